"""Precisions and scoring rules of one model, side by side, against its fp32 full-vocabulary engine.

    python benchmarks/precision.py REF_ENGINE ENGINE... --data DATA --index NAME [--users 2000] > out.json

All engines come from the same checkpoint (``pauserec-export --precision ... --scoring ...``). For the
first N test users (fixed seed), every engine recommends top-10 with 20 beams; per engine: bytes on disk,
peak RSS of a fresh process serving one batch, p50 latency at batch 1 and 16, Hit@10 / NDCG@10, and
against REF_ENGINE: mean top-10 overlap, share of users with an identical top-10 list, top-1 agreement,
and the Hit@10 / NDCG@10 change with a paired bootstrap 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def ranked_metrics(items: np.ndarray, targets: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per user hit@10 and ndcg@10 (one target per user)."""
    hit = np.zeros(len(targets))
    ndcg = np.zeros(len(targets))
    for u, (row, t) in enumerate(zip(items, targets)):
        where = np.flatnonzero(row[:10] == t)
        if where.size:
            hit[u] = 1.0
            ndcg[u] = 1.0 / np.log2(where[0] + 2)
    return hit, ndcg


def bootstrap(diff: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main() -> None:
    from pauserec.bench.env import environment
    from pauserec.bench.latency import peak_rss_mb
    from pauserec.data import load_dataset
    from pauserec.runtime import Engine, Recommender

    ap = argparse.ArgumentParser()
    ap.add_argument("engines", type=Path, nargs="+", help="the reference (fp32, full) first")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", default=None)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    test = load_dataset(args.data, args.index).splits().test
    pick = np.random.default_rng(args.seed).permutation(len(test))[: args.users]
    rows = []
    ref = None
    for path in args.engines:
        engine = Engine.load(path, provider="cpu", threads=args.threads)
        rec = Recommender(engine, batch_size=64)
        ids = engine.catalog.item_ids
        histories = [[ids[i] for i in test.histories[p]] for p in pick]
        targets = [ids[int(test.targets[p])] for p in pick]
        items = rec.recommend(histories, k=10, beams=20).items
        lat = {}
        for bs in (1, 16):
            ts = []
            for it in range(7):
                t0 = time.perf_counter()
                rec.recommend(histories[it * bs : (it + 1) * bs], k=10, beams=20)
                ts.append(time.perf_counter() - t0)
            lat[str(bs)] = float(np.median(ts[2:]))
        hit, ndcg = ranked_metrics(items, targets)
        m = engine.manifest
        row = {"engine": str(path), "precision": m.precision, "scoring": m.scoring, "kind": m.kind,
               "int4_compute": next((v.get("int4_compute") for v in m.validation if "int4_compute" in v), None),
               "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
               "weights_bytes": (path / "weights.bin").stat().st_size, "peak_rss_mb": peak_rss_mb("engine", path, 16, 20, args.threads),
               "p50_s": lat, "hit@10": float(hit.mean()), "ndcg@10": float(ndcg.mean())}
        if ref is None:
            ref = {"items": items, "hit": hit, "ndcg": ndcg}
        else:
            overlap = [len(set(a[a != ""]) & set(b[b != ""])) / 10 for a, b in zip(ref["items"], items)]
            row.update({"top10_overlap": float(np.mean(overlap)),
                        "identical_top10": float(np.mean([np.array_equal(a, b) for a, b in zip(ref["items"], items)])),
                        "top1_agreement": float(np.mean(ref["items"][:, 0] == items[:, 0])),
                        "hit@10_change": float(hit.mean() - ref["hit"].mean()),
                        "hit@10_change_ci95": bootstrap(hit - ref["hit"]),
                        "ndcg@10_change": float(ndcg.mean() - ref["ndcg"].mean()),
                        "ndcg@10_change_ci95": bootstrap(ndcg - ref["ndcg"])})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "engine"}), file=sys.stderr, flush=True)
    print(json.dumps({"users": len(pick), "data": str(args.data), "index": args.index, "rows": rows,
                      "command": " ".join(sys.argv), "env": environment(threads=args.threads)}, indent=2))


if __name__ == "__main__":
    main()
