"""pauserec-export --stream: the model is never loaded; the engine is the one the in-memory export writes.

Each tiny checkpoint (Qwen3 untied with q/k norms, Qwen2 tied with q/k/v biases, Llama with llama3 RoPE scaling; a
bfloat16 sharded real-vocabulary checkpoint) is exported both ways: ``weights.bin`` must be byte-identical, every graph
must validate against the layer-by-layer HF reference, and the engines must recommend the same items. The layer-by-
layer reference itself is checked against HF's whole-model forward.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export import exported, make_checkpoint, tiny_model  # noqa: E402

from pauserec.errors import CheckpointError, ExportError  # noqa: E402

CASES = [("qwen3", "pause"), ("qwen2", "direct"), ("llama", "cot")]
HISTORIES = [["item1", "item5"], ["item7"], ["item2", "item9", "item3", "item12", "item20", "item0", "item8"]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recommend(engine: Path):
    from pauserec.runtime import Engine, Recommender

    return Recommender(Engine.load(engine, provider="cpu")).recommend(HISTORIES, k=10, beams=10)


@pytest.mark.parametrize("arch,kind", CASES)
def test_streamed_export_writes_the_same_engine(tmp_path_factory, arch, kind):
    normal = exported(tmp_path_factory, arch, kind)
    streamed = exported(tmp_path_factory, arch, kind, "-stream", stream=True)
    assert _sha(streamed / "weights.bin") == _sha(normal / "weights.bin")
    checks = json.loads((streamed / "manifest.json").read_text())["validation"]
    assert checks and all(c["ok"] for c in checks)  # every graph against HF's layers, one at a time
    a, b = _recommend(normal), _recommend(streamed)
    assert a.items.tolist() == b.items.tolist()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_layer_by_layer_reference_is_the_whole_forward(tmp_path_factory, arch):
    from pauserec.export.stream import StreamedWeights, layerwise_logprobs
    from pauserec.export.validate import hf_logprobs

    ckpt = make_checkpoint(tmp_path_factory.getbasetemp() / "pauserec-tiny", arch, "direct")
    model = tiny_model(arch)
    seqs = [(6, 7, 8, 40, 45, 5, 2, 3), (9, 10), (41,)]
    got = layerwise_logprobs(StreamedWeights(ckpt), seqs, keep=2)
    for seq in seqs:
        want = hf_logprobs(model, list(seq))[-2:]
        np.testing.assert_allclose(got[seq], want, atol=2e-5, rtol=0)


def test_the_skeleton_holds_no_weights(tmp_path_factory):
    """A real-vocabulary (151,936 x 64, tied) checkpoint's skeleton: every parameter a stand-in of one number."""
    from test_export import real_shape_checkpoint

    from pauserec.export.stream import StreamedWeights, is_stand_in

    ckpt = real_shape_checkpoint(tmp_path_factory.mktemp("real-stream"), "pause")
    weights = StreamedWeights(ckpt)
    params = list(weights.model.parameters())
    assert params and all(is_stand_in(p) or p.numel() == 1 for p in params)
    assert sum(p.untyped_storage().nbytes() for p in params) <= 4 * len(params)
    emb = weights.model.get_input_embeddings().weight
    assert weights.rows(emb, [5, 6, 7, 100]).shape == (4, 64)


def test_bfloat16_shards_stream_to_the_same_engine(tmp_path):
    """A sharded bfloat16 checkpoint (real Qwen3-8B vocabulary and heads, one layer) exports the same both ways."""
    import pauserec.bench.shapes as shapes
    from pauserec.export import ExportConfig, export_engine

    shapes.SHARD_BYTES, before = 20_000_000, shapes.SHARD_BYTES
    try:
        ckpt = shapes.write_shape_checkpoint("qwen3-8b", tmp_path / "ck", layers=1, hidden=64, dtype="bfloat16")
    finally:
        shapes.SHARD_BYTES = before
    assert (ckpt / "model.safetensors.index.json").is_file()
    cfg = dict(checkpoint=ckpt, check_users=0, prompt_sample=4, threads=1)
    a = export_engine(ExportConfig(out=tmp_path / "normal", **cfg)).out
    b = export_engine(ExportConfig(out=tmp_path / "stream", stream=True, **cfg)).out
    assert _sha(a / "weights.bin") == _sha(b / "weights.bin")

    # --precision bf16 of a bf16 checkpoint: half the bytes, the fp32 engine's items, its scores within float32
    # rounding (the same weights and float32 arithmetic; the operators' order may differ by an ulp or two)
    report = export_engine(ExportConfig(out=tmp_path / "bf16", precision="bf16", stream=True, quant_sample=8, **cfg))
    c = report.out
    assert report.quantized["exact"] and report.quantized["reference"] == "hf-layerwise"
    assert report.checks and all(ch["ok"] and ch["atol"] < 1e-2 for ch in report.checks)  # fp32's tolerance
    assert (c / "weights.bin").stat().st_size < 0.53 * (a / "weights.bin").stat().st_size
    _assert_bf16_graphs(c)
    from pauserec.runtime import Engine, Recommender

    fp32, bf16 = (Recommender(Engine.load(e, provider="cpu")) for e in (a, c))
    ids = fp32.catalog.item_ids
    histories = [list(ids[i:i + n]) for i, n in ((0, 3), (7, 1), (20, 12))]
    want, got = (r.recommend(histories, k=10, beams=10) for r in (fp32, bf16))
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_allclose(got.scores, want.scores, atol=2e-5, rtol=0)
    # a session per graph over the shared mapped weights (as on a GPU): the bfloat16 tensors go in as such
    per_graph = Recommender(Engine.load(c, provider="cpu", prepack=False)).recommend(histories, k=10, beams=10)
    np.testing.assert_array_equal(per_graph.items, got.items)
    np.testing.assert_allclose(per_graph.scores, got.scores, atol=2e-5, rtol=0)


def _assert_bf16_graphs(engine: Path) -> None:
    """Every weight a MatMul or Gather reads is a bfloat16 initializer cast to float32 (a Gather: its rows); the
    fused prefix's KV, computed by the export, stays float32."""
    import onnx
    from onnx import TensorProto

    from pauserec.export.graphs import COMPUTED_CONSTANTS

    for file in ("prefill.onnx", "decode.onnx"):
        g = onnx.load(str(engine / file), load_external_data=False).graph
        types = {t.name: t.data_type for t in g.initializer}
        big = {t.name for t in g.initializer if t.data_location == TensorProto.EXTERNAL
               and t.data_type in (TensorProto.FLOAT, TensorProto.BFLOAT16)}
        assert {types[n] for n in big - set(COMPUTED_CONSTANTS)} == {TensorProto.BFLOAT16}
        assert all(types[n] == TensorProto.FLOAT for n in COMPUTED_CONSTANTS if n in types)
        assert not [n for n in g.node if n.op_type == "MatMul" and set(n.input) & big]  # each read through its cast
        casts = [n for n in g.node if n.op_type == "Cast" and n.input[0] in big]
        assert casts and all(c.attribute[0].i == TensorProto.FLOAT for c in casts)
        for n in g.node:
            if n.op_type == "Gather" and n.input[0] in big - set(COMPUTED_CONSTANTS):
                assert types[n.input[0]] == TensorProto.BFLOAT16
                (cast,) = [m for m in g.node if n.output[0] in m.input]
                assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT


def test_what_streaming_refuses(tmp_path_factory, tmp_path):
    from pauserec.export import ExportConfig, export_engine

    ckpt = make_checkpoint(tmp_path_factory.getbasetemp() / "pauserec-tiny", "qwen3", "pause")
    no_safetensors = tmp_path / "bin"
    shutil.copytree(ckpt, no_safetensors)
    (no_safetensors / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        export_engine(ExportConfig(checkpoint=no_safetensors, out=tmp_path / "e1", stream=True))
    bad = tmp_path / "nan"
    shutil.copytree(ckpt, bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="non-finite.*up_proj"):
        export_engine(ExportConfig(checkpoint=bad, out=tmp_path / "e2", stream=True))
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_a_pipelines_own_checkpoint_streams_to_hf_generates_top10(tmp_path):
    """An LC-Rec-format checkpoint (Llama, BOS, byte-level BPE with SID tokens added after training, its own
    prompt): the streamed engine equals the in-memory one and ranks as HF generate does on prompts that the HF
    tokenizer made (streaming skips export's own generate check; this is it)."""
    from test_export_external import LCREC_0, _export, _histories, _setup, assert_same_top10, hf_top10

    ckpt, index, _ = _setup(tmp_path, "lcrec", ("a", "b", "c", "d"), "llama", tied=False)
    normal = _export(tmp_path, ckpt, "lcrec.index.json", prompt="lc-rec:0", check_users=0).out
    streamed = _export(tmp_path, ckpt, "lcrec.index.json", prompt="lc-rec:0", stream=True).out
    assert _sha(streamed / "weights.bin") == _sha(normal / "weights.bin")
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    histories = _histories(4)
    prompts = [tok(LCREC_0.replace("{inters}", ", ".join("".join(index[i]) for i in h[-20:])))["input_ids"]
               for h in histories]
    assert_same_top10(streamed, histories, hf_top10(ckpt, prompts, index, eos=True))


# -- the HF top-10, one decoder layer at a time -------------------------------------------------------------------
DENSE_HISTORIES = [np.array([1, 5]), np.array([7]), np.array([2, 9, 3, 12, 20, 0, 8]), np.array([21, 4, 4])]


def _hf(tmp_path_factory, arch: str, kind: str):
    from pauserec.reference.hf_generate import HFBaseline

    hf = HFBaseline(make_checkpoint(tmp_path_factory.getbasetemp() / "pauserec-tiny", arch, kind))
    return hf, hf._prompts(DENSE_HISTORIES)


def _assert_same_top(items, scores, want_items, want_scores):
    from pauserec.export.pipeline import same_top

    assert items.shape == want_items.shape and items.dtype == np.int32 and scores.dtype == np.float32
    for b in range(len(items)):
        assert same_top(items[b], scores[b], want_items[b], want_scores[b], 1e-4), (b, items[b], want_items[b])


@pytest.mark.parametrize("arch,kind", [("qwen3", "pause"), ("qwen2", "direct"), ("llama", "direct")])
def test_layer_by_layer_top10_is_hf_generates(tmp_path_factory, arch, kind):
    from pauserec.export.stream import StreamedWeights, layerwise_topk

    hf, prompts = _hf(tmp_path_factory, arch, kind)
    want = hf.recommend_prompts(prompts, 10, 10)
    items, scores = layerwise_topk(StreamedWeights(hf.ckpt), prompts, hf.spec, hf.catalog, beams=10, k=10)
    _assert_same_top(items, scores, want.item_index, want.scores)
    assert (items >= 0).all()


def _sid_beam_search(model, prompt, spec, catalog, beams: int, k: int):
    """The ``sid`` rule's beam search, written out: whole-model forwards of prompt + each beam's SID tokens, log-probs
    renormalised over the level's codes, children of a beam's prefix read from the catalog's SIDs."""
    table, sids = spec.sid_table(), catalog.trie.sid_codes
    live = [((), 0.0)]  # (codes so far, score)
    for level in range(spec.levels):
        ids = table[level, : spec.codebook_sizes[level]]
        cands = []
        for codes, score in live:
            seq = list(prompt) + [int(table[lv, c]) for lv, c in enumerate(codes)]
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].double().numpy()
            sub = logits[ids]
            lp = sub - (sub.max() + np.log(np.exp(sub - sub.max()).sum()))
            below = sorted({int(s[level]) for s in sids if tuple(int(c) for c in s[:level]) == codes})
            cands += [(codes + (c,), score + lp[c]) for c in below]
        live = sorted(cands, key=lambda c: -c[1])[:beams]
    sid_of = {tuple(int(c) for c in s): i for i, s in enumerate(sids)}
    ranked = [(int(item), score) for codes, score in live for item in catalog.trie.items_of_sid(sid_of[codes])][:k]
    items, scores = np.full(k, -1, np.int32), np.full(k, -np.inf, np.float32)
    items[: len(ranked)], scores[: len(ranked)] = [i for i, _ in ranked], [s for _, s in ranked]
    return items, scores


def test_layer_by_layer_top10_with_sid_scoring(tmp_path_factory):
    from pauserec.export.stream import StreamedWeights, layerwise_topk

    hf, prompts = _hf(tmp_path_factory, "qwen3", "pause")
    items, scores = layerwise_topk(StreamedWeights(hf.ckpt), prompts, hf.spec, hf.catalog, beams=6, k=8, scoring="sid")
    want = [_sid_beam_search(hf.model, p, hf.spec, hf.catalog, beams=6, k=8) for p in prompts]
    _assert_same_top(items, scores, np.stack([w[0] for w in want]), np.stack([w[1] for w in want]))
    full, _ = layerwise_topk(StreamedWeights(hf.ckpt), prompts, hf.spec, hf.catalog, beams=6, k=8)
    assert not np.array_equal(full, items)  # the rule changes the ranking on this model


def test_layer_by_layer_top10_refuses_cot(tmp_path_factory):
    from pauserec.data import Catalog
    from pauserec.prompt.spec import TrainingCard
    from pauserec.export.stream import StreamedWeights, layerwise_topk

    ckpt = make_checkpoint(tmp_path_factory.getbasetemp() / "pauserec-tiny", "llama", "cot")
    spec, catalog = TrainingCard.load(ckpt).prompt, Catalog.load(ckpt / "catalog.npz")
    with pytest.raises(ExportError, match="rationales.*without --stream"):
        layerwise_topk(StreamedWeights(ckpt), [np.array([6, 7, 2])], spec, catalog, beams=4)


def test_layer_by_layer_top10_over_a_real_vocabulary(tmp_path_factory):
    """151,936 tokens (the head read in 19 blocks): SID tokens across a block boundary and at the vocabulary's end."""
    from test_export import REAL_VOCAB, real_shape_checkpoint

    from pauserec.reference.hf_generate import HFBaseline
    from pauserec.export.stream import StreamedWeights, layerwise_topk

    ckpt = real_shape_checkpoint(tmp_path_factory.mktemp("real-topk"), "direct")
    hf = HFBaseline(ckpt)
    sid_ids = [list(range(8190, 8194)), list(range(100_000, 100_005)), list(range(REAL_VOCAB - 6, REAL_VOCAB))]
    hf = HFBaseline.from_parts(hf.model, hf.spec.replace(sid_token_ids=sid_ids), hf.catalog)
    prompts = hf._prompts(DENSE_HISTORIES)
    want = hf.recommend_prompts(prompts, 10, 10)
    items, scores = layerwise_topk(StreamedWeights(ckpt), prompts, hf.spec, hf.catalog, beams=10, k=10)
    _assert_same_top(items, scores, want.item_index, want.scores)


@pytest.mark.parametrize("arch,kind,precision", [("qwen3", "pause", "int8"), ("qwen2", "direct", "int4"),
                                                 ("llama", "pause", "fp16"), ("qwen2", "direct", "bf16")])
def test_streamed_lowered_export_never_writes_fp32_weights(tmp_path_factory, monkeypatch, arch, kind, precision):
    """--stream at int8 / int4 / fp16 / bf16: the lowering reads the checkpoint; no float32 copy of a MatMul weight is
    written anywhere (every file the export writes is watched), the engine recommends what the in-memory export's
    does, and its ranking is judged against the HF model's own top-10, computed one layer at a time."""
    import re

    import onnx

    from pauserec.export import quantize
    from pauserec.export.weights import is_lazy

    seen = []
    lowering = {"fp16": "fp16_graphs", "bf16": "bf16_graphs"}.get(precision, "quantize_graphs")
    real_lowering = getattr(quantize, lowering)

    def watched(graphs, out_dir, *args, **kw):
        for path, *_ in graphs.values():  # the fp32 graphs handed to the lowering
            g = onnx.load(str(path), load_external_data=False).graph
            inits = {t.name: t for t in g.initializer}
            weights = [inits[n.input[1]] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
                       and re.search(r"\.(w\d+_|head_t)", n.input[1])]  # decoder projections, head (not SID rows)
            seen.append((len(weights), all(is_lazy(t) for t in weights), (path.parent / "weights.bin").stat().st_size))
        return real_lowering(graphs, out_dir, *args, **kw)

    normal = exported(tmp_path_factory, arch, kind, f"-{precision}", precision=precision, quant_sample=16)
    monkeypatch.setattr(quantize, lowering, watched)
    streamed = exported(tmp_path_factory, arch, kind, f"-{precision}-stream", precision=precision, quant_sample=16,
                        stream=True)
    assert seen and all(n > 0 and lazy for n, lazy, _ in seen)  # every MatMul weight read from the checkpoint
    fp32_bytes = sum(np.prod(t.shape) * 4 for t in tiny_model(arch).parameters())
    assert all(size < fp32_bytes / 4 for _, _, size in seen)  # what fp32 bytes were written: embedding rows, norms
    m = json.loads((streamed / "manifest.json").read_text())
    ranking = [c for c in m["validation"] if c.get("case") == "ranking sample"][0]
    assert ranking["reference"] == "hf-layerwise" and ranking["sample"] == 16
    normal_ranking = [c for c in json.loads((normal / "manifest.json").read_text())["validation"]
                      if c.get("case") == "ranking sample"][0]
    assert normal_ranking["reference"] == "fp32-engine"
    assert ranking["top10_overlap"] == normal_ranking["top10_overlap"]  # the HF top-10 is the fp32 engine's
    if precision == "bf16":  # float32 weights rounded to bfloat16: judged by ranking, not held to fp32's tolerance
        assert ranking["exact"] is False and normal_ranking["exact"] is False
    a, b = _recommend(normal), _recommend(streamed)
    assert a.items.tolist() == b.items.tolist()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6, rtol=0)


def test_streamed_quantized_cot_is_refused_before_export(tmp_path_factory):
    from pauserec.export import ExportConfig, export_engine

    ckpt = make_checkpoint(tmp_path_factory.getbasetemp() / "pauserec-tiny", "llama", "cot")
    with pytest.raises(ExportError, match="cot model"):
        export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path_factory.mktemp("cot-int8") / "e", precision="int8",
                                   stream=True))
