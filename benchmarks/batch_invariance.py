"""A user's top-10 and scores alone and inside a batch of 8, on a real-shape engine.

    python benchmarks/batch_invariance.py ENGINE [--users 8] [--seed 0] [--out FILE.json]

Seeded random histories of 1-10 catalog items (so a batch mixes history lengths), beam 20, top-10. Prints and
writes: per user whether the top-10 is the same, and the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from pauserec.runtime import Engine, Recommender


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", type=Path)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    engine = Engine.load(args.engine, provider="cpu", threads=args.threads, verify=False)
    rng = np.random.default_rng(args.seed)
    ids = engine.catalog.item_ids
    histories = [[ids[i] for i in rng.integers(0, len(ids), size=int(rng.integers(1, 11)))] for _ in range(args.users)]
    batch = Recommender(engine, batch_size=args.users).recommend(histories, k=10, beams=20)
    alone = Recommender(engine, batch_size=1).recommend(histories, k=10, beams=20)
    same = [bool((a == b).all()) for a, b in zip(batch.items, alone.items)]
    out = {"engine": args.engine.name, "precision": engine.manifest.precision, "kv_dtype": engine.manifest.kv_dtype,
           "users": args.users, "same_top10": same, "users_with_another_top10": same.count(False),
           "max_score_difference": float(np.abs(batch.scores - alone.scores).max()),
           "machine": platform.processor() or platform.machine()}
    print(json.dumps(out))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
