"""A ``PromptLayout`` + a tokenizer + a catalog -> the token-level ``PromptSpec`` (torch-free).

Nothing about the ids is assumed: every probe prompt (each catalog item alone, plus seeded longer
histories) is rendered and tokenised with the checkpoint's own tokenizer (the ``tokenizers`` library),
and the spec is read off those ids:

1. every SID token (in the layout's spelling), the pause token and the cot ``think_end`` must be one
   token each;
2. ``ids`` assembly is tried first: the ids around each item's SID tokens (lead, tail) and between items
   (separator) are read from the probes, and the spec is kept only if ``prefix + items + suffix``
   reproduces *every* probe exactly;
3. otherwise (titles, numbering, merges across item edges) the prompt is assembled from ``text`` at run
   time; the fused prefix is then the longest id prefix shared by every probe (BPE can merge across a
   text boundary) and the fused suffix the longest shared id suffix, each stopping at the SID tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pauserec.prompt.layout import EOS, HISTORY, PAUSES, PromptLayout, fill
from pauserec.prompt.spec import ITEM_SEP, THINK, PromptEncoder, PromptSpec
from pauserec.errors import CheckpointError, DataError

MAX_SINGLE_PROBES = 5000  # items probed alone (all of them in catalogs up to this size)
MULTI_PROBES = 64


def single_token(tok, text: str, what: str) -> int:
    """The id of ``text`` when the tokenizer makes exactly one token of it, else CheckpointError."""
    i = tok.token_to_id(text)
    if i is None or list(tok.encode(text, add_special_tokens=False).ids) != [i]:
        raise CheckpointError(f"the {what} {text!r} is not a single token of the checkpoint's tokenizer; add it "
                              "(tokenizer.add_tokens) and train with it, or fix the prompt layout's spelling")
    return int(i)


def sid_token_ids(layout: PromptLayout, tok, catalog, vocab: int | None = None) -> tuple[tuple[int, ...], ...]:
    """``[level][code]`` ids of every SID token of the catalog's codebooks; one error listing all that are missing."""
    out, missing = [], []
    for prefix, size in zip(catalog.token_prefixes, catalog.codebook_sizes):
        level = []
        for code in range(size):
            text = fill(layout.sid_token, {"prefix": prefix, "code": str(code)})
            i = tok.token_to_id(text)
            if i is None or (vocab is not None and i >= vocab) or list(tok.encode(text, add_special_tokens=False).ids) != [i]:
                missing.append(text)
                i = -1
            level.append(int(i))
        out.append(tuple(level))
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(
            f"{len(missing)} SID tokens of the index are not single tokens of the model ({shown}); the index's codes "
            "exceed the SID tokens the checkpoint was trained with, or the layout's sid_token spells them "
            f"differently ({layout.sid_token!r}). Use the index the model was trained on, or fix sid_token")
    return tuple(out)


def after_sid_ids(layout: PromptLayout, tok, catalog, sid_ids, eos_id: int) -> tuple[int, ...]:
    """The ids of ``layout.after_sid`` as the pipeline tokenises its target (the SID's text followed by that text,
    in one string; ``{eos}`` appended as the EOS id): read after the SID tokens, the same for every item."""
    if not layout.after_sid:
        return ()
    text = layout.after_sid[: -len(EOS)] if layout.after_sid.endswith(EOS) else layout.after_sid
    tail = [int(eos_id)] if layout.after_sid.endswith(EOS) else []
    if not text:
        return tuple(tail)
    seen = set()
    for item in range(min(catalog.n_items, 64)):
        codes = catalog.sids[item]
        sid = [sid_ids[lv][int(c)] for lv, c in enumerate(codes)]
        seen.add(_text_after(tok, layout.sid_text(catalog.token_prefixes, codes), text, sid, layout.name, "after_sid"))
    if len(seen) != 1:
        raise CheckpointError(f"prompt layout {layout.name!r}: after_sid {text!r} tokenises differently after "
                              f"different SIDs ({sorted(seen)[:3]}); the engine scores one fixed id sequence")
    return (*seen.pop(), *tail)


def _text_after(tok, lead: str, text: str, lead_ids: list[int], name: str, what: str) -> tuple[int, ...]:
    """The ids of ``text`` where the pipeline tokenises it: right after ``lead`` (whose ids are ``lead_ids``), in one
    string with it."""
    if not text:
        return ()
    ids = list(tok.encode(lead + text, add_special_tokens=False).ids)
    if ids[: len(lead_ids)] != list(lead_ids) or len(ids) == len(lead_ids):
        raise CheckpointError(f"prompt layout {name!r}: {lead!r} followed by {what} {text!r} does not tokenise as "
                              f"{lead!r}'s tokens and then that text ({ids}); fix {what}")
    return tuple(ids[len(lead_ids):])


def resolve_layout(layout: PromptLayout, tok, catalog, kind: str, *, eos_id: int, pad_id: int,
                   pause_k: int | None = None, bos_id: int | None = None, item_fields: dict | None = None,
                   max_rationale: int = 64, vocab: int | None = None, seed: int = 0) -> PromptSpec:
    """The ``PromptSpec`` of ``layout`` for a ``kind`` model with tokenizer ``tok`` (``tokenizers.Tokenizer``)."""
    name = layout.name
    if kind not in layout.kinds:
        raise DataError(f"prompt layout {name!r} declares no {kind} template (it has {', '.join(layout.kinds)})")
    segments = layout.segments(kind)
    has_pauses = PAUSES in "".join(segments)
    if kind == "pause":
        if not pause_k or pause_k < 1:
            raise DataError("a pause model needs its pause count: pass --pause-k K (the number of pause tokens it "
                            "was trained with); it is never guessed")
        if not has_pauses:
            raise DataError(f"prompt layout {name!r} has no {PAUSES} in its pause template; a pause model's prompt "
                            "must say where the pauses go")
    elif pause_k:
        raise DataError(f"--pause-k is for pause models; this is a {kind} model")
    sid_ids = sid_token_ids(layout, tok, catalog, vocab)
    pause_id = single_token(tok, layout.pause_token, "pause token") if kind == "pause" else -1
    think_end = -1
    after_think: tuple[int, ...] = ()
    if kind == "cot":
        if not layout.think_end:
            raise DataError(f"prompt layout {name!r} names no think_end token; a cot model needs the token that "
                            "closes its rationale")
        think_end = single_token(tok, layout.think_end, "think_end token")
        after_think = _text_after(tok, layout.think_end, layout.after_think or "", [think_end], name, "after_think")
    fields = layout.item_fields()
    expanded = [s.replace(PAUSES, (layout.pause_token or "") * int(pause_k or 0)) for s in segments]
    resolved = PromptLayout.from_dict({**layout.to_dict(), "template": expanded if len(expanded) > 1 else expanded[0],
                                       "kinds": [kind], "chat": None})
    text = {**resolved.to_dict(), "bos_id": bos_id if layout.bos else None}
    base = dict(kind=kind, pause_k=int(pause_k or 0), max_history=int(layout.max_history), sid_token_ids=sid_ids,
                eos_id=int(eos_id), pad_id=int(pad_id), think_end_id=think_end, pause_id=pause_id,
                item_sep_id=_optional(tok, ITEM_SEP), think_id=_optional(tok, THINK), max_rationale=max_rationale,
                layout=name, fields=fields, after_ids=after_sid_ids(layout, tok, catalog, sid_ids, eos_id),
                after_think_ids=after_think)
    # Probe with a text-assembly spec that fuses nothing: its encoder gives each probe's whole prompt.
    probe_spec = PromptSpec(**base, prefix_ids=(), suffix_ids=(), assembly="text", text=text,
                            max_history_tokens=1 << 30)
    encoder = PromptEncoder(probe_spec, catalog, tok, item_fields)
    probes = _probe_histories(catalog.n_items, layout.max_history, seed)
    prompts = [list(x) for x in encoder.many(probes)]
    sid_of = lambda item: [sid_ids[lv][int(c)] for lv, c in enumerate(catalog.sids[int(item)])]  # noqa: E731
    first = [_find(p, sid_of(h[0])) for p, h in zip(prompts, probes)]
    last = [_find(p, sid_of(h[-1]), last=True) for p, h in zip(prompts, probes)]
    if any(f < 0 for f in first) or any(x < 0 for x in last):
        bad = probes[min(i for i in range(len(probes)) if first[i] < 0 or last[i] < 0)]
        raise CheckpointError(f"the SID tokens of item {catalog.item_ids[int(bad[0])]!r} do not appear as tokens in "
                              f"its rendered prompt ({encoder.text(bad)!r}); check the layout's item and sid_token")
    if not fields and "{n}" not in layout.item:
        spec = _try_ids(base, resolved, tok, prompts, probes, first, last, sid_of, catalog)
        if spec is not None:
            return _budget(spec, layout)
    p = min(min(first), _common_prefix(prompts))
    levels = catalog.levels
    s = min(min(len(x) - (e + levels) for x, e in zip(prompts, last)), _common_prefix([x[::-1] for x in prompts]))
    spec = PromptSpec(**base, prefix_ids=tuple(prompts[0][:p]), suffix_ids=tuple(prompts[0][len(prompts[0]) - s:]),
                      assembly="text", text=text, max_history_tokens=1 << 30)
    mids = [len(x) - p - s for x in prompts]
    single = max(m for m, h in zip(mids, probes) if len(h) == 1)
    sep = len(tok.encode(layout.separator, add_special_tokens=False).ids) + 2 if layout.separator else 2
    natural = max(layout.max_history * single + (layout.max_history - 1) * sep, max(mids))
    return spec.replace(max_history_tokens=min(natural, layout.max_history_tokens or natural))


def _try_ids(base, layout: PromptLayout, tok, prompts, probes, first, last, sid_of, catalog) -> PromptSpec | None:
    """The ids assembly read off the probes, or None when it does not reproduce every one of them."""
    lead_text, tail_text = layout.item.split("{sid}")
    enc = lambda t: list(tok.encode(t, add_special_tokens=False).ids) if t else []  # noqa: E731
    lead, tail = enc(lead_text), enc(tail_text)
    levels = catalog.levels
    i = next(j for j, h in enumerate(probes) if len(h) == 1)
    x, f = prompts[i], first[i]
    if f < len(lead) or x[f - len(lead): f] != lead or x[f + levels: f + levels + len(tail)] != tail:
        return None
    prefix, suffix = x[: f - len(lead)], x[f + levels + len(tail):]
    j = next((j for j, h in enumerate(probes) if len(h) > 1), None)
    sep: list[int] = []
    if j is not None:
        y, h = prompts[j], probes[j]
        start = len(prefix) + len(lead) + levels + len(tail)
        second = _find(y, sid_of(h[1]), start=start)
        sep = y[start: second - len(lead)] if second >= start + len(lead) else []
    spec = PromptSpec(**base, prefix_ids=tuple(prefix), suffix_ids=tuple(suffix), item_lead_ids=tuple(lead),
                      item_tail_ids=tuple(tail), sep_ids=tuple(sep), assembly="ids", max_history_tokens=1 << 30)
    encoder = PromptEncoder(spec, catalog)  # what the runtime will assemble, against every probe
    if any(encoder.full(h).tolist() != x for x, h in zip(prompts, probes)):
        return None
    return spec


def _budget(spec: PromptSpec, layout: PromptLayout) -> PromptSpec:
    natural = layout.max_history * spec.item_width - len(spec.sep_ids)
    return spec.replace(max_history_tokens=min(natural, layout.max_history_tokens or natural))


def _probe_histories(n_items: int, max_history: int, seed: int) -> list[np.ndarray]:
    """Every item alone (a seeded sample in larger catalogs), then seeded histories of 2..max_history items."""
    rng = np.random.default_rng(seed)
    singles = np.arange(n_items) if n_items <= MAX_SINGLE_PROBES else np.sort(rng.choice(n_items, MAX_SINGLE_PROBES, replace=False))
    out = [np.array([i]) for i in singles]
    if max_history > 1 and n_items > 0:
        lengths = [max_history, 2] + [int(x) for x in rng.integers(2, max_history + 1, size=MULTI_PROBES - 2)]
        out += [rng.integers(0, n_items, size=n) for n in lengths]
    return out


def _find(seq: Sequence[int], sub: Sequence[int], last: bool = False, start: int = 0) -> int:
    """Index of the first (or last) occurrence of ``sub`` in ``seq`` at or after ``start``; -1 when absent."""
    n = len(sub)
    rng = range(len(seq) - n, start - 1, -1) if last else range(start, len(seq) - n + 1)
    for i in rng:
        if list(seq[i: i + n]) == list(sub):
            return i
    return -1


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def _optional(tok, text: str) -> int:
    i = tok.token_to_id(text)
    return -1 if i is None else int(i)


__all__ = ["HISTORY", "resolve_layout", "sid_token_ids", "single_token"]
