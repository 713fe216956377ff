"""`pauserec demo`: train, export and benchmark direct / pause / CoT models end to end."""

from __future__ import annotations

from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors


@handle_errors
def demo(
    data: Path = typer.Option(None, "--data", help="A dataset folder; default: a seeded synthetic dataset."),
    index: str = typer.Option(None, "--index", help="SID index name (datasets with several indexes)."),
    out: Path = typer.Option(Path("pauserec-demo"), "--out", help="Where checkpoints, engines and the report go."),
    preset: str = typer.Option("tiny", "--preset", help="Model size: tiny (minutes) or small."),
    train_minutes: float = typer.Option(1.5, "--train-minutes", help="Training budget per model."),
    quality_users: int = typer.Option(500, "--quality-users", help="Test users to evaluate (0: all)."),
    no_hf: bool = typer.Option(False, "--no-hf-baseline", help="Skip the HF generate baseline."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
) -> None:
    """The main job on a fresh machine: no downloads, a few minutes on 2 cores."""
    from pauserec.bench.demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=out, data=data, index=index, preset=preset, train_minutes=train_minutes,
                        quality_users=quality_users or None, hf_baseline=not no_hf, force=force), console)
