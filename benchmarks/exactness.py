"""Exactness of an engine against the PyTorch reference and HF generate on a trained checkpoint.

    python benchmarks/exactness.py CKPT ENGINE --data DATA --index NAME [--users 1000] [--hf-users 64]

For the first N test users it compares the engine's top-10 items with the PyTorch reference
recommender's (exact trie-constrained beam search) and, for the first M users, with HF
``generate(num_beams=20, prefix_allowed_tokens_fn=trie)``. A user whose lists differ only where
scores tie within 1e-5 counts as a tie, not a difference. Writes JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def compare(a_items, a_scores, b_items, b_scores, tol: float = 1e-5) -> dict:
    same = tie = diff = 0
    max_err = 0.0
    for ia, sa, ib, sb in zip(a_items, a_scores, b_items, b_scores):
        if np.array_equal(ia, ib):
            same += 1
            ok = np.isfinite(sa) & np.isfinite(sb)
            max_err = max(max_err, float(np.abs(sa[ok] - sb[ok]).max(initial=0.0)))
        elif np.allclose(np.sort(sa), np.sort(sb), atol=tol, equal_nan=True) and _ties_only(ia, sa, ib, tol):
            tie += 1
        else:
            diff += 1
    n = same + tie + diff
    return {"users": n, "identical": same, "tie_only": tie, "different": diff,
            "identical_or_tie_rate": (same + tie) / max(n, 1), "max_abs_score_err": max_err}


def _ties_only(ia, sa, ib, tol) -> bool:
    """Positions where the lists differ hold items whose scores tie with a neighbour."""
    for j in np.flatnonzero(ia != ib):
        near = np.abs(sa - sa[j]) <= tol
        if near.sum() < 2 and j < len(sa) - 1:
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", default=None)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--hf-users", type=int, default=64)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--random-len", type=int, default=0,
                    help="use seeded random histories of this many items instead of the test users")
    args = ap.parse_args()

    import torch

    from pauserec.reference.hf_generate import HFBaseline
    from pauserec.bench.env import environment
    from pauserec.data import load_dataset
    from pauserec.runtime import Engine, Recommender
    from pauserec.train.reference import ReferenceRecommender

    torch.set_num_threads(args.threads)
    test = load_dataset(args.data, index=args.index).splits().test
    engine = Engine.load(args.engine, threads=args.threads)
    ids = engine.catalog.item_ids
    rec = Recommender(engine)
    ref = ReferenceRecommender.from_checkpoint(args.ckpt, beams=args.beams, top_n=10)
    if args.random_len:
        rng = np.random.default_rng(0)
        n_items = len(engine.catalog.item_ids)
        histories = [rng.choice(n_items, size=args.random_len, replace=False) for _ in range(args.users)]
    else:
        histories = test.histories
    n = min(args.users, len(histories))
    eng_items = np.full((n, 10), -1, np.int64)
    eng_scores = np.full((n, 10), -np.inf, np.float32)
    eng_sids = np.full((n, 10, engine.catalog.levels), -1, np.int64)
    ref_items, ref_scores = np.full_like(eng_items, -1), np.full_like(eng_scores, -np.inf)
    t_ref = t_eng = 0.0
    with torch.inference_mode():
        for s in range(0, n, 32):
            hist = [histories[u] for u in range(s, min(s + 32, n))]
            t0 = time.perf_counter()
            r = ref.recommend(hist)
            t_ref += time.perf_counter() - t0
            ref_items[s : s + len(hist)], ref_scores[s : s + len(hist)] = r.items, r.scores
            t0 = time.perf_counter()
            e = rec.recommend([[ids[i] for i in h] for h in hist], k=10, beams=args.beams)
            t_eng += time.perf_counter() - t0
            eng_items[s : s + len(hist)], eng_scores[s : s + len(hist)] = e.item_index, e.scores
            eng_sids[s : s + len(hist)] = e.sids
    out = {"checkpoint": args.ckpt.name, "engine": args.engine.name, "kind": engine.manifest["kind"],
           "histories": f"random, {args.random_len} items" if args.random_len else "test split",
           "beams": args.beams, "vs_reference": compare(eng_items, eng_scores, ref_items, ref_scores),
           "seconds": {"reference": t_ref, "engine": t_eng}}
    m = min(args.hf_users, n)
    if m:
        hf = HFBaseline(args.ckpt, threads=args.threads)
        h = hf.recommend([histories[u] for u in range(m)], k=10, beams=args.beams)
        out["vs_hf_generate"] = compare(eng_items[:m], eng_scores[:m], h.item_index, h.scores)
    # invalid = a returned SID that is not the catalog SID of the item it names
    real = eng_items >= 0
    catalog_sids = engine.catalog.sids[np.maximum(eng_items, 0)]
    out["invalid_items"] = int((real & (catalog_sids != eng_sids).any(axis=2)).sum())
    out["environment"] = environment(args.threads)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
