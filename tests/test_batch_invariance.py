"""A user's recommendations do not depend on the other users in the batch, at every precision.

Batch jobs cut the input into batches (and a resumed job may cut it elsewhere), so a user's top-10 and scores
must be the same alone and inside any batch. Quantized engines are the risk: activation scales taken over a
whole tensor (ONNX Runtime's dynamic quantization) mix the users of a batch. pauserec's int8 takes one scale per
row, int4 (MatMulNBits) one per row and block.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export import exported  # noqa: E402

# lengths 1..7: rows with other history lengths (padding) and other magnitudes share each batch
HISTORIES = [["item1", "item5"], ["item7"], ["item2", "item9", "item3", "item12", "item20", "item0", "item8"],
             ["item4", "item4", "item6"], ["item19", "item11", "item13", "item14"], ["item15"],
             ["item16", "item17", "item18", "item10", "item21"], ["item21", "item2"]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# fp16 rounds a log-prob near -10 to steps of 0.008: the GEMM's summation order (which follows the batch's row
# count, not its contents) moves scores by ~1e-4 there, never the ranking. Every other precision: the same bits
# (each history is padded to its own bucket, so the masked slots never change a user's sums; see PAD_QUANTUM).
# cot: a user's think steps run with the batch's other unfinished users (alone: one row), and ONNX Runtime's float
# GEMM sums a one-row product in another order: ~1e-6.
# int4 on AVX2 CPUs without AVX-512 (AMD Zen 3): ONNX Runtime's MatMulNBits sums some row counts in another order,
# ~1e-6 (the same bits on AVX-512 / AMX Xeons).
ATOL = {"fp16": 1e-3, "int4": 1e-5}
COT_ATOL = 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "int4"])
@pytest.mark.parametrize("arch,kind", [("qwen3", "pause"), ("llama", "cot")])
def test_scores_are_the_same_alone_and_in_a_batch(tmp_path_factory, precision, arch, kind):
    from pauserec.runtime import Engine, Recommender

    cfg = {} if precision == "fp32" else dict(precision=precision, quant_sample=4, min_agreement=0.0)
    engine = exported(tmp_path_factory, arch, kind, "" if precision == "fp32" else f"-batch-{precision}", **cfg)
    rec = Recommender(Engine.load(engine, provider="cpu"))
    batch = rec.recommend(HISTORIES, k=10, beams=10)
    atol = ATOL.get(precision, COT_ATOL if kind == "cot" else 0.0)
    for u, history in enumerate(HISTORIES):
        alone = rec.recommend([history], k=10, beams=10)
        assert alone.items[0].tolist() == batch.items[u].tolist(), (precision, u)
        np.testing.assert_allclose(alone.scores[0], batch.scores[u], atol=atol, rtol=0, err_msg=f"{precision} user {u}")
    pairs = rec.recommend(HISTORIES[:2], k=10, beams=10)  # another cut of the same users
    np.testing.assert_allclose(pairs.scores, batch.scores[:2], atol=atol, rtol=0)


def test_int8_graph_computes_the_per_row_rule(tmp_path):
    """The rewritten MatMul equals its NumPy statement (per-column int8 weights, per-row int8 activations), for
    a 3-D input whose rows differ in magnitude by 10^4, and each row's output is the same alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from pauserec.export.quantize import reference_matmul, to_int8_rows

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column keeps a finite scale
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 48])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "f.onnx"), save_as_external_data=True, location="f.data", size_threshold=0)
    to_int8_rows(tmp_path / "f.onnx", tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).graph.node]
    assert "MatMulInteger" in ops and "MatMul" not in ops and "DynamicQuantizeLinear" not in ops
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((2, 5, 64)).astype(np.float32) * np.array([1e-2, 1.0, 1e2, 0.0, 1.0])[None, :, None].astype(np.float32)
    got = sess.run(None, {"x": a})[0]
    np.testing.assert_allclose(got, reference_matmul(a, w), rtol=1e-5, atol=1e-6)
    assert np.abs(got - a @ w).max() <= 0.02 * np.abs(a @ w).max()  # and near the float product
    for i in range(2):
        for j in range(5):
            np.testing.assert_array_equal(sess.run(None, {"x": a[i:i + 1, j:j + 1]})[0][0, 0], got[i, j])


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_batch_prefilled_in_parts_gives_the_same_results(tmp_path_factory, precision):
    """The host prefills a batch a few users at a time (``Engine.prefill_tokens``) to bound its working memory:
    the same items and scores as one call, and the parts are really separate calls."""
    from pauserec.runtime import Engine, Recommender

    cfg = {} if precision == "fp32" else dict(precision=precision, quant_sample=4, min_agreement=0.0)
    engine = exported(tmp_path_factory, "qwen3", "pause", "" if precision == "fp32" else f"-batch-{precision}", **cfg)
    e = Engine.load(engine, provider="cpu")
    whole = Recommender(e).recommend(HISTORIES, k=10, beams=10)
    calls = []
    real = e._prefill
    e._prefill = lambda ids, mask, device: calls.append(len(ids)) or real(ids, mask, device)
    e.prefill_tokens = 1  # one user per call
    parts = Recommender(e).recommend(HISTORIES, k=10, beams=10)
    assert len(calls) > 1 and max(calls) == 1
    assert parts.items.tolist() == whole.items.tolist()
    np.testing.assert_allclose(parts.scores, whole.scores, atol=ATOL.get(precision, 0.0), rtol=0)
