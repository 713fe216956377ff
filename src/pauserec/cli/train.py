"""`pauserec train` and `pauserec eval`: thin commands over pauserec.train (torch imported inside)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors


@handle_errors
def train(
    data: Path = typer.Option(..., "--data", help="Dataset directory (LC-Rec or MiniOneRec layout)."),
    index: str = typer.Option(None, "--index", help="SID index name (e.g. rkmeans_zcr); default: the one beside the data."),
    kind: str = typer.Option(..., "--kind", help="direct | pause | cot"),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    preset: str = typer.Option("small", "--preset", help="Model size: tiny (tests) | small (default)."),
    pause_k: int = typer.Option(5, "--pause-k", help="Number of <pause> tokens (pause kind)."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Wall-clock budget for the whole run."),
    epochs: int = typer.Option(None, "--epochs", help="SFT epochs (default: the preset's)."),
    seed: int = typer.Option(0, "--seed"),
    init_from: Path = typer.Option(
        None, "--init-from",
        help="Fine-tune a local HF checkpoint (Qwen2/Qwen3/Llama) instead of a preset from scratch; "
        "its default lr is 5e-5 (1e-4 for --grounding).",
    ),
    grounding: bool = typer.Option(False, "--grounding", help="First train SID<->title grounding."),
    pause_pretrain: bool = typer.Option(False, "--pause-pretrain", help="Pre-train the <pause> row alone first."),
    lr: float = typer.Option(
        None, "--lr",
        help="Peak learning rate, after a linear warm-up over the first 5% of each stage, then cosine decay. "
        "Default: the preset's from scratch (small 4e-3, tiny 6e-3); with --init-from 5e-5 for SFT and 1e-4 "
        "for --grounding (the PauseRec paper's fine-tuning rates). The card records the lr used.",
    ),
    batch_size: int = typer.Option(None, "--batch-size", help="Samples per batch (default: the preset's)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop SFT after this many optimizer steps (quick checks)."),
    threads: int = typer.Option(None, "--threads", help="torch threads (1 is fastest on a busy machine)."),
) -> None:
    """Train a direct, pause (PauseRec) or cot recommender and save a checkpoint.

    A run whose loss, gradients or weights become NaN/inf stops with exit code 2 and writes no checkpoint.
    """
    from pauserec.train.sft import TrainConfig
    from pauserec.train.sft import train as run

    cfg = TrainConfig(
        data=data, index=index, kind=kind, out=out, preset=preset, pause_k=pause_k, max_minutes=max_minutes,
        epochs=epochs, seed=seed, init_from=init_from, grounding=grounding, pause_pretrain=pause_pretrain,
        lr=lr, batch_size=batch_size, max_steps=max_steps, threads=threads, progress=True,
    )
    res = run(cfg)
    console.print(
        f"[bold green]saved[/] {res.out}: {res.steps} steps, {res.epochs:g} epochs, "
        f"final loss {res.final_loss:.4f}, {res.wall_time_s / 60:.1f} min"
    )


@handle_errors
def eval_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint directory written by `pauserec train`."),
    data: Path = typer.Option(..., "--data", help="Dataset directory."),
    index: str = typer.Option(None, "--index", help="SID index name (must be the checkpoint's)."),
    split: str = typer.Option("test", "--split", help="test | valid"),
    beams: int = typer.Option(20, "--beams", help="Beam width K."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N users."),
    batch_size: int = typer.Option(32, "--batch-size", help="Users per batch."),
    threads: int = typer.Option(None, "--threads", help="torch threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Hit/NDCG@5/10, invalid rate and the popularity baseline of a checkpoint (PyTorch reference)."""
    import torch

    from pauserec.train.reference import evaluate_checkpoint

    if threads:
        torch.set_num_threads(threads)
    m = evaluate_checkpoint(ckpt, data, index, split, beams, limit, batch_size, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"{m['kind']} on {m['dataset']} / {m['index']} ({m['split']}, {m['users']} users, K={beams})")
    for col in ("", "Hit@5", "NDCG@5", "Hit@10", "NDCG@10"):
        t.add_column(col)
    keys = ("hit@5", "ndcg@5", "hit@10", "ndcg@10")
    t.add_row("model", *(f"{m[k]:.4f}" for k in keys))
    t.add_row("model (SID level)", *(f"{m['sid_' + k]:.4f}" for k in keys))
    t.add_row("popularity", *(f"{m['popularity'][k]:.4f}" for k in keys))
    console.print(t)
    console.print(f"invalid rate {m['invalid_rate']:.4f} · {m['users_per_s']:.1f} users/s · {m['wall_time_s']:.1f} s")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(eval_cmd)
