"""`pauserec train` and `pauserec eval`: thin commands over pauserec.train (torch imported inside)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors


@handle_errors
def train(
    data: Path = typer.Option(..., "--data", help="Dataset directory (LC-Rec, MiniOneRec or OneRec-Think layout)."),
    index: str = typer.Option(None, "--index", help="SID index: a name (e.g. rkmeans_zcr) or a NAME.index.json file; "
                              "default: the one beside the data."),
    kind: str = typer.Option(..., "--kind", help="direct | pause | cot"),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    preset: str = typer.Option("small", "--preset", help="Model size: tiny (tests) | small (default)."),
    layers: int = typer.Option(None, "--layers", help="Transformer layers of a model trained from scratch "
                               "(default: the preset's)."),
    pause_k: int = typer.Option(5, "--pause-k", help="Number of pause tokens (pause kind)."),
    max_minutes: float = typer.Option(
        None, "--max-minutes", help="Wall-clock ceiling for the whole run (validation picks the saved weights)."),
    epochs: int = typer.Option(None, "--epochs", help="Most SFT epochs (default: the preset's; early stopping "
                               "usually ends the run first)."),
    seed: int = typer.Option(0, "--seed"),
    init_from: Path = typer.Option(
        None, "--init-from",
        help="Fine-tune a local HF checkpoint (Qwen2/Qwen3/Llama) instead of a preset from scratch; "
        "its default lr is 5e-5 (1e-4 for --grounding).",
    ),
    prompt: str = typer.Option(
        None, "--prompt",
        help="With --init-from: train in the checkpoint's own prompt layout, a preset (minionerec, lc-rec[:N], "
        "onerec-think, pauserec) or a JSON layout file, in its SID spelling and tokenisation, resolved as "
        "pauserec-export resolves it. --kind pause: the layout's pause token (<pause> if it names none) is added when "
        "missing (its row starts at the mean embedding) and the pauses go where its pause template puts them; a "
        "layout with only a direct template (minionerec, lc-rec) gets them at the very end of it, right before the "
        "first SID token. The SID tokens must already be in the checkpoint. Export the result with "
        "`pauserec-export OUT --prompt` the same layout, and no other flag.",
    ),
    items: Path = typer.Option(None, "--items", help="With --prompt: item fields the layout renders (titles): LC-Rec "
                               ".item.json or MiniOneRec info .txt (kept in the checkpoint for the export)."),
    lora: int = typer.Option(
        None, "--lora", help="With --prompt: train LoRA adapters of rank R (alpha 2R) on every attention/MLP "
        "projection plus the pause token's embedding row, the rest frozen; the adapters are merged into the saved "
        "weights (a complete checkpoint: export needs no --base). Less optimizer memory at 1.7B."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute activations in the backward pass: less memory for "
        "long prompts or big models, about a third more compute."),
    grounding: bool = typer.Option(False, "--grounding", help="First train SID<->title grounding."),
    pause_pretrain: bool = typer.Option(False, "--pause-pretrain", help="Pre-train the <pause> row alone first."),
    lr: float = typer.Option(
        None, "--lr",
        help="Peak learning rate, after a linear warm-up (--warmup-steps), then cosine decay to 0.1x (--decay-epochs). "
        "Default: the preset's from scratch (small 4e-3, tiny 6e-3); with --init-from 5e-5 for SFT and 1e-4 "
        "for --grounding (the PauseRec paper's fine-tuning rates). The card records the lr used.",
    ),
    batch_size: int = typer.Option(None, "--batch-size", help="Samples per batch (default: the preset's)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop SFT after this many optimizer steps (quick checks)."),
    threads: int = typer.Option(None, "--threads", help="torch threads (1 is fastest on a busy machine)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay on matrices (default: the preset's)."),
    dropout: float = typer.Option(None, "--dropout", help="Residual dropout while training (default: the preset's)."),
    warmup_steps: int = typer.Option(None, "--warmup-steps", help="Linear lr warm-up steps (default: the preset's)."),
    decay_epochs: float = typer.Option(
        None, "--decay-epochs", help="Epochs of cosine lr decay to 0.1x the peak, then constant (default: the preset's)."),
    val_users: int = typer.Option(
        None, "--val-users", help="Validation users (fixed seeded sample of the valid split) ranked at every evaluation; "
        "0 turns validation off and saves the last weights (default: the preset's, small 500)."),
    val_every: int = typer.Option(
        None, "--val-every", help="Evaluate every N steps (default: at epoch ends, as often as --val-share allows)."),
    val_share: float = typer.Option(
        0.10, "--val-share", help="Epoch-end evaluations are skipped while validation would exceed this share of "
        "the training time."),
    patience: int = typer.Option(5, "--patience", help="Stop after this many evaluations without a gain."),
    val_metric: str = typer.Option("ndcg@10", "--val-metric", help="Selection metric: hit@5 | ndcg@5 | hit@10 | ndcg@10."),
    val_beams: int = typer.Option(20, "--val-beams", help="Beam width of the validation search."),
    snapshots: bool = typer.Option(
        False, "--snapshots", help="Also keep the weights of every evaluation in OUT/snapshots/step-N.pt (budget sweeps: "
        "past --decay-epochs the lr schedule does not depend on --epochs, so a run capped at E epochs ends on the "
        "epoch-E snapshot). Each snapshot is as large as the fp32 weights (about 2.4 GB at Qwen3-0.6B size)."),
    sid_share: float = typer.Option(
        None, "--sid-share", help="cot: share of each sample's loss on its SID tokens, the rationale and </think> "
        "carrying the rest; 0: every labelled token weighs the same (default: the preset's, tiny 0.8, small 0)."),
) -> None:
    """Train a direct, pause (PauseRec) or cot recommender and save its best checkpoint.

    Validation (exact constrained search on --val-users users) runs every epoch; the saved weights are the best
    evaluation's, the run stops after --patience evaluations without a gain, and curve.png (with matplotlib) and
    the training card record the curve. A run whose loss, gradients or weights become NaN/inf stops with exit
    code 2 and writes no checkpoint.
    """
    from pauserec.train.sft import TrainConfig
    from pauserec.train.sft import train as run

    cfg = TrainConfig(
        data=data, index=index, kind=kind, out=out, preset=preset, layers=layers, pause_k=pause_k, max_minutes=max_minutes,
        epochs=epochs, seed=seed, init_from=init_from, grounding=grounding, pause_pretrain=pause_pretrain,
        lr=lr, batch_size=batch_size, max_steps=max_steps, threads=threads, progress=True,
        weight_decay=weight_decay, dropout=dropout, warmup_steps=warmup_steps, decay_epochs=decay_epochs,
        val_users=val_users, val_every=val_every, val_share=val_share, patience=patience, val_metric=val_metric, val_beams=val_beams,
        snapshots=snapshots, prompt=prompt, items=items, lora=lora, gradient_checkpointing=gradient_checkpointing,
        sid_share=sid_share,
    )
    res = run(cfg)
    console.print(
        f"[bold green]saved[/] {res.out}: {res.steps} steps, {res.epochs:g} epochs, "
        f"final loss {res.final_loss:.4f}, {res.wall_time_s / 60:.1f} min", highlight=False,
    )
    v = res.validation
    if v is not None:
        console.print(f"{v['stop_detail']}; validation took {100 * (v['share_of_sft_time'] or 0):.1f} % of the "
                      f"training time ({v['users']} users)", highlight=False)


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
