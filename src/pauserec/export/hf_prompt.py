"""The checkpoint's own Hugging Face tokenizer as the independent judge of an engine's prompts.

* ``render_chat``: a chat layout rendered once with the checkpoint's chat template
  (``apply_chat_template``), giving the plain template the engine stores;
* ``reference_ids``: one user's prompt built the way the training pipeline builds it: the text
  rendered (per user, through the chat template for chat layouts), tokenised with ``transformers``'
  tokenizer segment by segment, the history budget applied by counting those ids;
* ``check_prompts``: the engine's assembled ids against those, for a sample of users; any difference
  fails the export and names the part (prefix, history, suffix) and the tokens that differ.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pauserec.data.layout import HISTORY, PromptLayout
from pauserec.errors import CheckpointError, ExportError

SENTINEL = "\u2063PAUSEREC_HISTORY\u2063"
TOKEN_LIKE = re.compile(r"<\|[^<>\s|]+\|>|</?[A-Za-z_][A-Za-z0-9_]*>")


def hf_tokenizer(path: Path):
    """The checkpoint's tokenizer as ``transformers`` loads it (fast, from tokenizer.json)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {path} with transformers ({e}); the checkpoint needs "
                              "its tokenizer files (tokenizer.json + tokenizer_config.json)") from e


def render_chat(layout: PromptLayout, hf_tok) -> PromptLayout:
    """A chat layout as a plain one: the chat template rendered with ``{history}`` left in the user turn."""
    if layout.chat is None:
        return layout
    return PromptLayout.from_dict({**layout.to_dict(), "template": _chat_text(layout, hf_tok, HISTORY), "chat": None,
                                   "tokenize": "whole"}, source=layout.name)


def _chat_text(layout: PromptLayout, hf_tok, history_text: str) -> str:
    chat = layout.chat
    if not getattr(hf_tok, "chat_template", None):
        raise CheckpointError(f"prompt layout {layout.name!r} renders the checkpoint's chat template, but its tokenizer "
                              "has none; give the layout a plain 'template' instead")
    messages = ([{"role": "system", "content": chat["system"]}] if chat.get("system") is not None else [])
    messages.append({"role": "user", "content": chat["user"].replace(HISTORY, SENTINEL)})
    try:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          **chat.get("template_kwargs", {}))
    except Exception as e:  # jinja2 raises its own errors
        raise CheckpointError(f"the checkpoint's chat template cannot render layout {layout.name!r} ({e}); fix the "
                              "layout's chat messages or give a plain 'template'") from e
    if text.count(SENTINEL) != 1:
        raise CheckpointError(f"the chat template rendered the user message {text.count(SENTINEL)} times; give the "
                              "layout a plain 'template'")
    return text.replace(SENTINEL, history_text) + chat.get("assistant", "")


def check_token_names(layout: PromptLayout, kind: str, tok) -> None:
    """Every ``<token>``-looking name in the layout's text must be one token of the tokenizer."""
    texts = [*layout.segments(kind), layout.item, layout.separator]
    names = sorted({m for t in texts for m in TOKEN_LIKE.findall(t)})
    bad = [n for n in names if tok.token_to_id(n) is None or len(tok.encode(n, add_special_tokens=False).ids) != 1]
    if bad:
        raise CheckpointError(f"the prompt layout {layout.name!r} names token(s) the checkpoint's tokenizer lacks: "
                              f"{', '.join(bad)}. They would be split into pieces, not read as the tokens the model "
                              "was trained with; fix the layout or export the checkpoint's own tokenizer")


def reference_ids(layout: PromptLayout, hf_tok, kind: str, pause_k: int, history_items: list[dict],
                  budget: int, constant: int) -> list[int]:
    """One user's prompt ids as the pipeline builds them: render, tokenise with the HF tokenizer, and drop the
    oldest items while the history (the ids beyond the ``constant`` fused prefix + suffix) exceeds ``budget``."""
    items = history_items[-layout.max_history:]
    while True:
        ids = _hf_ids(layout, hf_tok, kind, pause_k, items)
        if len(items) == 1 or len(ids) - constant <= budget:
            return ids
        items = items[1:]


def _hf_ids(layout, hf_tok, kind, pause_k, items) -> list[int]:
    if layout.chat is not None:
        segments = [_chat_text(layout, hf_tok, layout.history_text(items))]
    else:
        segments = layout.render(layout.segments(kind), items, pause_k)
    ids = [hf_tok.bos_token_id] if layout.bos and hf_tok.bos_token_id is not None else []
    for seg in segments:
        ids += list(hf_tok(seg, add_special_tokens=layout.add_special_tokens)["input_ids"])
    return ids


def check_prompts(encoder, layout: PromptLayout, hf_tok, catalog, histories: list[np.ndarray],
                  item_fields: dict | None) -> list[list[int]]:
    """The engine's prompt ids against the HF tokenizer's for every history; ExportError at the first difference.
    Returns the HF-built prompts (the reference that HF ``generate`` then ranks from)."""
    spec = encoder.spec
    fields = item_fields or {}
    built = []
    for h in histories:
        items = [{"sid": layout.sid_text(catalog.token_prefixes, catalog.sids[int(i)]),
                  **{f: str(fields[f][int(i)]) for f in spec.fields}} for i in h]
        want = reference_ids(layout, hf_tok, spec.kind, spec.pause_k, items, spec.max_history_tokens,
                             len(spec.prefix_ids) + len(spec.suffix_ids))
        try:
            got = encoder.full(np.asarray(h, np.int64)).tolist()
        except Exception as e:  # a DataError of the encoder: the prompt cannot be assembled
            raise ExportError(f"the engine cannot assemble the prompt of history {_ids(catalog, h)} ({e})") from e
        if got != want:
            raise ExportError(_difference(got, want, spec, hf_tok, catalog, h))
        built.append(want)
    return built


def _ids(catalog, h) -> str:
    shown = [str(catalog.item_ids[int(i)]) for i in h[:5]]
    return "[" + ", ".join(shown) + (", …" if len(h) > 5 else "") + "]"


def _difference(got: list[int], want: list[int], spec, hf_tok, catalog, h) -> str:
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    p, s = len(spec.prefix_ids), len(spec.suffix_ids)
    part = "the fused prefix" if i < p else "the fused suffix" if i >= len(got) - s else "the history"
    show = lambda ids: repr(hf_tok.decode(ids[max(0, i - 3): i + 4]))  # noqa: E731
    tok = lambda ids: ids[i] if i < len(ids) else None  # noqa: E731
    return (f"the engine's prompt differs from the checkpoint tokenizer's at token {i} ({part}) for history "
            f"{_ids(catalog, h)}: engine id {tok(got)} in {show(got)}, HF id {tok(want)} in {show(want)} "
            f"({len(got)} vs {len(want)} ids). The prompt layout does not tokenise as declared; check its text, "
            "tokenize/add_special_tokens/bos settings and the item separator")
