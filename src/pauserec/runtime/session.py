"""Graph I/O as the manifest declares it, and the checks that hold a backend's session to it.

The runtime never imports ``pauserec.export``: the manifest is the one contract, so the I/O
declarations are read back from it here. A backend opens one ``Session`` per graph; its declared
inputs and outputs must match the manifest's (names, dtypes, ranks, fixed dims), else EngineError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pauserec.errors import EngineError

DTYPES = {"int64": np.int64, "float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class TensorIO:
    name: str
    dtype: str
    dims: tuple[int | str, ...]

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class GraphIO:
    name: str
    file: str
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    @classmethod
    def from_manifest(cls, name: str, d: dict[str, Any]) -> GraphIO:
        try:
            def tensors(key: str) -> tuple[TensorIO, ...]:
                return tuple(TensorIO(t["name"], t["dtype"], tuple(t["dims"])) for t in d[key])

            io = cls(name, d["file"], tensors("inputs"), tensors("outputs"))
        except (KeyError, TypeError) as e:
            raise EngineError(f"manifest entry of graph {name!r} is malformed ({e!r}); re-export the engine") from e
        bad = [t.dtype for t in (*io.inputs, *io.outputs) if t.dtype not in DTYPES]
        if bad:
            raise EngineError(f"graph {name!r} declares unknown dtype {bad[0]!r}; re-export the engine")
        return io

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class Session(Protocol):
    """One graph on one backend. Feeds and results are numpy arrays (or backend device values)."""

    io: GraphIO

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run the graph; outputs named in ``keep`` may stay on the device (opaque values the same
        backend accepts as feeds); every other output is a numpy array."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray: ...


def check_declared(io: GraphIO, actual_in: list[tuple[str, str, tuple]], actual_out: list[tuple[str, str, tuple]],
                   where: str) -> None:
    """Compare a loaded graph's (name, dtype, dims) lists with the manifest; EngineError listing differences."""
    problems: list[str] = []
    for kind, declared, actual in (("input", io.inputs, actual_in), ("output", io.outputs, actual_out)):
        if [t.name for t in declared] != [a[0] for a in actual]:
            problems.append(f"{kind}s {[a[0] for a in actual]} != manifest {[t.name for t in declared]}")
            continue
        for t, (name, dtype, dims) in zip(declared, actual):
            if dtype is not None and dtype != t.dtype:
                problems.append(f"{kind} {name}: dtype {dtype} != manifest {t.dtype}")
            if dims is not None and len(dims) != len(t.dims):
                problems.append(f"{kind} {name}: rank {len(dims)} != manifest {len(t.dims)}")
            elif dims is not None:
                fixed = [(a, b) for a, b in zip(dims, t.dims) if isinstance(a, int) and a >= 0 and isinstance(b, int)]
                if any(a != b for a, b in fixed):
                    problems.append(f"{kind} {name}: shape {list(dims)} != manifest {list(t.dims)}")
    if problems:
        raise EngineError(f"{where} does not match manifest.json: " + "; ".join(problems)
                          + ". The engine directory is inconsistent; re-export it with pauserec-export")
