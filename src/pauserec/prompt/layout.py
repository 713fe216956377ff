"""The prompt as data: how a pipeline turns a user's history into the text its model reads (torch-free).

A ``PromptLayout`` declares, once, everything that decides a model's input ids:

* ``template``: the prompt text with one ``{history}`` placeholder; after it, ``{pauses}`` may stand for
  ``pause_token`` x k (pause models). A list of strings is a prompt tokenised *per segment* (each
  string on its own, ids concatenated: MiniOneRec); a mapping ``{kind: template}`` gives each model
  kind its own text (pauserec's ``<think>…</think>`` block). Everything after ``{history}`` up to the
  end is the suffix right before the first SID token: pauses, ``<think>\\n\\n</think>\\n``, a forced
  ``<|sid_begin|>``, ``"\\n\\n### Response:\\n"``.
* ``chat``: instead of ``template``, the checkpoint's own chat template rendered with a pinned system
  prompt and a user message holding ``{history}`` (plus ``assistant``: text forced after the
  generation prompt). Rendered once at export into a plain template (``pauserec.prompt.hf``), so
  everything else the template reads is declared: ``template_kwargs`` (the switches the pipeline passed,
  ``enable_thinking``) and ``pin`` (inputs whose export-time value the engine keeps for good: a date,
  ``{"date_string": "26 Jul 2024"}``, or ``null`` to keep what the template renders at export, e.g. its
  ``strftime_now`` clock). Export refuses a template that reads anything else that changes its output.
* ``item``: one history item: ``{sid}`` (its SID tokens, each spelt by ``sid_token``), ``{n}`` (its
  1-based position in the kept history) and any field of the items file (``{title}``); items are
  joined by ``separator``.
* tokenisation: ``tokenize`` ("whole" or "segments"), ``add_special_tokens`` (as passed to the
  tokenizer for every segment: a Llama tokenizer's post-processor adds its BOS) and ``bos`` (put the
  tokenizer's BOS token first once, as MiniOneRec's ``encode(bos=True)``).
* the history budget: the ``max_history`` most recent items, then (``max_history_tokens``) the oldest
  items dropped until the history's tokens fit.
* ``think_end`` and ``after_think`` (cot): the token that closes the rationale, and the text the pipeline
  forces after it, before the first SID token (OneRec-Think: ``"\n<|sid_begin|>"``).
* ``after_sid``: what the pipeline's own ``generate`` produces after the SID and scores with it
  (``{eos}`` is the tokenizer's end-of-sequence token, last if present): MiniOneRec ``"\n{eos}"``,
  LC-Rec ``"{eos}"``. The engine adds those tokens' log-probs to each beam's score (under the ``full``
  rule), so that its ranking is the pipeline's; absent (None), beams are ranked by their SID tokens alone.

Presets reproduce the evaluation prompts of known pipelines (``PRESETS``; ``pauserec`` is this
toolkit's own); any other prompt is a JSON file with the same fields (``load_layout``).
``resolve_layout`` (in :mod:`pauserec.prompt.spec`) turns a layout, a tokenizer and a catalog into the
token-level ``PromptSpec`` that training, export and the runtime use.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pauserec.errors import DataError

KINDS = ("direct", "pause", "cot")
HISTORY, PAUSES, EOS = "{history}", "{pauses}", "{eos}"
CHAT_KEYS = ("system", "user", "assistant", "template_kwargs", "pin")
CLOCK_INPUTS = ("strftime_now", "date_string")  # template inputs that change with the day: only ever pinned
TOKENIZE = ("whole", "segments")
FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
BUILTIN_FIELDS = ("sid", "n")

# -- pauserec's own template --------------------------------------------------------------------------
THINK, THINK_END, PAUSE, ITEM_SEP = "<think>", "</think>", "<pause>", "<item_sep>"
INSTRUCTION = "Given the items this user interacted with, in order, recommend the next item."

# -- MiniOneRec (data.py, EvalSidDataset.pre / generate_prompt) ------------------------------------------
MINIONEREC_INSTRUCTION = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\nCan you predict the next possible item that the user may expect?\n\n"
)
MINIONEREC_INPUT = (
    "### User Input: \nCan you predict the next possible item the user may expect, given the following "
    "chronological interaction history: {history}\n\n### Response:\n"
)

# -- LC-Rec (prompt.py: sft_prompt and the 17 "seqrec" instructions; {inters} is the history) --------------
LCREC_WRAPPER = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n{instruction}\n\n### Response:")
LCREC_SEQREC = (
    "The user has interacted with items {inters} in chronological order. Can you predict the next possible item "
    "that the user may expect?",
    "I find the user's historical interactive items: {inters}, and I want to know what next item the user needs. "
    "Can you help me decide?",
    "Here are the user's historical interactions: {inters}, try to recommend another item to the user. Note that "
    "the historical interactions are arranged in chronological order.",
    "Based on the items that the user has interacted with: {inters}, can you determine what item would be "
    "recommended to him next?",
    "The user has interacted with the following items in order: {inters}. What else do you think the user need?",
    "Here is the item interaction history of the user: {inters}, what to recommend to the user next?",
    "Which item would the user be likely to interact with next after interacting with items {inters}?",
    "By analyzing the user's historical interactions with items {inters}, what is the next expected interaction "
    "item?",
    "After interacting with items {inters}, what is the next item that could be recommended for the user?",
    "Given the user's historical interactive items arranged in chronological order: {inters}, can you recommend a "
    "suitable item for the user?",
    "Considering the user has interacted with items {inters}. What is the next recommendation for the user?",
    "What is the top recommended item for the user who has previously interacted with items {inters} in order?",
    "The user has interacted with the following items in the past in order: {inters}. Please predict the next "
    "item that the user most desires based on the given interaction records.",
    "Using the user's historical interactions as input data, suggest the next item that the user is highly likely "
    "to enjoy. The historical interactions are provided as follows: {inters}.",
    "You can access the user's historical item interaction records: {inters}. Now your task is to recommend the "
    "next potential item to him, considering his past interactions.",
    "You have observed that the user has interacted with the following items: {inters}, please recommend a next "
    "item that you think would be suitable for the user.",
    "You have obtained the ordered list of user historical interaction items, which is as follows: {inters}. "
    "Using this history as a reference, please select the next item to recommend to the user.",
)

# -- OneRec-Think (test_model_hitrate.py: format_chat_prompt; ChatML written by hand) ----------------------
ONERECTHINK_SYSTEM = (
    "You are a professional recommendation expert who needs to recommend the next possible purchase for users "
    "based on their purchase history. Please predict the most likely next product that the user will purchase "
    "based on the user's historical purchase information."
)
_ONERECTHINK_HEAD = (f"<|im_start|>system\n{ONERECTHINK_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                     "The user has purchased the following items: {history};<|im_end|>\n<|im_start|>assistant\n")


@dataclass(frozen=True)
class PromptLayout:
    """The text layout of a model's prompt (see the module docstring for every field)."""

    name: str = "custom"
    template: Any = None  # str | list[str] | {kind: str | list[str]}
    chat: dict[str, Any] | None = None  # {"system", "user", "assistant", "template_kwargs"}
    tokenize: str = "whole"
    add_special_tokens: bool = False
    bos: bool = False
    item: str = "{sid}"
    separator: str = ""
    sid_token: str = "<{prefix}_{code}>"
    pause_token: str | None = None
    think_end: str | None = None  # cot: the token that closes the rationale
    after_think: str | None = None  # cot: text forced after think_end, before the first SID token
    max_history: int | None = None
    max_history_tokens: int | None = None
    description: str = ""
    kinds: tuple[str, ...] = ()  # the model kinds it has a prompt for; () derives them from the template
    after_sid: str | None = None  # generated (and scored) after the SID by the pipeline; "{eos}": the EOS token

    def __post_init__(self) -> None:
        where = f"prompt layout {self.name!r}"
        if not self.kinds:
            object.__setattr__(self, "kinds", self._derived_kinds())
        if any(k not in KINDS for k in self.kinds):
            raise DataError(f"{where}: kinds {list(self.kinds)} must be among {', '.join(KINDS)}")
        if (self.template is None) == (self.chat is None):
            raise DataError(f"{where}: give exactly one of 'template' (the prompt text) or 'chat' (the checkpoint's "
                            "chat template with a pinned system prompt)")
        if self.tokenize not in TOKENIZE:
            raise DataError(f"{where}: tokenize is {self.tokenize!r}; use 'whole' or 'segments'")
        if self.chat is not None:
            if not isinstance(self.chat, dict) or not isinstance(self.chat.get("user"), str):
                raise DataError(f"{where}: 'chat' needs a 'user' message text holding {HISTORY}")
            if self.chat["user"].count(HISTORY) != 1:
                raise DataError(f"{where}: the chat user message must hold {HISTORY} exactly once")
            unknown = sorted(set(self.chat) - set(CHAT_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown chat field(s) {', '.join(unknown)}; known: {', '.join(CHAT_KEYS)}")
            for key in ("template_kwargs", "pin"):
                if not isinstance(self.chat.get(key, {}), dict):
                    raise DataError(f"{where}: chat.{key} must be a JSON object {{name: value}}")
            clock = [k for k in CLOCK_INPUTS if k in self.chat.get("template_kwargs", {})]
            if clock:
                raise DataError(f"{where}: chat.template_kwargs sets {', '.join(clock)}, a date; move it to chat.pin "
                                "so that the export says the engine keeps that date for good")
            if self.chat.get("pin", {}).get("strftime_now") is not None:
                raise DataError(f"{where}: chat.pin.strftime_now must be null (strftime_now is the template's clock "
                                "and takes no value: null keeps the date it renders at export); to fix another date, "
                                "pin the variable the template writes it into (date_string)")
        else:
            for kind in self.kinds:
                self.segments(kind)  # validates every kind's template
        if self.item.count("{sid}") != 1:
            raise DataError(f"{where}: item {self.item!r} must hold {{sid}} exactly once")
        unknown_sid = set(FIELD_RE.findall(self.sid_token)) - {"prefix", "code"}
        if unknown_sid or "{code}" not in self.sid_token:
            raise DataError(f"{where}: sid_token {self.sid_token!r} must use {{code}} and may use {{prefix}} only")
        if self.max_history is None or int(self.max_history) < 1:
            raise DataError(f"{where}: max_history (the most recent items kept) must be >= 1; the preset or file "
                            "must say how many items the model was trained to read")
        if self.max_history_tokens is not None and int(self.max_history_tokens) < 1:
            raise DataError(f"{where}: max_history_tokens must be >= 1 (or absent)")
        if self.after_think is not None and (not isinstance(self.after_think, str) or not self.think_end):
            raise DataError(f"{where}: after_think is text forced after think_end (a cot layout's rationale end); "
                            "it needs think_end")
        if self.after_sid is not None:
            if not isinstance(self.after_sid, str) or not self.after_sid:
                raise DataError(f"{where}: after_sid must be the text generated after the SID (e.g. \"\\n{EOS}\"), "
                                "or absent")
            body = self.after_sid[: -len(EOS)] if self.after_sid.endswith(EOS) else self.after_sid
            if EOS in body or set(FIELD_RE.findall(self.after_sid)) - {"eos"}:
                raise DataError(f"{where}: after_sid {self.after_sid!r} may use {EOS} only, and only at its end")

    def _derived_kinds(self) -> tuple[str, ...]:
        """A mapping template names its kinds; one text serves a pause model when it holds {pauses}, else a
        direct model (and a cot model when it names the ``think_end`` that closes the rationale)."""
        if isinstance(self.template, dict):
            return tuple(k for k in KINDS if k in self.template)
        text = json.dumps(self.template if self.template is not None else self.chat)
        if PAUSES in text:
            return ("pause",)
        return ("direct", "cot") if self.think_end else ("direct",)

    # -- text ---------------------------------------------------------------------------------------
    def segments(self, kind: str) -> tuple[str, ...]:
        """The template of ``kind`` as segments (one unless tokenised per segment), placeholders intact."""
        where = f"prompt layout {self.name!r}"
        if self.chat is not None:
            raise DataError(f"{where} is a chat layout: render it with the checkpoint's tokenizer first "
                            "(pauserec.prompt.hf.render_chat)")
        t = self.template
        if isinstance(t, dict):
            if kind not in t:
                raise DataError(f"{where} has no template for {kind} models (it has {', '.join(t)})")
            t = t[kind]
        segs = (t,) if isinstance(t, str) else tuple(t) if isinstance(t, list | tuple) else None
        if not segs or not all(isinstance(s, str) for s in segs):
            raise DataError(f"{where}: template must be a string, a list of strings or {{kind: ...}}")
        if len(segs) > 1 and self.tokenize != "segments":
            raise DataError(f"{where}: a template of several segments needs tokenize='segments'")
        joined = "\x00".join(segs)
        if joined.count(HISTORY) != 1:
            raise DataError(f"{where}: the {kind} template must hold {HISTORY} exactly once")
        if PAUSES in joined:
            if joined.index(PAUSES) < joined.index(HISTORY):
                raise DataError(f"{where}: {PAUSES} must come after {HISTORY} (the pauses precede the answer)")
            if not self.pause_token:
                raise DataError(f"{where}: the template uses {PAUSES} but names no pause_token")
        return segs

    def with_pause_template(self) -> PromptLayout:
        """This layout with a pause template, the one place a pause prompt is derived: its own when it has one;
        else (a layout with only a direct template: minionerec, lc-rec) the direct template with ``{pauses}`` at its
        very end, right before the first SID token, where PauseRec puts the pauses (just before the answer).
        ``pause_token`` defaults to ``<pause>``. Training (``pauserec train --prompt``) and export both call it."""
        if "pause" in self.kinds:
            return self
        if self.chat is not None or "direct" not in self.kinds:
            raise DataError(f"prompt layout {self.name!r} has no pause template, and a pause prompt is derived only "
                            "from a plain direct 'template': write the layout's pause template with {pauses} where "
                            "the pauses go")
        direct = list(self.segments("direct"))
        direct[-1] += PAUSES
        own = self.template if isinstance(self.template, dict) else {k: self.template for k in self.kinds}
        return PromptLayout.from_dict({**self.to_dict(), "template": {**own, "pause": direct if len(direct) > 1
                                                                      else direct[0]},
                                       "pause_token": self.pause_token or PAUSE,
                                       "kinds": [k for k in KINDS if k in self.kinds or k == "pause"]},
                                      source=self.name)

    def chat_messages(self, history_text: str) -> list[dict[str, str]]:
        """A chat layout's messages for one user: the pinned system prompt (if any) and the user message with
        ``history_text`` in place of ``{history}``."""
        chat = self.chat
        system = [{"role": "system", "content": chat["system"]}] if chat.get("system") is not None else []
        return [*system, {"role": "user", "content": chat["user"].replace(HISTORY, history_text)}]

    def chat_kwargs(self) -> dict[str, Any]:
        """What a chat layout passes to ``apply_chat_template`` besides the messages: its ``template_kwargs`` and
        the pinned values (a ``null`` pin is not passed: the template renders it as it does at export)."""
        pins = {k: v for k, v in self.chat.get("pin", {}).items() if v is not None}
        return {**self.chat.get("template_kwargs", {}), **pins}

    def item_fields(self) -> tuple[str, ...]:
        """Item-file fields the item rendering needs (besides the built-in ``sid`` and ``n``)."""
        names = FIELD_RE.findall(self.item)
        return tuple(dict.fromkeys(n for n in names if n not in BUILTIN_FIELDS))

    def sid_text(self, prefixes, codes) -> str:
        return "".join(fill(self.sid_token, {"prefix": p, "code": str(int(c))}) for p, c in zip(prefixes, codes))

    def history_text(self, items: list[dict[str, str]]) -> str:
        """What ``{history}`` becomes: ``items`` (the kept history items' fields: ``sid`` + file fields), each
        rendered by ``item`` with its 1-based position ``n``, joined by ``separator``."""
        return self.separator.join(fill(self.item, {**it, "n": str(i + 1)}) for i, it in enumerate(items))

    def render(self, segments: tuple[str, ...], items: list[dict[str, str]], pause_k: int = 0) -> list[str]:
        """Text segments of one prompt (``items`` as for ``history_text``)."""
        history = self.history_text(items)
        pauses = (self.pause_token or "") * int(pause_k)
        return [s.replace(HISTORY, history).replace(PAUSES, pauses) for s in segments]

    # -- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "prompt layout") -> PromptLayout:
        if not isinstance(d, dict):
            raise DataError(f"{source}: expected a JSON object with the prompt layout fields")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        d["kinds"] = tuple(d.get("kinds") or ())
        return cls(**d)


def fill(text: str, values: dict[str, str]) -> str:
    """``{name}`` placeholders of ``text`` replaced by ``values`` (other braces left as they are)."""
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            raise DataError(f"the prompt's item text uses {{{name}}}, which this item does not have; pass an items "
                            "file (--items) with that field, or change the layout's 'item'")
        return values[name]

    return FIELD_RE.sub(sub, text)


# -- presets ---------------------------------------------------------------------------------------------
def _pauserec() -> PromptLayout:
    return PromptLayout(
        name="pauserec",
        template={"direct": INSTRUCTION + HISTORY + THINK + THINK_END,
                  "pause": INSTRUCTION + HISTORY + THINK + PAUSES + THINK_END,
                  "cot": INSTRUCTION + HISTORY + THINK},
        item="{sid}" + ITEM_SEP, pause_token=PAUSE, think_end=THINK_END, max_history=20,
        description="pauserec train's own template: instruction, SID + <item_sep> per item, <think> block",
    )


def _minionerec() -> PromptLayout:
    return PromptLayout(
        name="minionerec", template=[MINIONEREC_INSTRUCTION, MINIONEREC_INPUT], tokenize="segments",
        bos=True, add_special_tokens=False, item="{sid}", separator=", ", max_history=10, kinds=("direct",),
        after_sid="\n" + EOS,
        description="MiniOneRec EvalSidDataset: instruction block and user block tokenised separately; SIDs "
                    "joined by ', '; the last 10 items (its data keeps 10); its generate scores the SID, '\\n' "
                    "and EOS",
    )


def _lcrec(arg: str | None) -> PromptLayout:
    try:
        idx = int(arg) if arg not in (None, "") else 0
        instruction = LCREC_SEQREC[idx]
    except (ValueError, IndexError):
        raise DataError(f"preset lc-rec:{arg}: LC-Rec has seqrec templates 0..{len(LCREC_SEQREC) - 1}; "
                        "write lc-rec:N (default 0)") from None
    return PromptLayout(
        name=f"lc-rec:{idx}", template=LCREC_WRAPPER.replace("{instruction}", instruction.replace("{inters}", HISTORY)),
        add_special_tokens=True, item="{sid}", separator=", ", max_history=20, kinds=("direct",), after_sid=EOS,
        description=f"LC-Rec seqrec template {idx} in its sft_prompt, empty response; SIDs joined by ', '; "
                    "the last 20 items; whole string with the tokenizer's special tokens (BOS); its generate "
                    "scores the SID and EOS",
    )


def _onerec_think() -> PromptLayout:
    return PromptLayout(
        name="onerec-think",
        template={"direct": _ONERECTHINK_HEAD + "<think>\n\n</think>\n<|sid_begin|>",
                  "pause": _ONERECTHINK_HEAD + PAUSES + "\n<|sid_begin|>",
                  "cot": _ONERECTHINK_HEAD + "<think>\n"},
        think_end="</think>", after_think="\n<|sid_begin|>",
        add_special_tokens=True, item="<|sid_begin|>{sid}<|sid_end|>", separator="; ", pause_token="<|thought|>",
        max_history=20, kinds=("direct", "pause", "cot"), after_sid="<|sid_end|>" + EOS,
        description="OneRec-Think test prompt (ChatML by hand, fixed system prompt, '; '-joined SIDs and a "
                    "trailing ';'); <|sid_begin|> forced before the first SID token, its trie then forces <|sid_end|> "
                    "and EOS. pause: the <|thought|> fork's training layout (<|thought|> x k + newline instead of "
                    "the think block). cot: its reasoning-activation target, <think>\\n{rationale}</think>\\n "
                    "then <|sid_begin|> and the SID (one greedy rationale, not its 4 sampled ones)",
    )


PRESETS = {"pauserec": _pauserec, "minionerec": _minionerec, "lc-rec": _lcrec, "onerec-think": _onerec_think}


def preset(name: str) -> PromptLayout:
    """A preset by name (``lc-rec:N`` picks LC-Rec's seqrec template N)."""
    base, _, arg = name.partition(":")
    if base not in PRESETS:
        raise DataError(f"unknown prompt preset {name!r}; presets: {', '.join(PRESETS)} (lc-rec:N for LC-Rec's "
                        "template N), or give a JSON layout file")
    if base == "lc-rec":
        return _lcrec(arg)
    if arg:
        raise DataError(f"preset {base!r} takes no ':{arg}'")
    return PRESETS[base]()


def load_layout(spec: str | Path, **overrides: Any) -> PromptLayout:
    """A preset name or a JSON layout file; ``overrides`` (None values ignored) replace fields."""
    path = Path(spec)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not a valid JSON prompt layout ({e})") from e
        layout = PromptLayout.from_dict(raw, source=str(path))
    elif str(spec).endswith(".json") or "/" in str(spec):
        raise DataError(f"prompt layout file {spec} not found")
    else:
        layout = preset(str(spec))
    changes = {k: v for k, v in overrides.items() if v is not None}
    return PromptLayout.from_dict({**layout.to_dict(), **changes}, source=layout.name) if changes else layout


def read_item_fields(items: Path | None, catalog, fields: tuple[str, ...],
                     known: dict[str, dict[str, str]] | None = None) -> dict[str, list[str]] | None:
    """Fields the prompt renders per item, in catalog order, from an LC-Rec ``.item.json``
    (``{item_id: {field: value}}``) or a MiniOneRec ``info`` file (``SID\ttitle\titem_id`` lines: ``title``);
    ``known``: rows already held (an engine's items.json), used for the items the file does not have."""
    if not fields:
        return None
    if items is None and known is None:
        raise DataError(f"the prompt renders item field(s) {', '.join(fields)}: pass --items ITEMS.json "
                        "(LC-Rec .item.json) or the MiniOneRec info .txt")
    table = _read_items_file(Path(items)) if items is not None else {}
    out: dict[str, list[str]] = {f: [] for f in fields}
    for item in catalog.item_ids:
        row = table.get(str(item), (known or {}).get(str(item)))
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{items or 'the engine'}: item {item!r} has no {', '.join(missing)}; every catalog item "
                            "needs the fields the prompt renders (pass --items with them)")
        for f in fields:
            out[f].append(str(row[f]))
    return out


def _read_items_file(items: Path) -> dict:
    if not items.is_file():
        raise DataError(f"--items {items} not found")
    if items.suffix == ".txt":
        table = {}
        for n, line in enumerate(items.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) < 3:
                raise DataError(f"{items}:{n}: expected 'SID<TAB>title<TAB>item_id', got {line[:80]!r}")
            table[parts[2].strip()] = {"title": parts[1]}
    else:
        try:
            table = json.loads(items.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{items} is not valid JSON ({e})") from e
        if not isinstance(table, dict):
            raise DataError(f"{items}: expected {{item_id: {{field: value}}}}")
    return table
