"""Supervised fine-tuning of direct, pause and cot recommenders (torch, transformers).

Every sample uses the one template of ``PromptSpec``::

    ids    = prompt_ids(history) [+ rationale + </think>  (cot)] + target SID (L tokens)
    labels = -100 on the prompt (instruction, history, <think>, pauses, </think> of direct/pause),
             the token itself on the target SID (and on rationale + </think> for cot); -100 on padding

Optional stages before SFT (paper §2.3, behind flags):

* grounding: SID -> title and title -> SID sequences for every item (all weights train);
* pause pre-training: the grounding sequences with ``<pause>`` inserted at ~10 % of positions; the
  network is frozen and only the ``<pause>`` embedding row trains (lr 1e-3).

cot: with ``sid_share`` (``--sid-share``, else the preset's) the SID tokens carry that share of each sample's loss
and the rationale the rest; without it every labelled token weighs the same (the rationale then dominates).

The ``<pause>`` row starts at the mean of all embedding rows. AdamW (weight decay on matrices), a
learning-rate schedule by steps (linear warm-up, cosine decay to 0.1x over the preset's ``decay_epochs``,
then constant; ``pauserec.train.optim``), residual dropout, gradient clipping at 1.0, length-bucketed
batches. Without a time budget the trajectory (the weights after every step) is bit-for-bit reproducible
from its seed; so is the saved checkpoint when the evaluation points are fixed (``val_every``).

Validation (``pauserec.train.validation``): at the end of every epoch (skipping epoch ends while
validation would take more than ``val_share``, 10 %, of the training time so far) or every ``val_every``
steps, the model ranks a fixed seeded sample of the validation split (``val_users``, exact constrained
beam search); the best weights by ``val_metric`` are kept, the run stops after ``patience`` evaluations
without a gain, and the checkpoint holds the best weights. ``--epochs`` and ``--max-minutes`` are
ceilings; the card records the curve, the chosen epoch and why the run stopped; ``curve.png`` is written
beside it when matplotlib is installed. Every evaluation, the first and the last too, must fit the time
allowed (``_eval_allowance``: ``val_share`` of the budget, or of the training so far, at least 10 s, and
with ``--max-minutes`` never past the budget plus that share): before the first, a few users are timed and
the sample is cut to what fits (a big model on a CPU); one that still does not fit is skipped, and the card
says so.

Peak learning rates: ``--lr`` when given; else, from scratch, the preset's (4e-3 / 6e-3); else, when
fine-tuning a pretrained ``--init-from`` model, the PauseRec paper's 5e-5 for SFT and 1e-4 for the
grounding (CPT) stage. The card records the peak of every stage.

Training never saves a broken model: a non-finite loss or gradient norm stops the run at that step,
and the weights are checked after loading, after the vocabulary is extended and after every stage
(``TrainError``, or ``CheckpointError`` for a broken ``--init-from`` checkpoint).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pauserec.prompt.spec import KINDS, TrainingCard
from pauserec.errors import CheckpointError, DataError, PauserecError, TrainError
from pauserec.train import tokenizer as tk
from pauserec.train.model import (
    build_model,
    cache_kwargs,
    check_architecture,
    get_preset,
    load_model,
    output_cache,
    save_checkpoint,
)
from pauserec.train.optim import FLOOR, lr_at, make_optimizer, residual_dropout
from pauserec.train.samples import (  # noqa: F401  (re-exported: the samples used to live here)
    IGNORE,
    PAUSE_RATE,
    collate,
    encode_sample,
    encode_split,
    grounding_samples,
    insert_pauses,
    length_batches,
    sid_share_weights,
)
from pauserec.train.validation import (
    SNAPSHOTS_DIR,
    Validation,
    ValidationConfig,
    build_validation,
    validation_record,
    write_curve,
)

GROUNDING_SHARE, PAUSE_PRETRAIN_SHARE = 0.15, 0.05  # of the time budget
PAUSE_LR = 1e-3
FINETUNE_LR, FINETUNE_GROUNDING_LR = 5e-5, 1e-4  # --init-from without --lr (PauseRec: SFT 5e-5, CPT 1e-4)
WARMUP = 0.05  # grounding / pause pre-training: share of the stage's steps spent warming the lr up


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    index: str | None
    kind: str
    out: Path
    preset: str = "small"
    layers: int | None = None  # transformer layers (None: the preset's); from scratch only
    pause_k: int = 5
    max_minutes: float | None = None
    epochs: int | None = None  # None: the preset's
    seed: int = 0
    init_from: Path | None = None
    grounding: bool = False
    pause_pretrain: bool = False
    lr: float | None = None  # None: the preset's (from scratch) or FINETUNE_LR (--init-from)
    batch_size: int | None = None
    max_steps: int | None = None
    max_history: int = 20
    max_rationale: int = 64
    threads: int | None = None  # torch intra-op threads (None: torch's default); 1 is fastest on a busy machine
    progress: bool = False
    weight_decay: float | None = None  # None: the preset's
    dropout: float | None = None  # None: the preset's
    warmup_steps: int | None = None  # None: the preset's
    decay_epochs: float | None = None  # None: the preset's
    val_users: int | None = None  # validation sample; None: the preset's; 0: no validation (last weights saved)
    val_every: int | None = None  # steps between evaluations; None: at epoch ends, within val_share
    val_share: float = 0.10  # epoch-end evaluations are skipped while validation would exceed this share of training
    patience: int = 5  # evaluations without a gain before stopping (500 users are noisy: 3 stopped pause too soon)
    val_metric: str = "ndcg@10"
    val_beams: int = 20
    plot: bool = True  # curve.png beside the checkpoint (needs matplotlib; never fails the run)
    snapshots: bool = False  # also keep every evaluation's weights in out/snapshots/ (budget sweeps)
    prompt: str | None = None  # --init-from only: the checkpoint's own prompt layout (pauserec.train.prompted)
    items: Path | None = None  # with prompt: item fields the layout renders (titles)
    lora: int | None = None  # with prompt: LoRA rank (adapters + the pause row train; merged before saving)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more compute)
    sid_share: float | None = None  # cot: share of each sample's loss on its SID; None: the preset's; 0: token mean


@dataclass
class TrainResult:
    out: Path
    steps: int
    epochs: float
    final_loss: float
    wall_time_s: float
    losses: list[float] = field(default_factory=list, repr=False)
    stages: dict = field(default_factory=dict)
    model: object = field(default=None, repr=False)  # the trained model (eval mode), as saved
    validation: dict | None = None  # the card's validation record (curve, chosen epoch, stop reason)


# -- samples (pauserec.train.samples) and the loss --------------------------------------------------
def masked_loss(model, ids, mask, labels, inputs_embeds=None, prefix_len: int = 0, think_end_id: int = -1,
                sid_share: float | None = None):
    """Mean next-token NLL (full-vocabulary softmax) over labelled positions -> (loss, n_labels).

    ``sid_share`` (cot, with ``think_end_id``): a weighted mean instead, in which the labels after ``</think>``
    (the SID) carry that share of every row's loss and the rationale + ``</think>`` the rest
    (``samples.sid_share_weights``); otherwise ~37 rationale labels outvote the 4 SID labels.

    ``prefix_len > 0``: the first ``prefix_len`` tokens (the constant instruction) are the same in
    every row and unlabelled; they are run once and their KV is shared by the batch (same result,
    less compute). The logits are only computed where a label is.
    """
    import torch
    import torch.nn.functional as F

    target = labels[:, 1:]  # (B, T-1): label of the token predicted at position t
    sel = target != IGNORE
    if inputs_embeds is not None or prefix_len <= 0:
        kwargs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
        hidden = model.model(attention_mask=mask, use_cache=False, **kwargs).last_hidden_state  # (B, T, H)
    else:
        B, T = ids.shape
        cache = output_cache(model.model(input_ids=ids[:1, :prefix_len], use_cache=True))  # (1, P) prefix
        cache.batch_repeat_interleave(B)
        pos = torch.arange(prefix_len, T).expand(B, -1)  # (B, T-P)
        rest = model.model(
            input_ids=ids[:, prefix_len:], attention_mask=mask, position_ids=pos, use_cache=True,
            **cache_kwargs(model.model, cache),
        ).last_hidden_state  # (B, T-P, H)
        hidden = torch.cat([rest.new_zeros(B, prefix_len, rest.shape[-1]), rest], dim=1)  # prefix rows: no labels
    logits = model.lm_head(hidden[:, :-1][sel])  # (N, V) only where a label is
    if sid_share is None or think_end_id < 0:
        return F.cross_entropy(logits.float(), target[sel]), int(sel.sum())
    w = sid_share_weights(target, think_end_id, sid_share)[sel]  # cot: the SID's share of every row's loss
    nll = F.cross_entropy(logits.float(), target[sel], reduction="none")
    return (w * nll).sum() / w.sum(), int(sel.sum())


# -- the loop ----------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    samples: list
    epochs: int
    lr: float
    batch_size: int
    budget_s: float | None
    max_steps: int | None = None
    pause_only: int | None = None  # pause token id: freeze everything but its embedding row
    lora: bool = False  # the model carries peft adapters: train them (and pause_row, if set) only
    pause_row: int | None = None  # with lora: the pause token id whose embedding row trains as its own vector
    prefix_len: int = 0  # every sample starts with these same unlabelled tokens (the instruction)
    weight_decay: float = 0.01
    dropout: float = 0.0
    warmup_steps: int | None = None  # None: WARMUP of the planned steps
    decay_steps: int | None = None  # None: the planned steps
    validate: Validation | None = None  # evaluates, keeps the best weights, says when to stop
    val_every: int | None = None  # steps between validate calls; None: at the end of every epoch (see _eval_due)
    val_share: float = 0.10  # with val_every None: most validation time as a share of the training time
    think_end_id: int = -1  # cot: with sid_share, the SID's labels are those after this one
    sid_share: float | None = None  # cot: share of each row's loss on the SID (None: every label weighs the same)


def _trainable(model, stage: Stage):
    """(parameters to optimise, the separate <pause> vector or None); freezes the rest for pause_only."""
    import torch

    emb = model.get_input_embeddings()
    if stage.lora:  # peft froze the base: the adapters, plus the pause row as a vector of its own
        params = [p for p in model.parameters() if p.requires_grad]
        if stage.pause_row is None:
            return params, None
        pause_vec = torch.nn.Parameter(emb.weight[stage.pause_row].detach().clone())
        return [*params, pause_vec], pause_vec
    if stage.pause_only is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters()), None
    for p in model.parameters():
        p.requires_grad_(False)
    pause_vec = torch.nn.Parameter(emb.weight[stage.pause_only].detach().clone())
    return [pause_vec], pause_vec


def _planned_steps(stage: Stage, per_epoch: int) -> int:
    planned = stage.epochs * per_epoch
    return planned if stage.max_steps is None else min(planned, stage.max_steps)


MIN_EVAL_S = 10.0  # an evaluation may always take this long, however short the training so far


def _eval_allowance(stage: Stage, val_s: float, t0: float) -> float:
    """Seconds the next evaluation may take: ``val_share`` of the time budget (or, without one, of the training
    time so far), at least MIN_EVAL_S; with a budget, never past ``budget + that share``, so --max-minutes
    bounds validation too (the last evaluation included)."""
    elapsed = time.perf_counter() - t0
    share = max(stage.val_share * (stage.budget_s or (elapsed - val_s)), MIN_EVAL_S)
    if stage.budget_s:
        return min(share, stage.budget_s + share - elapsed)
    return share


def _eval_due(stage: Stage, val_s: float, t0: float, last_eval: int) -> bool:
    """Epoch-end evaluation unless it would push validation over ``val_share`` of the training time so far.

    The first evaluation always runs; later ones are skipped (to the next epoch end) while the validation
    time so far plus one more evaluation exceeds the share, so cheap epochs are evaluated every few epochs.
    """
    if last_eval == 0:
        return True
    train_s = time.perf_counter() - t0 - val_s
    per_eval = val_s / max(stage.validate.evaluations, 1)
    return val_s + per_eval <= stage.val_share * train_s


def run_stage(model, stage: Stage, pad_id: int, rng, progress=None) -> dict:
    """Train on ``stage.samples``; returns steps, epochs done, losses, wall time and why it stopped."""
    import torch

    emb = model.get_input_embeddings()
    params, pause_vec = _trainable(model, stage)
    row = stage.pause_only if stage.pause_only is not None else stage.pause_row  # the row pause_vec stands for

    def sync_pause_row() -> None:  # the embedding row := the vector trained for it
        if pause_vec is not None:
            with torch.no_grad():
                emb.weight[row] = pause_vec.detach()
    opt = make_optimizer(params, stage.lr, stage.weight_decay)
    lengths = np.array([len(x) for x, _ in stage.samples])
    per_epoch = math.ceil(len(lengths) / stage.batch_size)
    planned = _planned_steps(stage, per_epoch)
    warmup = stage.warmup_steps if stage.warmup_steps is not None else int(WARMUP * planned)
    decay = min(stage.decay_steps or planned, planned)
    task = progress.add_task(stage.name, total=planned, loss=float("nan"), tps=0.0, val="") if progress else None
    model.train()
    losses, step, tokens, t0, val_s, last_eval = [], 0, 0, time.perf_counter(), 0.0, 0
    cpu0, stop_reason = time.process_time(), None

    def evaluate() -> bool:
        nonlocal val_s, last_eval
        tv = time.perf_counter()
        sync_pause_row()
        if not stage.validate.fits(model, _eval_allowance(stage, val_s, t0)):
            val_s += time.perf_counter() - tv
            if progress:
                progress.update(task, val=f"validation skipped: over the time allowed ({stage.validate.skipped})")
            return False
        point = {"step": step, "epoch": round(step / per_epoch, 3), "lr": lr,
                 "train_loss": float(np.mean(losses[last_eval:])) if step > last_eval else float("nan")}
        stop = stage.validate(model, point, progress, task)
        val_s, last_eval = val_s + time.perf_counter() - tv, step
        return stop

    with residual_dropout(model, stage.dropout if stage.pause_only is None else 0.0):
        for epoch in range(stage.epochs):
            for idx in length_batches(lengths, stage.batch_size, rng):
                ids, mask, labels = collate([stage.samples[i] for i in idx], pad_id)
                embeds = None
                if pause_vec is not None:
                    with torch.no_grad():
                        embeds = emb(ids)
                    embeds = torch.where((ids == row)[..., None], pause_vec, embeds)
                elapsed = time.perf_counter() - t0
                lr = lr_at(step, stage.lr, warmup, decay, elapsed / stage.budget_s if stage.budget_s else 0.0)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss, _ = masked_loss(model, ids, mask, labels, embeds, stage.prefix_len, stage.think_end_id,
                                      stage.sid_share)
                _require_finite(loss, "loss", stage, step + 1, lr)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _require_finite(torch.nn.utils.clip_grad_norm_(params, 1.0), "gradient norm", stage, step + 1, lr)
                opt.step()
                step, tokens = step + 1, tokens + int(mask.sum())
                losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t0
                if progress:
                    progress.update(task, completed=step, loss=np.mean(losses[-50:]), tps=tokens / max(elapsed - val_s, 1e-9))
                if stage.validate and stage.val_every and step % stage.val_every == 0 and evaluate():
                    stop_reason = "early_stopping"
                elif stage.budget_s and elapsed >= stage.budget_s:
                    stop_reason = "time_budget"
                elif step >= planned:
                    stop_reason = "max_steps" if stage.max_steps is not None and step >= stage.max_steps else "epochs"
                if stop_reason:
                    break
            if not stop_reason and stage.validate and not stage.val_every and _eval_due(stage, val_s, t0, last_eval) \
                    and evaluate():
                stop_reason = "early_stopping"
            if stop_reason:
                break
        stop_reason = stop_reason or "epochs"
        if stage.validate and last_eval != step and stop_reason != "early_stopping":
            evaluate()  # the last weights get their evaluation too
    sync_pause_row()
    if stage.pause_only is not None:
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()
    if stage.validate:
        stage.validate.restore(model)
    require_finite_weights(model, f"after stage {stage.name} ({step} steps, peak lr {stage.lr:g})", _lower_lr(stage))
    wall = time.perf_counter() - t0
    return {
        "lr": stage.lr,
        "weight_decay": stage.weight_decay,
        "dropout": stage.dropout if stage.pause_only is None else 0.0,
        "warmup_steps": warmup,
        "decay_steps": decay,
        "steps": step,
        "steps_per_epoch": per_epoch,
        "epochs": round(step / per_epoch, 3),
        "samples": len(lengths),
        "tokens": tokens,
        "stop_reason": stop_reason,
        "wall_time_s": round(wall, 2),
        "validation_time_s": round(val_s, 2),
        "cpu_time_s": round(time.process_time() - cpu0, 2),
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "first_loss": float(np.mean(losses[:10])) if losses else float("nan"),
        "losses": losses,
    }


def _lower_lr(stage: Stage) -> str:
    """What to do when a stage goes non-finite (one sentence)."""
    if stage.pause_only is not None:
        return f"The <pause> pre-training lr is fixed at {PAUSE_LR:g}; run without --pause-pretrain"
    return (
        f"Lower the learning rate with --lr (this stage's peak was {stage.lr:g}; fine-tuning a pretrained "
        f"--init-from model usually needs about {FINETUNE_LR:g})"
    )


def _require_finite(value, what: str, stage: Stage, step: int, lr: float) -> None:
    """TrainError unless the scalar tensor ``value`` (loss, gradient norm) is finite."""
    value = float(value.detach())
    if math.isfinite(value):
        return
    raise TrainError(
        f"stage {stage.name}: the {what} is {value} at step {step} (lr {lr:.3g}); training stopped and "
        f"no checkpoint was written. {_lower_lr(stage)}; if it fails at step 1 whatever the lr, check that the "
        "starting weights and the data are sound"
    )


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (tied weights are listed once)."""
    import torch

    with torch.no_grad():
        return [name for name, p in model.named_parameters() if not bool(p.isfinite().all())]


def require_finite_weights(model, when: str, advice: str, error: type[PauserecError] = TrainError) -> None:
    """``error`` naming the non-finite parameters, if any."""
    bad = nonfinite_parameters(model)
    if bad:
        total = len(list(model.parameters()))
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise error(
            f"NaN or inf weights {when}, in {len(bad)} of {total} tensors ({shown}); no checkpoint was written. {advice}"
        )


def _progress_bar():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("{task.fields[val]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


# -- model + tokenizer ---------------------------------------------------------------------------------
def init_pause_embedding(model, pause_id: int) -> None:
    """Set the ``<pause>`` row to the mean of all input embedding rows."""
    import torch

    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[pause_id] = w.mean(dim=0)


def fill_zero_rows(model) -> int:
    """Give every all-zero input embedding row the mean of the other rows, and drop ``padding_idx``; returns the
    number of rows filled.

    ``nn.Embedding(padding_idx=pad)`` zeroes the pad row of a model built from its config (Qwen's pad is its
    eos, ``<|endoftext|>``). A position whose input row is zero keeps an all-zero hidden state through every
    layer (it attends to itself), and each RMSNorm's gradient at zero is ``1/sqrt(eps)`` (1000 at 1e-6): through
    28 layers the gradient overflows, and every gradient of the step is NaN. Trained checkpoints seldom have
    such rows; bases built from configs always do.
    """
    import torch

    emb = model.get_input_embeddings()
    emb.padding_idx = None
    with torch.no_grad():
        w = emb.weight
        zero = ~w.detach().ne(0).any(dim=1)
        n = int(zero.sum())
        if n and n < len(w):
            w[zero] = w[~zero].mean(dim=0)
    return n


def prepare(cfg: TrainConfig, dataset):
    """(model, tokenizer, pad, eos) for a config: a preset from scratch or an extended local checkpoint."""
    import torch

    preset = get_preset(cfg.preset)
    if cfg.init_from is not None:
        check_architecture(cfg.init_from)
        tok, pad, eos = tk.extend_tokenizer(cfg.init_from, dataset.catalog)
        torch.manual_seed(cfg.seed)
        model = load_model(cfg.init_from)
        require_finite_weights(
            model, f"in the --init-from checkpoint {cfg.init_from}", "Re-create or re-download that checkpoint",
            CheckpointError,
        )
        fill_zero_rows(model)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if model.get_input_embeddings().weight.shape[0] < vocab:
            model.resize_token_embeddings(vocab)
    else:
        tok, pad, eos = tk.train_tokenizer(dataset.items, dataset.catalog, preset.text_vocab), tk.PAD, tk.EOS
        model = build_model(cfg.preset, tok.get_vocab_size(), tok.token_to_id(pad), tok.token_to_id(eos), cfg.seed,
                            cfg.layers)
    init_pause_embedding(model, tk.token_id(tok, tk.PAUSE))
    require_finite_weights(
        model, f"after adding the pauserec tokens ({tok.get_vocab_size()} in all) to the embeddings",
        "This is a bug in pauserec: please report it (with the --init-from checkpoint's config.json, if any)",
    )
    return model, tok, pad, eos


def peak_lrs(cfg: TrainConfig) -> tuple[float, float, str]:
    """(SFT peak lr, grounding peak lr, where they come from): --lr, the fine-tuning defaults or the preset's."""
    if cfg.lr is not None:
        return cfg.lr, cfg.lr, "--lr"
    if cfg.init_from is not None:
        return FINETUNE_LR, FINETUNE_GROUNDING_LR, "fine-tuning default (--init-from)"
    lr = get_preset(cfg.preset).lr
    return lr, lr, f"preset {cfg.preset}"


# -- entry point -------------------------------------------------------------------------------------
def train(cfg: TrainConfig, dataset=None) -> TrainResult:
    """Train one checkpoint and write it to ``cfg.out``."""
    import torch

    if cfg.kind not in KINDS:
        raise PauserecError(f"unknown kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise PauserecError(f"--max-minutes must be > 0, got {cfg.max_minutes}")
    if cfg.layers is not None and (cfg.layers < 1 or cfg.init_from is not None):
        raise PauserecError(f"--layers must be >= 1 and only sizes a model trained from scratch (not --init-from), "
                            f"got {cfg.layers}")
    from pauserec.train import prompted

    prompted.check_config(cfg)  # --prompt / --lora: refused before anything is loaded when they do not fit
    threads_before = torch.get_num_threads()
    threads = cfg.threads or get_preset(cfg.preset).threads
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, dataset)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, dataset) -> TrainResult:
    import torch

    from pauserec.data import load_dataset

    from pauserec.train import prompted

    t_start = time.perf_counter()
    preset = get_preset(cfg.preset)
    layout = prompted.check_config(cfg)
    dataset = dataset if dataset is not None else load_dataset(cfg.data, cfg.index)
    splits = dataset.splits(layout.max_history if layout is not None else cfg.max_history)
    if len(splits.train) == 0:
        raise DataError(
            f"dataset {dataset.name!r} has no training samples (every user needs >= 3 interactions); "
            "check the data directory and index"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pm, encoder, peft_model = None, None, None
    if layout is not None:  # the checkpoint's own prompt, resolved as export resolves it
        pm = prompted.prepare(cfg, dataset)
        model, tok, spec, encoder = pm.model, pm.tok, pm.spec, pm.encoder
        if cfg.lora:
            peft_model = prompted.add_lora(model, cfg.lora)
    else:
        model, tok, pad, eos = prepare(cfg, dataset)
        spec = tk.build_prompt_spec(tok, dataset.catalog, cfg.kind, cfg.pause_k, cfg.max_history, cfg.max_rationale,
                                    pad, eos)
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
    # the shared-prefix KV path runs the prefix with a cache, which checkpointing does not keep
    prefix_len = 0 if cfg.gradient_checkpointing else len(spec.prefix_ids)
    lr, grounding_lr, lr_source = peak_lrs(cfg)
    bs = cfg.batch_size or preset.batch_size
    epochs = cfg.epochs or preset.epochs
    budget = cfg.max_minutes * 60.0 if cfg.max_minutes else None
    stages: dict[str, dict] = {}
    progress = _progress_bar() if cfg.progress else None
    with progress or _Null():
        if cfg.grounding or cfg.pause_pretrain:
            ground = grounding_samples(spec, dataset, tok)
        if cfg.grounding:
            st = Stage("grounding", ground, 1, grounding_lr, bs, budget and budget * GROUNDING_SHARE)
            stages["grounding"] = run_stage(model, st, spec.pad_id, rng, progress)
        if cfg.pause_pretrain:
            paused = insert_pauses(ground, spec.pause_id, rng)
            st = Stage("pause-pretrain", paused, 1, PAUSE_LR, bs, budget and budget * PAUSE_PRETRAIN_SHARE, pause_only=spec.pause_id)
            stages["pause_pretrain"] = run_stage(model, st, spec.pad_id, rng, progress)
        samples = encode_split(spec, dataset, splits.train, tok, encoder)
        left = None if budget is None else max(budget - (time.perf_counter() - t_start), 1.0)
        vcfg = ValidationConfig(users=_pick(cfg.val_users, preset.val_users), every=cfg.val_every,
                                patience=cfg.patience, metric=cfg.val_metric, beams=cfg.val_beams, seed=cfg.seed)
        validation = build_validation(vcfg, spec, dataset.catalog, splits.valid,
                                      Path(cfg.out) / SNAPSHOTS_DIR if cfg.snapshots else None, encoder)
        st = Stage(f"sft-{cfg.kind}", samples, epochs, lr, bs, left, cfg.max_steps, prefix_len=prefix_len,
                   lora=peft_model is not None, pause_row=spec.pause_id if spec.kind == "pause" else None,
                   weight_decay=_pick(cfg.weight_decay, preset.weight_decay),
                   dropout=_pick(cfg.dropout, preset.dropout),
                   warmup_steps=_pick(cfg.warmup_steps, preset.warmup_steps),
                   decay_steps=_decay_steps(cfg, preset, len(samples), bs),
                   validate=validation, val_every=cfg.val_every, val_share=cfg.val_share,
                   think_end_id=spec.think_end_id, sid_share=_sid_share(cfg, preset))
        sft = run_stage(model, st, spec.pad_id, rng, progress)
    if cfg.gradient_checkpointing:
        _checkpointing(model, False)
    if peft_model is not None:
        model = prompted.merge_lora(peft_model)
    wall = time.perf_counter() - t_start
    losses = sft.pop("losses")
    for s in stages.values():
        s.pop("losses")
    val_record = validation_record(validation, sft, epochs=epochs, max_steps=cfg.max_steps, budget_s=budget)
    train_facts = {
        "kind": cfg.kind, "pause_k": spec.pause_k, "lr": lr, "lr_source": lr_source,
        "lr_schedule": {"warmup_steps": sft["warmup_steps"], "decay_steps": sft["decay_steps"], "floor": FLOOR,
                        "shape": "linear warm-up from 0.1x, cosine to the floor, then constant"},
        "weight_decay": sft["weight_decay"], "dropout": sft["dropout"],
        "batch_size": bs, "epochs_planned": epochs, "steps_per_epoch": sft["steps_per_epoch"],
        "epochs": sft["epochs"], "steps": sft["steps"], "final_loss": sft["final_loss"],
        "first_loss": sft["first_loss"], "wall_time_s": round(wall, 2), "sft_wall_time_s": sft["wall_time_s"],
        "sft_cpu_time_s": sft["cpu_time_s"], "stop_reason": sft["stop_reason"],
        "max_minutes": cfg.max_minutes, "max_steps": cfg.max_steps, "train_samples": sft["samples"],
        "tokens": sft["tokens"], "init_from": str(cfg.init_from) if cfg.init_from else None,
        "grounding": cfg.grounding, "pause_pretrain": cfg.pause_pretrain, "stages": stages,
        "torch_threads": torch.get_num_threads(), "validation": val_record, "sid_share": st.sid_share,
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    if pm is not None:
        train_facts["prompt"] = pm.facts
        train_facts["lora"] = None if not cfg.lora else {
            "rank": cfg.lora, "alpha": 2 * cfg.lora,
            "targets": sorted(peft_model.peft_config["default"].target_modules),
            "saved": "merged into the weights"}
    card = TrainingCard(
        prompt=spec, dataset=dataset.name, index=cfg.index or (dataset.index or ""), seed=cfg.seed,
        preset=cfg.preset if cfg.init_from is None else f"init:{Path(cfg.init_from).name}",
        model_config=json.loads(model.config.to_json_string()), train=train_facts,
    )
    if pm is not None:
        prompted.save(cfg.out, model, pm, card, dataset.catalog)
    else:
        save_checkpoint(cfg.out, model, tok, card, dataset.catalog, pad, eos)
    if val_record is not None and cfg.plot:
        _, val_record["plot"] = write_curve(cfg.out, val_record["curve"], val_record["metric"],
                                            f"{cfg.kind} on {dataset.name}: {val_record['stop_detail']}")
        card.save(cfg.out)  # with the plot note
        if progress is not None:
            progress.console.print(f"curve: {val_record['plot']}", highlight=False)
    return TrainResult(Path(cfg.out), sft["steps"], sft["epochs"], sft["final_loss"], wall, losses, stages, model,
                       val_record)


def _checkpointing(model, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, by the name this transformers has (renamed in 5.x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _pick(value, default):
    return default if value is None else value


def _sid_share(cfg: TrainConfig, preset) -> float | None:
    """cot: the SID's share of each sample's loss (None: a plain mean over every labelled token)."""
    share = _pick(cfg.sid_share, preset.sid_share) if cfg.kind == "cot" else None
    if share is not None and not 0 <= share < 1:
        raise TrainError(f"--sid-share must be in [0, 1) (0: every labelled token weighs the same), got {share}")
    return share or None


def _decay_steps(cfg: TrainConfig, preset, n_samples: int, batch_size: int) -> int:
    """Steps of the cosine decay: the preset's (or --decay-epochs) epochs worth of steps."""
    epochs = _pick(cfg.decay_epochs, preset.decay_epochs)
    if epochs <= 0:
        raise TrainError(f"--decay-epochs must be > 0, got {epochs}")
    return max(1, int(round(epochs * math.ceil(n_samples / batch_size))))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
