"""Recommendation quality of an engine (not torch): Hit/NDCG@5/10, SID-level metrics, invalid rate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pauserec import metrics
from pauserec.bench.latency import system_name
from pauserec.errors import PauserecError


def _dedupe_rows(sid_ids: np.ndarray) -> np.ndarray:
    """Per row, the SID ids in first-seen order (padding -1 kept at the end)."""
    out = np.full_like(sid_ids, -1)
    for u, row in enumerate(sid_ids):
        seen = list(dict.fromkeys(int(s) for s in row if s >= 0))
        out[u, : len(seen)] = seen
    return out


def run_quality(
    engine_path: Path,
    data: Path,
    index: str | None = None,
    split: str = "test",
    beams: int = 20,
    limit: int | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    tick: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate one engine on a dataset split; returns {"name", "kind", "path", "metrics", "popularity"}."""
    from pauserec.data import load_dataset
    from pauserec.runtime import Engine, Recommender

    if split not in ("test", "valid"):
        raise PauserecError(f"--split must be test or valid, got {split!r}")
    engine = Engine.load(engine_path, threads=threads)
    dataset = load_dataset(data, index=index)
    cat = engine.catalog
    if list(cat.item_ids) != list(dataset.catalog.item_ids) or not np.array_equal(cat.sids, dataset.catalog.sids):
        raise PauserecError(
            f"engine {engine_path} was exported for another catalog than {data} (index {index or 'default'}); "
            "pass the dataset and --index the model was trained on"
        )
    samples = getattr(dataset.splits(max_history=engine.max_history), split)
    n = len(samples) if limit is None else min(limit, len(samples))
    rec = Recommender(engine, batch_size=batch_size)
    ranked_items = np.full((n, 10), -1, np.int64)
    ranked_codes = np.full((n, 10, cat.levels), -1, np.int64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        hist = [[cat.item_ids[i] for i in samples.histories[u]] for u in range(start, stop)]
        res = rec.recommend(hist, k=10, beams=beams)
        ranked_items[start:stop] = res.item_index
        ranked_codes[start:stop] = res.sids
        if tick:
            tick(stop - start)
    targets = np.asarray(samples.targets[:n], np.int64)
    item_sid = cat.trie.item_sid
    ranked_sids = _dedupe_rows(np.where(ranked_items >= 0, item_sid[np.maximum(ranked_items, 0)], -1))
    m = metrics.summarize(ranked_items, targets, ranked_sids=ranked_sids, target_sids=item_sid[targets],
                          ranked_codes=ranked_codes, catalog_sids=cat.sids)
    pop = metrics.popularity_metrics(dataset.sequences, len(cat.item_ids), targets, split=split)
    kind = engine.manifest["kind"]
    return {"name": system_name(kind, engine_path), "kind": kind, "path": str(engine_path),
            "split": split, "beams": beams, "metrics": m, "popularity": pop}
