"""SFT samples: the one template as (ids, labels) pairs, grounding sequences, pause insertion, batching.

``labels`` are -100 (``IGNORE``) wherever no loss is taken: the prompt (instruction, history, ``<think>``,
pauses, ``</think>`` of direct/pause) and padding; the target SID (and the cot rationale + ``</think>``)
carry their own ids. numpy only, except ``collate`` (torch, imported inside).
"""

from __future__ import annotations

import numpy as np

from pauserec.errors import DataError
from pauserec.train import tokenizer as tk
from pauserec.train.rationale import rationale_text

IGNORE = -100
PAUSE_RATE, MAX_TITLE_TOKENS = 0.10, 32


def encode_sample(spec, catalog, history, target, rationale_ids=None, prompt=None) -> tuple[np.ndarray, np.ndarray]:
    """One SFT sample -> (ids, labels), both (T,) int64; ``prompt``: the history's prompt ids when already built
    (a ``PromptEncoder``'s, for text-assembled prompts), else the spec's ids assembly."""
    prompt = spec.prompt_ids(catalog.sids[np.asarray(history)]) if prompt is None else np.asarray(prompt, np.int64)
    target_ids = spec.target_ids(catalog.sids[int(target)])  # (L,)
    head = [prompt]
    if spec.kind == "cot":
        rat = np.asarray(list(rationale_ids or [])[: spec.max_rationale] + list(spec.rationale_end), np.int64)
        head.append(rat)
    ids = np.concatenate([*head, target_ids])
    labels = ids.copy()
    labels[: len(prompt)] = IGNORE
    return ids, labels


def encode_split(spec, dataset, split, tok=None, encoder=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode every sample of a split (cot needs the tokenizer for its rationales); ``encoder``: the
    ``PromptEncoder`` that builds the prompts (a declared ``--prompt`` layout, text assembly included), else the
    spec's ids assembly."""
    if len(split) == 0:
        raise DataError(
            f"dataset {dataset.name!r} has no training samples (every user needs >= 3 interactions); "
            "check the data directory and index"
        )
    prompts = [None] * len(split)
    if encoder is not None:
        prompts, edge = [], (np.asarray(spec.prefix_ids, np.int64), np.asarray(spec.suffix_ids, np.int64))
        for lo in range(0, len(split), 1024):  # a text-assembled prompt tokenises a batch at a time
            prompts += [np.concatenate([edge[0], ids, edge[1]]) for ids in encoder.many(split.histories[lo: lo + 1024])]
    out = []
    for hist, target, prompt in zip(split.histories, split.targets, prompts, strict=True):
        rat = tk.encode_text(tok, rationale_text(dataset.items, hist)) if spec.kind == "cot" else None
        out.append(encode_sample(spec, dataset.catalog, hist, target, rat, prompt))
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


def sid_share_weights(target, think_end_id: int, sid_share: float):
    """Per-label loss weights (B, T) for cot rows: the labels after ``</think>`` (the SID) carry ``sid_share`` of
    each row's weight, the rationale and ``</think>`` the rest (each group split evenly over its tokens); a row
    without a labelled ``</think>`` (nothing to split) weighs every label ``1 / n``. ``target`` (B, T) holds
    labels (IGNORE where none); weights are 0 there. Rows weigh the same whatever their lengths."""
    import torch

    sel = target != IGNORE
    end = (target == think_end_id).long()
    after = (end.cumsum(1) - end) > 0  # strictly after the </think> label
    ans, rat = sel & after, sel & ~after
    n_ans, n_rat = ans.sum(1, keepdim=True), rat.sum(1, keepdim=True)  # (B, 1)
    split = (n_ans > 0) & (end.sum(1, keepdim=True) > 0)
    w_ans = torch.where(split, sid_share / n_ans.clamp(min=1), 1.0 / (n_ans + n_rat).clamp(min=1))
    w_rat = torch.where(split, (1.0 - sid_share) / n_rat.clamp(min=1), 1.0 / (n_ans + n_rat).clamp(min=1))
    return torch.where(ans, w_ans, torch.where(rat, w_rat, 0.0))
