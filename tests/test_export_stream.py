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
    assert_same_top10(streamed, histories, hf_top10(ckpt, prompts, index))
