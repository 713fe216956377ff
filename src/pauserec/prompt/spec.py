"""The prompt at the token level, shared by training, export, the runtime, validation and baselines.

A ``PromptLayout`` (:mod:`pauserec.prompt.layout`: the text, declared as data) resolved against one
tokenizer and catalog gives a ``PromptSpec``: the token ids of every prompt are

    [prefix_ids][history ids][suffix_ids]        then the target SID (L tokens)

* ``prefix_ids``: the longest id prefix shared by every prompt (fused into the graphs as KV);
* ``suffix_ids``: the constant ids right before the first SID token (pauses, ``<think>…</think>``,
  ``"\n\n### Response:\n"``, a forced ``<|sid_begin|>``); also fused;
* the history ids, assembled per user in one of two ways, chosen at resolution by checking:
  ``ids``: each item is ``item_lead_ids + its SID tokens + item_tail_ids``, items joined by ``sep_ids``
  (no text tokenizer needed: the catalog's SID codes are enough); ``text``: the layout's text is
  rendered and tokenised with the checkpoint's tokenizer (``tokenizers``, no torch), for prompts whose
  ids depend on neighbours (item titles, numbering), then the fused prefix and suffix are cut off.
* the history budget: the ``max_history`` most recent items, then as many items as fit in
  ``max_history_tokens`` ids (the prefill graph's history slots).
* ``after_ids``: the tokens the pipeline generates after the SID and scores with it (MiniOneRec's
  ``"\n"`` + EOS); the search adds their log-probs to each beam's score. Empty: SID tokens alone.

``PromptSpec`` is saved in ``pauserec_card.json`` of a trained checkpoint and in every engine's manifest;
``PromptEncoder`` is the one place that turns histories into ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pauserec.prompt.layout import INSTRUCTION, ITEM_SEP, KINDS, PAUSE, THINK, THINK_END, PromptLayout
from pauserec.errors import CheckpointError, DataError

CARD_FILE = "pauserec_card.json"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer a text-assembled prompt is tokenised with (engines, checkpoints)
ITEMS_FILE = "items.json"  # item fields a text-assembled prompt renders ({item_id: {field: value}})
CARD_VERSION = 1
ASSEMBLY = ("ids", "text")
__all__ = ["CARD_FILE", "ITEMS_FILE", "TOKENIZER_FILE", "INSTRUCTION", "ITEM_SEP", "KINDS", "PAUSE", "THINK", "THINK_END", "PromptEncoder",
           "PromptSpec", "TrainingCard"]


@dataclass(frozen=True)
class PromptSpec:
    """Everything needed to turn a history of items into model input ids."""

    kind: str
    pause_k: int
    max_history: int
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    sid_token_ids: tuple[tuple[int, ...], ...]  # [level][code] -> token id
    eos_id: int
    pad_id: int
    max_history_tokens: int = 0  # history slots; 0: max_history full items
    assembly: str = "ids"
    item_lead_ids: tuple[int, ...] = ()
    item_tail_ids: tuple[int, ...] = ()
    sep_ids: tuple[int, ...] = ()
    text: dict[str, Any] | None = None  # text assembly: the resolved layout (PromptLayout.to_dict)
    think_end_id: int = -1  # cot: closes the rationale
    pause_id: int = -1
    item_sep_id: int = -1  # pauserec training: the grounding samples' separator
    think_id: int = -1
    max_rationale: int = 64  # cot only: cap on generated rationale tokens
    layout: str = "pauserec"
    fields: tuple[str, ...] = field(default=())  # item-file fields the text rendering reads
    after_ids: tuple[int, ...] = ()  # scored after the SID (the pipeline's "\n", EOS); () ranks by the SID alone
    after_think_ids: tuple[int, ...] = ()  # cot: forced after think_end, before the first SID token

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "pause" and self.pause_k < 1:
            raise CheckpointError(f"a pause model needs pause_k >= 1, got {self.pause_k}")
        if self.kind == "cot" and self.think_end_id < 0:
            raise CheckpointError("a cot model needs the token that ends its rationale (think_end)")
        if self.assembly not in ASSEMBLY:
            raise CheckpointError(f"unknown history assembly {self.assembly!r}; re-export the engine")
        if self.assembly == "text" and not self.text:
            raise CheckpointError("a text-assembled prompt needs its layout text; re-export the engine")
        if self.max_history_tokens <= 0:
            object.__setattr__(self, "max_history_tokens", self.max_history * self.item_width)

    # -- layout ---------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.sid_token_ids)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(len(level) for level in self.sid_token_ids)

    @property
    def item_width(self) -> int:
        """ids assembly: ids per item, its separator included (the last item's is not used)."""
        return len(self.item_lead_ids) + self.levels + len(self.item_tail_ids) + len(self.sep_ids)

    @property
    def rationale_end(self) -> tuple[int, ...]:
        """cot: the ids that close a rationale, fed after it: ``think_end`` (the model's own, or forced at
        ``max_rationale``), then the pipeline's forced text before the SID (``after_think_ids``)."""
        return (self.think_end_id, *self.after_think_ids)

    @property
    def embeds_any_token(self) -> bool:
        """Whether graphs may embed any vocabulary token (cot rationales, text-assembled histories)."""
        return self.kind == "cot" or self.assembly == "text"

    def embedded_ids(self) -> list[int]:
        """Every token id the graphs of an ids-assembled direct/pause engine embed: SID codes, the ids around and
        between items, padding and the fused suffix (the runtime feeds nothing else)."""
        return sorted({*(t for level in self.sid_token_ids for t in level), *self.item_lead_ids, *self.item_tail_ids,
                       *self.sep_ids, self.pad_id, self.eos_id, *self.suffix_ids, *self.after_ids})

    def describe(self) -> str:
        """One line for reports: which prompt a system runs."""
        parts = [f"{self.assembly} assembly", f"{len(self.prefix_ids)} + {len(self.suffix_ids)} fused ids",
                 f"at most {self.max_history} items"]
        if self.kind == "pause":
            parts.append(f"{self.pause_k} pauses")
        if self.after_think_ids:
            parts.append(f"{len(self.after_think_ids)} id(s) forced after the rationale")
        if self.after_ids:
            parts.append(f"{len(self.after_ids)} id(s) after the SID scored")
        return f"the {self.layout} prompt ({', '.join(parts)})"

    def sid_table(self) -> np.ndarray:
        """(L, max V) int64 table: token id of code c at level l (-1 beyond that level's size)."""
        table = np.full((self.levels, max(self.codebook_sizes)), -1, dtype=np.int64)
        for level, ids in enumerate(self.sid_token_ids):
            table[level, : len(ids)] = ids
        return table

    def target_ids(self, codes: np.ndarray) -> np.ndarray:
        """The L token ids of one target SID."""
        return self.sid_table()[np.arange(self.levels), np.asarray(codes, dtype=np.int64)]

    def item_rows(self, codes: np.ndarray) -> np.ndarray:
        """ids assembly: SID codes (n, L) -> each item's ids with its separator after it, (n, item_width)."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.levels)
        tokens = self.sid_table()[np.arange(self.levels)[None, :], codes]  # (n, L)
        n = len(codes)
        parts = [np.broadcast_to(np.asarray(self.item_lead_ids, np.int64), (n, len(self.item_lead_ids))), tokens,
                 np.broadcast_to(np.asarray(self.item_tail_ids, np.int64), (n, len(self.item_tail_ids))),
                 np.broadcast_to(np.asarray(self.sep_ids, np.int64), (n, len(self.sep_ids)))]
        return np.concatenate(parts, axis=1)

    def join_rows(self, rows: np.ndarray) -> np.ndarray:
        """Item rows (n, item_width) -> the history ids: every row, the last one without its separator."""
        flat = np.asarray(rows, np.int64).reshape(-1)
        return flat[: len(flat) - len(self.sep_ids)] if len(flat) else flat

    @property
    def kept_items(self) -> int:
        """ids assembly: the most recent history items the item and token budgets keep."""
        fit = (self.max_history_tokens + len(self.sep_ids)) // self.item_width
        return max(1, min(self.max_history, fit))

    def history_ids(self, history_codes: np.ndarray) -> np.ndarray:
        """ids assembly: SID codes of the history items (n, L) -> the history ids, truncated to the budget."""
        codes = np.asarray(history_codes, dtype=np.int64).reshape(-1, self.levels)
        return self.join_rows(self.item_rows(codes[-self.kept_items:]))

    def prompt_ids(self, history_codes: np.ndarray) -> np.ndarray:
        """ids assembly: the full prompt up to (and including) the constant suffix."""
        if self.assembly != "ids":
            raise DataError(f"the {self.layout!r} prompt is assembled from text; use PromptEncoder with the items")
        return np.concatenate([np.asarray(self.prefix_ids, np.int64), self.history_ids(history_codes),
                               np.asarray(self.suffix_ids, np.int64)])

    def text_layout(self) -> PromptLayout:
        """text assembly: the resolved layout (one kind, pauses expanded) the runtime renders."""
        layout = {k: v for k, v in self.text.items() if k != "bos_id"}
        return PromptLayout.from_dict(layout, source="the engine's prompt layout")

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        if "prefix_ids" not in d and "instruction_ids" in d:
            d = _from_v1(d)
        try:
            ints = lambda key: tuple(int(x) for x in d.get(key, ()))  # noqa: E731
            return cls(
                kind=d["kind"], pause_k=int(d["pause_k"]), max_history=int(d["max_history"]),
                prefix_ids=ints("prefix_ids"), suffix_ids=ints("suffix_ids"),
                sid_token_ids=tuple(tuple(int(x) for x in level) for level in d["sid_token_ids"]),
                eos_id=int(d["eos_id"]), pad_id=int(d["pad_id"]),
                max_history_tokens=int(d.get("max_history_tokens", 0)), assembly=d.get("assembly", "ids"),
                item_lead_ids=ints("item_lead_ids"), item_tail_ids=ints("item_tail_ids"), sep_ids=ints("sep_ids"),
                text=d.get("text"), think_end_id=int(d.get("think_end_id", -1)), pause_id=int(d.get("pause_id", -1)),
                item_sep_id=int(d.get("item_sep_id", -1)), think_id=int(d.get("think_id", -1)),
                max_rationale=int(d.get("max_rationale", 64)), layout=str(d.get("layout", "pauserec")),
                fields=tuple(d.get("fields", ())), after_ids=ints("after_ids"), after_think_ids=ints("after_think_ids"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"prompt spec is incomplete or malformed ({e!r}); re-run `pauserec train` or "
                                  "re-export the engine") from e

    def replace(self, **changes: Any) -> PromptSpec:
        d = self.to_dict()
        d.update(changes)
        if "max_history" in changes and "max_history_tokens" not in changes and self.assembly == "ids":
            d["max_history_tokens"] = 0  # recomputed from the new item budget
        return PromptSpec.from_dict(d)


def _from_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A card written before prompt layouts: pauserec's template with its ids named one by one."""
    kind, k = d["kind"], int(d.get("pause_k", 0))
    think, end, pause = int(d["think_id"]), int(d["think_end_id"]), int(d["pause_id"])
    suffix = {"direct": [think, end], "pause": [think, *[pause] * k, end], "cot": [think]}[kind]
    return {**d, "prefix_ids": d["instruction_ids"], "suffix_ids": suffix, "item_tail_ids": [d["item_sep_id"]],
            "think_end_id": end, "layout": "pauserec"}


class PromptEncoder:
    """Histories (dense catalog indices, oldest first) -> the ids between the fused prefix and suffix.

    ids assembly: a table of every catalog item's ids, gathered and joined. text assembly: the layout
    rendered with the items' SIDs (and fields) and tokenised with ``tokenizer`` (a ``tokenizers.Tokenizer``);
    a prompt that does not start with the fused prefix ids or end with the suffix ids raises DataError
    (its user cannot be served by this engine), never a silently different prompt.
    """

    def __init__(self, spec: PromptSpec, catalog, tokenizer=None, item_fields: dict[str, Sequence[str]] | None = None):
        self.spec, self.catalog = spec, catalog
        if spec.assembly == "ids":
            self.rows = spec.item_rows(catalog.sids)  # (n_items, item_width)
            self.keep = spec.kept_items
            return
        if tokenizer is None:
            raise CheckpointError("this prompt is assembled from text and needs the checkpoint's tokenizer.json")
        self.tok, self.layout = tokenizer, spec.text_layout()
        self.segments = self.layout.segments(spec.kind)
        self.bos = [int(spec.text["bos_id"])] if spec.text.get("bos_id") is not None else []
        missing = [f for f in spec.fields if f not in (item_fields or {})]
        if missing:
            raise DataError(f"the prompt renders item field(s) {', '.join(missing)}: pass the items file (--items) "
                            "that has them for every catalog item")
        self.values = {f: list(item_fields[f]) for f in spec.fields}
        for f, vals in self.values.items():
            if len(vals) != catalog.n_items:
                raise DataError(f"item field {f!r} has {len(vals)} values for {catalog.n_items} catalog items")
        self.prefix, self.suffix = list(spec.prefix_ids), list(spec.suffix_ids)

    def __call__(self, dense: np.ndarray) -> np.ndarray:
        """One history -> its history ids (most recent items kept within the budget)."""
        return self.many([dense])[0]

    def many(self, histories: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.many_kept(histories)[0]

    def many_kept(self, histories: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        """(history ids, items kept) of each history: the most recent items that fit the item and token budgets."""
        spec = self.spec
        if spec.assembly == "ids":  # the hot path: one gather per user, the same join as history_ids
            keep, rows = self.keep, self.rows
            hists = [np.asarray(h) for h in histories]
            return [spec.join_rows(rows[h[-keep:]]) for h in hists], [min(len(h), keep) for h in hists]
        kept = [np.asarray(h, np.int64)[-spec.max_history:] for h in histories]
        ids = self._text_ids(kept)
        for i, h in enumerate(kept):  # drop the oldest items until the history fits its token budget
            while len(ids[i]) > spec.max_history_tokens and len(h) > 1:
                h = h[1:]
                ids[i] = self._text_ids([h])[0]
            kept[i] = h
            if len(ids[i]) > spec.max_history_tokens:
                raise DataError(f"the item {self.catalog.item_ids[int(h[0])]!r} alone needs {len(ids[i])} history "
                                f"tokens, more than the engine's {spec.max_history_tokens}; re-export with a larger "
                                "max_history_tokens")
        return ids, [len(h) for h in kept]

    def full(self, dense: np.ndarray) -> np.ndarray:
        """The whole prompt of one history (fused prefix and suffix included)."""
        return np.concatenate([np.asarray(self.spec.prefix_ids, np.int64), self(dense),
                               np.asarray(self.spec.suffix_ids, np.int64)])

    def text(self, dense: np.ndarray) -> list[str]:
        """text assembly: the rendered text segments of one (already truncated) history."""
        cat = self.catalog
        items = [{"sid": self.layout.sid_text(cat.token_prefixes, cat.sids[int(i)]),
                  **{f: str(v[int(i)]) for f, v in self.values.items()}} for i in dense]
        return self.layout.render(self.segments, items)

    def _text_ids(self, histories: list[np.ndarray]) -> list[np.ndarray]:
        texts = [self.text(h) for h in histories]
        add = bool(self.layout.add_special_tokens)
        per_seg = [self.tok.encode_batch([t[s] for t in texts], add_special_tokens=add) for s in range(len(self.segments))]
        out = []
        p, s = len(self.prefix), len(self.suffix)
        for i in range(len(texts)):
            ids = self.bos + [t for seg in per_seg for t in seg[i].ids]
            if ids[:p] != self.prefix or ids[len(ids) - s:] != self.suffix or len(ids) < p + s:
                raise DataError(
                    "this history's prompt does not tokenise to the engine's fused prefix/suffix (a tokenizer merge "
                    f"across the history's edge): {texts[i]!r}. Report it with the prompt layout; the engine cannot "
                    "serve it exactly")
            out.append(np.asarray(ids[p: len(ids) - s], np.int64))
        return out


@dataclass
class TrainingCard:
    """``pauserec_card.json``: the prompt spec plus what produced the checkpoint."""

    prompt: PromptSpec
    dataset: str = ""
    index: str = ""
    seed: int = 0
    preset: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # epochs, lr, wall_time_s, final_loss, ...
    version: int = CARD_VERSION

    def save(self, ckpt_dir: str | Path) -> Path:
        path = Path(ckpt_dir) / CARD_FILE
        d = {
            "version": self.version,
            "prompt": self.prompt.to_dict(),
            "dataset": self.dataset,
            "index": self.index,
            "seed": self.seed,
            "preset": self.preset,
            "model_config": self.model_config,
            "train": self.train,
        }
        path.write_text(json.dumps(d, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, ckpt_dir: str | Path) -> TrainingCard:
        path = Path(ckpt_dir) / CARD_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path} not found: this checkpoint has no pauserec training card. Train it with "
                "`pauserec train`, or pass --kind/--data/--index overrides to the command."
            )
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-run `pauserec train`") from e
        if d.get("version") != CARD_VERSION:
            raise CheckpointError(f"{path} has card version {d.get('version')!r}, this pauserec reads {CARD_VERSION}")
        return cls(
            prompt=PromptSpec.from_dict(d.get("prompt", {})),
            dataset=d.get("dataset", ""),
            index=d.get("index", ""),
            seed=int(d.get("seed", 0)),
            preset=d.get("preset", ""),
            model_config=d.get("model_config", {}),
            train=d.get("train", {}),
        )
