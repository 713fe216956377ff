"""Serve-time filters (exclude / allow / exclude_history): the filtered search equals a search over a
catalog rebuilt from each user's allowed items, on every model kind; collision groups; bad filters;
padding; node masks against brute force.

Engines are the tiny exports of test_export.py (cached per session in the pytest base temp dir).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export import exported, tiny_catalog  # noqa: E402

from pauserec.data import Catalog  # noqa: E402
from pauserec.errors import DataError  # noqa: E402

ARCH_OF = {"direct": "qwen2", "pause": "qwen3", "cot": "llama"}
HISTORIES = [["item1", "item5"], ["item7"], ["item2", "item9", "item3", "item12", "item20", "item0", "item8"],
             ["item3", "item14"], ["item19"]]
K, BEAMS = 6, 6
GROUP = ["item3", "item20", "item21"]  # the tiny catalog's collision group (one SID, three items)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from pauserec.runtime import Engine

    return {kind: Engine.load(exported(tmp_path_factory, arch, kind), provider="cpu") for kind, arch in ARCH_OF.items()}


def _rec(engine, **kw):
    from pauserec.runtime import Recommender

    return Recommender(engine, **kw)


def _sub_engine(engine, keep: list[int]):
    """The engine serving a catalog rebuilt from the dense items ``keep`` only (order kept)."""
    from pauserec.runtime import Engine

    cat = engine.catalog
    sub = Catalog([cat.item_ids[i] for i in keep], cat.sids[keep], cat.token_prefixes, name="rebuilt")
    return Engine.load(engine.path, provider="cpu", verify=False, catalog=sub)


def _reference(engine, history: list[str], allowed: list[int], k: int, beams: int):
    """(items, scores) of one user from a beam search over the rebuilt catalog, history tokens as the
    full catalog spells them (the rebuilt catalog may lack the history's items)."""
    from pauserec.runtime import BeamSearch

    sub = _sub_engine(engine, allowed)
    toks = engine.encoder(np.array([engine.catalog.index_of(x) for x in history])).reshape(1, -1)
    search = BeamSearch(sub, toks.astype(np.int64), np.ones_like(toks, dtype=np.int64), beams=beams, impl="numpy")
    while not search.done:
        search.step()
    nodes, scores = search.leaves()
    trie, items, out_scores = sub.catalog.trie, [], []
    for node, score in zip(nodes[0], scores[0]):
        if node < 0:
            break
        for i in trie.items_of_leaf(int(node)):
            items.append(sub.catalog.item_ids[i])
            out_scores.append(score)
    return items[:k], np.array(out_scores[:k], np.float32)


def _check_against_reference(engine, out, allowed_per_user: list[list[int]]):
    for u, allowed in enumerate(allowed_per_user):
        items, scores = _reference(engine, HISTORIES[u], allowed, K, BEAMS)
        got = [x for x in out.items[u] if x]
        assert got == items, f"user {u}"
        np.testing.assert_allclose(out.scores[u, : len(items)], scores, rtol=1e-5, atol=1e-5)
        assert (out.item_index[u, len(items):] == -1).all() and np.isneginf(out.scores[u, len(items):]).all()


def _allowed(catalog, allow=None, exclude=()) -> list[int]:
    ids = catalog.item_ids if allow is None else allow
    drop = set(exclude)
    return sorted(catalog.index_of(x) for x in ids if x not in drop)


@pytest.mark.parametrize("kind", list(ARCH_OF))
def test_filtered_search_equals_a_rebuilt_catalog(engines, kind):
    engine = engines[kind]
    cat, rec = engine.catalog, _rec(engine)
    shared = ["item1", "item6", "item13", "item17"]  # one exclusion for the whole batch
    out = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=shared)
    _check_against_reference(engine, out, [_allowed(cat, exclude=shared)] * len(HISTORIES))

    allow = [[f"item{i}" for i in range(0, 22, 2)], None, [f"item{i}" for i in range(5, 18)], GROUP, ["item19"]]
    out = rec.recommend(HISTORIES, k=K, beams=BEAMS, allow=allow)
    _check_against_reference(engine, out, [_allowed(cat, allow=a) for a in allow])

    exclude = [["item2"], None, ["item4", "item10"], [], None]
    out = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=exclude, allow=[f"item{i}" for i in range(1, 21)],
                        exclude_history=True)
    allowed = [_allowed(cat, allow=[f"item{i}" for i in range(1, 21)], exclude=(e or []) + h)
               for e, h in zip(exclude, HISTORIES)]
    _check_against_reference(engine, out, allowed)


def test_unfiltered_call_is_unchanged_and_filters_never_leak(engines):
    engine = engines["pause"]
    rec = _rec(engine)
    plain = rec.recommend(HISTORIES, k=K, beams=BEAMS)
    same = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=[None] * len(HISTORIES), allow=None)
    np.testing.assert_array_equal(plain.items, same.items)
    assert "filters" not in plain.timings and "filters" in same.timings
    out = rec.recommend(HISTORIES, k=20, beams=20, exclude_history=True)
    for u, h in enumerate(HISTORIES):
        assert not set(out.items[u]) & set(h)


@pytest.mark.parametrize("impl", ["numpy", "cpu"])
def test_every_topk_impl_gives_the_same_filtered_results(engines, impl):
    from pauserec.runtime.trie_topk import available_impls

    if impl not in available_impls():
        pytest.skip(f"impl {impl!r} not usable here")
    engine = engines["direct"]
    kw = dict(k=K, beams=BEAMS, exclude=[["item2"], None, ["item4"], ["item3"], None], exclude_history=True)
    want = _rec(engine, impl="numpy").recommend(HISTORIES, **kw)
    got = _rec(engine, impl=impl).recommend(HISTORIES, **kw)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6)


def test_collision_groups(engines):
    engine = engines["direct"]
    rec = _rec(engine)
    hist = [["item3"]]
    full = rec.recommend(hist, k=22, beams=22)
    assert set(GROUP) <= set(full.items[0])
    some = rec.recommend(hist, k=22, beams=22, exclude=["item20"])
    picked = [x for x in some.items[0] if x in GROUP]
    assert picked == ["item3", "item21"]  # the SID stays, with only its allowed items, in the stable order
    gone = rec.recommend(hist, k=22, beams=22, exclude=GROUP)
    assert not set(gone.items[0]) & set(GROUP)
    sid = tuple(engine.catalog.sids[engine.catalog.index_of("item3")])
    assert sid not in {tuple(s) for s in gone.sids[0] if s[0] >= 0}  # the SID disappears
    only = rec.recommend(hist, k=4, beams=4, allow=["item20", "item7"])
    assert [x for x in only.items[0] if x] in (["item20", "item7"], ["item7", "item20"])


def test_a_user_left_without_items_gets_padding(engines):
    rec = _rec(engines["cot"])
    out = rec.recommend(HISTORIES[:2], k=K, beams=BEAMS, allow=[[], None])
    assert (out.items[0] == "").all() and (out.item_index[0] == -1).all() and np.isneginf(out.scores[0]).all()
    assert (out.sids[0] == -1).all() and (out.item_index[1, :BEAMS] >= 0).all()
    out = rec.recommend(HISTORIES[:2], k=K, beams=BEAMS, allow=[])  # an empty shared allow set: nobody gets any
    assert (out.item_index == -1).all()
    out = rec.recommend([["item5"]], k=K, beams=BEAMS, allow=["item5"], exclude_history=True)
    assert (out.item_index == -1).all()


def test_bad_filters_name_the_user_and_the_ids(engines):
    rec = _rec(engines["direct"])
    with pytest.raises(DataError, match=r"user 1: unknown item ids in exclude: nope, gone"):
        rec.recommend(HISTORIES[:2], exclude=[["item1"], ["nope", "item2", "gone"]])
    with pytest.raises(DataError, match=r"allow \(one set for every user\): unknown item ids in allow: zz"):
        rec.recommend(HISTORIES[:2], allow=["item1", "zz"])
    with pytest.raises(DataError, match="3 per-user entries for 2 users"):
        rec.recommend(HISTORIES[:2], exclude=[["item1"], None, None])
    with pytest.raises(DataError, match="mixes item ids with lists"):
        rec.recommend(HISTORIES[:2], exclude=["item1", ["item2"]])
    with pytest.raises(DataError, match="must be a collection of item ids"):
        rec.recommend(HISTORIES[:2], exclude="item1")
    assert rec.validate_filter(["item1", "item2"]) is None and rec.validate_filter(None) is None
    numeric = Catalog(["10", "11"], np.array([[0, 0, 0], [1, 1, 1]]), ("a", "b", "c"))
    idx, unknown = numeric.indices_of([11, "10", 12])  # int ids are looked up as their strings
    assert idx.tolist() == [1, 0] and unknown == ["12"]
    assert rec.validate_filter(["item1", "x1"], "allow") == "unknown item ids in allow: x1"
    assert "collection of item ids" in rec.validate_filter("item1")
    many = rec.validate_filter([f"bad{i}" for i in range(8)])
    assert many.endswith("and 3 more")


def test_shared_forms_and_iter_recommend(engines):
    rec = _rec(engines["pause"])
    want = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=["item1", "item6"])
    for form in ({"item1", "item6"}, ("item1", "item6"), np.array(["item1", "item6"]), iter(["item1", "item6"])):
        got = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=form)
        np.testing.assert_array_equal(got.items, want.items)
    chunks = list(rec.iter_recommend(HISTORIES, k=K, beams=BEAMS, batch_size=2, exclude=iter(["item1", "item6"])))
    np.testing.assert_array_equal(np.concatenate([c.items for c in chunks]), want.items)

    per_user = [["item2"], None, ["item4"], GROUP, None]
    want = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=per_user, exclude_history=True)
    chunks = list(rec.iter_recommend(iter(HISTORIES), k=K, beams=BEAMS, batch_size=2, exclude=per_user,
                                     exclude_history=True))
    assert [len(c) for c in chunks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([c.items for c in chunks]), want.items)
    with pytest.raises(DataError, match="per-user entries"):
        list(rec.iter_recommend(HISTORIES, k=K, beams=BEAMS, batch_size=2, exclude=per_user[:3]))


def test_static_engine_pads_filters_with_its_rows(tmp_path_factory):
    from pauserec.runtime import Engine

    path = exported(tmp_path_factory, "qwen2", "direct", suffix="-static-b4k6", static=True, batch=4, beams=BEAMS)
    engine = Engine.load(path, provider="cpu")
    rec = _rec(engine)
    exclude = [["item2"], None, ["item4", "item10"], ["item3"], None]  # 5 users: a full batch of 4, then 1 + 3 pads
    out = rec.recommend(HISTORIES, k=K, beams=BEAMS, exclude=exclude)
    for u in range(len(HISTORIES)):
        single = rec.recommend(HISTORIES[u : u + 1], k=K, beams=BEAMS, exclude=[exclude[u]])
        np.testing.assert_array_equal(out.items[u], single.items[0])


# -- node masks (pauserec.data.trie) ------------------------------------------------------------------------
def _brute_mask(catalog, allowed: set[int]) -> np.ndarray:
    trie = catalog.trie
    want = np.zeros(trie.num_nodes, np.uint8)
    for i in allowed:
        node = 0
        want[0] = 1
        for code in catalog.sids[i]:
            node = trie.child(node, int(code))
            want[node] = 1
    return want


@pytest.mark.parametrize("seed", range(4))
def test_node_masks_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    sids = rng.integers(0, 4, size=(300, 3))
    sids[rng.random(300) < 0.3] = sids[0]  # a large collision group
    cat = Catalog([f"i{i}" for i in range(300)], sids, ("a", "b", "c"))
    trie = cat.trie
    n = cat.n_items
    for _ in range(6):
        allow = rng.choice(n, size=int(rng.integers(0, n)), replace=False)
        exclude = rng.choice(n, size=int(rng.integers(0, n)), replace=False)
        np.testing.assert_array_equal(trie.node_mask(allow=allow, exclude=exclude),
                                      _brute_mask(cat, set(allow.tolist()) - set(exclude.tolist())))
        for size in (1, 3, n // 2, n - 1, n):  # the few-excluded and many-excluded paths
            ex = rng.choice(n, size=size, replace=False)
            ex_dup = np.concatenate([ex, ex[: size // 2]])
            np.testing.assert_array_equal(trie.node_mask(exclude=ex_dup), _brute_mask(cat, set(range(n)) - set(ex.tolist())))
    np.testing.assert_array_equal(trie.node_mask(), _brute_mask(cat, set(range(n))))
    counts = trie.item_counts()
    assert counts[0] == n and counts[trie.level_starts[1]:trie.level_starts[2]].sum() == n
    np.testing.assert_array_equal(trie.item_counts(np.arange(n)), counts)
    with pytest.raises(ValueError, match="outside"):
        trie.node_mask(exclude=[n])


def test_sid_paths_walk_the_trie():
    cat = tiny_catalog()
    trie = cat.trie
    for s, codes in enumerate(trie.sid_codes):
        nodes, node = [], 0
        for c in codes:
            node = trie.child(node, int(c))
            nodes.append(node)
        np.testing.assert_array_equal(trie.sid_paths[s], nodes)
