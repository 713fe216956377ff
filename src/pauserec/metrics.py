"""Top-N recommendation metrics and a popularity baseline (numpy only; no torch).

Every user has one target item. For a ranked list ``r`` (best first) and a cutoff ``k``:

* Hit@k = 1 if the target is among ``r[:k]``;
* NDCG@k = 1 / log2(rank + 2) when the target sits at 0-based rank < k, else 0 (ideal DCG = 1).

Collision rule (several items sharing one SID): a model ranks SIDs, not items. The ranked SIDs are
expanded, in rank order, to the items of their collision group in the group's stable order
(ascending dense item index, as ``Trie.sid_items``), and the expanded list is truncated to N. So a
SID shared by G items fills G consecutive ranks with equal scores, and the lower item index comes
first. SID-level metrics are reported as well: Hit/NDCG of the ranked SIDs against the target's
SID (no expansion; a colliding target counts as found when its SID is).

Invalid rate: the share of returned SIDs (padding excluded) whose code tuple is not the SID of any
catalog item. Trie-constrained decoding makes it 0 by construction; it is measured anyway.

Paired bootstrap (``paired_bootstrap``): per-user metric vectors of two systems on the same users
(one row per seed); each resample draws users with replacement (the same users for both systems) and,
when a system has several seeds, its seeds with replacement (independently: seeds of two kinds are not
paired); the statistic is the mean over users of (mean over drawn seeds of A) - (same of B). The interval
is the percentile interval of the resampled statistics.

Popularity baseline: items ranked by how often they occur in the interactions before the split's
targets (test: ``seq[:-1]`` of every user, valid: ``seq[:-2]``), ties to the lower item index; the
same list for every user.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (5, 10)
SPLIT_CUT = {"test": 1, "valid": 2}


def _ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target in its list, or -1 when absent. ranked (U, N), targets (U,)."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets).reshape(-1, 1)
    hit = ranked == targets  # (U, N)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1)


def per_user(ranked, targets, k: int = 10) -> dict[str, np.ndarray]:
    """Per-user Hit@k and NDCG@k, each (U,) float64 (their means are ``hit_ndcg``)."""
    ranks = _ranks(np.asarray(ranked), targets)
    inside = (ranks >= 0) & (ranks < k)
    return {f"hit@{k}": inside.astype(np.float64),
            f"ndcg@{k}": np.where(inside, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)}


def paired_bootstrap(a, b, resamples: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Mean of A - B over users with a paired bootstrap interval; ``a`` (S_a, U) or (U,), ``b`` (S_b, U) or (U,).

    -> {"diff", "lo", "hi", "ci", "resamples", "excludes_zero", "sign"} (sign: +1 / -1 when the whole
    interval is above / below 0, else 0).
    """
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired bootstrap needs the same non-empty set of users, got {a.shape[1]} and {b.shape[1]}")
    if not 0 < ci < 1 or resamples < 1:
        raise ValueError(f"need 0 < ci < 1 and resamples >= 1, got {ci} and {resamples}")
    rng = np.random.default_rng(seed)
    U = a.shape[1]
    stats = np.empty(resamples)
    for r in range(resamples):
        users = rng.integers(0, U, U)
        ra = a[rng.integers(0, len(a), len(a))] if len(a) > 1 else a
        rb = b[rng.integers(0, len(b), len(b))] if len(b) > 1 else b
        stats[r] = (ra[:, users].mean(0) - rb[:, users].mean(0)).mean()
    lo, hi = np.quantile(stats, [(1 - ci) / 2, (1 + ci) / 2])
    sign = 1 if lo > 0 else -1 if hi < 0 else 0
    return {"diff": float(a.mean(0).mean() - b.mean(0).mean()), "lo": float(lo), "hi": float(hi), "ci": ci,
            "resamples": resamples, "excludes_zero": sign != 0, "sign": sign}


def hit_ndcg(ranked, targets, ks: Sequence[int] = KS, prefix: str = "") -> dict[str, float]:
    """Mean Hit@k and NDCG@k over users. ``ranked`` (U, N) ids (pad with -1), ``targets`` (U,)."""
    ranked = np.asarray(ranked)
    if len(ranked) == 0:
        return {f"{prefix}{m}@{k}": 0.0 for k in ks for m in ("hit", "ndcg")}
    ranks = _ranks(ranked, targets)
    out: dict[str, float] = {}
    for k in ks:
        inside = (ranks >= 0) & (ranks < k)
        out[f"{prefix}hit@{k}"] = float(inside.mean())
        out[f"{prefix}ndcg@{k}"] = float(np.where(inside, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0).mean())
    return out


def expand_sids(ranked_sids, sid_item_offsets, sid_items, n: int) -> np.ndarray:
    """Ranked SID ids (U, K) -> ranked items (U, n) by the collision rule; -1 pads short lists."""
    ranked_sids = np.asarray(ranked_sids)
    out = np.full((len(ranked_sids), n), -1, dtype=np.int64)
    for u, row in enumerate(ranked_sids):
        filled = 0
        for s in row:
            if s < 0 or filled >= n:
                continue
            group = sid_items[sid_item_offsets[s] : sid_item_offsets[s + 1]][: n - filled]
            out[u, filled : filled + len(group)] = group
            filled += len(group)
    return out


def invalid_rate(ranked_codes, catalog_sids) -> float:
    """Share of returned SIDs ((U, K, L) codes, rows of -1 = padding) that no catalog item has."""
    codes = np.asarray(ranked_codes).reshape(-1, np.asarray(catalog_sids).shape[1])
    codes = codes[(codes >= 0).all(axis=1)]
    if len(codes) == 0:
        return 0.0
    valid = {tuple(r) for r in np.asarray(catalog_sids).tolist()}
    return float(np.mean([tuple(r) not in valid for r in codes.tolist()]))


def popularity_ranking(sequences: Sequence[np.ndarray], n_items: int, split: str = "test", n: int = 10) -> np.ndarray:
    """The ``n`` most frequent items in the interactions before ``split``'s targets (ties: lower index)."""
    if split not in SPLIT_CUT:
        raise ValueError(f"split must be one of {', '.join(SPLIT_CUT)}, got {split!r}")
    cut = SPLIT_CUT[split]
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in sequences:
        seq = np.asarray(seq)
        if len(seq) > cut:
            np.add.at(counts, seq[:-cut], 1)
    return np.lexsort((np.arange(n_items), -counts))[:n]


def popularity_metrics(sequences, n_items: int, targets, split: str = "test", ks: Sequence[int] = KS) -> dict[str, float]:
    """Hit/NDCG of the popularity list for every user of a split."""
    top = popularity_ranking(sequences, n_items, split, max(ks))
    return hit_ndcg(np.broadcast_to(top, (len(targets), len(top))), targets, ks)


def summarize(ranked_items, targets, ranked_sids=None, target_sids=None, ranked_codes=None, catalog_sids=None) -> dict:
    """Item metrics, plus SID-level metrics and the invalid rate when their inputs are given."""
    out: dict[str, float] = {"users": int(len(targets)), **hit_ndcg(ranked_items, targets)}
    if ranked_sids is not None and target_sids is not None:
        out.update(hit_ndcg(ranked_sids, target_sids, prefix="sid_"))
    if ranked_codes is not None and catalog_sids is not None:
        out["invalid_rate"] = invalid_rate(ranked_codes, catalog_sids)
    return out
