"""`pauserec serve`: online recommendations over HTTP (pauserec.frontends.server)."""

from __future__ import annotations

from pathlib import Path

import typer

from pauserec.cli.common import KV_MEMORY_HELP, handle_errors
from pauserec.cli.common import kv_memory as parse_kv_memory


@handle_errors
def serve(
    engine: str = typer.Argument(..., help="Engine directory made by pauserec-export, or its URI (s3://, gs://, "
                                           "hdfs://, file://: copied once per machine into $PAUSEREC_CACHE)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    k: int = typer.Option(10, "--k", min=1, help="Items per request unless the request sends \"k\"."),
    beams: int = typer.Option(20, "--beams", min=1, help="Beam width of the trie-constrained search (>= any k)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Requests batched into one engine call."),
    kv_memory: str = typer.Option("auto", "--kv-memory", help=KV_MEMORY_HELP),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="How long the oldest waiting request "
                                      "waits for others before its batch starts."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Requests that may wait; more get 503."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads (default: the CPUs this process may use)."),
    spin: bool = typer.Option(False, "--spin", help="Intra-op threads busy-wait between operators (ONNX Runtime's "
                              "default): faster on a machine the server has to itself."),
    provider: str = typer.Option("auto", "--provider", help="auto|cpu|cuda|tensorrt"),
    admin_token: str = typer.Option(None, "--admin-token", envvar="PAUSEREC_ADMIN_TOKEN", show_envvar=True,
                                    help="Turns on the admin routes (catalog reload, rollback) for requests that "
                                    "send 'Authorization: Bearer TOKEN'. Off when not given."),
    exclude_history: bool = typer.Option(False, "--exclude-history", help="Never recommend a user's own history items."),
    exclude_file: Path = typer.Option(None, "--exclude-file", help="Item ids never recommended, one per line."),
    drain_s: float = typer.Option(30.0, "--drain-s", min=0, help="At SIGTERM, how long requests in flight may take."),
) -> None:
    """Serve recommendations over HTTP: POST /recommend, GET /health, GET /metrics (pip install 'pauserec\\[serve]')."""
    from pauserec.frontends.server import ServeConfig, read_exclude_file, serve as run

    run(ServeConfig(engine=engine, host=host, port=port, k=k, beams=beams, max_batch=max_batch,
                    kv_memory=parse_kv_memory(kv_memory), max_wait_ms=max_wait_ms, max_queue=max_queue, threads=threads, spin=spin, provider=provider,
                    admin_token=admin_token, exclude_history=exclude_history,
                    exclude=read_exclude_file(exclude_file), drain_s=drain_s))
