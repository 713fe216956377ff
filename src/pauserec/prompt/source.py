"""A checkpoint's prompt: its tokenizers, and the ``PromptSpec`` from its training card or a declared layout.

Export (and anything else that starts from a checkpoint directory) asks two questions here:

* ``checkpoint_tokenizers``: the ``tokenizers.Tokenizer`` the prompt ids come from and the checkpoint's
  ``transformers`` tokenizer, the independent judge of those ids (``pauserec.prompt.hf``);
* ``checkpoint_prompt``: the token-level prompt. A checkpoint ``pauserec train`` wrote carries it in its
  training card (command-line overrides checked against it); any other checkpoint names its layout
  (``--prompt PRESET|FILE``), which is rendered through the checkpoint's chat template where it has one,
  checked token by token and resolved against the catalog (``pauserec.prompt.resolve``). A checkpoint
  ``pauserec train --init-from CKPT --prompt LAYOUT`` wrote has both: its card gives the kind, pause count, catalog
  and item fields the declared layout is resolved with, and the result must be the card's spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pauserec.errors import CheckpointError
from pauserec.prompt.layout import PromptLayout, load_layout, preset, read_item_fields
from pauserec.prompt.spec import CARD_FILE, ITEMS_FILE, TOKENIZER_FILE, PromptEncoder, PromptSpec, TrainingCard


@dataclass
class CheckpointPrompt:
    """How a checkpoint reads a history: the resolved spec, its encoder and what they were derived from."""

    spec: PromptSpec
    encoder: PromptEncoder  # histories -> ids (the engine's assembly)
    layout: PromptLayout | None  # as declared (chat layouts unrendered); None: nothing to render a reference from
    card: TrainingCard | None
    item_fields: dict[str, list[str]] | None = None
    warnings: list[str] = field(default_factory=list)


def has_card(path: Path, prompt: str | None) -> bool:
    """Whether the prompt is the checkpoint's training card (a layout given on the command line wins)."""
    return (Path(path) / CARD_FILE).is_file() and prompt is None


def read_tokenizer(path: Path):
    """A directory's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` (None when it has none)."""
    f = Path(path) / TOKENIZER_FILE
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise CheckpointError(f"{f} is not a readable HF tokenizer ({e})") from e


def checkpoint_tokenizers(path: Path, base: Path | None, card: bool) -> tuple[Any, Any, list[str]]:
    """(tokenizer, transformers tokenizer, warnings) of a checkpoint (or of ``base``, a PEFT adapter's).

    A card checkpoint keeps its ``tokenizer.json`` as written (``pauserec train`` tokenised with that file) and
    may lack a transformers tokenizer; any other checkpoint tokenises as ``transformers`` builds it
    (``pauserec.prompt.hf.engine_tokenizer``), and needs it."""
    from pauserec.prompt import hf

    path = Path(path)
    tok = read_tokenizer(path) or (read_tokenizer(Path(base)) if base else None)
    if not card and tok is None:
        raise CheckpointError(f"{path} has no {TOKENIZER_FILE}: the prompt's ids come from the checkpoint's own "
                              "tokenizer. Save it with tokenizer.save_pretrained (a slow tokenizer: "
                              "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...))")
    if tok is None:
        return None, None, []
    hf_tok, warnings = None, []
    try:
        hf_tok = hf.hf_tokenizer(path if (path / TOKENIZER_FILE).is_file() else Path(base))
    except CheckpointError:
        if not card:
            raise  # a pauserec card's ids stand without it; a declared prompt needs its tokenizer
    if hf_tok is not None and not card:
        tok, drift = hf.engine_tokenizer(hf_tok, tok)
        warnings += [drift] if drift else []
    return tok, hf_tok, warnings


def checkpoint_prompt(path: Path, catalog, tok, hf_tok, *, vocab: int, config_eos=None, prompt: str | None = None,
                      kind: str | None = None, pause_k: int | None = None, max_history: int | None = None,
                      max_rationale: int | None = None, items: Path | None = None, seed: int = 0,
                      card_defaults: bool = True) -> CheckpointPrompt:
    """The prompt of checkpoint ``path`` against ``catalog``: its training card's spec (with the overrides) or the
    layout ``prompt`` (a preset or JSON file) resolved with its tokenizers; ``vocab``: the model's rows;
    ``config_eos``: config.json's eos id, used when the tokenizer names none.

    A declared ``prompt`` beside a training card (``pauserec train --prompt`` writes one; ``card_defaults``) takes
    the card's kind and pause count where they are not given, the card directory's ``items.json`` for the item
    fields, and must resolve to the card's spec (``same_as_card``). A pause prompt of a layout with only a direct
    template is ``PromptLayout.with_pause_template``'s."""
    from pauserec.prompt import hf
    from pauserec.prompt.resolve import resolve_layout

    path = Path(path)
    if has_card(path, prompt):
        card = TrainingCard.load(path)
        spec = _override(card.prompt, kind, pause_k, max_history, max_rationale)
        layout = PromptLayout.from_dict({**preset("pauserec").to_dict(), "max_history": spec.max_history})
        if spec.layout != "pauserec" or spec.max_history_tokens != spec.max_history * spec.item_width:
            layout = None  # not pauserec's own text: nothing to render the HF reference from
        check_sid_tokens(spec, catalog, vocab, tok)
        return CheckpointPrompt(spec, PromptEncoder(spec, catalog, tok), layout, card)
    if prompt is None:
        raise CheckpointError(f"{path} was not trained by pauserec: pass --prompt PRESET|FILE, the prompt layout "
                              "it was trained with (presets: pauserec, minionerec, lc-rec[:N], onerec-think)")
    card = TrainingCard.load(path) if card_defaults and (path / CARD_FILE).is_file() else None
    flags = {"kind": kind, "pause_k": pause_k, "max_history": max_history, "max_rationale": max_rationale}
    if card is not None:
        if kind is not None and kind != card.prompt.kind:
            raise CheckpointError(f"the checkpoint's card says it is a {card.prompt.kind} model; --kind {kind} cannot "
                                  "change what it was trained as")
        kind = card.prompt.kind
        pause_k = pause_k if pause_k is not None or card.prompt.kind != "pause" else card.prompt.pause_k
        max_rationale = max_rationale or card.prompt.max_rationale
    layout = load_layout(prompt, max_history=max_history)
    kind = kind or (layout.kinds[0] if len(layout.kinds) == 1 else None)
    if kind is None:
        raise CheckpointError(f"prompt layout {layout.name!r} has templates for {', '.join(layout.kinds)} "
                              "models: pass --kind to say which this checkpoint is")
    if kind == "pause":
        layout = layout.with_pause_template()
    warnings = hf.chat_pins(layout, hf_tok)
    plain = hf.render_chat(layout, hf_tok)
    hf.check_token_names(plain, kind, tok)
    known = _card_items(path) if card is not None and items is None else None
    fields = read_item_fields(items, catalog, plain.item_fields(), known)
    eos = hf_tok.eos_token_id if hf_tok.eos_token_id is not None else _config_id(config_eos)
    if eos is None:
        raise CheckpointError(f"{path}: neither the tokenizer nor config.json names an eos token")
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos
    spec = resolve_layout(plain, tok, catalog, kind, eos_id=eos, pad_id=pad, pause_k=pause_k,
                          bos_id=hf_tok.bos_token_id, item_fields=fields, vocab=vocab,
                          max_rationale=max_rationale or 64, seed=seed)
    check_sid_tokens(spec, catalog, vocab, None)
    if card is not None:
        same_as_card(spec, card, path, prompt, flags)
    return CheckpointPrompt(spec, PromptEncoder(spec, catalog, tok, fields), layout, card, fields, warnings)


def same_as_card(spec: PromptSpec, card: TrainingCard, path: Path, prompt: str, flags: dict[str, Any]) -> None:
    """CheckpointError unless ``spec`` (resolved from ``--prompt``) is the card's, but for what the flags change
    (``--pause-k``: the pause count; ``--max-history``; ``--max-rationale``)."""
    trained, given = card.prompt, card.train.get("prompt") or {}
    ignore = {"pause_k", "suffix_ids"} if flags["pause_k"] is not None else set()
    ignore |= {"max_history", "max_history_tokens"} if flags["max_history"] is not None else set()
    ignore |= {"max_rationale"} if flags["max_rationale"] is not None else set()
    ours, theirs = spec.to_dict(), trained.to_dict()
    differ = [k for k in ours if k not in ignore and ours[k] != theirs.get(k)]
    if differ:
        was = given.get("given") or trained.layout
        raise CheckpointError(
            f"{path} was trained with prompt {was!r} as a {trained.kind} model (its {CARD_FILE}), and --prompt "
            f"{prompt} resolves to a different prompt ({', '.join(differ)} differ{'s' if len(differ) == 1 else ''}). "
            f"Export it with --prompt {was} (or without --prompt: the card's prompt)")


def _card_items(path: Path) -> dict[str, dict[str, str]] | None:
    """The item fields a card checkpoint keeps (``items.json``, written by ``pauserec train --prompt``), if any."""
    import json

    f = Path(path) / ITEMS_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def check_sid_tokens(spec: PromptSpec, catalog, vocab: int, tok) -> None:
    """Every SID code of the catalog needs a token id inside the model's vocabulary (and tokenizer)."""
    if spec.levels != catalog.levels:
        raise CheckpointError(f"the prompt spec has {spec.levels} SID levels, the catalog {catalog.levels}; "
                              "export with the catalog the checkpoint was trained on (--catalog / --index)")
    missing: list[str] = []
    for lv, (prefix, size) in enumerate(zip(catalog.token_prefixes, catalog.codebook_sizes)):
        ids = spec.sid_token_ids[lv]
        for c in range(size):
            want = f"<{prefix}_{c}>"
            i = ids[c] if c < len(ids) else -1
            if not 0 <= i < vocab or (tok is not None and spec.layout == "pauserec" and tok.id_to_token(i) != want):
                missing.append(want)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(f"{len(missing)} SID tokens are missing from the model's vocabulary/tokenizer ({shown}); "
                              "use the SID index the checkpoint was trained on, or train a checkpoint for this index")
    named = {"pad": spec.pad_id, "eos": spec.eos_id, "think_end": spec.think_end_id, "pause": spec.pause_id}
    bad = [f"{k}={v}" for k, v in named.items() if v >= vocab or (k in ("pad", "eos") and v < 0)]
    bad += [f"prompt id {i}" for i in (*spec.prefix_ids, *spec.suffix_ids, *spec.item_lead_ids, *spec.item_tail_ids,
                                       *spec.sep_ids, *spec.after_ids) if not 0 <= i < vocab]
    if bad:
        raise CheckpointError(f"token ids outside the model's vocabulary of {vocab}: {', '.join(bad[:6])}")


def _config_id(value) -> int | None:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return None if value is None else int(value)


def _override(spec: PromptSpec, kind, pause_k, max_history, max_rationale) -> PromptSpec:
    """A pauserec card's spec with command-line overrides (a pause model keeps its own pause count)."""
    changes: dict[str, Any] = {}
    if kind is not None and kind != spec.kind:
        raise CheckpointError(f"the checkpoint's card says it is a {spec.kind} model; --kind {kind} cannot change "
                              "what it was trained as")
    if pause_k is not None and pause_k != spec.pause_k:
        if spec.kind != "pause":
            raise CheckpointError(f"--pause-k is for pause models; this checkpoint is a {spec.kind} model")
        think = [t for t in spec.suffix_ids if t != spec.pause_id]
        changes.update(pause_k=pause_k, suffix_ids=[think[0], *[spec.pause_id] * pause_k, *think[1:]])
    if max_history is not None:
        changes["max_history"] = max_history
    if max_rationale is not None:
        changes["max_rationale"] = max_rationale
    return spec.replace(**changes) if changes else spec
