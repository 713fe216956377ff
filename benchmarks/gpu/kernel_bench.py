"""Trie-masked top-k on a GPU: µs per call of the C++ kernel vs the CUDA kernel, one run, one machine.

Implementations, each timed through the path a caller takes:

- ``cpu``: the C++ kernel on host arrays (what ``impl="auto"`` runs for host arrays);
- ``cuda-oneshot``: ``impl="cuda"`` on host arrays: trie, inputs and outputs copied every call;
- ``cuda-resident``: ``DeviceTrie.topk`` on host arrays: the trie resident, inputs/outputs copied;
- ``cuda-device``: ``DeviceTrie.topk_device`` on device buffers, what the device search (``CudaOps``) runs
  between decode steps (launch + one 4-byte status read + stream sync; no other copy).

Cells: level 2 of the bench's random catalogs (``typical`` 4,096 items, ``dense`` 65,536 items; 4 levels
x 256 codes), B in {1, 16, 64}, K = k in {10, 20, 50, 128, 256}, and a 1,024-wide level (V = 1024, one
beam on a node with 1,024 children). Every result is checked against the NumPy reference before it
is timed. Usage: ``python benchmarks/gpu/kernel_bench.py --out results.json [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import numpy as np

from pauserec.bench.kernel import LEVELS, SCENARIOS, random_catalog_trie, step_inputs
from pauserec.runtime import trie_topk as tt


def _per_call(fn, min_s: float, repeats: int) -> dict:
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(min_s / one))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    s = np.array(samples)
    return {"median_us": float(np.median(s)), "p10_us": float(np.percentile(s, 10)),
            "p90_us": float(np.percentile(s, 90)), "calls_per_sample": calls}


def _same(got, want) -> bool:
    return (all(np.array_equal(np.asarray(g), w) for g, w in zip(got[:3], want[:3]))
            and np.allclose(np.asarray(got[3]), want[3], rtol=1e-6))


def wide_level(rng, B: int, K: int, V: int = 1024):
    """One beam per row on the root of a 2-level, 40,000-item catalog of V codes (~V children), the rest on
    depth-1 nodes (~40 children each)."""
    trie = random_catalog_trie(40000, 2, V, seed=int(rng.integers(1 << 30)))
    lo, hi = trie.level_starts[1], trie.level_starts[2]
    nodes = np.concatenate([np.zeros((B, 1), np.int64), rng.integers(lo, hi, size=(B, K - 1))], 1).astype(np.int32)
    scores = -np.sort(rng.exponential(2.0, size=(B, K)), axis=1).astype(np.float32)
    logits = rng.normal(0.0, 2.0, size=(B, K, V))
    logprobs = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)
    return trie, scores, logprobs, nodes


def measure(trie, scores, logprobs, nodes, k: int, mod, min_s: float, repeats: int) -> dict:
    csr = (trie.offsets, trie.tokens, trie.children)
    want = tuple(tt.trie_topk_numpy(scores, logprobs, nodes, *csr, k))
    resident = mod.DeviceTrie(*csr)
    B, K, V = logprobs.shape
    d_in = [mod.DeviceArray.from_numpy(a) for a in (scores, logprobs, nodes)]
    d_out = [mod.DeviceArray([B, k], t, False) for t in ("int32", "int32", "int32", "float32")]

    def device():
        resident.topk_device(d_in[0].ptr, d_in[1].ptr, d_in[2].ptr, B, K, V, k, *(o.ptr for o in d_out))

    fns = {
        "cpu": lambda: tt.trie_topk(scores, logprobs, nodes, *csr, k, impl="cpu"),
        "cuda-oneshot": lambda: tt.trie_topk(scores, logprobs, nodes, *csr, k, impl="cuda"),
        "cuda-resident": lambda: resident.topk(scores, logprobs, nodes, k),
        "cuda-device": device,
    }
    parity = {"cpu": _same(fns["cpu"](), want), "cuda-oneshot": _same(fns["cuda-oneshot"](), want),
              "cuda-resident": _same(fns["cuda-resident"](), want)}
    device()
    parity["cuda-device"] = _same(tuple(o.to_numpy() for o in d_out), want)
    timings = {name: _per_call(fn, min_s, repeats) for name, fn in fns.items()}
    cands = int(np.diff(trie.offsets)[nodes[nodes >= 0]].sum()) / B
    return {"B": B, "K": K, "k": k, "V": V, "candidates_per_row": cands, "parity": parity, "timings": timings,
            "cpu_over_device": timings["cpu"]["median_us"] / timings["cuda-device"]["median_us"]}


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "cuda_module": tt.built_cuda_archs(), "available_impls": list(tt.available_impls())}
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    try:
        env["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_sha"] = None
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer cells and shorter samples")
    args = ap.parse_args()
    mod = tt.cuda_module()  # BackendUnavailable (with the reason) when no usable GPU
    min_s, repeats = (0.005, 3) if args.quick else (0.02, 5)
    batches, beams = ((1, 64), (20, 256)) if args.quick else ((1, 16, 64), (10, 20, 50, 128, 256))
    rng = np.random.default_rng(0)
    cells = []
    for name in SCENARIOS:
        trie = random_catalog_trie(SCENARIOS[name], LEVELS, 256, 0)
        for B in batches:
            for K in beams:
                scores, logprobs, nodes = step_inputs(trie, 2, B, K, 256, rng)
                cell = {"scenario": name, **measure(trie, scores, logprobs, nodes, K, mod, min_s, repeats)}
                cells.append(cell)
                print(f"{name:8s} B={B:3d} K={K:3d}  cpu {cell['timings']['cpu']['median_us']:9.1f} us  "
                      f"device {cell['timings']['cuda-device']['median_us']:8.1f} us  parity {cell['parity']}",
                      flush=True)
    for B in batches:
        for K in beams:
            trie, scores, logprobs, nodes = wide_level(rng, B, K)
            cell = {"scenario": "wide-1024", **measure(trie, scores, logprobs, nodes, K, mod, min_s, repeats)}
            cells.append(cell)
            print(f"wide1024 B={B:3d} K={K:3d}  cpu {cell['timings']['cpu']['median_us']:9.1f} us  "
                  f"device {cell['timings']['cuda-device']['median_us']:8.1f} us  parity {cell['parity']}", flush=True)
    result = {"benchmark": "gpu-kernel", "environment": environment(), "cells": cells,
              "all_parity": all(all(c["parity"].values()) for c in cells)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}; parity everywhere: {result['all_parity']}")
    return 0 if result["all_parity"] else 1


if __name__ == "__main__":
    sys.exit(main())
