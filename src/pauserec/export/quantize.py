"""int8 with one activation scale per row: a user's scores never depend on the other users of a batch.

ONNX Runtime's dynamic quantization (``quantize_dynamic``) quantises each MatMul's input with one scale for the
whole tensor, so a row's int8 values, and a user's scores, change with the largest activation of any user in
the same batch (2 of 8 users got another top-10 in a batch than alone on a small pause engine). Here every
MatMul by a constant 2-D weight ``W`` (K, N) becomes

    s_a   = max |A| over K, per row / 127                      (..., 1)    one scale per row
    A_q   = uint8(round(A / s_a) + 128)                        (..., K)    zero point 128
    acc   = MatMulInteger(A_q, W_q, 128)                       (..., N)    int32, MLAS's u8 x s8 kernels (VNNI, AMX)
    out   = float(acc) * s_a * s_w                             (..., N)

with ``W_q = round(W / s_w)`` symmetric int8 per output column (``s_w = max |W[:, n]| / 127``). Inputs that
several MatMuls share (q/k/v, gate/up) are quantised once. A row's output depends on that row alone.

The pass reads the source graph's weights one tensor at a time (from its external data) and appends each
result to the destination's data file, so it never holds the model's weights at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pauserec.errors import ExportError
from pauserec.export.weights import point_to

ZERO_POINT = 128  # activations are stored as uint8 around 128: MLAS's fastest integer GEMM is u8 x s8
TINY = 1e-12  # an all-zero row gets a positive scale (and zeros)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float -> (int8 (K, N), float32 scale (N,)), symmetric per column, values in [-127, 127]."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def reference_matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NumPy statement of what the rewritten graph computes for ``a @ w`` (tests compare the two)."""
    wq, sw = quantize_weight(w)
    sa = np.maximum(np.abs(a).max(axis=-1, keepdims=True), TINY).astype(np.float32) / np.float32(127.0)
    aq = np.rint(a / sa).astype(np.int32)  # (the graph adds and subtracts the zero point: same integers)
    return (aq @ wq.astype(np.int32)).astype(np.float32) * sa * sw


class _Writer:
    """Appends tensors to one external-data file beside the destination graph."""

    def __init__(self, dst: Path) -> None:
        self.location = dst.name + ".data"
        self.fh = open(dst.parent / self.location, "wb")

    def tensor(self, array: np.ndarray, name: str):
        from onnx import numpy_helper

        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if array.nbytes >= 1024:
            self.raw(t, t.raw_data)
        return t

    def raw(self, t, data: bytes) -> None:
        """Point initializer ``t`` at a copy of ``data`` appended to this file."""
        offset = self.fh.tell()
        self.fh.write(data)
        point_to(t, self.location, offset, len(data))


def to_int8_rows(src: Path, dst: Path) -> Path:
    """The per-row int8 version of the graph ``src`` at ``dst`` (its weights in ``dst.name + '.data'``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pauserec.export.onnx import check
    from pauserec.export.weights import _tensor_bytes

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = {n.name: n for n in graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
               and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
               and inits[n.input[1]].data_type == TensorProto.FLOAT}
    if not targets:
        raise ExportError(f"{src.name} has no MatMul by a float32 weight to quantise to int8")
    consts = {"q8/axes": np.array([-1], np.int64), "q8/tiny": np.array(TINY, np.float32),
              "q8/127": np.array(127.0, np.float32), "q8/off": np.array(float(ZERO_POINT), np.float32),
              "q8/zp": np.array(ZERO_POINT, np.uint8)}
    writer = _Writer(dst)
    try:
        new_inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
        done_weights: set[str] = set()
        quantized_acts: dict[str, tuple[str, str]] = {}  # activation -> (uint8 tensor, row scale)
        nodes = []
        for node in graph.node:
            if node.name not in targets:
                nodes.append(node)
                continue
            a, w = node.input[0], node.input[1]
            if a not in quantized_acts:
                p = f"{a}/q8"
                nodes += [helper.make_node("Abs", [a], [f"{p}/abs"], name=f"{p}/abs"),
                          helper.make_node("ReduceMax", [f"{p}/abs", "q8/axes"], [f"{p}/max"], name=f"{p}/max", keepdims=1),
                          helper.make_node("Max", [f"{p}/max", "q8/tiny"], [f"{p}/max1"], name=f"{p}/max1"),
                          helper.make_node("Div", [f"{p}/max1", "q8/127"], [f"{p}/scale"], name=f"{p}/scale"),
                          helper.make_node("Div", [a, f"{p}/scale"], [f"{p}/div"], name=f"{p}/div"),
                          helper.make_node("Round", [f"{p}/div"], [f"{p}/round"], name=f"{p}/round"),
                          helper.make_node("Add", [f"{p}/round", "q8/off"], [f"{p}/shift"], name=f"{p}/shift"),
                          helper.make_node("Cast", [f"{p}/shift"], [f"{p}/u8"], name=f"{p}/u8", to=TensorProto.UINT8)]
                quantized_acts[a] = (f"{p}/u8", f"{p}/scale")
            aq, sa = quantized_acts[a]
            if w not in done_weights:
                t = inits[w]
                data = np.frombuffer(_tensor_bytes(t, src.parent), np.float32).reshape(tuple(t.dims))
                wq, sw = quantize_weight(data)
                new_inits += [writer.tensor(wq, f"{w}/q8"), writer.tensor(sw, f"{w}/q8_scale")]
                done_weights.add(w)
                del data, wq
            q = f"{node.name}/q8"
            nodes += [helper.make_node("MatMulInteger", [aq, f"{w}/q8", "q8/zp"], [f"{q}/acc"], name=f"{q}/matmul"),
                      helper.make_node("Cast", [f"{q}/acc"], [f"{q}/accf"], name=f"{q}/cast", to=TensorProto.FLOAT),
                      helper.make_node("Mul", [f"{q}/accf", sa], [f"{q}/rows"], name=f"{q}/rows"),
                      helper.make_node("Mul", [f"{q}/rows", f"{w}/q8_scale"], [node.output[0]], name=f"{q}/cols")]
        used = {x for n in nodes for x in n.input}
        kept = []
        for t in graph.initializer:  # the rest (and a weight also read otherwise, a tied lookup) move to dst's file
            if t.name not in used:
                continue
            if t.data_location == TensorProto.EXTERNAL:
                writer.raw(t, _tensor_bytes(t, src.parent))
            kept.append(t)
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(kept + new_inits)
    finally:
        writer.fh.close()
    onnx.save(model, str(dst))
    check(dst)
    return dst
