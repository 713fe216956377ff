"""Graph inputs and outputs, declared once as data (torch-free).

Export (names, dynamic axes), TensorRT optimisation profiles, the manifest and the runtime's checks
all read these declarations: export writes ``GraphSpec.to_dict`` into the manifest and the runtime
reads it back with ``GraphSpec.from_manifest``. A dim is either an int (fixed by the model or the catalog) or a symbol:

* ``batch``: users per call; ``beams``: beams per user (K);
* ``hist``: history slots (items x (L + 1) tokens, right-padded);
* ``ctx``: context slots after the constant prefix. Prefill outputs ``hist + suffix_len`` of them;
  decode and think take any number (cot contexts grow by one slot per rationale token).

``resolve_dims`` turns symbols into ints for static shapes and TensorRT profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pauserec.errors import EngineError

DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16, "int8": np.int8}
# Engine precisions whose weights are stored in 16 bits and cast to float32 where they are read (CPU: no float16
# or bfloat16 MatMul); their sessions run operators in priority order (runtime.backends.ort.session_options).
CAST_WEIGHTS = ("fp16", "bf16")
KV = "kv"  # placeholder dtype of KV tensors: the engine's kv_dtype (KV_STORAGE)
# How an engine holds its KV cache between graph calls (the manifest's kv_dtype) -> the bytes the last axis
# of every KV tensor adds to head_dim. "int8": each (layer, user, head, slot) vector of head_dim values is stored
# as head_dim int8 values q, then two int8 lanes m and e encoding its scale s = (m + 192) * 2**(e - 7); the
# values are q * s (all zeros: 0). pauserec.export.onnx.kv_storage writes it; kv_int8_reference states it.
KV_STORAGE = {"float32": 0, "float16": 0, "int8": 2}


def kv_width(head_dim: int, kv_dtype: str) -> int:
    """The last axis of an engine's KV tensors: head_dim, plus the scale lanes of an int8 KV cache."""
    return head_dim + KV_STORAGE[kv_dtype]
SYMBOLS = ("batch", "beams", "hist", "ctx")
GRAPH_FILES = {"prefill": "prefill.onnx", "decode": "decode.onnx", "think": "think.onnx"}
# merged.onnx (pauserec.export.merge): every graph's inputs and outputs as "<graph>/<name>", and one boolean
# "<graph>/run" per graph; a run sets its graph's flag alone (the idle graphs compute nothing).
MERGED_SEP = "/"


def merged_name(graph: str, name: str) -> str:
    return f"{graph}{MERGED_SEP}{name}"


def run_flag(graph: str) -> str:
    """The merged model's input that makes ``graph`` compute."""
    return merged_name(graph, "run")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32" | KV
    dims: tuple[int | str, ...]

    def to_dict(self, kv_dtype: str = "float32") -> dict[str, Any]:
        if self.dtype != KV:
            return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}
        return {"name": self.name, "dtype": kv_dtype, "dims": [*self.dims[:-1], kv_width(self.dims[-1], kv_dtype)]}

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype]

    def shape(self, env: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape under ``env`` (symbol -> size); KeyError names an unbound symbol."""
        return tuple(d if isinstance(d, int) else int(env[d]) for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return GRAPH_FILES[self.name]

    @classmethod
    def from_manifest(cls, name: str, d: dict[str, Any]) -> GraphSpec:
        """The declaration as an engine's manifest holds it (concrete dtypes); EngineError when malformed."""
        try:
            def tensors(key: str) -> tuple[TensorSpec, ...]:
                return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["dims"])) for t in d[key])

            spec = cls(name, tensors("inputs"), tensors("outputs"))
            if d["file"] != spec.file:
                raise KeyError(f"file {d['file']!r} (expected {spec.file!r})")
        except (KeyError, TypeError) as e:
            raise EngineError(f"manifest entry of graph {name!r} is malformed ({e!r}); re-export the engine") from e
        bad = [t.dtype for t in (*spec.inputs, *spec.outputs) if t.dtype not in DTYPES]
        if bad:
            raise EngineError(f"graph {name!r} declares unknown dtype {bad[0]!r}; re-export the engine")
        return spec

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def to_dict(self, kv_dtype: str = "float32") -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_dict(kv_dtype) for t in self.inputs],
            "outputs": [t.to_dict(kv_dtype) for t in self.outputs],
        }


@dataclass(frozen=True)
class ModelShape:
    """The fixed sizes of one export: model, SID levels and the constant prompt parts."""

    kind: str
    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    codebook_sizes: tuple[int, ...]
    prefix_len: int
    suffix_len: int
    max_rationale: int = 0
    scoring: str = "full"  # "full": log_softmax over the vocabulary; "sid": over each level's codes
    after: int = 0  # tokens scored after the SID (PromptSpec.after_ids): decode steps with a one-token "codebook"
    after_think: int = 0  # cot: tokens forced after think_end, before the SID (PromptSpec.after_think_ids)

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def steps(self) -> int:
        """Decode calls of one search (and the beams' own KV slots): the SID levels after the first, then one per
        token scored after the SID."""
        return self.levels - 1 + self.after

    @property
    def first_width(self) -> int:
        """Width of prefill's log-probs: level-1 codes, or the full vocabulary for cot."""
        return self.vocab if self.kind == "cot" else self.codebook_sizes[0]

    @property
    def next_width(self) -> int:
        return max((*self.codebook_sizes[1:], *(1,) * self.after)) if self.steps else 0

    @property
    def ctx_extra(self) -> int:
        """Context slots a cot search adds after the prefill (rationale + ``</think>`` + the text forced after it)."""
        return self.max_rationale + 1 + self.after_think if self.kind == "cot" else 0


def _kv(name: str, *middle: int | str, shape: ModelShape) -> TensorSpec:
    return TensorSpec(name, KV, (shape.layers, "batch", shape.kv_heads, *middle, shape.head_dim))


def graph_specs(shape: ModelShape) -> dict[str, GraphSpec]:
    """The graphs of one engine: prefill, decode (when L > 1 or tokens are scored after the SID) and think (cot)."""
    s = shape
    ctx_kv = [_kv("ctx_key", "ctx", shape=s), _kv("ctx_value", "ctx", shape=s)]
    specs = {
        "prefill": GraphSpec(
            "prefill",
            inputs=(TensorSpec("history_ids", "int64", ("batch", "hist")), TensorSpec("history_mask", "int64", ("batch", "hist"))),
            outputs=(TensorSpec("logprobs", "float32", ("batch", s.first_width)), *ctx_kv),
        )
    }
    if s.steps:
        slots = s.steps
        beam_kv = [_kv(n, "beams", slots, shape=s) for n in ("beam_key", "beam_value")]
        specs["decode"] = GraphSpec(
            "decode",
            inputs=(
                TensorSpec("codes", "int64", ("batch", "beams")),
                TensorSpec("step", "int64", ()),
                *ctx_kv,
                TensorSpec("ctx_mask", "int64", ("batch", "ctx")),
                *beam_kv,
            ),
            outputs=(
                TensorSpec("logprobs", "float32", ("batch", "beams", s.next_width)),
                *[_kv(n, "beams", 1, shape=s) for n in ("new_key", "new_value")],  # slot ``step`` only
            ),
        )
    if s.kind == "cot":
        specs["think"] = GraphSpec(
            "think",
            inputs=(TensorSpec("token", "int64", ("batch",)), *ctx_kv, TensorSpec("ctx_mask", "int64", ("batch", "ctx"))),
            outputs=(
                TensorSpec("logprobs", "float32", ("batch", s.vocab)),
                _kv("new_key", 1, shape=s),
                _kv("new_value", 1, shape=s),
            ),
        )
    return specs


def resolve_dims(graph: str, shape: ModelShape, batch: int, beams: int, hist: int) -> dict[str, int]:
    """Symbol sizes of ``graph`` for a batch of ``batch`` users, ``beams`` beams, ``hist`` history slots
    (the prompt's history token budget, ``PromptSpec.max_history_tokens``).

    Prefill's ``ctx`` is what it outputs (hist + suffix); decode and think see the cot rationale too.
    """
    ctx = hist + shape.suffix_len + (0 if graph == "prefill" else shape.ctx_extra)
    return {"batch": batch, "beams": beams, "hist": hist, "ctx": ctx}


def freeze(spec: GraphSpec, env: dict[str, int]) -> GraphSpec:
    """The same graph with every symbol replaced by its size (static engines)."""

    def fix(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, t.shape(env))

    return GraphSpec(spec.name, tuple(map(fix, spec.inputs)), tuple(map(fix, spec.outputs)))
