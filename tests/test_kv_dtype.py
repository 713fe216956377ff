"""``--kv-dtype float16 | int8``: int8/int4 engines hold the KV cache in half / about a quarter of the memory and
compute as before.

The pass (``pauserec.export.onnx.kv_storage``) must mean exactly "the KV is rounded to float16 (quantised to int8
with a scale per vector) between graph calls": checked here on a graph built by the test against its own NumPy
statement, then on exported engines (every graph and the merged model take and return the stored KV,
recommendations agree with the float32-KV engine of the same precision, and a user's scores still do not depend
on the batch).
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


def _int8_reference(x):
    """The test's own statement of int8 KV storage: per vector along the last axis, s = m * 2**(e - 7) >= amax / 127
    with m an integer (stored as m - 192) and e = floor(log2(amax / 127)); values round(x / s) in [-127, 127]."""
    x = np.asarray(x, np.float32)
    t = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(127), np.float32(1e-30))
    e = np.floor(np.log2(t))
    m = np.ceil(t / 2.0 ** (e - 7))
    q = np.clip(np.round(x / (m * 2.0 ** (e - 7))), -127, 127)
    return np.concatenate([q, m - 192, e], axis=-1).astype(np.int8)


def _int8_values(packed):
    packed = np.asarray(packed)
    return packed[..., :-2] * ((packed[..., -2:-1].astype(np.float64) + 192) * 2.0 ** (packed[..., -1:] - 7.0))


def test_the_pass_rounds_the_kv_and_nothing_else(tmp_path):
    import onnxruntime as ort

    from pauserec.export.onnx import kv_storage

    src, dst = tmp_path / "f32.onnx", tmp_path / "f16.onnx"
    _kv_graph(src)
    _kv_graph(dst)
    kv_storage(dst, ["kv"], ["new_kv", "scaled_kv"], "float16")
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


def test_int8_storage_is_per_vector_quantisation(tmp_path):
    """int8: each vector along the last axis gets its own scale (magnitudes 1e-3..1e3 and an all-zero vector in one
    tensor), the graph computes on the stored values, and the outputs are stored by the same rule."""
    import onnx
    import onnxruntime as ort

    from pauserec.export.onnx import kv_int8_decode, kv_int8_reference, kv_storage

    src, dst = tmp_path / "f32.onnx", tmp_path / "i8.onnx"
    _kv_graph(src)
    _kv_graph(dst)
    kv_storage(dst, ["kv"], ["new_kv", "scaled_kv"], "int8")
    graph = onnx.load(str(dst)).graph
    assert [(v.type.tensor_type.elem_type, v.type.tensor_type.shape.dim[-1].dim_value) for v in graph.input] == \
        [(onnx.TensorProto.INT8, 4 + 2)]
    a = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 4)).astype(np.float32) * (10.0 ** rng.integers(-3, 4, (3, 7, 1))).astype(np.float32)
    x[1, 2] = 0.0
    packed = _int8_reference(x)
    np.testing.assert_array_equal(kv_int8_reference(x), packed)  # the module's NumPy statement is the test's
    np.testing.assert_array_equal(kv_int8_decode(packed), _int8_values(packed).astype(np.float32))
    values = _int8_values(packed)
    assert np.all(np.abs(values - x) <= np.abs(x).max(-1, keepdims=True) / 127 * 0.51 + 1e-30)  # half a step per vector
    assert np.all(values[1, 2] == 0)
    want = a.run(None, {"kv": values.astype(np.float32)})
    got = b.run(None, {"kv": packed})
    np.testing.assert_array_equal(got[0], _int8_reference(want[0]))
    np.testing.assert_array_equal(got[1], _int8_reference(want[1]))
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
    for layer in range(3):  # a vector's storage depends on that vector alone
        alone = b.run(None, {"kv": packed[:, layer:layer + 1]})
        np.testing.assert_array_equal(alone[0], got[0][:, layer:layer + 1])
    zeros = b.run(None, {"kv": np.zeros((3, 2, 6), np.int8)})  # zero-filled buffers hold zeros
    np.testing.assert_array_equal(_int8_values(zeros[1]), 0)


def test_a_graph_without_the_named_kv_is_refused(tmp_path):
    from pauserec.export.onnx import kv_storage

    _kv_graph(tmp_path / "g.onnx")
    with pytest.raises(ExportError, match="no KV tensor ctx_key"):
        kv_storage(tmp_path / "g.onnx", ["ctx_key"], [], "float16")


def test_fp32_engines_stay_exact():
    from pauserec.export import ExportConfig
    from pauserec.export.pipeline import _check_config

    with pytest.raises(ExportError, match="--precision int8 or int4"):
        _check_config(ExportConfig(checkpoint="c", out="o", kv_dtype="float16"))
    with pytest.raises(ExportError, match="--precision int8 or int4"):
        _check_config(ExportConfig(checkpoint="c", out="o", kv_dtype="int8"))
    with pytest.raises(ExportError, match="fp16 engines hold their KV in float16"):
        _check_config(ExportConfig(checkpoint="c", out="o", precision="fp16", kv_dtype="int8"))
    with pytest.raises(ExportError, match="unknown --kv-dtype"):
        _check_config(ExportConfig(checkpoint="c", out="o", precision="int8", kv_dtype="int4"))


# -- exported engines ---------------------------------------------------------------------------------------
pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_batch_invariance import HISTORIES  # noqa: E402
from test_export import exported  # noqa: E402


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("arch,kind,precision,kv", [("qwen3", "pause", "int4", "float16"), ("llama", "cot", "int8", "float16"),
                                                    ("qwen3", "pause", "int4", "int8"), ("llama", "cot", "int8", "int8")])
def test_kv_storage_engines(tmp_path_factory, arch, kind, precision, kv):
    import onnx

    from pauserec.runtime import Engine, Recommender
    from test_runtime import held_kv_bytes

    cfg = dict(precision=precision, quant_sample=4, min_agreement=0.0)
    small = exported(tmp_path_factory, arch, kind, f"-kv{kv}-{precision}", kv_dtype=kv, **cfg)
    full = exported(tmp_path_factory, arch, kind, f"-batch-{precision}", **cfg)  # shared with test_batch_invariance
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["kv_dtype"] == kv
    elem = {"float16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}[kv]
    for name in [*{g["file"] for g in manifest["graphs"].values()}, manifest["merged"]]:
        graph = onnx.load(str(small / name), load_external_data=False).graph
        stored = [v for v in (*graph.input, *graph.output) if "key" in v.name or "value" in v.name]
        assert stored and all(v.type.tensor_type.elem_type == elem for v in stored), name
    assert (small / "weights.bin").stat().st_size == (full / "weights.bin").stat().st_size  # the weights are the same

    e_small, e_full = Engine.load(small, provider="cpu"), Engine.load(full, provider="cpu")
    held, held_full = held_kv_bytes(e_small, 4, 3), held_kv_bytes(e_full, 4, 3)
    assert held == 3 * e_small.kv_bytes_per_user(4)
    assert held / held_full == ({"float16": 2, "int8": 1}[kv] * e_small.kv_width) / (4 * e_small.head_dim)
    rec_small, rec_full = Recommender(e_small), Recommender(e_full)
    batch = rec_small.recommend(HISTORIES, k=10, beams=10)
    ref = rec_full.recommend(HISTORIES, k=10, beams=10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(batch.items.tolist(), ref.items.tolist())])
    assert overlap >= 0.9, overlap
    assert np.abs(batch.scores - ref.scores).max() < 0.05
    for u, history in enumerate(HISTORIES):  # still batch-invariant: the storage is per element / per vector
        alone = rec_small.recommend([history], k=10, beams=10)
        assert alone.items[0].tolist() == batch.items[u].tolist(), u
        np.testing.assert_allclose(alone.scores[0], batch.scores[u], atol=1e-4, rtol=0)
