"""The int4 pass: ONNX Runtime's own MatMulNBits weights, written column block by column block.

The weights must be byte-identical to what ONNX Runtime's ``MatMulNBitsQuantizer`` writes for the same MatMul (the
independent reference), however the columns are split into blocks, and the graph must compute what its NumPy
dequantisation says."""

from __future__ import annotations

import numpy as np
import pytest

from pauserec.export import quantize


def _matmul_graph(tmp_path, w: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, w.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inline = onnx.ModelProto()
    inline.CopyFrom(model)  # (saving with external data moves the tensors out of ``model``)
    onnx.save(model, str(tmp_path / "f.onnx"), save_as_external_data=True, location="f.data", size_threshold=0)
    return inline


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("k,n,column_bytes,block", [(64, 48, quantize.COLUMN_BYTES, 32), (70, 33, 70 * 4 * 5, 32),
                                                     (300, 20, 300 * 4 * 7, 128), (48, 9, quantize.COLUMN_BYTES, 16)])
def test_int4_weights_are_onnxruntimes_own(tmp_path, monkeypatch, k, n, column_bytes, block):
    """K not a multiple of the block (padded), columns quantised a few at a time, blocks of 16 to 128 (--int4-block):
    the same bytes as ORT's quantizer."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 2] = 0.0
    model = _matmul_graph(tmp_path, w)
    monkeypatch.setattr(quantize, "COLUMN_BYTES", column_bytes)
    (tmp_path / "ours").mkdir()
    quantize.quantize_graphs({"g": (tmp_path / "f.onnx", "q.onnx")}, tmp_path / "ours", "int4", block=block)
    ref = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=True)
    ref.process()
    want = {t.name: onnx.numpy_helper.to_array(t) for t in ref.model.model.graph.initializer}
    got = _initializers(tmp_path / "ours" / "q.onnx")
    (packed,) = [v for name, v in want.items() if v.dtype == np.uint8]
    (scales,) = [v for name, v in want.items() if v.dtype == np.float32]
    np.testing.assert_array_equal(got["w/q4"], packed)
    np.testing.assert_array_equal(got["w/q4_scale"], scales.reshape(-1))
    # and the graph computes the dequantised weight's product (codes - 8) * scale
    codes = np.stack([got["w/q4"] & 15, got["w/q4"] >> 4], axis=-1).reshape(n, -1).astype(np.float32)[:, :k] - 8
    (node,) = onnx.load(str(tmp_path / "ours" / "q.onnx"), load_external_data=False).graph.node
    assert {a.name: a.i for a in node.attribute}["block_size"] == block
    blocks = np.repeat(got["w/q4_scale"].reshape(n, -1), block, axis=1)[:, :k]
    dequant = (codes * blocks).T
    sess = ort.InferenceSession(str(tmp_path / "ours" / "q.onnx"), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": a})[0], a @ dequant, rtol=1e-4, atol=1e-4)


def test_a_weight_shared_by_graphs_is_quantised_and_stored_once(tmp_path):
    """Two graphs multiplying by the same consolidated weight: one copy of its int8 values in weights.bin."""
    import onnx

    from pauserec.export.weights import consolidate

    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 64)).astype(np.float32)
    _matmul_graph(tmp_path, w)
    (tmp_path / "b").mkdir()
    onnx.save(onnx.load(str(tmp_path / "f.onnx")), str(tmp_path / "b" / "f.onnx"), save_as_external_data=True,
              location="g.data", size_threshold=0)
    one = consolidate({"a": tmp_path / "f.onnx", "b": tmp_path / "b" / "f.onnx"}, tmp_path / "fp32")
    (tmp_path / "q").mkdir()
    out = quantize.quantize_graphs({"a": (one["a"], "a.onnx"), "b": (one["b"], "b.onnx")}, tmp_path / "q", "int8")
    size = (tmp_path / "q" / "weights.bin").stat().st_size
    assert 256 * 64 <= size < 2 * 256 * 64
    a, b = _initializers(out["a"]), _initializers(out["b"])
    np.testing.assert_array_equal(a["w/q8"], quantize.quantize_weight(w)[0])
    np.testing.assert_array_equal(b["w/q8"], a["w/q8"])


def test_weights_written_are_not_kept_in_memory(tmp_path):
    """The quantizer keeps every written weight's TensorProto (a weight shared by graphs is quantised once), so
    those protos must not hold the bytes: made with the values and then cleared, protobuf's upb arena kept them,
    and a 7B int8 export held its whole engine in memory. 160 MB written, the process grows by far less."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import re, numpy as np
        from pauserec.export.quantize import WeightsWriter
        rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) >> 10
        w = WeightsWriter({str(tmp_path / "weights.bin")!r})
        a = np.ones((2048, 2048), np.int8)
        before, kept = rss(), []
        for i in range(40):
            a[0, 0] = i  # distinct contents: each written
            kept.append(w.tensor(a, f"w{{i}}"))
        w.close()
        print(rss() - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert (tmp_path / "weights.bin").stat().st_size >= 40 * 2048 * 2048
    assert grown < 40, f"{grown} MB stayed resident after writing 160 MB of weights"
