"""The protocol of one graph on one backend, and the check that holds it to the manifest.

The I/O declarations are ``pauserec.runtime.spec.GraphSpec`` (read back from the manifest). A
backend opens one ``Session`` per graph; its declared inputs and outputs must match the manifest's
(names, dtypes, ranks, fixed dims), else EngineError.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from pauserec.errors import EngineError
from pauserec.runtime.spec import GraphSpec


class Session(Protocol):
    """One graph on one backend. Feeds and results are numpy arrays (or backend device values)."""

    io: GraphSpec

    def run(self, feeds: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run the graph; outputs named in ``keep`` may stay on the device (opaque values the same
        backend accepts as feeds); every other output is a numpy array."""
        ...

    def to_numpy(self, value: Any) -> np.ndarray: ...


def check_declared(io: GraphSpec, actual_in: list[tuple[str, str, tuple]], actual_out: list[tuple[str, str, tuple]],
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
