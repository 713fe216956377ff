"""Catalog and trie: CSR layout, collisions, save/load, and every real SID index."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from pauserec.data import Catalog, Trie, load_dataset
from pauserec.errors import DataError

INDEXES = (
    "rkmeans_native", "rkmeans_zcr", "rkmeans_zcr_cf", "rqvae_native", "rqvae_zcr",
    "letter_native", "letter_zcr", "quasid_native", "quasid_zcr", "mql4grec",
)


def brute_force_groups(sids: np.ndarray) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(sids.tolist()):
        groups[tuple(row)].append(i)
    return dict(sorted(groups.items()))


def check_trie(trie: Trie, sids: np.ndarray) -> None:
    """Every CSR invariant of the contract, against a brute-force grouping."""
    n, L = sids.shape
    groups = brute_force_groups(sids)
    assert trie.levels == L and trie.num_items == n and trie.num_sids == len(groups)
    assert trie.offsets.dtype == trie.tokens.dtype == trie.children.dtype == np.int32
    assert trie.offsets[0] == 0 and trie.offsets[-1] == len(trie.tokens) == len(trie.children)
    # BFS numbering: depth-d nodes [level_starts[d], level_starts[d+1]); children of depth-d are depth d+1
    for d in range(L):
        a, b = trie.level_starts[d], trie.level_starts[d + 1]
        for node in range(a, b):
            toks, kids = trie.edges(node)
            assert len(toks) >= 1 and np.all(np.diff(toks) > 0)  # sorted by code, no duplicates
            assert np.all((kids >= trie.level_starts[d + 1]) & (kids < trie.level_starts[d + 2]))
    leaves = np.arange(trie.level_starts[L], trie.level_starts[L + 1])
    assert np.all(np.diff(trie.offsets)[leaves] == 0)
    # SIDs in lexicographic order with their items ascending
    assert [tuple(r) for r in trie.sid_codes.tolist()] == list(groups)
    for s, items in enumerate(groups.values()):
        assert trie.items_of_sid(s).tolist() == items
        assert trie.sid_id(trie.sid_codes[s]) == s
    for i in range(n):
        leaf = trie.walk(sids[i])
        assert trie.level_starts[L] <= leaf < trie.level_starts[L + 1]
        assert i in trie.items_of_leaf(leaf)
        assert trie.item_sid[i] == trie.sid_of_leaf(leaf)


def test_trie_small_exact_layout():
    sids = np.array([[1, 2], [0, 5], [1, 2], [1, 0]])
    t = Trie.build(sids)
    # root -> {0: n1, 1: n2}; n1 -> {5: n3}; n2 -> {0: n4, 2: n5}
    assert t.offsets.tolist() == [0, 2, 3, 5, 5, 5, 5]
    assert t.tokens.tolist() == [0, 1, 5, 0, 2]
    assert t.children.tolist() == [1, 2, 3, 4, 5]
    assert t.level_starts.tolist() == [0, 1, 3, 6]
    assert t.sid_codes.tolist() == [[0, 5], [1, 0], [1, 2]]
    assert t.sid_item_offsets.tolist() == [0, 1, 2, 4]
    assert t.sid_items.tolist() == [1, 3, 0, 2]
    assert t.walk([1, 3]) == -1 and t.sid_id([0]) == -1 and t.child(0, 7) == -1
    with pytest.raises(ValueError):
        t.sid_of_leaf(1)
    check_trie(t, sids)


@pytest.mark.parametrize("n,L,V,seed", [(1, 1, 1, 0), (1, 3, 4, 0), (50, 1, 8, 1), (200, 3, 3, 2), (300, 4, 16, 3)])
def test_trie_matches_brute_force(n, L, V, seed):
    sids = np.random.default_rng(seed).integers(0, V, (n, L))
    check_trie(Trie.build(sids), sids)


def test_trie_degenerate_first_level():
    sids = np.random.default_rng(0).integers(0, 5, (40, 3))
    sids[:, 0] = 7  # every item has the same level-1 code
    t = Trie.build(sids)
    assert t.offsets[1] - t.offsets[0] == 1 and t.tokens[0] == 7
    check_trie(t, sids)


def test_trie_save_load(tmp_path):
    t = Trie.build(np.random.default_rng(0).integers(0, 4, (30, 3)))
    u = Trie.load(t.save(tmp_path / "trie.npz"))
    for k, v in t.to_arrays().items():
        assert np.array_equal(u.to_arrays()[k], v)


def test_catalog_basics(synthetic_data):
    cat = load_dataset(synthetic_data).catalog
    assert cat.levels == 4 and cat.token_prefixes == ("a", "b", "c", "d")
    assert cat.codebook_sizes == tuple(int(v) + 1 for v in cat.sids.max(axis=0))
    assert cat.sids.dtype == np.int32 and cat.sids.shape == (cat.n_items, 4)
    assert cat.index_of("17") == 17 and cat.index_of(17) == 17
    toks = cat.sid_tokens(5)
    assert toks == [f"<{p}_{c}>" for p, c in zip("abcd", cat.sids[5], strict=True)]
    assert cat.codes_of_tokens(toks).tolist() == cat.sids[5].tolist()
    assert cat.codes_of_tokens("".join(toks)).tolist() == cat.sids[5].tolist()
    assert [len(lv) for lv in cat.level_tokens()] == list(cat.codebook_sizes)
    groups = cat.collision_groups()
    assert groups and all(len(g) >= 2 and np.all(np.diff(g) > 0) for g in groups)
    for g in groups:
        assert (cat.sids[g] == cat.sids[g[0]]).all()
        assert cat.items_with_sid(cat.sids[g[0]]).tolist() == g.tolist()
    with pytest.raises(DataError, match="unknown item id 'nope'"):
        cat.index_of("nope")
    with pytest.raises(DataError, match="<a_CODE>"):
        cat.codes_of_tokens(["<x_1>", "<b_1>", "<c_1>", "<d_1>"])


def test_catalog_save_load_roundtrip(tmp_path, synthetic_data):
    cat = load_dataset(synthetic_data).catalog
    path = cat.save(tmp_path / "catalog.npz")
    with np.load(path, allow_pickle=False) as z:  # no object arrays inside
        assert z["item_ids"].dtype.kind == "U" and z["token_prefixes"].dtype.kind == "U"
    back = Catalog.load(path)
    assert back == cat and back.name == cat.name
    for k, v in cat.trie.to_arrays().items():
        assert np.array_equal(back.trie.to_arrays()[k], v)
    assert [g.tolist() for g in back.collision_groups()] == [g.tolist() for g in cat.collision_groups()]


def test_catalog_load_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing.npz not found"):
        Catalog.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        Catalog.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(DataError, match="other.npz lacks"):
        Catalog.load(other)
    objs = tmp_path / "objs.npz"
    np.savez(objs, catalog_version=np.array([1]), item_ids=np.array(["a", 1], dtype=object),
             sids=np.zeros((2, 1)), token_prefixes=np.array(["a"]), codebook_sizes=np.array([1]))
    with pytest.raises(DataError, match="objs.npz"):
        Catalog.load(objs)


def test_catalog_rejects_inconsistent_construction():
    with pytest.raises(DataError, match="no items"):
        Catalog([], np.zeros((0, 2)), ("a", "b"))
    with pytest.raises(DataError, match="token prefixes"):
        Catalog(["0"], np.zeros((1, 2)), ("a",))
    with pytest.raises(DataError, match="codebook sizes"):
        Catalog(["0"], np.array([[3]]), ("a",), codebook_sizes=(2,))


# -- real data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_catalogs(scientific):
    return {name: load_dataset(scientific, index=name).catalog for name in INDEXES}


@pytest.mark.parametrize("name", INDEXES)
def test_real_trie_reaches_every_item(real_catalogs, name):
    cat = real_catalogs[name]
    t = cat.trie
    assert cat.n_items == 4344 and cat.levels == 4
    leaves = t.level_starts[-1] - t.level_starts[-2]
    assert leaves == t.num_sids == len({tuple(r) for r in cat.sids.tolist()})
    leaf = np.array([t.walk(row) for row in cat.sids])
    assert np.all(leaf >= t.level_starts[-2])
    for i in range(cat.n_items):
        assert i in t.items_of_leaf(leaf[i])


def test_real_rkmeans_native_collisions(real_catalogs):
    cat = real_catalogs["rkmeans_native"]
    s = cat.stats()
    assert (s["collision_items"], s["collision_groups"], s["largest_group"], s["unique_sids"]) == (1326, 451, 26, 3469)
    expected = [g for g in brute_force_groups(cat.sids).values() if len(g) >= 2]
    assert [g.tolist() for g in cat.collision_groups()] == expected


def test_real_codebooks_and_degenerate_root(real_catalogs):
    rq = real_catalogs["rqvae_native"]
    assert rq.codebook_sizes[0] == int(rq.sids[:, 0].max()) + 1
    assert rq.stats()["used_codes_per_level"] == [32, 256, 256, 256]
    mql = real_catalogs["mql4grec"]
    assert mql.trie.offsets[1] - mql.trie.offsets[0] == 1  # the root has exactly one child
    assert mql.trie.tokens[0] == 190 and mql.sid_tokens(0)[0] == "<a_190>"
    assert mql.stats()["used_codes_per_level"] == [1, 8, 10, 229]


def test_real_save_load_roundtrip(tmp_path, real_catalogs):
    cat = real_catalogs["rkmeans_native"]
    back = Catalog.load(cat.save(tmp_path / "c.npz"))
    assert back == cat
    for k, v in cat.trie.to_arrays().items():
        assert np.array_equal(back.trie.to_arrays()[k], v)
