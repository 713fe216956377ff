"""`pauserec recommend`: the batch job over JSONL/Parquet (pauserec.frontends.batch; --ray: pauserec.frontends.ray_job)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from pauserec.cli.common import KV_MEMORY_HELP, console, handle_errors
from pauserec.cli.common import kv_memory as parse_kv_memory


@handle_errors
def recommend(
    engine: str = typer.Argument(..., help="Engine directory made by pauserec-export, or its URI (s3://, gs://, "
                                           "hdfs://, file://: copied once per machine into $PAUSEREC_CACHE)."),
    input: Path = typer.Option(..., "--input", "-i", help="users.jsonl or users.parquet (user_id, history)."),
    output: Path = typer.Option(..., "--output", "-o", help="recs.jsonl or recs.parquet."),
    errors: Path = typer.Option(None, "--errors", help="Rejected rows (default: the output's name without its "
                                "suffix + .errors.jsonl)."),
    k: int = typer.Option(10, "--k", help="Items per user."),
    beams: int = typer.Option(20, "--beams", help="Beam width of the trie-constrained search (>= --k)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Users per batch (and per crash-safe part)."),
    kv_memory: str = typer.Option("auto", "--kv-memory", help=KV_MEMORY_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same job."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output or discard an interrupted run."),
    unique: bool = typer.Option(False, "--unique", help="A repeated user id is an error row (default: kept, counted)."),
    exclude_history: bool = typer.Option(False, "--exclude-history", help="Never recommend a user's own history items."),
    exclude_file: Path = typer.Option(None, "--exclude-file", help="Item ids never recommended, one per line."),
    user_field: str = typer.Option("user_id", "--user-field", help="Input field of the user id."),
    history_field: str = typer.Option("history", "--history-field", help="Input field of the history."),
    provider: str = typer.Option("auto", "--provider", help="auto|cpu|cuda|tensorrt"),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads (default: the CPUs this process may use; "
                                "with --ray: CPUs per actor)."),
    spin: bool = typer.Option(False, "--spin", help="Local runs: intra-op threads busy-wait between operators (ONNX "
                              "Runtime's default; faster on a machine the job has to itself)."),
    ray: bool = typer.Option(False, "--ray", help="Run on a Ray cluster (pip install 'pauserec\\[ray]')."),
    address: str = typer.Option(None, "--address", help="With --ray: a running cluster (default: RAY_ADDRESS, else "
                                "a local one)."),
    concurrency: int = typer.Option(None, "--concurrency", help="With --ray: actors, one engine each (default: as "
                                    "many as the nodes hold)."),
) -> None:
    """Recommend items for every user of a JSONL/Parquet file; bad rows go to an errors file."""
    from pauserec.frontends.batch import BatchConfig

    cfg = BatchConfig(input=input, output=output, errors=errors, k=k, beams=beams, batch_size=batch_size,
                      kv_memory=parse_kv_memory(kv_memory), resume=resume, overwrite=overwrite, unique=unique,
                      user_field=user_field, history_field=history_field, exclude_history=exclude_history, exclude_file=exclude_file)
    with _progress_bar(cfg) as progress:
        if ray:
            report = _run_ray(cfg, engine, address, concurrency, threads, provider, progress)
        else:
            report = _run_local(cfg, engine, provider, threads, progress, spin)
    _print(report)


@contextmanager
def _progress_bar(cfg):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pauserec.frontends.batch import count_rows

    columns = (TextColumn("recommend"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} users/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("recommend", total=count_rows(cfg), rate="-")

        def progress(n: int) -> None:
            bar.advance(task, n)
            t = bar.tasks[0]
            if t.elapsed:
                bar.update(task, rate=f"{t.completed / t.elapsed:,.0f}")

        yield progress


def _run_local(cfg, engine: str, provider: str, threads: int | None, progress, spin: bool = False):
    from pauserec.runtime import Engine, Recommender
    from pauserec.frontends.batch import run_batch

    rec = Recommender(Engine.load(engine, provider=provider, threads=threads, spin=spin), batch_size=cfg.batch_size,
                      kv_memory=cfg.kv_memory)
    return run_batch(cfg, rec, progress=progress)


def _run_ray(cfg, engine: str, address: str | None, concurrency: int | None, threads: int | None, provider: str,
             progress):
    from pauserec.errors import BackendUnavailable

    try:
        import ray  # noqa: F401
    except ImportError:
        raise BackendUnavailable("--ray needs Ray: pip install 'pauserec[ray]'") from None
    from pauserec.frontends.ray_job import run_ray

    return run_ray(cfg, engine, address=address, concurrency=concurrency, threads=threads,
                   provider=provider, progress=progress,
                   warn=lambda msg: console.print(f"[yellow]{msg}[/yellow]"))


def _print(report) -> None:
    if report.already_complete:
        console.print(f"the job is complete already (--resume): {report.ok:,} users recommended, "
                      f"{report.errors:,} rejected\n  summary: {report.summary_file}")
        return
    extra = [f"{report.skipped_done:,} already done" if report.skipped_done else "",
             f"{report.duplicates:,} repeated user ids" if report.duplicates else "",
             f"{report.truncated:,} histories truncated" if report.truncated else ""]
    console.print(
        f"{report.ok:,} users recommended, {report.errors:,} rejected"
        + (f" ({', '.join(f'{k}: {v}' for k, v in report.reasons.items())})" if report.reasons else "")
        + "".join(f", {e}" for e in extra if e)
        + f" in {report.seconds:.1f}s\n  output: {report.output}\n  errors: {report.errors_file}"
        + f"\n  summary: {report.summary_file}"
    )
