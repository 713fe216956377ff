"""``--kv-dtype float16``: int8/int4 engines hold the KV cache in half the memory and compute as before.

The pass (``pauserec.export.onnx.kv_to_float16``) must mean exactly "the KV is rounded to float16 between graph
calls": checked here on a graph built by the test against its own NumPy statement, then on exported engines
(every graph and the merged model take and return float16 KV, recommendations agree with the float32-KV engine
of the same precision, and a user's scores still do not depend on the batch).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pauserec.errors import ExportError


def _kv_graph(path):
    """kv (L, B, D) read per layer by Gather, a whole-tensor reader (ReduceSum), and two KV outputs: a
    per-layer stack (Unsqueeze + Concat) and a plain product (Mul)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers, d = 3, 4
    nodes, stacked = [], []
    inits = [numpy_helper.from_array(np.asarray(0.5, np.float32), "half"),
             numpy_helper.from_array(np.asarray([0], np.int64), "axis0")]
    for i in range(layers):
        inits += [numpy_helper.from_array(np.asarray(i, np.int64), f"i{i}"),
                  numpy_helper.from_array(np.random.default_rng(i).standard_normal((d, d)).astype(np.float32), f"w{i}")]
        nodes += [helper.make_node("Gather", ["kv", f"i{i}"], [f"g{i}"], axis=0),
                  helper.make_node("MatMul", [f"g{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Unsqueeze", [f"m{i}", "axis0"], [f"u{i}"])]
        stacked.append(f"u{i}")
    nodes += [helper.make_node("Concat", stacked, ["new_kv"], axis=0),
              helper.make_node("Mul", ["kv", "half"], ["scaled_kv"]),
              helper.make_node("ReduceSum", ["kv"], ["total"], keepdims=0)]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "kv", [helper.make_tensor_value_info("kv", f, [layers, "b", d])],
                              [helper.make_tensor_value_info("new_kv", f, [layers, "b", d]),
                               helper.make_tensor_value_info("scaled_kv", f, [layers, "b", d]),
                               helper.make_tensor_value_info("total", f, [])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_the_pass_rounds_the_kv_and_nothing_else(tmp_path):
    import onnxruntime as ort

    from pauserec.export.onnx import kv_to_float16

    src, dst = tmp_path / "f32.onnx", tmp_path / "f16.onnx"
    _kv_graph(src)
    _kv_graph(dst)
    kv_to_float16(dst, ["kv"], ["new_kv", "scaled_kv"])
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    assert [i.type for i in b.get_inputs()] == ["tensor(float16)"]
    assert [o.type for o in b.get_outputs()] == ["tensor(float16)", "tensor(float16)", "tensor(float)"]
    kv = (np.random.default_rng(0).standard_normal((3, 5, 4)) * 100).astype(np.float16)
    want = a.run(None, {"kv": kv.astype(np.float32)})
    got = b.run(None, {"kv": kv})
    np.testing.assert_array_equal(got[0], want[0].astype(np.float16))
    np.testing.assert_array_equal(got[1], want[1].astype(np.float16))
    np.testing.assert_array_equal(got[2], want[2])
    import onnx

    ops = [n.op_type for n in onnx.load(str(dst)).graph.node]
    assert ops.count("Cast") == 3 + 3 + 1 + 1  # a Cast per layer read, per layer stacked, one whole read, one output


def test_a_graph_without_the_named_kv_is_refused(tmp_path):
    from pauserec.export.onnx import kv_to_float16

    _kv_graph(tmp_path / "g.onnx")
    with pytest.raises(ExportError, match="no KV tensor ctx_key"):
        kv_to_float16(tmp_path / "g.onnx", ["ctx_key"], [])


def test_fp32_engines_stay_exact():
    from pauserec.export import ExportConfig
    from pauserec.export.pipeline import _check_config

    with pytest.raises(ExportError, match="--precision int8 or int4"):
        _check_config(ExportConfig(checkpoint="c", out="o", kv_dtype="float16"))
    with pytest.raises(ExportError, match="unknown --kv-dtype"):
        _check_config(ExportConfig(checkpoint="c", out="o", precision="int8", kv_dtype="int4"))


# -- exported engines ---------------------------------------------------------------------------------------
pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_batch_invariance import HISTORIES  # noqa: E402
from test_export import exported  # noqa: E402


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("arch,kind,precision", [("qwen3", "pause", "int4"), ("llama", "cot", "int8")])
def test_float16_kv_engines(tmp_path_factory, arch, kind, precision):
    import onnx

    from pauserec.runtime import Engine, Recommender

    cfg = dict(precision=precision, quant_sample=4, min_agreement=0.0)
    half = exported(tmp_path_factory, arch, kind, f"-kv16-{precision}", kv_dtype="float16", **cfg)
    full = exported(tmp_path_factory, arch, kind, f"-batch-{precision}", **cfg)  # shared with test_batch_invariance
    manifest = json.loads((half / "manifest.json").read_text())
    assert manifest["kv_dtype"] == "float16"
    for name in [*{g["file"] for g in manifest["graphs"].values()}, manifest["merged"]]:
        graph = onnx.load(str(half / name), load_external_data=False).graph
        kv = [v for v in (*graph.input, *graph.output) if "key" in v.name or "value" in v.name]
        assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv), name
    assert (half / "weights.bin").stat().st_size == (full / "weights.bin").stat().st_size  # the weights are the same

    rec_half, rec_full = Recommender(Engine.load(half, provider="cpu")), Recommender(Engine.load(full, provider="cpu"))
    batch = rec_half.recommend(HISTORIES, k=10, beams=10)
    ref = rec_full.recommend(HISTORIES, k=10, beams=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(batch.items.tolist(), ref.items.tolist())])
    assert overlap >= 0.9, overlap
    assert np.abs(batch.scores - ref.scores).max() < 0.05
    for u, history in enumerate(HISTORIES):  # still batch-invariant: the rounding is per element
        alone = rec_half.recommend([history], k=10, beams=10)
        assert alone.items[0].tolist() == batch.items[u].tolist(), u
        np.testing.assert_allclose(alone.scores[0], batch.scores[u], atol=1e-4, rtol=0)
