"""Supervised fine-tuning of direct, pause and cot recommenders (torch, transformers).

Every sample uses the one template of ``PromptSpec``::

    ids    = prompt_ids(history) [+ rationale + </think>  (cot)] + target SID (L tokens)
    labels = -100 on the prompt (instruction, history, <think>, pauses, </think> of direct/pause),
             the token itself on the target SID (and on rationale + </think> for cot); -100 on padding

Optional stages before SFT (paper §2.3, behind flags):

* grounding: SID -> title and title -> SID sequences for every item (all weights train);
* pause pre-training: the grounding sequences with ``<pause>`` inserted at ~10 % of positions; the
  network is frozen and only the ``<pause>`` embedding row trains (lr 1e-3).

The ``<pause>`` row starts at the mean of all embedding rows. AdamW (weight decay 0.01), linear
warm-up then cosine decay over the run's progress, gradient clipping at 1.0, length-bucketed
batches. Without a time budget a run is bit-for-bit reproducible from its seed; with
``max_minutes`` the run's progress is max(step share, time share), so it ends on time.

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

from pauserec.data.prompts import KINDS, TrainingCard
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
from pauserec.train.rationale import rationale_text

IGNORE = -100
GROUNDING_SHARE, PAUSE_PRETRAIN_SHARE = 0.15, 0.05  # of the time budget
PAUSE_RATE, PAUSE_LR, MAX_TITLE_TOKENS = 0.10, 1e-3, 32
FINETUNE_LR, FINETUNE_GROUNDING_LR = 5e-5, 1e-4  # --init-from without --lr (PauseRec: SFT 5e-5, CPT 1e-4)
WARMUP = 0.05  # share of a stage's progress spent warming the lr up (from 0.1x to 1x the peak)


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    index: str | None
    kind: str
    out: Path
    preset: str = "small"
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


# -- samples ---------------------------------------------------------------------------------------
def encode_sample(spec, catalog, history, target, rationale_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """One SFT sample -> (ids, labels), both (T,) int64."""
    prompt = spec.prompt_ids(catalog.sids[np.asarray(history)])  # (P,)
    target_ids = spec.target_ids(catalog.sids[int(target)])  # (L,)
    head = [prompt]
    if spec.kind == "cot":
        rat = np.asarray(list(rationale_ids or [])[: spec.max_rationale] + [spec.think_end_id], np.int64)
        head.append(rat)
    ids = np.concatenate([*head, target_ids])
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE
    return ids, labels


def encode_split(spec, dataset, split, tok=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode every sample of a split (cot needs the tokenizer for its rationales)."""
    if len(split) == 0:
        raise DataError(
            f"dataset {dataset.name!r} has no training samples (every user needs >= 3 interactions); "
            "check the data directory and index"
        )
    out = []
    for hist, target in zip(split.histories, split.targets, strict=True):
        rat = tk.encode_text(tok, rationale_text(dataset.items, hist)) if spec.kind == "cot" else None
        out.append(encode_sample(spec, dataset.catalog, hist, target, rat))
    return out


def grounding_samples(spec, dataset, tok) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per item: ``SID <item_sep> title <eos>`` (loss on title + eos) and ``title <item_sep> SID`` (loss on SID)."""
    out = []
    for item, text in enumerate(dataset.items):
        title = np.asarray(tk.encode_text(tok, text.title or text.categories)[:MAX_TITLE_TOKENS], np.int64)
        if len(title) == 0:
            continue
        sid = spec.target_ids(dataset.catalog.sids[item])
        sep, eos = np.array([spec.item_sep_id]), np.array([spec.eos_id])
        a = np.concatenate([sid, sep, title, eos])
        la = a.copy()
        la[: len(sid) + 1] = IGNORE
        b = np.concatenate([title, sep, sid])
        lb = b.copy()
        lb[: len(title) + 1] = IGNORE
        out += [(a, la), (b, lb)]
    return out


def insert_pauses(samples, pause_id: int, rng, rate: float = PAUSE_RATE):
    """Insert ``<pause>`` before ~``rate`` of the positions (never first); pauses carry no label."""
    out = []
    for ids, labels in samples:
        n = max(1, int(round(rate * len(ids))))
        pos = np.sort(rng.choice(np.arange(1, len(ids)), size=min(n, len(ids) - 1), replace=False))
        out.append((np.insert(ids, pos, pause_id), np.insert(labels, pos, IGNORE)))
    return out


def length_batches(lengths: np.ndarray, batch_size: int, rng) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (random order inside equal lengths), batches shuffled."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(samples, pad_id: int):
    """Right-padded (ids, attention mask, labels) tensors, each (B, T)."""
    import torch

    T = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), T), dtype=torch.long)
    for b, (x, y) in enumerate(samples):
        ids[b, : len(x)] = torch.from_numpy(x)
        labels[b, : len(y)] = torch.from_numpy(y)
        mask[b, : len(x)] = 1
    return ids, mask, labels


def masked_loss(model, ids, mask, labels, inputs_embeds=None, prefix_len: int = 0):
    """Mean next-token NLL (full-vocabulary softmax) over labelled positions -> (loss, n_labels).

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
    return F.cross_entropy(logits.float(), target[sel]), int(sel.sum())


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
    prefix_len: int = 0  # every sample starts with these same unlabelled tokens (the instruction)


def _lr_at(progress: float, peak: float, warmup: float = WARMUP) -> float:
    if progress < warmup:
        return peak * (0.1 + 0.9 * progress / warmup)
    t = (progress - warmup) / (1 - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def run_stage(model, stage: Stage, pad_id: int, rng, progress=None) -> dict:
    """Train on ``stage.samples``; returns steps, epochs done, losses and wall time."""
    import torch

    emb = model.get_input_embeddings()
    if stage.pause_only is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        pause_vec = torch.nn.Parameter(emb.weight[stage.pause_only].detach().clone())
        params = [pause_vec]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.01)
    lengths = np.array([len(x) for x, _ in stage.samples])
    per_epoch = math.ceil(len(lengths) / stage.batch_size)
    planned = stage.epochs * per_epoch if stage.max_steps is None else min(stage.epochs * per_epoch, stage.max_steps)
    task = progress.add_task(stage.name, total=planned, loss=float("nan"), tps=0.0) if progress else None
    model.train()
    losses, step, tokens, t0, frac = [], 0, 0, time.perf_counter(), 0.0
    cpu0 = time.process_time()
    for _epoch in range(stage.epochs):
        for idx in length_batches(lengths, stage.batch_size, rng):
            ids, mask, labels = collate([stage.samples[i] for i in idx], pad_id)
            embeds = None
            if stage.pause_only is not None:
                with torch.no_grad():
                    embeds = emb(ids)
                embeds = torch.where((ids == stage.pause_only)[..., None], pause_vec, embeds)
            lr = _lr_at(frac, stage.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, _ = masked_loss(model, ids, mask, labels, embeds, stage.prefix_len)
            _require_finite(loss, "loss", stage, step + 1, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _require_finite(torch.nn.utils.clip_grad_norm_(params, 1.0), "gradient norm", stage, step + 1, lr)
            opt.step()
            step, tokens = step + 1, tokens + int(mask.sum())
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - t0
            frac = max(step / planned, elapsed / stage.budget_s if stage.budget_s else 0.0)
            if progress:
                progress.update(task, completed=min(frac, 1.0) * planned, loss=np.mean(losses[-50:]), tps=tokens / elapsed)
            if frac >= 1.0:
                break
        if frac >= 1.0:
            break
    if stage.pause_only is not None:
        with torch.no_grad():
            emb.weight[stage.pause_only] = pause_vec.detach()
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()
    require_finite_weights(model, f"after stage {stage.name} ({step} steps, peak lr {stage.lr:g})", _lower_lr(stage))
    wall = time.perf_counter() - t0
    return {
        "lr": stage.lr,
        "steps": step,
        "epochs": round(step / per_epoch, 3),
        "samples": len(lengths),
        "tokens": tokens,
        "wall_time_s": round(wall, 2),
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
        vocab = tok.get_vocab_size(with_added_tokens=True)
        if model.get_input_embeddings().weight.shape[0] < vocab:
            model.resize_token_embeddings(vocab)
    else:
        tok, pad, eos = tk.train_tokenizer(dataset.items, dataset.catalog, preset.text_vocab), tk.PAD, tk.EOS
        model = build_model(cfg.preset, tok.get_vocab_size(), tok.token_to_id(pad), tok.token_to_id(eos), cfg.seed)
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

    from pauserec.data import load_dataset

    if cfg.kind not in KINDS:
        raise PauserecError(f"unknown kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise PauserecError(f"--max-minutes must be > 0, got {cfg.max_minutes}")
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

    t_start = time.perf_counter()
    preset = get_preset(cfg.preset)
    dataset = dataset if dataset is not None else load_dataset(cfg.data, cfg.index)
    splits = dataset.splits(cfg.max_history)
    if len(splits.train) == 0:
        raise DataError(
            f"dataset {dataset.name!r} has no training samples (every user needs >= 3 interactions); "
            "check the data directory and index"
        )
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model, tok, pad, eos = prepare(cfg, dataset)
    spec = tk.build_prompt_spec(tok, dataset.catalog, cfg.kind, cfg.pause_k, cfg.max_history, cfg.max_rationale, pad, eos)
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
        samples = encode_split(spec, dataset, splits.train, tok)
        left = None if budget is None else max(budget - (time.perf_counter() - t_start), 1.0)
        st = Stage(f"sft-{cfg.kind}", samples, epochs, lr, bs, left, cfg.max_steps, prefix_len=len(spec.instruction_ids))
        sft = run_stage(model, st, spec.pad_id, rng, progress)
    wall = time.perf_counter() - t_start
    losses = sft.pop("losses")
    for s in stages.values():
        s.pop("losses")
    train_facts = {
        "kind": cfg.kind, "pause_k": spec.pause_k, "lr": lr, "lr_source": lr_source, "lr_warmup": WARMUP,
        "batch_size": bs, "epochs_planned": epochs,
        "epochs": sft["epochs"], "steps": sft["steps"], "final_loss": sft["final_loss"],
        "first_loss": sft["first_loss"], "wall_time_s": round(wall, 2), "sft_wall_time_s": sft["wall_time_s"],
        "sft_cpu_time_s": sft["cpu_time_s"],
        "max_minutes": cfg.max_minutes, "max_steps": cfg.max_steps, "train_samples": sft["samples"],
        "tokens": sft["tokens"], "init_from": str(cfg.init_from) if cfg.init_from else None,
        "grounding": cfg.grounding, "pause_pretrain": cfg.pause_pretrain, "stages": stages,
        "torch_threads": torch.get_num_threads(),
    }
    card = TrainingCard(
        prompt=spec, dataset=dataset.name, index=cfg.index or (dataset.index or ""), seed=cfg.seed,
        preset=cfg.preset if cfg.init_from is None else f"init:{Path(cfg.init_from).name}",
        model_config=json.loads(model.config.to_json_string()), train=train_facts,
    )
    save_checkpoint(cfg.out, model, tok, card, dataset.catalog, pad, eos)
    return TrainResult(Path(cfg.out), sft["steps"], sft["epochs"], sft["final_loss"], wall, losses, stages, model)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
