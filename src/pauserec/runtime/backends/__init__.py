"""Backends behind one small protocol (``pauserec.runtime.session.Session``).

* ``cpu``: ONNX Runtime, CPU execution provider;
* ``cuda``: ONNX Runtime's CUDA execution provider with IO binding (needs onnxruntime-gpu + a GPU);
* ``tensorrt``: the engine's ``.plan`` files through ``tensorrt`` + ``cuda-python``.

``auto`` picks the first usable of tensorrt (when the engine has plans), cuda, cpu. An explicitly
requested backend that is not usable raises BackendUnavailable saying what to install; nothing
falls back silently.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

from pauserec.errors import BackendUnavailable, EngineError
from pauserec.runtime.session import Session
from pauserec.runtime.spec import GraphSpec

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, Kubernetes
    limits), which ``os.cpu_count()`` and ONNX Runtime's default thread count both ignore."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        q, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        quota = None if q == "max" else int(q) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            quota = q / int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read()) if q > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(n, math.ceil(quota)) if quota else n)


def unavailable_reason(provider: str, has_plans: bool = True) -> str | None:
    """None when ``provider`` can run here (for an engine with/without TensorRT plans)."""
    if provider == "cpu":
        return None
    if provider == "cuda":
        from pauserec.runtime.backends.ort import cuda_unavailable_reason

        return cuda_unavailable_reason()
    if provider == "tensorrt":
        if not has_plans:
            return ("this engine has no TensorRT plans: export it with pauserec-export --backend tensorrt "
                    "--static --batch B --beams K")
        from pauserec.runtime.backends.trt import unavailable_reason as trt_reason

        return trt_reason()
    raise BackendUnavailable(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")


def open_sessions(path: Path, graphs: dict[str, GraphSpec], plans: dict[str, str], provider: str,
                  threads: int | None, prepack: bool = False, merged: str | None = None,
                  tf32: bool = False, spin: bool = False, cast_weights: bool = False) -> tuple[str, dict[str, Session]]:
    """(provider used, graph name -> session); ``prepack``, ``merged``, ``tf32``, ``spin``: see ``Engine.load``;
    ``cast_weights``: see ``ort.session_options``."""
    if provider not in PROVIDERS:
        raise BackendUnavailable(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if provider == "auto":
        for candidate in ("tensorrt", "cuda"):
            if unavailable_reason(candidate, bool(plans)) is None:
                try:
                    return candidate, _open(path, graphs, plans, candidate, threads, prepack, merged, tf32, spin,
                                            cast_weights)
                except BackendUnavailable:
                    continue
        return "cpu", _open(path, graphs, plans, "cpu", threads, prepack, merged, tf32, spin, cast_weights)
    reason = unavailable_reason(provider, bool(plans))
    if reason:
        raise BackendUnavailable(f"provider {provider!r} is not usable: {reason}")
    return provider, _open(path, graphs, plans, provider, threads, prepack, merged, tf32, spin, cast_weights)


def _open(path: Path, graphs: dict[str, GraphSpec], plans: dict[str, str], provider: str,
          threads: int | None, prepack: bool, merged: str | None = None, tf32: bool = False,
          spin: bool = False, cast_weights: bool = False) -> dict[str, Session]:
    if provider == "tensorrt":
        from pauserec.runtime.backends.trt import TrtSession

        missing = [g for g in graphs if g not in plans]
        if missing:
            raise EngineError(f"the engine lists no TensorRT plan for {', '.join(missing)}; re-export it")
        return {name: TrtSession(path / plans[name], io) for name, io in graphs.items()}
    from pauserec.runtime.backends.ort import MergedSession, OrtSession
    from pauserec.runtime.weights import WEIGHTS_FILE, WeightStore

    from pauserec.runtime.memory import dropping_mapped_pages

    # the kernels hold their own copies when they prepack (or live on a GPU): the pages read at load are not read
    # again, and are dropped while the sessions open, not after (see dropping_mapped_pages)
    copies = prepack or provider != "cpu"
    with dropping_mapped_pages(path / WEIGHTS_FILE) if copies else contextlib.nullcontext():
        if provider == "cpu" and prepack and merged:  # one session: each weight packed once for every graph
            sessions = dict(MergedSession(path / merged, graphs, threads, spin, cast_weights).views)
        else:
            store = WeightStore(path / WEIGHTS_FILE)  # one mapped copy of the weights for every graph
            sessions = {name: OrtSession(path / io.file, io, provider, threads, store, prepack, tf32, spin,
                                         cast_weights) for name, io in graphs.items()}
    return sessions
