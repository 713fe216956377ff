"""`pauserec recommend`: the batch job over JSONL/Parquet (see pauserec.runtime.batch)."""

from __future__ import annotations

from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors


@handle_errors
def recommend(
    engine: Path = typer.Argument(..., help="Engine directory made by pauserec-export."),
    input: Path = typer.Option(..., "--input", "-i", help="users.jsonl or users.parquet (user_id, history)."),
    output: Path = typer.Option(..., "--output", "-o", help="recs.jsonl or recs.parquet."),
    errors: Path = typer.Option(None, "--errors", help="Rejected rows (default: <output>.errors.jsonl)."),
    k: int = typer.Option(10, "--k", help="Items per user."),
    beams: int = typer.Option(20, "--beams", help="Beam width of the trie-constrained search."),
    batch_size: int = typer.Option(64, "--batch-size", help="Users per batch (and per crash-safe part)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    provider: str = typer.Option("auto", "--provider", help="auto|cpu|cuda|tensorrt"),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads (default: all cores)."),
) -> None:
    """Recommend items for every user of a JSONL/Parquet file; bad rows go to an errors file."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.batch import BatchConfig, count_rows, run_batch

    cfg = BatchConfig(input=input, output=output, errors=errors, k=k, beams=beams,
                      batch_size=batch_size, resume=resume, overwrite=overwrite)
    eng = Engine.load(engine, provider=provider, threads=threads)
    rec = Recommender(eng)
    prefixes = eng.catalog.token_prefixes

    def sid_text(codes) -> str:
        return "".join(f"<{p}_{int(c)}>" for p, c in zip(prefixes, codes))

    columns = (TextColumn("recommend"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} users/s"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("recommend", total=count_rows(cfg), rate="-")

        def progress(n: int) -> None:
            bar.advance(task, n)
            t = bar.tasks[0]
            if t.elapsed:
                bar.update(task, rate=f"{t.completed / t.elapsed:,.0f}")

        report = run_batch(cfg, rec, sid_text=sid_text, progress=progress)
    console.print(
        f"{report.ok:,} users recommended, {report.errors:,} rejected"
        + (f" ({', '.join(f'{k}: {v}' for k, v in report.reasons.items())})" if report.reasons else "")
        + (f", {report.skipped_done:,} already done" if report.skipped_done else "")
        + f" in {report.seconds:.1f}s\n  output: {report.output}\n  errors: {report.errors_file}"
    )
