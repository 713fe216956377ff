"""`pauserec-bench`: measurements, each a thin command over a pauserec.bench function."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pauserec.cli.common import console, err_console, handle_errors

app = typer.Typer(
    name="pauserec-bench",
    help="Measure pauserec: kernels, latency and quality of PauseRec vs CoT vs direct models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Measure pauserec: kernels, latency and quality of PauseRec vs CoT vs direct models."""


@app.command()
@handle_errors
def kernel(
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
    repeats: int = typer.Option(7, "--repeats", min=1, help="Timed samples per implementation and cell."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON result to this file."),
) -> None:
    """Trie-masked top-k: NumPy reference vs native CPU (and CUDA when usable), B in {1,16,64}, K in {10,20,50}."""
    from pauserec.bench.kernel import KernelBenchConfig, kernel_table, run_kernel_bench, summary_lines

    progress = None if json_out else (lambda msg: err_console.print(f"[dim]measuring {msg}[/]", highlight=False))
    result = run_kernel_bench(KernelBenchConfig(repeats=repeats), progress=progress)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if json_out:
        typer.echo(text)
        return
    console.print(kernel_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    if out is not None:
        console.print(f"wrote {out}", highlight=False)
