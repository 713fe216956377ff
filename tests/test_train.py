"""pauserec.train: tokenizer, sample masking, cot template, training, checkpoints, reference beam search."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pauserec.data import ItemText, load_dataset, write_synthetic  # noqa: E402
from pauserec.prompt.spec import TrainingCard  # noqa: E402
from pauserec.errors import CheckpointError, DataError, PauserecError  # noqa: E402
from pauserec.train import tokenizer as tk  # noqa: E402
from pauserec.train.model import load_checkpoint  # noqa: E402
from pauserec.train.rationale import rationale_text  # noqa: E402
from pauserec.train.reference import (  # noqa: E402
    ReferenceRecommender,
    evaluate_checkpoint,
    exhaustive_scores,
    trie_topk_torch,
)
from pauserec.train.sft import IGNORE, TrainConfig, collate, encode_sample, encode_split, masked_loss, train  # noqa: E402

KINDS = ("direct", "pause", "cot")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(synthetic_data):
    return load_dataset(synthetic_data)


@pytest.fixture(scope="module")
def tok(synth):
    return tk.train_tokenizer(synth.items, synth.catalog, 1024)


def _train_tiny(data, out, **kw):
    kw = {"kind": "direct", "preset": "tiny", "seed": 0, "threads": 1, "max_steps": 6, **kw}
    return train(TrainConfig(data=data, index=None, out=out, **kw))


# -- tokenizer and samples ---------------------------------------------------------------------------
def test_tokenizer_has_every_special_and_sid_token(synth, tok):
    cat = synth.catalog
    for level, size in enumerate(cat.codebook_sizes):
        for code in range(size):  # every code of the codebook, used or not
            t = f"<{cat.token_prefixes[level]}_{code}>"
            assert tok.encode(t, add_special_tokens=False).ids == [tok.token_to_id(t)]
    for t in tk.CONTROL_TOKENS:
        assert tok.token_to_id(t) is not None
    spec = tk.build_prompt_spec(tok, cat, "pause", pause_k=5)
    assert spec.codebook_sizes == cat.codebook_sizes
    assert tk.decode_ids(tok, spec.prefix_ids).startswith("Given the items")


@pytest.mark.parametrize("kind", KINDS)
def test_loss_only_on_target_sid_and_rationale(synth, tok, kind):
    spec = tk.build_prompt_spec(tok, synth.catalog, kind, pause_k=5)
    split = synth.splits().train
    samples = encode_split(spec, synth, split, tok)
    L = spec.levels
    for (ids, labels), hist, target in list(zip(samples, split.histories, split.targets, strict=True))[:50]:
        prompt = spec.prompt_ids(synth.catalog.sids[hist])
        assert np.array_equal(ids[: len(prompt)], prompt)
        assert (labels[: len(prompt)] == IGNORE).all()  # instruction, history, think block, pauses
        assert np.array_equal(ids[-L:], spec.target_ids(synth.catalog.sids[target]))
        assert np.array_equal(labels[len(prompt) :], ids[len(prompt) :])  # everything after the prompt
        assert not (labels == spec.pause_id).any()
        if kind != "cot":
            assert (labels != IGNORE).sum() == L
        else:
            assert ids[-L - 1] == spec.think_end_id
    if kind == "pause":
        assert (samples[0][0] == spec.pause_id).sum() == 5
    ids, mask, labels = collate(samples[:8], spec.pad_id)
    assert (labels[mask == 0] == IGNORE).all() and (ids[mask == 0] == spec.pad_id).all()
    assert int((labels != IGNORE).sum()) == sum(int((y != IGNORE).sum()) for _, y in samples[:8])


def test_cot_template(tok, synth):
    items = [
        ItemText("Pipette A", "", "Eppendorf", "Industrial & Scientific,Lab,Pipettes"),
        ItemText("Tube", "", "Corning", "Industrial & Scientific,Lab,Tubes"),
        ItemText("Pipette B", "", "Eppendorf", "Industrial & Scientific,Lab,Pipettes"),
        ItemText("Mystery", "", "", ""),
    ]
    text = rationale_text(items, [0, 1, 2, 3])
    assert text == (
        "The user bought 4 items, mostly Pipettes and Tubes, often from Eppendorf. "
        "The user is likely to buy items in the Pipettes category."
    )
    assert rationale_text(items, [1, 0]) == rationale_text(items, [1, 0])  # deterministic
    assert "mostly Pipettes and Tubes" in rationale_text(items, [1, 0])  # tie -> the more recent first
    assert rationale_text(items, [3]) == "The user bought 1 item."
    spec = tk.build_prompt_spec(tok, synth.catalog, "cot", max_rationale=64)
    hist, target = synth.splits().train.histories[3], synth.splits().train.targets[3]
    rat = tk.encode_text(tok, rationale_text(synth.items, hist))
    ids, labels = encode_sample(spec, synth.catalog, hist, target, rat)
    prompt = spec.prompt_ids(synth.catalog.sids[hist])
    assert prompt[-1] == spec.think_id
    assert tk.decode_ids(tok, ids[len(prompt) : len(prompt) + len(rat)]) == rationale_text(synth.items, hist)
    short = dataclasses.replace(spec, max_rationale=4)
    ids4, _ = encode_sample(short, synth.catalog, hist, target, rat)
    assert len(ids4) == len(prompt) + 4 + 1 + spec.levels  # capped rationale, then </think>


def test_shared_instruction_prefix_gives_the_same_loss_and_grads(synth, tok):
    from pauserec.train.model import build_model

    spec = tk.build_prompt_spec(tok, synth.catalog, "pause")
    ids, mask, labels = collate(encode_split(spec, synth, synth.splits().train, tok)[:12], spec.pad_id)
    model = build_model("tiny", tok.get_vocab_size(), spec.pad_id, spec.eos_id, seed=1)
    grads = []
    for prefix in (0, len(spec.prefix_ids)):
        model.zero_grad()
        loss, n = masked_loss(model, ids, mask, labels, prefix_len=prefix)
        loss.backward()
        grads.append((float(loss.detach()), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


# -- training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loss_falls_and_card_is_complete(tiny_checkpoints, kind):
    card = TrainingCard.load(tiny_checkpoints[kind])
    t = card.train
    assert t["final_loss"] < 0.8 * t["first_loss"]
    assert card.prompt.kind == kind and card.prompt.pause_k == (5 if kind == "pause" else 0)
    assert card.preset == "tiny" and card.seed == 0 and card.dataset == "synthetic"
    assert card.model_config["model_type"] == "qwen3"
    assert t["steps"] > 0 and t["epochs"] > 0 and t["wall_time_s"] > 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "pauserec_card.json", "catalog.npz"):
        assert (tiny_checkpoints[kind] / f).is_file()


def test_checkpoint_round_trip(synthetic_data, synth, tmp_path):
    res = _train_tiny(synthetic_data, tmp_path / "ck", kind="pause", max_steps=4)
    ck = load_checkpoint(res.out)
    assert ck.catalog == synth.catalog
    assert ck.spec.pause_k == 5
    ids = torch.as_tensor(ck.spec.prompt_ids(synth.catalog.sids[synth.splits().test.histories[0]]))[None]
    with torch.no_grad():
        assert torch.equal(res.model(input_ids=ids).logits, ck.model(input_ids=ids).logits)
    emb = ck.model.get_input_embeddings().weight
    assert emb.shape[0] == ck.tokenizer.get_vocab_size()


def test_pause_row_starts_at_the_mean_embedding():
    from pauserec.train.model import build_model
    from pauserec.train.sft import init_pause_embedding

    model = build_model("tiny", 100, 0, 1, seed=3)
    mean = model.get_input_embeddings().weight.mean(0).detach().clone()
    init_pause_embedding(model, 7)
    assert torch.allclose(model.get_input_embeddings().weight[7], mean)


def test_pause_pretraining_changes_only_the_pause_row(synth, tok):
    from pauserec.train.model import build_model
    from pauserec.train.sft import Stage, grounding_samples, insert_pauses, run_stage

    spec = tk.build_prompt_spec(tok, synth.catalog, "pause")
    model = build_model("tiny", tok.get_vocab_size(), spec.pad_id, spec.eos_id, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    samples = insert_pauses(grounding_samples(spec, synth, tok), spec.pause_id, rng)
    assert any((ids == spec.pause_id).any() for ids, _ in samples)
    assert all(((ids == spec.pause_id) <= (y == IGNORE)).all() for ids, y in samples)
    run_stage(model, Stage("p", samples, 1, 1e-2, 32, None, max_steps=3, pause_only=spec.pause_id), spec.pad_id, rng)
    after = model.state_dict()
    emb_key = "model.embed_tokens.weight"
    changed = (after[emb_key] != before[emb_key]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [spec.pause_id]
    assert all(torch.equal(after[k], before[k]) for k in before if k not in (emb_key, "lm_head.weight"))


def test_reproducible_from_seed(synthetic_data, tmp_path):
    a = _train_tiny(synthetic_data, tmp_path / "a", kind="cot", max_steps=5)
    b = _train_tiny(synthetic_data, tmp_path / "b", kind="cot", max_steps=5)
    c = _train_tiny(synthetic_data, tmp_path / "c", kind="cot", max_steps=5, seed=1)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert a.losses == b.losses
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_stages_run_and_are_recorded(synthetic_data, tmp_path):
    res = _train_tiny(synthetic_data, tmp_path / "s", kind="pause", grounding=True, pause_pretrain=True, max_steps=3)
    card = TrainingCard.load(res.out)
    assert card.train["grounding"] and card.train["pause_pretrain"]
    assert card.train["stages"]["grounding"]["steps"] > 0 and card.train["stages"]["pause_pretrain"]["steps"] > 0


# -- reference recommender ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_equals_exhaustive_scoring(tiny_checkpoints, synth, kind):
    ck = load_checkpoint(tiny_checkpoints[kind])
    S = len(ck.catalog.trie.sid_codes)
    spec = dataclasses.replace(ck.spec, max_rationale=12)  # keep cot quick
    rec = ReferenceRecommender(ck.model, spec, ck.catalog, beams=S + 3, top_n=20)
    hists = synth.splits().test.histories[: 1 if kind == "cot" else 2]
    out = rec.recommend(hists)
    for u, hist in enumerate(hists):
        prefix = rec.prompts([hist])[0]
        if kind == "cot":
            assert len(out.rationales[u]) <= 12 and spec.think_end_id not in out.rationales[u]
            prefix = np.concatenate([prefix, out.rationales[u], [spec.think_end_id]])
        want = exhaustive_scores(ck.model, spec, ck.catalog.trie, prefix)  # (S,)
        assert (out.sids[u, :S] >= 0).all() and (out.sids[u, S:] == -1).all()  # every SID, then padding
        np.testing.assert_allclose(out.sid_scores[u, :S], want[out.sids[u, :S]], atol=1e-4)
        assert np.all(np.diff(out.sid_scores[u, :S]) <= 0)
        order = np.lexsort((np.arange(S), -want))
        gap = np.abs(np.diff(np.sort(want))).min()
        if gap > 1e-4:  # no near-ties: the ranking is exactly the exhaustive one
            assert np.array_equal(out.sids[u, :S], order)
        codes = ck.catalog.trie.sid_codes[out.sids[u, :S]]
        assert np.array_equal(out.sid_codes[u, :S], codes)
        # items: SIDs expanded to their collision groups in ascending item order
        expanded = np.concatenate([ck.catalog.trie.items_of_sid(s) for s in out.sids[u, :S]])[:20]
        assert np.array_equal(out.items[u], expanded)


def test_batched_beam_search_equals_one_user_at_a_time(tiny_checkpoints, synth):
    rec = ReferenceRecommender.from_checkpoint(tiny_checkpoints["pause"], beams=7, top_n=10)
    hists = synth.splits().test.histories[:4]  # different lengths -> left padding
    assert len({len(h) for h in hists}) > 1
    together = rec.recommend(hists)
    for u, h in enumerate(hists):
        alone = rec.recommend([h])
        assert np.array_equal(alone.items[0], together.items[u])
        np.testing.assert_allclose(alone.sid_scores[0], together.sid_scores[u], atol=1e-5)


def test_trie_topk_tie_rule_and_padding():
    from pauserec.data import Catalog

    cat = Catalog([str(i) for i in range(4)], np.array([[0, 1], [0, 2], [1, 0], [1, 0]]), ("a", "b"))
    from pauserec.train.reference import child_tables

    tables = child_tables(cat.trie)
    scores = torch.tensor([[0.0, 0.0]])
    lp = torch.zeros(1, 2, 3)  # all equal: ties everywhere
    nodes = torch.tensor([[1, 2]])  # the two depth-1 nodes (codes 0 and 1)
    top = trie_topk_torch(scores, lp, nodes, tables[1], int(cat.trie.level_starts[1]), k=5)
    assert top.parent.tolist() == [[0, 0, 1, -1, -1]]  # lower parent first, then lower code
    assert top.token.tolist() == [[1, 2, 0, -1, -1]]
    assert torch.isinf(top.score[0, 3:]).all()


def test_trie_topk_matches_the_runtime_numpy_kernel():
    tt = pytest.importorskip("pauserec.runtime.trie_topk")
    from pauserec.train.reference import child_tables

    d = load_dataset(write_synthetic(Path(pytest.importorskip("tempfile").mkdtemp()), n_items=60, codebook=4, seed=5))
    trie = d.catalog.trie
    tables = child_tables(trie)
    rng = np.random.default_rng(0)
    ls = trie.level_starts
    for depth in range(trie.levels):
        nodes = rng.integers(ls[depth], ls[depth + 1], size=(3, 4))
        nodes[0, 1] = -1
        scores = np.round(rng.normal(size=(3, 4)), 1).astype(np.float32)
        lp = np.round(rng.normal(size=(3, 4, 4)), 1).astype(np.float32)  # rounded: many ties
        want = tt.trie_topk(scores, lp, nodes.astype(np.int32), trie.offsets, trie.tokens, trie.children, 6, impl="numpy")
        got = trie_topk_torch(torch.from_numpy(scores), torch.from_numpy(lp), torch.from_numpy(nodes), tables[depth], int(ls[depth]), 6)
        assert got.parent.tolist() == want.parent.tolist()
        assert got.token.tolist() == want.token.tolist()
        assert got.node.tolist() == want.node.tolist()


def test_evaluate_checkpoint_reports_metrics_and_popularity(tiny_checkpoints, synthetic_data):
    m = evaluate_checkpoint(tiny_checkpoints["direct"], synthetic_data, limit=40, beams=10)
    assert m["users"] == 40 and m["invalid_rate"] == 0.0
    for k in ("hit@5", "ndcg@5", "hit@10", "ndcg@10", "sid_hit@10"):
        assert 0.0 <= m[k] <= 1.0
    for k in ("hit@5", "ndcg@5", "hit@10", "ndcg@10"):
        assert 0.0 <= m["popularity"][k] <= 1.0
    assert m["ndcg@10"] <= m["hit@10"]


# -- bad input ---------------------------------------------------------------------------------------------
def test_unsupported_architecture(tmp_path, synthetic_data):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="gpt2.*not supported"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not supported"):
        _train_tiny(synthetic_data, tmp_path / "x", init_from=bad)
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(tmp_path)


def test_index_with_unknown_sid_tokens(tiny_checkpoints, tmp_path):
    wider = write_synthetic(tmp_path / "wide", codebook=32, seed=0)  # codes 16..31 were never in the vocabulary
    with pytest.raises(CheckpointError, match="not in the model's tokenizer"):
        evaluate_checkpoint(tiny_checkpoints["direct"], wider, limit=2)
    other = write_synthetic(tmp_path / "other", seed=1)  # same tokens, other SIDs
    with pytest.raises(CheckpointError, match="differs from the catalog"):
        evaluate_checkpoint(tiny_checkpoints["direct"], other, limit=2)


def test_empty_dataset(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "tiny.inter.json").write_text(json.dumps({"0": [0, 1], "1": [1, 0]}))  # too short for a train sample
    (d / "tiny.item.json").write_text(json.dumps({"0": {"title": "a"}, "1": {"title": "b"}}))
    (d / "tiny.index.json").write_text(json.dumps({"0": ["<a_0>", "<b_0>"], "1": ["<a_1>", "<b_0>"]}))
    with pytest.raises(PauserecError, match="no training samples|empty"):
        _train_tiny(d, tmp_path / "out")


def test_bad_kind_and_budget(synthetic_data, tmp_path):
    with pytest.raises(PauserecError, match="unknown kind"):
        _train_tiny(synthetic_data, tmp_path / "o", kind="sampled")
    with pytest.raises(PauserecError, match="max-minutes"):
        _train_tiny(synthetic_data, tmp_path / "o", max_minutes=0)
    with pytest.raises(DataError):
        _train_tiny(tmp_path / "missing", tmp_path / "o")


def test_layers_override_the_preset_depth_and_reach_the_saved_config(synthetic_data, tmp_path):
    res = _train_tiny(synthetic_data, tmp_path / "deep", layers=3, max_steps=2)
    ck = load_checkpoint(res.out)
    assert ck.model.config.num_hidden_layers == 3 and len(ck.model.model.layers) == 3
    assert ck.card.model_config["num_hidden_layers"] == 3
    with pytest.raises(PauserecError, match="--layers"):
        _train_tiny(synthetic_data, tmp_path / "o", layers=0)
