"""`pauserec-bench kernel`: the trie-masked top-k, NumPy reference vs native CPU (and CUDA when usable).

Every cell (scenario, B, K) times each implementation through the public shim
(:func:`pauserec.runtime.trie_topk.trie_topk`), the way beam search calls it, with k = K_in = K and
V = 256. Samples of the implementations are interleaved, so a noisy neighbour slows all of them alike;
the report gives the median and the p10-p90 spread of the time per call, and the speedup of each
implementation over the NumPy reference (median / median). Before timing, each native result is
checked against the reference (indices exact).

Scenarios (random catalogs, 4 SID levels x 256 codes, seeded):

- ``typical``: level 2 of a 4,096-item catalog: each beam sits on a distinct depth-1 node, with about
  15 valid children (the step that dominates decoding once the first level is chosen);
- ``dense``: level 2 of a 65,536-item catalog: about 160 valid children per beam.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from pauserec.runtime import trie_topk as tt

SCENARIOS = {"typical": 4096, "dense": 65536}  # name -> catalog items
LEVELS = 4


@dataclass(frozen=True)
class KernelBenchConfig:
    batches: tuple[int, ...] = (1, 16, 64)
    beams: tuple[int, ...] = (10, 20, 50)
    vocab: int = 256
    repeats: int = 7
    min_sample_s: float = 0.01  # each sample loops calls until it lasts at least this long
    seed: int = 0
    scenarios: tuple[str, ...] = ("typical", "dense")


@dataclass(frozen=True)
class CsrTrie:
    offsets: np.ndarray  # (N + 1,) int32
    tokens: np.ndarray  # (E,) int32
    children: np.ndarray  # (E,) int32
    level_starts: np.ndarray  # (L + 2,) int64: depth-d nodes are [level_starts[d], level_starts[d + 1])


def random_catalog_trie(items: int, levels: int, vocab: int, seed: int) -> CsrTrie:
    """CSR trie of ``items`` random SIDs (duplicates merged), BFS node numbering, children sorted."""
    rng = np.random.default_rng(seed)
    codes = np.unique(rng.integers(0, vocab, size=(items, levels)), axis=0)  # (S, L), lexicographic
    S = codes.shape[0]
    ids = np.zeros(S, np.int64)  # node id of each SID's depth-(d-1) prefix; depth 0: the root
    starts = [0, 1]
    parents, tokens, children = [], [], []
    for d in range(1, levels + 1):
        new = np.ones(S, bool)
        new[1:] = np.any(codes[1:, :d] != codes[:-1, :d], axis=1)  # first SID of each depth-d prefix
        child_ids = starts[-1] + np.cumsum(new) - 1  # (S,)
        parents.append(ids[new])
        tokens.append(codes[new, d - 1])
        children.append(child_ids[new])
        ids = child_ids
        starts.append(int(child_ids[-1]) + 1)
    parent = np.concatenate(parents)  # non-decreasing: BFS order
    offsets = np.zeros(starts[-1] + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(parent, minlength=starts[-1]))
    return CsrTrie(offsets.astype(np.int32), np.concatenate(tokens).astype(np.int32),
                   np.concatenate(children).astype(np.int32), np.array(starts, np.int64))


def step_inputs(trie: CsrTrie, level: int, B: int, K: int, V: int, rng) -> tuple[np.ndarray, ...]:
    """One decoding step at ``level``: K beams per row on distinct depth-(level-1) nodes, best first."""
    lo, hi = trie.level_starts[level - 1], trie.level_starts[level]
    nodes = np.stack([rng.choice(np.arange(lo, hi), size=K, replace=hi - lo < K) for _ in range(B)])  # (B, K)
    scores = -np.sort(rng.exponential(2.0, size=(B, K)), axis=1)  # (B, K), descending
    logits = rng.normal(0.0, 2.0, size=(B, K, V))  # (B, K, V)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return scores.astype(np.float32), logprobs.astype(np.float32), nodes.astype(np.int32)


def _sample(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _calibrate(fn, min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s`` (after a warm-up call)."""
    fn()
    one = _sample(fn, 1)
    return max(1, int(np.ceil(min_sample_s / max(one, 1e-7))))


def _stats(samples: list[float]) -> dict:
    s = np.array(samples) * 1e6
    return {"median_us": float(np.median(s)), "p10_us": float(np.percentile(s, 10)),
            "p90_us": float(np.percentile(s, 90)), "samples": len(samples)}


def _same(a: tt.TopK, b: tt.TopK) -> bool:
    return (all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("parent", "token", "node"))
            and np.allclose(a.score, b.score, rtol=1e-6, equal_nan=True))


def measure_cell(args: tuple, impls: tuple[str, ...], cfg: KernelBenchConfig) -> dict:
    """Times each implementation on one input; samples interleaved across implementations."""
    fns = {i: (lambda i=i: tt.trie_topk(*args, impl=i)) for i in impls}
    ref = tt.trie_topk_numpy(*args)
    parity = {i: _same(fns[i](), ref) for i in impls if i != "numpy"}
    calls = {i: _calibrate(fns[i], cfg.min_sample_s) for i in impls}
    samples: dict[str, list[float]] = {i: [] for i in impls}
    for _ in range(cfg.repeats):
        for i in impls:
            samples[i].append(_sample(fns[i], calls[i]))
    timings = {i: _stats(samples[i]) for i in impls}
    base = timings["numpy"]["median_us"]
    speedup = {i: base / timings[i]["median_us"] for i in impls if i != "numpy"}
    return {"timings": timings, "speedup_vs_numpy": speedup, "parity": parity}


def _native_info() -> dict:
    info = {"available_impls": list(tt.available_impls())}
    try:
        from pauserec import _trie_topk_cpu

        info["cpu_built_with_cuda"] = bool(_trie_topk_cpu.built_with_cuda)
    except ImportError as e:
        info["cpu_import_error"] = str(e)
    if "cuda" not in info["available_impls"]:
        info["cuda_unavailable"] = tt._load("cuda")[1]
    return info


def run_kernel_bench(cfg: KernelBenchConfig = KernelBenchConfig(), progress=None) -> dict:
    """All cells in one run on this machine; returns a JSON-able result (schema pauserec-bench/1)."""
    from pauserec.bench.report import finish

    impls = ("numpy", *[i for i in ("cpu", "cuda") if i in tt.available_impls()])
    rng = np.random.default_rng(cfg.seed)
    cells, scenarios = [], {}
    for name in cfg.scenarios:
        trie = random_catalog_trie(SCENARIOS[name], LEVELS, cfg.vocab, cfg.seed)
        lo, hi = trie.level_starts[1], trie.level_starts[2]
        scenarios[name] = {
            "catalog_items": SCENARIOS[name], "distinct_sids": int(trie.level_starts[-1] - trie.level_starts[-2]),
            "levels": LEVELS, "codes_per_level": cfg.vocab, "timed_level": 2,
            "trie_nodes": int(trie.offsets.shape[0] - 1),
            "mean_children_per_beam": float(np.diff(trie.offsets[lo:hi + 1]).mean()),
        }
        for B in cfg.batches:
            for K in cfg.beams:
                args = (*step_inputs(trie, 2, B, K, cfg.vocab, rng), trie.offsets, trie.tokens, trie.children, K)
                if progress:
                    progress(f"{name} B={B} K={K}")
                cells.append({"scenario": name, "B": B, "K": K, "k": K, "V": cfg.vocab,
                              **measure_cell(args, impls, cfg)})
    result = {"config": asdict(cfg), "impls": list(impls), "scenarios": scenarios, "cells": cells,
              "native": _native_info(), "target": _target(cells)}
    return finish(result, "kernel", threads=1)


def _target(cells: list[dict]) -> dict:
    """The issue's bar: native CPU >= 20x the NumPy reference at B=16, K=20 (typical scenario)."""
    cell = next((c for c in cells if c["scenario"] == "typical" and c["B"] == 16 and c["K"] == 20), None)
    got = cell["speedup_vs_numpy"].get("cpu") if cell else None
    return {"cell": "typical B=16 K=20", "impl": "cpu", "required_speedup": 20.0, "speedup": got,
            "met": None if got is None else bool(got >= 20.0)}


def kernel_table(result: dict):
    """A rich table: one row per cell, median (p10-p90) per implementation, speedups."""
    from rich.table import Table

    impls = result["impls"]
    native = [i for i in impls if i != "numpy"]
    table = Table(title="trie-masked top-k, µs per call: median ±half the p10–p90 spread; × = numpy / impl")
    for col in ("scenario", "B", "K", "cands/row"):
        table.add_column(col, justify="right" if col != "scenario" else "left")
    for i in impls:
        table.add_column(f"{i} µs", justify="right")
    for i in native:
        table.add_column(f"{i} ×", justify="right")
    for c in result["cells"]:
        sc = result["scenarios"][c["scenario"]]
        row = [c["scenario"], str(c["B"]), str(c["K"]), f"{c['K'] * sc['mean_children_per_beam']:.0f}"]
        for i in impls:
            t = c["timings"][i]
            spread = 50 * (t["p90_us"] - t["p10_us"]) / t["median_us"]
            row.append(f"{t['median_us']:,.1f} ±{spread:.0f}%")
        for i in native:
            mark = "" if c["parity"][i] else " [red]MISMATCH[/]"
            row.append(f"{c['speedup_vs_numpy'][i]:.1f}{mark}")
        table.add_row(*row)
    return table


def summary_lines(result: dict) -> list[str]:
    env, tgt = result["environment"], result["target"]
    lines = [f"{env['cpu']}, {env['cores']} cores; numpy {env['versions'].get('numpy', '?')}; "
             f"git {env.get('git_sha') or 'unknown'}; impls: {', '.join(result['impls'])}"]
    for name, sc in result["scenarios"].items():
        lines.append(f"{name}: level {sc['timed_level']} of a {sc['catalog_items']:,}-item catalog "
                     f"({sc['levels']} levels x {sc['codes_per_level']} codes), "
                     f"{sc['mean_children_per_beam']:.1f} valid children per beam on average")
    if tgt["speedup"] is not None:
        verdict = "met" if tgt["met"] else "NOT met"
        lines.append(f"target: cpu >= {tgt['required_speedup']:.0f}x numpy at {tgt['cell']}: "
                     f"{tgt['speedup']:.1f}x ({verdict})")
    if "cuda_unavailable" in result["native"]:
        lines.append(f"cuda: not timed ({result['native']['cuda_unavailable']})")
    return lines
