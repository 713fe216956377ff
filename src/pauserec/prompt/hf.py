"""The checkpoint's own Hugging Face tokenizer as the independent judge of an engine's prompts.

* ``engine_tokenizer``: the tokenizer the engine ships and the export resolves with: the one
  ``AutoTokenizer`` builds (its ``tokenizers`` backend, serialised), not the checkpoint's
  ``tokenizer.json`` as a file (transformers 5 rebuilds a Qwen2 tokenizer's pre-tokenizer from its class);
* ``render_chat``: a chat layout rendered once with the checkpoint's chat template
  (``apply_chat_template``), giving the plain template the engine stores; ``chat_pins`` first refuses a
  template whose output depends on anything but the messages unless the layout declares it;
* ``reference_ids``: one user's prompt built the way the training pipeline builds it: the text
  rendered per user (for chat layouts by ``apply_chat_template`` on that user's messages alone, nothing
  rendered by pauserec), tokenised with ``transformers``' tokenizer segment by segment, the history budget
  applied by counting those ids;
* ``check_prompts``: the engine's assembled ids against those, for a sample of users; any difference
  fails the export and names the part (prefix, history, suffix) and the tokens that differ;
  ``check_item_texts``: every catalog item's text, engine tokenizer against ``transformers``'.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import numpy as np

from pauserec.prompt.layout import HISTORY, PromptLayout
from pauserec.errors import CheckpointError, ExportError

SENTINEL = "\u2063PAUSEREC_HISTORY\u2063"
TOKEN_LIKE = re.compile(r"<\|[^<>\s|]+\|>|</?[A-Za-z_][A-Za-z0-9_]*>")
# What a chat template may read without being declared: the conversation, and the tokenizer's own tokens (fixed
# with the checkpoint); jinja's and transformers' helper functions. strftime_now (transformers' clock) is not here.
MESSAGE_INPUTS = ("messages", "add_generation_prompt", "tools", "documents")
TOKEN_INPUTS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                "additional_special_tokens")
TEMPLATE_HELPERS = ("raise_exception", "namespace", "dict", "range", "lipsum", "cycler", "joiner")
PROBES = ("\u2063pauserec-probe\u2063", True, False)  # values an undeclared input is rendered with


def hf_tokenizer(path: Path):
    """The checkpoint's tokenizer as ``transformers`` loads it (fast, from tokenizer.json)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer of {path} with transformers ({e}); the checkpoint needs "
                              "its tokenizer files (tokenizer.json + tokenizer_config.json)") from e


def engine_tokenizer(hf_tok, file_tok):
    """(the ``tokenizers.Tokenizer`` the engine ships, a warning or None): ``hf_tok``'s backend as the engine will read
    it back from JSON (no padding, no truncation: ``transformers``' defaults for one text), and a warning when it is
    not ``file_tok``, the checkpoint's ``tokenizer.json`` as written (``transformers`` rebuilt part of it)."""
    import transformers
    from tokenizers import Tokenizer

    if not getattr(hf_tok, "is_fast", False):
        raise CheckpointError(f"transformers loads this checkpoint's tokenizer as {type(hf_tok).__name__}, not a fast "
                              "(tokenizers) tokenizer; the engine needs one: save it with "
                              "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...)")
    tok = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    ours, built = json.loads(file_tok.to_str()), json.loads(tok.to_str())
    parts = [k for k in ("normalizer", "pre_tokenizer", "post_processor") if ours.get(k) != built.get(k)]
    model, built_model = ours.get("model") or {}, built.get("model") or {}
    parts += [f"model {k}" for k in ("vocab", "merges") if model.get(k) != built_model.get(k)]
    if not parts:
        return tok, None
    return tok, (f"transformers {transformers.__version__} builds this checkpoint's tokenizer as "
                 f"{type(hf_tok).__name__} with another {', '.join(parts)} than its tokenizer.json has: the engine "
                 "tokenises as transformers does (AutoTokenizer), which its prompts are checked against. If the model "
                 "was trained on tokenizer.json as written (an older transformers, or the tokenizers library), export "
                 "with that version")


def render_chat(layout: PromptLayout, hf_tok) -> PromptLayout:
    """A chat layout as a plain one: the chat template rendered with ``{history}`` left in the user turn (the
    engine's prompt; ``chat_pins`` says first whether rendering it once can stand for every later rendering)."""
    if layout.chat is None:
        return layout
    text = _render(layout, hf_tok, layout.chat_messages(SENTINEL), layout.chat_kwargs())
    if text.count(SENTINEL) != 1:
        raise CheckpointError(f"the chat template rendered the user message {text.count(SENTINEL)} times; give the "
                              "layout a plain 'template'")
    plain = text.replace(SENTINEL, HISTORY) + layout.chat.get("assistant", "")
    return PromptLayout.from_dict({**layout.to_dict(), "template": plain, "chat": None, "tokenize": "whole"},
                                  source=layout.name)


def _template(layout: PromptLayout, hf_tok) -> str:
    """The chat template ``apply_chat_template`` renders (no tools: the default one)."""
    if not getattr(hf_tok, "chat_template", None):
        raise CheckpointError(f"prompt layout {layout.name!r} renders the checkpoint's chat template, but its "
                              "tokenizer has none; give the layout a plain 'template' instead")
    return hf_tok.get_chat_template()


def _render(layout: PromptLayout, hf_tok, messages: list[dict], kwargs: dict) -> str:
    _template(layout, hf_tok)
    try:
        return hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # jinja2 raises its own errors
        raise CheckpointError(f"the checkpoint's chat template cannot render layout {layout.name!r} ({e}); fix the "
                              "layout's chat messages or give a plain 'template'") from e


def chat_pins(layout: PromptLayout, hf_tok) -> list[str]:
    """A warning per input the layout pins (``chat.pin``); ExportError when the chat template's output depends on
    an input besides the messages, the tokenizer's tokens and the layout's declared ones (``template_kwargs``, ``pin``):
    each undeclared input the template reads is rendered with a few values, and one that changes the text (or
    breaks it: ``strftime_now`` called) is such a dependence. The engine renders the template once, at export."""
    if layout.chat is None:
        return []
    chat = layout.chat
    reads = _template_inputs(_template(layout, hf_tok))
    pins = chat.get("pin", {})
    unread = sorted(set(pins) - reads)
    if unread:
        raise ExportError(f"prompt layout {layout.name!r} pins {', '.join(unread)}, which the checkpoint's chat "
                          f"template does not read (it reads {', '.join(sorted(reads)) or 'nothing'}); drop or fix "
                          "the pin")
    declared = {*MESSAGE_INPUTS, *TOKEN_INPUTS, *getattr(hf_tok, "special_tokens_map", {}), *TEMPLATE_HELPERS,
                *chat.get("template_kwargs", {}), *pins}
    messages, kwargs = layout.chat_messages(SENTINEL), layout.chat_kwargs()
    base = _render(layout, hf_tok, messages, kwargs)
    depends = []
    for name in sorted(reads - declared):
        for value in PROBES:
            try:
                changed = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                     **{**kwargs, name: value}) != base
            except Exception:  # noqa: BLE001 (jinja2's errors): the template uses the value (calls it, iterates it)
                changed = True
            if changed:
                depends.append(name)
                break
    if depends:
        raise ExportError(
            f"the checkpoint's chat template renders differently with {', '.join(depends)} (besides the messages); "
            f"prompt layout {layout.name!r} does not say what the model was trained with, and the engine renders the "
            "template once, at export: a date or a variable it reads would be frozen unsaid. Declare each in the "
            "layout's chat: a switch the training pipeline passed in template_kwargs ('enable_thinking': false), "
            "or a pin the engine keeps for good in pin ('date_string': '26 Jul 2024'; null keeps what it renders "
            "at export, e.g. 'strftime_now': null freezes today's date)")
    return [_pin_warning(name, value) for name, value in sorted(pins.items())]


def _pin_warning(name: str, value) -> str:
    if value is not None:
        kept = f"is pinned to {value!r}: the engine's prompt keeps that"
    elif name == "strftime_now":
        kept = f"is pinned: the engine's prompt keeps the date it rendered at export ({datetime.date.today()})"
    else:
        kept = "is pinned unset: the engine's prompt keeps what the template renders without it"
    return f"the chat template's {name} {kept} for good, whatever a later rendering of the template would give"


def _template_inputs(template: str) -> set[str]:
    """The names a chat template reads from its context (jinja2's ``meta.find_undeclared_variables``), parsed with
    the extensions transformers renders it with (loop controls, the ``{% generation %}`` block)."""
    import jinja2
    from jinja2 import meta
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols", Generation])
    try:
        return set(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"the checkpoint's chat template does not parse ({e}); give the layout a plain "
                              "'template'") from e


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
    if layout.chat is not None:  # the checkpoint's template on this user's own messages: nothing pauserec renders
        text = hf_tok.apply_chat_template(layout.chat_messages(layout.history_text(items)), tokenize=False,
                                          add_generation_prompt=True, **layout.chat_kwargs())
        segments = [text + layout.chat.get("assistant", "")]
    else:
        segments = layout.render(layout.segments(kind), items, pause_k)
    ids = [hf_tok.bos_token_id] if layout.bos and hf_tok.bos_token_id is not None else []
    for seg in segments:  # (apply_chat_template(tokenize=True) tokenises its text with add_special_tokens=False too)
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
            raise ExportError(_difference(got, want, spec, hf_tok, catalog, h, chat=layout.chat is not None))
        built.append(want)
    return built


def check_item_texts(layout: PromptLayout, hf_tok, tok, catalog, item_fields: dict | None) -> int:
    """Every catalog item's text (the layout's ``item`` rendered alone) tokenised by the engine's tokenizer ``tok``
    and by ``transformers``' ``hf_tok``; ExportError naming the first item where they differ. Returns the count."""
    fields = item_fields or {}
    names = layout.item_fields()
    batch = 4096
    for start in range(0, catalog.n_items, batch):
        rows = range(start, min(start + batch, catalog.n_items))
        texts = [layout.history_text([{"sid": layout.sid_text(catalog.token_prefixes, catalog.sids[i]),
                                       **{f: str(fields[f][i]) for f in names}}]) for i in rows]
        ours = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        theirs = hf_tok(texts, add_special_tokens=False)["input_ids"]
        for i, text, a, b in zip(rows, texts, ours, theirs):
            if list(a) != list(b):
                raise ExportError(f"the engine's tokenizer and transformers' tokenise item {catalog.item_ids[i]!r} "
                                  f"differently ({text!r}: {list(a)} vs {list(b)}); report this with the checkpoint's "
                                  "tokenizer files and the transformers and tokenizers versions")
    return catalog.n_items


def _ids(catalog, h) -> str:
    shown = [str(catalog.item_ids[int(i)]) for i in h[:5]]
    return "[" + ", ".join(shown) + (", …" if len(h) > 5 else "") + "]"


def _difference(got: list[int], want: list[int], spec, hf_tok, catalog, h, chat: bool) -> str:
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    p, s = len(spec.prefix_ids), len(spec.suffix_ids)
    part = "the fused prefix" if i < p else "the fused suffix" if i >= len(got) - s else "the history"
    show = lambda ids: repr(hf_tok.decode(ids[max(0, i - 3): i + 4]))  # noqa: E731
    tok = lambda ids: ids[i] if i < len(ids) else None  # noqa: E731
    ours, theirs = hf_tok.decode(got), hf_tok.decode(want)
    c = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    text = "" if ours == theirs else (f" The texts differ at character {c}: engine {ours[max(0, c - 24): c + 24]!r}, "
                                      f"HF {theirs[max(0, c - 24): c + 24]!r}.")
    if chat and ours != theirs:
        fix = ("The checkpoint's chat template does not keep this user's message as written (it trims or rewrites "
               "it), so its rendering at export cannot stand for every user: give the layout a plain 'template' "
               "holding the text the pipeline fed, or an item/separator whose text the template keeps")
    else:
        fix = ("The prompt layout does not tokenise as declared; check its text, tokenize/add_special_tokens/bos "
               "settings and the item separator")
    return (f"the engine's prompt differs from the checkpoint tokenizer's at token {i} ({part}) for history "
            f"{_ids(catalog, h)}: engine id {tok(got)} in {show(got)}, HF id {tok(want)} in {show(want)} "
            f"({len(got)} vs {len(want)} ids).{text} {fix}")
