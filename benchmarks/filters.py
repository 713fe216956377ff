"""Cost of serve-time item filters: a filtered trie-masked top-k step vs an unfiltered one, and the
node-mask construction per user.

    python benchmarks/filters.py --data DATA_DIR --index rqvae_native [--out results/filters/scientific.json]

Catalog: the real SID index given (default: Amazon'18 Scientific, ``rqvae_native``, 4 levels x 256
codes, with collisions). Steps: every SID level of the search at B = 64 users, K = 20 beams (level 1:
one beam per user at the root; levels 2..L: 20 beams per user on distinct nodes of the level above),
V = 256. Filters: 10 % of the items excluded, either a different random 10 % per user (M = 64 mask
rows) or one set for the whole batch (M = 1). Each implementation (numpy, cpu; cuda when usable) is
timed through the public shim, samples interleaved across the variants so a noisy neighbour slows all
alike; the report gives median and p10-p90 per call and the ratio filtered / unfiltered.

Mask construction (per user, one (N,) uint8 row): ``Trie.node_mask`` for "exclude 10 %", "allow
90 %", "exclude 100 items" (recently bought, say), and the whole request path of a recommend call
(``filters.resolve`` turning external ids into dense ones + ``RequestFilters.masks``), on the real
catalog and on a synthetic catalog of ``--big-items`` random SIDs (about 1M trie nodes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pauserec.bench.report import finish
from pauserec.data import Catalog, load_dataset
from pauserec.runtime import filters as item_filters
from pauserec.runtime import trie_topk as tt

B, K, V = 64, 20, 256


def _stats(samples: list[float]) -> dict:
    s = np.array(samples) * 1e6
    return {"median_us": float(np.median(s)), "p10_us": float(np.percentile(s, 10)),
            "p90_us": float(np.percentile(s, 90)), "samples": len(samples)}


def _time(fns: dict, repeats: int, min_sample_s: float) -> dict:
    """Interleaved samples of every callable; each sample loops calls for at least ``min_sample_s``."""
    calls = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(np.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-7))))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls[name])
    return {n: _stats(s) for n, s in samples.items()}


def step_inputs(trie, level: int, rng) -> tuple[np.ndarray, ...]:
    """One search step at ``level``: (scores (B, K_in), logprobs (B, K_in, V), nodes (B, K_in))."""
    if level == 1:
        k_in = 1
        nodes = np.zeros((B, 1), np.int64)
    else:
        k_in = K
        lo, hi = int(trie.level_starts[level - 1]), int(trie.level_starts[level])
        nodes = np.stack([rng.choice(np.arange(lo, hi), size=K, replace=hi - lo < K) for _ in range(B)])
    scores = -np.sort(rng.exponential(2.0, size=(B, k_in)), axis=1)
    logits = rng.normal(0.0, 2.0, size=(B, k_in, V))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return scores.astype(np.float32), logprobs.astype(np.float32), nodes.astype(np.int32)


def excluded_sets(n_items: int, fraction: float, users: int, rng) -> list[np.ndarray]:
    size = int(round(fraction * n_items))
    return [rng.choice(n_items, size=size, replace=False) for _ in range(users)]


def kernel_cells(trie, impls, repeats: int, min_sample_s: float, rng) -> list[dict]:
    n = trie.num_items
    per_user = np.stack([trie.node_mask(exclude=x) for x in excluded_sets(n, 0.10, B, rng)])  # (B, N)
    shared = trie.node_mask(exclude=excluded_sets(n, 0.10, 1, rng)[0])[None, :]  # (1, N)
    rows = np.arange(B, dtype=np.int32)
    zeros = np.zeros(B, np.int32)
    cells = []
    for level in range(1, trie.levels + 1):
        args = (*step_inputs(trie, level, rng), trie.offsets, trie.tokens, trie.children, K)
        for impl in impls:
            fns = {"unfiltered": lambda i=impl: tt.trie_topk(*args, impl=i),
                   "per_user": lambda i=impl: tt.trie_topk(*args, impl=i, node_mask=per_user, mask_row=rows),
                   "shared": lambda i=impl: tt.trie_topk(*args, impl=i, node_mask=shared, mask_row=zeros)}
            ref = tt.trie_topk_numpy(*args, node_mask=per_user, mask_row=rows)
            got = fns["per_user"]()
            parity = bool(np.array_equal(got.token, ref.token) and np.array_equal(got.parent, ref.parent))
            t = _time(fns, repeats, min_sample_s)
            base = t["unfiltered"]["median_us"]
            cells.append({"level": level, "impl": impl, "k_in": int(args[0].shape[1]), "timings": t,
                          "ratio_per_user": t["per_user"]["median_us"] / base,
                          "ratio_shared": t["shared"]["median_us"] / base, "parity_with_numpy": parity})
    return cells


def mask_costs(catalog: Catalog, repeats: int, rng) -> dict:
    """Per-user cost of one mask row, by filter kind, plus the whole request path for B users."""
    trie = catalog.trie
    n = trie.num_items
    ex10 = excluded_sets(n, 0.10, 1, rng)[0]
    allow90 = np.setdiff1d(np.arange(n), ex10)
    bought = rng.choice(n, size=min(100, n), replace=False)
    out = np.empty(trie.num_nodes, np.uint8)
    fns = {"exclude_10pct": lambda: trie.node_mask(exclude=ex10, out=out),
           "allow_90pct": lambda: trie.node_mask(allow=allow90, out=out),
           "exclude_100_items": lambda: trie.node_mask(exclude=bought, out=out),
           "copy_only": lambda: np.copyto(out, trie.node_mask())}
    per_mask = _time(fns, repeats, 0.02)
    ids = [[catalog.item_ids[i] for i in x] for x in excluded_sets(n, 0.10, B, rng)]
    bought_ids = [[catalog.item_ids[i] for i in rng.choice(n, size=min(100, n), replace=False)] for _ in range(B)]
    rows = np.arange(B)

    def request(per_user_ids):
        item_filters.resolve(catalog, B, exclude=per_user_ids).masks(trie, rows)

    path = _time({"exclude_10pct": lambda: request(ids), "exclude_100_items": lambda: request(bought_ids)},
                 max(3, repeats // 2), 0.0)
    per_user_path = {k: {s: v / B if s.endswith("_us") else v for s, v in t.items()} for k, t in path.items()}
    return {"trie_nodes": trie.num_nodes, "items": n, "mask_bytes_per_user": trie.num_nodes,
            "node_mask_us": per_mask, "request_path_us_per_user": per_user_path}


def big_catalog(items: int, seed: int) -> Catalog:
    rng = np.random.default_rng(seed)
    sids = rng.integers(0, V, size=(items, 4))
    return Catalog([str(i) for i in range(items)], sids, ("a", "b", "c", "d"), name=f"random-{items}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LC-Rec dataset folder")
    ap.add_argument("--index", default="rqvae_native")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-sample-s", type=float, default=0.02)
    ap.add_argument("--big-items", type=int, default=500_000, help="items of the synthetic catalog (0 = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    catalog = load_dataset(args.data, index=args.index).catalog
    trie = catalog.trie
    impls = tuple(i for i in ("numpy", "cpu", "cuda") if i in tt.available_impls())
    result = {
        "config": {"B": B, "K": K, "V": V, "excluded_fraction": 0.10, "repeats": args.repeats,
                   "min_sample_s": args.min_sample_s, "seed": args.seed, "index": args.index},
        "catalog": {"name": catalog.name, "items": catalog.n_items, "sids": trie.num_sids, "levels": trie.levels,
                    "trie_nodes": trie.num_nodes},
        "impls": list(impls),
        "kernel": kernel_cells(trie, impls, args.repeats, args.min_sample_s, rng),
        "masks": {"scientific": mask_costs(catalog, args.repeats, rng)},
    }
    if args.big_items:
        result["masks"]["synthetic"] = mask_costs(big_catalog(args.big_items, args.seed), max(3, args.repeats // 3), rng)
    result["summary"] = summary(result)
    result = finish(result, "filters", threads=1)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


def summary(result: dict) -> dict:
    """Filtered / unfiltered over a whole search (sum of the levels' medians), per implementation."""
    out = {}
    for impl in result["impls"]:
        cells = [c for c in result["kernel"] if c["impl"] == impl]
        total = {v: sum(c["timings"][v]["median_us"] for c in cells) for v in ("unfiltered", "per_user", "shared")}
        out[impl] = {"search_topk_us": total, "ratio_per_user": total["per_user"] / total["unfiltered"],
                     "ratio_shared": total["shared"] / total["unfiltered"],
                     "worst_level_ratio": max(max(c["ratio_per_user"], c["ratio_shared"]) for c in cells)}
    return out


if __name__ == "__main__":
    main()
