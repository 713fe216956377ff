"""The one prompt template shared by training, export and the runtime (torch-free).

Token layout of every sample::

    [instruction prefix][history: L SID tokens + item separator, per item][think block][target SID]

* direct: think block = ``<think></think>``
* pause:  think block = ``<think>`` + ``<pause>`` x k + ``</think>`` (constant: fused into the prefill graph)
* cot:    think block = ``<think>`` + rationale tokens + ``</think>``; the rationale is generated at run time

Everything here works on token ids, so the runtime needs no text tokenizer: an item's history
tokens come from the catalog's SID codes through ``sid_token_ids``. ``PromptSpec`` is saved as
``pauserec_card.json`` inside a checkpoint (together with training facts) and copied into the
engine manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pauserec.errors import CheckpointError

KINDS = ("direct", "pause", "cot")
CARD_FILE = "pauserec_card.json"
CARD_VERSION = 1

# Special tokens every pauserec tokenizer carries (besides one token per SID code).
THINK, THINK_END, PAUSE, ITEM_SEP = "<think>", "</think>", "<pause>", "<item_sep>"
INSTRUCTION = "Given the items this user interacted with, in order, recommend the next item."


@dataclass(frozen=True)
class PromptSpec:
    """Everything needed to turn a history of items into model input ids."""

    kind: str
    pause_k: int
    max_history: int
    instruction_ids: tuple[int, ...]
    item_sep_id: int
    think_id: int
    think_end_id: int
    pause_id: int
    eos_id: int
    pad_id: int
    sid_token_ids: tuple[tuple[int, ...], ...]  # [level][code] -> token id
    max_rationale: int = 64  # cot only: cap on generated rationale tokens

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"unknown model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "pause" and self.pause_k < 1:
            raise CheckpointError(f"a pause model needs pause_k >= 1, got {self.pause_k}")

    # -- layout ---------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.sid_token_ids)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(len(level) for level in self.sid_token_ids)

    @property
    def think_suffix(self) -> tuple[int, ...]:
        """Constant tokens after the history. For cot only ``<think>``: the rationale follows."""
        if self.kind == "direct":
            return (self.think_id, self.think_end_id)
        if self.kind == "pause":
            return (self.think_id, *([self.pause_id] * self.pause_k), self.think_end_id)
        return (self.think_id,)

    def sid_table(self) -> np.ndarray:
        """(L, max V) int64 table: token id of code c at level l (-1 beyond that level's size)."""
        table = np.full((self.levels, max(self.codebook_sizes)), -1, dtype=np.int64)
        for level, ids in enumerate(self.sid_token_ids):
            table[level, : len(ids)] = ids
        return table

    def history_ids(self, history_codes: np.ndarray) -> np.ndarray:
        """SID codes of the (already truncated) history items, (n, L) -> token ids (n * (L + 1),)."""
        codes = np.asarray(history_codes, dtype=np.int64).reshape(-1, self.levels)
        table = self.sid_table()
        tokens = table[np.arange(self.levels)[None, :], codes]  # (n, L)
        sep = np.full((len(codes), 1), self.item_sep_id, dtype=np.int64)
        return np.concatenate([tokens, sep], axis=1).reshape(-1)

    def prompt_ids(self, history_codes: np.ndarray) -> np.ndarray:
        """Full prompt up to (and including) the constant think suffix."""
        codes = np.asarray(history_codes, dtype=np.int64).reshape(-1, self.levels)[-self.max_history :]
        return np.concatenate(
            [np.asarray(self.instruction_ids, np.int64), self.history_ids(codes), np.asarray(self.think_suffix, np.int64)]
        )

    def target_ids(self, codes: np.ndarray) -> np.ndarray:
        """The L token ids of one target SID."""
        return self.sid_table()[np.arange(self.levels), np.asarray(codes, dtype=np.int64)]

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["instruction_ids"] = list(self.instruction_ids)
        d["sid_token_ids"] = [list(level) for level in self.sid_token_ids]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSpec:
        try:
            return cls(
                kind=d["kind"],
                pause_k=int(d["pause_k"]),
                max_history=int(d["max_history"]),
                instruction_ids=tuple(int(x) for x in d["instruction_ids"]),
                item_sep_id=int(d["item_sep_id"]),
                think_id=int(d["think_id"]),
                think_end_id=int(d["think_end_id"]),
                pause_id=int(d["pause_id"]),
                eos_id=int(d["eos_id"]),
                pad_id=int(d["pad_id"]),
                sid_token_ids=tuple(tuple(int(x) for x in level) for level in d["sid_token_ids"]),
                max_rationale=int(d.get("max_rationale", 64)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"prompt spec is incomplete or malformed ({e!r}); re-run `pauserec train`") from e


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
