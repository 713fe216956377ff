"""pauserec.runtime: exact top-N against exhaustive torch scoring and HF generate; engine checks; bad input.

Engines come from the tiny random checkpoints of test_export.py (exported once per session).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export import exported, tiny_catalog, tiny_model, tiny_spec  # noqa: E402

from pauserec.errors import BackendUnavailable, DataError, EngineError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCH_OF = {"direct": "qwen2", "pause": "qwen3", "cot": "llama"}
HISTORIES = [["item1", "item5"], ["item7"], ["item2", "item9", "item3", "item12", "item20", "item0", "item8"]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory) -> dict[str, Path]:
    return {kind: exported(tmp_path_factory, arch, kind) for kind, arch in ARCH_OF.items()}


def _recommender(path: Path, **kw):
    from pauserec.runtime import Engine, Recommender

    return Recommender(Engine.load(path, provider="cpu"), **kw)


# -- torch references ---------------------------------------------------------------------------------
def _prompt(model, spec, history: list[str], catalog) -> list[int]:
    """Prompt ids up to the first SID token; cot: HF greedy rationale (capped), then </think>."""
    codes = catalog.sids[[catalog.index_of(x) for x in history]]
    ids = spec.prompt_ids(codes).tolist()
    if spec.kind == "cot":
        for _ in range(spec.max_rationale):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == spec.think_end_id:
                return ids
        ids.append(spec.think_end_id)
    return ids


def _exhaustive(model, spec, catalog, history: list[str], scoring: str = "full") -> tuple[list[str], np.ndarray]:
    """Every catalog SID scored by the HF model (sum of its SID tokens' log-probs: full vocabulary, or
    renormalised over each level's codes for ``scoring="sid"``); items ranked best first."""
    trie = catalog.trie
    prompt = _prompt(model, spec, history, catalog)
    table = spec.sid_table()
    sid_tok = table[np.arange(spec.levels)[None, :], trie.sid_codes]  # (S, L)
    seqs = torch.tensor([prompt + row.tolist() for row in sid_tok])
    with torch.no_grad():
        lp = model(seqs).logits.double().log_softmax(-1)  # (S, n + L, V)
    n = len(prompt)
    steps = lp[:, n - 1 : n - 1 + spec.levels]  # (S, L, V)
    if scoring == "sid":  # log_softmax over the level's codebook rows only
        for lv in range(spec.levels):
            ids = list(spec.sid_token_ids[lv])
            steps[:, lv, ids] = steps[:, lv, ids].log_softmax(-1)
    scores = steps.gather(2, torch.from_numpy(sid_tok)[:, :, None]).sum((1, 2)).numpy()  # (S,)
    order = np.argsort(-scores, kind="stable")
    items, item_scores = [], []
    for s in order:
        for i in trie.items_of_sid(int(s)):
            items.append(catalog.item_ids[i])
            item_scores.append(scores[s])
    return items, np.array(item_scores)


# -- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["direct", "pause", "cot"])
def test_top_n_equals_exhaustive_scoring(engine_dirs, kind):
    """beams >= every trie level's width: the search keeps every prefix, so it must find the exact top-N."""
    rec = _recommender(engine_dirs[kind])
    model, spec, catalog = tiny_model(ARCH_OF[kind]), tiny_spec(kind), tiny_catalog()
    out = rec.recommend(HISTORIES, k=10, beams=20)
    assert out.items.shape == (3, 10) and out.sids.shape == (3, 10, 3)
    for row, history in enumerate(HISTORIES):
        items, scores = _exhaustive(model, spec, catalog, history)
        assert out.items[row].tolist() == items[:10]
        np.testing.assert_allclose(out.scores[row], scores[:10], atol=1e-4)
        idx = [catalog.index_of(x) for x in items[:10]]
        assert out.item_index[row].tolist() == idx
        assert (out.sids[row] == catalog.sids[idx]).all()


@pytest.mark.parametrize("kind", ["direct", "pause", "cot"])
def test_sid_scoring_top_n_equals_exhaustive_scoring(tmp_path_factory, kind):
    """The SID-level head (``--scoring sid``): the exact top-N under per-level normalisation."""
    path = exported(tmp_path_factory, ARCH_OF[kind], kind, "-sid", scoring="sid")
    assert json.loads((path / "manifest.json").read_text())["scoring"] == "sid"
    rec = _recommender(path)
    model, spec, catalog = tiny_model(ARCH_OF[kind]), tiny_spec(kind), tiny_catalog()
    out = rec.recommend(HISTORIES, k=10, beams=20)
    for row, history in enumerate(HISTORIES):
        items, scores = _exhaustive(model, spec, catalog, history, scoring="sid")
        assert out.items[row].tolist() == items[:10]
        np.testing.assert_allclose(out.scores[row], scores[:10], atol=1e-4)


@pytest.mark.parametrize("kind", ["pause", "direct"])
def test_top_beams_equal_hf_generate(engine_dirs, kind):
    """Fewer beams than SIDs (real pruning): same beams, order and scores as HF beam search."""
    model, spec, catalog = tiny_model(ARCH_OF[kind]), tiny_spec(kind), tiny_catalog()
    trie, beams = catalog.trie, 6
    rec = _recommender(engine_dirs[kind])
    from pauserec.runtime.beam import BeamSearch

    for history in HISTORIES:
        prompt = _prompt(model, spec, history, catalog)

        def allowed(_batch_id, ids, n=len(prompt)):
            node = 0
            for level, tok in enumerate(ids[n:].tolist()):
                node = trie.child(node, spec.sid_token_ids[level].index(tok))
            edges = trie.tokens[trie.offsets[node] : trie.offsets[node + 1]]
            return [spec.sid_token_ids[len(ids) - n][c] for c in edges] if len(ids) - n < spec.levels else [spec.eos_id]

        gen = model.generate(torch.tensor([prompt]), num_beams=beams, num_return_sequences=beams, do_sample=False,
                             max_new_tokens=spec.levels, prefix_allowed_tokens_fn=allowed, length_penalty=0.0,
                             early_stopping=True, pad_token_id=spec.pad_id, eos_token_id=spec.eos_id,
                             output_scores=True, return_dict_in_generate=True)
        hf_sids = [[spec.sid_token_ids[lv].index(t) for lv, t in enumerate(seq[len(prompt):].tolist())]
                   for seq in gen.sequences]
        dense = rec.encode([history])
        ids = rec.encoder(dense[0]).reshape(1, -1)
        search = BeamSearch(rec.engine, ids, np.ones_like(ids), beams=beams)
        while not search.done:
            search.step()
        nodes, scores = search.leaves()
        ours = [trie.sid_codes[n - trie.level_starts[trie.levels]].tolist() for n in nodes[0]]
        assert ours == hf_sids
        np.testing.assert_allclose(scores[0], gen.sequences_scores.numpy(), atol=1e-4)


@pytest.mark.parametrize("kind", ["direct", "pause", "cot"])
def test_equals_the_pytorch_reference_recommender(engine_dirs, kind):
    """Same items and scores as pauserec.train.reference with pruning (beams < SIDs), all three kinds."""
    reference = pytest.importorskip("pauserec.train.reference")
    catalog = tiny_catalog()
    ref = reference.ReferenceRecommender(tiny_model(ARCH_OF[kind]), tiny_spec(kind), catalog, beams=6, top_n=6)
    want = ref.recommend([[catalog.index_of(x) for x in h] for h in HISTORIES])
    got = _recommender(engine_dirs[kind]).recommend(HISTORIES, k=6, beams=6)
    assert got.item_index.tolist() == want.items.tolist()
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


def test_static_engine_matches_dynamic(tmp_path_factory):
    static = _recommender(exported(tmp_path_factory, "qwen3", "cot", "-static", static=True, batch=2, beams=5,
                                   max_history=3))
    dynamic = _recommender(exported(tmp_path_factory, "qwen3", "cot", "-dyn", max_history=3))
    a = static.recommend(HISTORIES, k=5, beams=5)  # 3 users on a batch-2 engine: padded batches
    b = dynamic.recommend(HISTORIES, k=5, beams=5)
    assert a.items.tolist() == b.items.tolist()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    with pytest.raises(EngineError, match="beams=5"):
        static.recommend(HISTORIES, k=4, beams=4)


def test_fp16_engine_agrees_with_fp32(tmp_path_factory, engine_dirs):
    fp16 = _recommender(exported(tmp_path_factory, "qwen3", "pause", "-fp16-default", precision="fp16"))
    a = fp16.recommend(HISTORIES, k=10, beams=20)
    b = _recommender(engine_dirs["pause"]).recommend(HISTORIES, k=10, beams=20)
    assert a.items[:, 0].tolist() == b.items[:, 0].tolist()
    np.testing.assert_allclose(a.scores, b.scores, atol=5e-2)


# -- the recommender ------------------------------------------------------------------------------------
def test_collision_groups_expand_in_stable_order(engine_dirs):
    rec = _recommender(engine_dirs["pause"])
    out = rec.recommend(HISTORIES[:1], k=30, beams=30)
    items = out.items[0][out.item_index[0] >= 0].tolist()
    assert sorted(items) == sorted(tiny_catalog().item_ids)  # all 22 items, each once
    pos = [items.index(f"item{i}") for i in (3, 20, 21)]  # item3, item20, item21 share one SID
    assert pos == list(range(pos[0], pos[0] + 3))
    assert len({float(out.scores[0][p]) for p in pos}) == 1
    assert out.items[0][22:].tolist() == [""] * 8 and np.isneginf(out.scores[0][22:]).all()
    assert (out.sids[0][22:] == -1).all() and (out.item_index[0][22:] == -1).all()


def test_batching_truncation_and_streams_do_not_change_results(engine_dirs):
    rec = _recommender(engine_dirs["direct"], batch_size=2)
    full = rec.recommend(HISTORIES, k=5, beams=8)
    for row, history in enumerate(HISTORIES):
        one = rec.recommend([history], k=5, beams=8)
        assert one.items[0].tolist() == full.items[row].tolist()
        np.testing.assert_allclose(one.scores[0], full.scores[row], atol=1e-5)
    last = rec.recommend([HISTORIES[2][-4:]], k=5, beams=8)  # max_history = 4
    assert last.items[0].tolist() == full.items[2].tolist()
    chunks = list(rec.iter_recommend(iter(HISTORIES), k=5, beams=8, batch_size=2))
    assert [len(c) for c in chunks] == [2, 1]
    assert np.concatenate([c.items for c in chunks]).tolist() == full.items.tolist()
    assert set(full.timings) >= {"prefill", "rationale", "decode", "topk", "total"}
    numpy_impl = _recommender(engine_dirs["direct"], impl="numpy").recommend(HISTORIES, k=5, beams=8)
    assert numpy_impl.items.tolist() == full.items.tolist()


def test_bad_histories_name_user_and_item(engine_dirs):
    rec = _recommender(engine_dirs["direct"])
    with pytest.raises(DataError, match=r"user 1: unknown item ids: nope"):
        rec.recommend([["item1"], ["item2", "nope"]])
    with pytest.raises(DataError, match="user 0: empty history"):
        rec.recommend([[]])
    assert rec.validate_history(["item1", 4]) == "unknown item ids: 4"
    assert rec.validate_history("item1") == "history must be a list of item ids"
    assert rec.validate_history(["item1"]) is None
    with pytest.raises(DataError, match="k and beams"):
        rec.recommend([["item1"]], k=0)


# -- engine loading -----------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_format_version_names_the_reexport(tmp_path, engine_dirs):
    from pauserec.runtime import Engine

    eng = _copy(engine_dirs["direct"], tmp_path / "eng")
    m = json.loads((eng / "manifest.json").read_text())
    (eng / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(EngineError, match="version 99.*pauserec-export"):
        Engine.load(eng)
    (eng / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        Engine.load(eng)
    (eng / "manifest.json").unlink()
    with pytest.raises(EngineError, match="no manifest.json"):
        Engine.load(eng)


def test_checksum_mismatch_names_the_file(tmp_path, engine_dirs):
    from pauserec.runtime import Engine

    eng = _copy(engine_dirs["direct"], tmp_path / "eng")
    with open(eng / "decode.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match="checksum mismatch for .*decode.onnx"):
        Engine.load(eng)
    (eng / "catalog.npz").unlink()
    with pytest.raises(EngineError, match="catalog.npz is missing"):
        Engine.load(eng)


def test_unusable_providers_raise(engine_dirs):
    import onnxruntime as ort

    from pauserec.runtime import Engine

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            Engine.load(engine_dirs["direct"], provider="cuda")
    with pytest.raises(BackendUnavailable, match="no TensorRT plans"):
        Engine.load(engine_dirs["direct"], provider="tensorrt")
    with pytest.raises(BackendUnavailable, match="unknown provider"):
        Engine.load(engine_dirs["direct"], provider="gpu")
    eng = Engine.load(engine_dirs["direct"], provider="auto", threads=1)
    assert eng.provider in ("cpu", "cuda", "tensorrt")


def test_runtime_never_imports_torch(engine_dirs):
    code = textwrap.dedent(f"""
        import sys
        import pauserec.runtime
        from pauserec.runtime import Engine, Recommender
        rec = Recommender(Engine.load({str(engine_dirs['cot'])!r}))
        out = rec.recommend([["item1", "item2"]], k=3, beams=4)
        assert out.items.shape == (1, 3)
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("pauserec.export")]
        assert not bad, bad
        print("ok")
    """)
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# -- trained checkpoints (tests/conftest.py: tiny_checkpoints) -------------------------------------


def _same_or_tied(got_items, got_scores, want_items, want_scores, tol: float = 1e-5) -> bool:
    """Equal top lists, or lists that first differ where the two scores tie within ``tol``."""
    for a, sa, b, sb in zip(got_items, got_scores, want_items, want_scores):
        if a != b:
            return abs(float(sa) - float(sb)) <= tol
    return True


@pytest.mark.parametrize("kind", ["direct", "pause", "cot"])
def test_trained_checkpoints_export_and_match_the_reference(trained_engines, tiny_checkpoints, synthetic_data, kind):
    from pauserec.data import load_dataset
    from pauserec.train.reference import ReferenceRecommender

    m = json.loads((trained_engines[kind] / "manifest.json").read_text())
    assert m["kind"] == kind and all(c["ok"] and c["max_abs_err"] < 1e-4 for c in m["validation"])
    rec = _recommender(trained_engines[kind])
    test = load_dataset(synthetic_data).splits(rec.engine.max_history).test
    n = 24
    ids = rec.catalog.item_ids
    got = rec.recommend([[ids[i] for i in h] for h in test.histories[:n]], k=10, beams=20)
    want = ReferenceRecommender.from_checkpoint(tiny_checkpoints[kind], beams=20, top_n=10).recommend(
        test.histories[:n])
    agree = [_same_or_tied(g, gs, w, ws) for g, gs, w, ws in zip(got.item_index, got.scores, want.items, want.scores)]
    assert all(agree), f"{agree.count(False)} of {n} users differ"
    assert (got.item_index >= 0).all()  # every slot is a real catalog item (no invalid items)


def test_int8_reports_hit10_change_on_the_test_split(tiny_checkpoints, synthetic_data, tmp_path):
    from pauserec.export import ExportConfig, export_engine

    report = export_engine(ExportConfig(checkpoint=tiny_checkpoints["pause"], out=tmp_path / "int8", precision="int8", min_agreement=0.0,
                                        data=synthetic_data, quant_sample=16))
    q = report.quantized
    assert q["sample"] == 16 and 0.0 <= q["hit10_fp32"] <= 1.0 and 0.0 <= q["hit10_lowered"] <= 1.0
    assert q["hit10_change"] == pytest.approx(q["hit10_lowered"] - q["hit10_fp32"])
    out = _recommender(tmp_path / "int8").recommend([["1", "2", "3"]], k=10, beams=20)
    assert (out.item_index >= 0).all()


def held_kv_bytes(e, beams: int, batch: int) -> int:
    """Bytes of KV a beam search of ``batch`` users at the longest history holds once the beams' KV exists."""
    from pauserec.runtime.beam import beam_search

    t = e.prompt.max_history_tokens
    ids = np.full((batch, t), e.prompt.pad_id, np.int64)
    for b, h in enumerate(e.encoder.many([np.arange(e.max_history) % len(e.catalog.item_ids)] * batch)):
        ids[b, : len(h)] = h[:t]
    search = beam_search(e, ids, np.ones((batch, t), np.int64), beams=beams)
    while search.level < 1:  # past the first level: the beams' KV exists
        search.step()
    return sum(np.asarray(a).nbytes for a in (search.ctx_key, search.ctx_value, search.beam_key, search.beam_value))


@pytest.mark.parametrize("kind", ["pause", "cot"])
def test_kv_bytes_per_user_is_what_a_search_holds(engine_dirs, kind):
    """The KV a user holds between graph calls (what the export sizes its check batches by) is the bytes the
    beam search really holds: the context KV at the longest history, plus every beam's SID slots."""
    from pauserec.runtime import Engine

    e = Engine.load(engine_dirs[kind], provider="cpu")
    assert held_kv_bytes(e, beams=4, batch=3) == 3 * e.kv_bytes_per_user(4)
