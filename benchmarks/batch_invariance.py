"""Batch invariance at a real shape: each of 8 users alone against the same user inside a batch of 8.

    python benchmarks/batch_invariance.py ENGINE [ENGINE ...]     # writes invariance.json in the working folder

Random catalog histories of 20 items (seeded), beam 20, top-10. Per engine: how many users get the same top-10
alone as in the batch, the largest score difference, and ``Engine.batch_invariant``.
"""

import json
import sys

import numpy as np

from pauserec.runtime import Engine, Recommender

out = {}
for path in sys.argv[1:]:
    rec = Recommender(Engine.load(path, threads=2))
    ids = rec.catalog.item_ids
    rng = np.random.default_rng(7)
    hist = [[ids[i] for i in rng.integers(0, len(ids), 20)] for _ in range(8)]
    batch = rec.recommend(hist, k=10, beams=20)
    diff, same = 0.0, 0
    for u in range(8):
        alone = rec.recommend([hist[u]], k=10, beams=20)
        same += alone.items[0].tolist() == batch.items[u].tolist()
        diff = max(diff, float(np.abs(alone.scores[0] - batch.scores[u]).max()))
    out[path] = {"same_top10": same, "users": 8, "max_score_diff": diff, "batch_invariant": rec.engine.batch_invariant}
    print(path, out[path], flush=True)
with open("invariance.json", "w") as f:
    json.dump(out, f, indent=1)
