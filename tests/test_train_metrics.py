"""pauserec.metrics: Hit/NDCG by hand, the collision rule, invalid rate, popularity (no torch)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pauserec import metrics


def test_hit_and_ndcg_by_hand():
    ranked = np.array([[3, 1, 2, -1], [9, 8, 7, 6], [5, 4, 3, 2]])
    targets = np.array([3, 6, 0])
    m = metrics.hit_ndcg(ranked, targets, ks=(1, 4))
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@4"] == pytest.approx(2 / 3)
    assert m["ndcg@4"] == pytest.approx((1.0 + 1 / np.log2(5)) / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert metrics.hit_ndcg(np.empty((0, 4)), np.empty(0))["hit@5"] == 0.0


def test_collision_groups_expand_in_item_order_and_truncate():
    # SID 0 -> items [4, 7], SID 1 -> [2], SID 2 -> [0, 1, 5]
    offsets = np.array([0, 2, 3, 6])
    items = np.array([4, 7, 2, 0, 1, 5])
    out = metrics.expand_sids(np.array([[2, 0, 1], [1, -1, -1]]), offsets, items, n=4)
    assert out.tolist() == [[0, 1, 5, 4], [2, -1, -1, -1]]


def test_invalid_rate_counts_unknown_sids_not_padding():
    catalog = np.array([[0, 1], [1, 1]])
    codes = np.array([[[0, 1], [1, 0]], [[1, 1], [-1, -1]]])
    assert metrics.invalid_rate(codes, catalog) == pytest.approx(1 / 3)
    assert metrics.invalid_rate(np.full((2, 2, 2), -1), catalog) == 0.0


def test_popularity_uses_only_interactions_before_the_split():
    seqs = [np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([2, 3, 3])]
    # before the test targets: [0, 1], [1, 2], [2, 3] -> counts 0:1, 1:2, 2:2, 3:1 (ties -> lower index)
    assert metrics.popularity_ranking(seqs, 5, "test", n=3).tolist() == [1, 2, 0]
    assert metrics.popularity_ranking(seqs, 5, "valid", n=3).tolist() == [0, 1, 2]  # [0], [1], [2]
    m = metrics.popularity_metrics(seqs, 5, np.array([2, 1, 3]), "test", ks=(1, 3))
    assert m["hit@1"] == pytest.approx(1 / 3) and m["hit@3"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.popularity_ranking(seqs, 5, "train")


def test_summarize_reports_sid_level_and_invalid_rate():
    m = metrics.summarize(
        np.array([[1, 2]]), np.array([2]), ranked_sids=np.array([[0, 1]]), target_sids=np.array([1]),
        ranked_codes=np.array([[[0], [1]]]), catalog_sids=np.array([[0], [1]]),
    )
    assert m["hit@5"] == 1.0 and m["sid_hit@5"] == 1.0 and m["invalid_rate"] == 0.0 and m["users"] == 1


def test_metrics_do_not_import_torch():
    import subprocess

    code = "import sys, pauserec.metrics; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
