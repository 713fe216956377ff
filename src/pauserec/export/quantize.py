"""int8 and int4 engines from the fp32 graphs, one weight at a time, written straight into ``weights.bin``.

**int8, one activation scale per row** (a user's scores never depend on the other users of a batch). ONNX
Runtime's dynamic quantization (``quantize_dynamic``) quantises each MatMul's input with one scale for the whole
tensor, so a row's int8 values, and a user's scores, change with the largest activation of any user in the same
batch (2 of 8 users got another top-10 in a batch than alone on a small pause engine). Here every MatMul by a
constant 2-D weight ``W`` (K, N) becomes

    s_a   = max |A| over K, per row / 127                      (..., 1)    one scale per row
    A_q   = uint8(round(A / s_a) + 128)                        (..., K)    zero point 128
    acc   = MatMulInteger(A_q, W_q, 128)                       (..., N)    int32, MLAS's u8 x s8 kernels (VNNI, AMX)
    out   = float(acc) * s_a * s_w                             (..., N)

with ``W_q = round(W / s_w)`` symmetric per output column in 7 bits (``s_w = max |W[:, n]| / 63``: see
``WEIGHT_MAX``, AVX2's saturating kernel). Inputs that
several MatMuls share (q/k/v, gate/up) are quantised once. A row's output depends on that row alone.

**int4, weight only**: every such MatMul becomes ONNX Runtime's ``MatMulNBits`` (symmetric, blocks of
``INT4_BLOCK`` along K), its weights quantised by ONNX Runtime's own ``quantize_matmul_4bits`` (the kernel its
``MatMulNBitsQuantizer`` calls), column block by column block; ``accuracy_level`` 4 computes with int8
activations quantised per block of one row (batch-invariant as well).

Weights are read from a :class:`TensorSource`: the fp32 graphs' external data (memory-mapped), or, for an export
that streams, the checkpoint itself (``pauserec.export.stream``: the fp32 weights are never written anywhere). A
weight is read in blocks of output columns (``COLUMN_BYTES`` of float32 at a time: the Qwen3-8B head is 2.5 GB
as float32), quantised once however many graphs multiply by it, and appended to the engine's ``weights.bin``
(64-byte aligned, each distinct content stored once) by one :class:`WeightsWriter` shared by every graph.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pauserec.errors import ExportError
from pauserec.export.weights import INLINE_BYTES, LAZY_FILE, _tensor_bytes, header, point_to
from pauserec.runtime.weights import ALIGN, WEIGHTS_FILE

ZERO_POINT = 128  # activations are stored as uint8 around 128: MLAS's fastest integer GEMM is u8 x s8
TINY = 1e-12  # an all-zero row gets a positive scale (and zeros)
INT4_BLOCK = 32  # MatMulNBits block size: 32 keeps ranking closest to fp32 at a small size cost
# What each reduced precision does to the fp32 graphs, as export reports it.
LOWERING = {
    "fp16": "float16 weights and KV (norms and softmaxes in float32)",
    "bf16": "bfloat16 weights cast to float32 where read, float32 compute (exact for a bf16 checkpoint)",
    "int8": "int8 MatMul weights per column, activations quantised per row (batch-invariant)",
    "int4": "int4 weight-only MatMul (ONNX Runtime MatMulNBits, symmetric, blocks along K)",
}
BF16_SUFFIX = "::bf16"  # a bf16 engine's stored weight (and a Gather's bfloat16 rows) before its cast
COLUMN_BYTES = 256 << 20  # float32 bytes of a weight read and quantised at a time


# int8 weights use 7 bits: MLAS's u8 x s8 kernel on AVX2 CPUs without VNNI (AMD Zen 3, older Xeons) adds pairs of
# products into int16 with saturation (vpmaddubsw), so 2 * 255 * |w| must stay below 32,768: |w| <= 63. With the
# full [-127, 127] such CPUs computed wrong sums (off by up to 247 in a 64-wide test product); VNNI / AMX do not
# saturate, but an engine must give the same scores on every CPU it is copied to.
WEIGHT_MAX = 63


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float -> (int8 (K, N), float32 scale (N,)), symmetric per column, values in [-WEIGHT_MAX, WEIGHT_MAX]."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=0) / float(WEIGHT_MAX)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), scale


def reference_matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NumPy statement of what the rewritten graph computes for ``a @ w`` (tests compare the two)."""
    wq, sw = quantize_weight(w)
    sa = np.maximum(np.abs(a).max(axis=-1, keepdims=True), TINY).astype(np.float32) / np.float32(127.0)
    aq = np.rint(a / sa).astype(np.int32)  # (the graph adds and subtracts the zero point: same integers)
    return (aq @ wq.astype(np.int32)).astype(np.float32) * sa * sw


def quantize_int4(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float32 -> MatMulNBits' B (N, ceil(K / block), block / 2) uint8 and scales (N * blocks,) float32,
    symmetric (the default zero point 8), by ONNX Runtime's ``quantize_matmul_4bits`` called as its quantizer calls it
    (K padded with zero rows; the padding's nibbles stay 0: the kernel reads K values)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    blocks = -(-k // block)
    if blocks * block != k:
        w = np.pad(w, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block // 2), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zero_points = np.zeros((n, -(-blocks // 2)), np.uint8)  # (unused: symmetric)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w, np.float32), scales, zero_points, block, n, k, True)
    return packed, scales.reshape(-1)


class TensorSource:
    """The values of a graph's initializers: bytes in external-data files beside the graph (``base``), or, for
    tensors whose location is ``LAZY_FILE``, the checkpoint read by ``lazy`` (a ``StreamedWeights``)."""

    def __init__(self, base: Path, lazy=None) -> None:
        self.base, self.lazy = Path(base), lazy

    @staticmethod
    def _info(t) -> dict | None:
        from onnx import TensorProto

        return {e.key: e.value for e in t.external_data} if t.data_location == TensorProto.EXTERNAL else None

    def key(self, t) -> tuple | None:
        """What identifies ``t``'s values across the graphs of one engine (None: inline, not shared)."""
        info = self._info(t)
        return None if info is None else (info["location"], int(info.get("offset", 0)), t.data_type, tuple(t.dims))

    def _lazy_index(self, t) -> int | None:
        info = self._info(t)
        if info is None or info["location"] != LAZY_FILE:
            return None
        if self.lazy is None:
            raise ExportError(f"{t.name} is to be read from the checkpoint but no checkpoint reader was given; "
                              "report this as a pauserec bug")
        return int(info["offset"])

    def bytes(self, t) -> bytes:
        index = self._lazy_index(t)
        return _tensor_bytes(t, self.base) if index is None else self.lazy.lazy_columns(index).tobytes()

    def columns(self, t, start: int, stop: int) -> np.ndarray:
        """Columns ``[start, stop)`` of the 2-D float32 initializer ``t`` as a contiguous (K, stop - start) array."""
        index = self._lazy_index(t)
        if index is not None:
            return self.lazy.lazy_columns(index, start, stop)
        info = self._info(t)
        if info is None:
            from onnx import numpy_helper

            return np.ascontiguousarray(numpy_helper.to_array(t)[:, start:stop], np.float32)
        mapped = np.memmap(self.base / info["location"], np.float32, "r", int(info.get("offset", 0)), tuple(t.dims))
        return np.ascontiguousarray(mapped[:, start:stop])


class WeightsWriter:
    """The engine's ``weights.bin``, appended to by every lowered graph: ALIGN-aligned tensors, each distinct
    content (sha256) stored once; a weight already quantised for another graph is not quantised again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fh = open(self.path, "wb")
        self.seen: dict[str, tuple[int, int]] = {}  # sha256 -> (offset, length)
        self.quantized: dict[tuple, list] = {}  # (source key, precision) -> [(suffix, TensorProto)]

    def raw(self, t, data: bytes) -> None:
        """Point initializer ``t`` at ``data`` in weights.bin (written unless the same bytes already are)."""
        key = hashlib.sha256(data).hexdigest()
        if key not in self.seen:
            self.fh.write(b"\0" * (-self.fh.tell() % ALIGN))
            self.seen[key] = (self.fh.tell(), len(data))
            self.fh.write(data)
        point_to(t, WEIGHTS_FILE, *self.seen[key])

    def tensor(self, array: np.ndarray, name: str):
        """An initializer ``name`` holding ``array``: inline when small, else in weights.bin."""
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        t = header(array, name)
        self.raw(t, memoryview(array).cast("B"))
        return t

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _column_blocks(t) -> list[tuple[int, int]]:
    k, n = (int(d) for d in t.dims)
    step = max(1, COLUMN_BYTES // (4 * max(k, 1)))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _quantized_weight(t, source: TensorSource, writer: WeightsWriter, precision: str, name: str,
                      block: int = INT4_BLOCK) -> list:
    """The initializers that replace the (K, N) float32 weight ``t`` (named ``name + suffix``), computed once per
    source tensor and precision."""
    from onnx import TensorProto

    key = (source.key(t), precision, block)
    if key[0] is None or key not in writer.quantized:
        parts = []
        for start, stop in _column_blocks(t):
            w = source.columns(t, start, stop)
            if not np.isfinite(w).all():
                raise ExportError(f"the weight {t.name} has non-finite (NaN/inf) values: the model's training "
                                  "diverged or the checkpoint is damaged; export an earlier checkpoint")
            parts.append(quantize_weight(w) if precision == "int8" else quantize_int4(w, block))
            del w
        if precision == "int8":
            arrays = {"/q8": np.concatenate([p[0] for p in parts], axis=1), "/q8_scale": np.concatenate([p[1] for p in parts])}
        else:
            arrays = {"/q4": np.concatenate([p[0] for p in parts]), "/q4_scale": np.concatenate([p[1] for p in parts])}
        del parts
        made = [(suffix, writer.tensor(a, t.name + suffix)) for suffix, a in arrays.items()]
        if key[0] is None:
            return [(s, x) for s, x in made]
        writer.quantized[key] = made
    out = []
    for suffix, proto in writer.quantized[key]:
        copy = TensorProto()
        copy.CopyFrom(proto)
        copy.name = name + suffix
        out.append((suffix, copy))
    return out


def _int8_activation(a: str) -> tuple[list, str, str]:
    """Nodes that quantise activation ``a`` per row: (nodes, uint8 tensor, row scale)."""
    from onnx import TensorProto, helper

    p = f"{a}/q8"
    nodes = [helper.make_node("Abs", [a], [f"{p}/abs"], name=f"{p}/abs"),
             helper.make_node("ReduceMax", [f"{p}/abs", "q8/axes"], [f"{p}/max"], name=f"{p}/max", keepdims=1),
             helper.make_node("Max", [f"{p}/max", "q8/tiny"], [f"{p}/max1"], name=f"{p}/max1"),
             helper.make_node("Div", [f"{p}/max1", "q8/127"], [f"{p}/scale"], name=f"{p}/scale"),
             helper.make_node("Div", [a, f"{p}/scale"], [f"{p}/div"], name=f"{p}/div"),
             helper.make_node("Round", [f"{p}/div"], [f"{p}/round"], name=f"{p}/round"),
             helper.make_node("Add", [f"{p}/round", "q8/off"], [f"{p}/shift"], name=f"{p}/shift"),
             helper.make_node("Cast", [f"{p}/shift"], [f"{p}/u8"], name=f"{p}/u8", to=TensorProto.UINT8)]
    return nodes, f"{p}/u8", f"{p}/scale"


INT8_CONSTS = {"q8/axes": np.array([-1], np.int64), "q8/tiny": np.array(TINY, np.float32),
               "q8/127": np.array(127.0, np.float32), "q8/off": np.array(float(ZERO_POINT), np.float32),
               "q8/zp": np.array(ZERO_POINT, np.uint8)}


def quantize_graph(src: Path, dst: Path, precision: str, writer: WeightsWriter, source: TensorSource,
                   accuracy_level: int | None = None, block: int = INT4_BLOCK) -> Path:
    """The ``precision`` (int8 / int4) version of the fp32 graph ``src`` at ``dst``, its tensors in ``writer``'s
    weights.bin (``dst`` must sit beside it). Every MatMul by a 2-D float32 initializer is rewritten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pauserec.export.onnx import check

    if precision not in ("int8", "int4"):
        raise ExportError(f"quantize_graph lowers to int8 or int4, not {precision!r}")
    if dst.parent != writer.path.parent:
        raise ExportError(f"{dst} must be written beside {writer.path} (its external data); report this as a bug")
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    targets = {n.name for n in graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
               and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
               and inits[n.input[1]].data_type == TensorProto.FLOAT}
    if not targets:
        raise ExportError(f"{src.name} has no MatMul by a float32 weight to quantise to {precision}")
    new_inits = [numpy_helper.from_array(v, k) for k, v in INT8_CONSTS.items()] if precision == "int8" else []
    done: dict[str, dict] = {}  # weight -> {suffix: name}
    activations: dict[str, tuple[str, str]] = {}  # int8: activation -> (uint8 tensor, row scale)
    nodes = []
    for node in graph.node:
        if node.name not in targets:
            nodes.append(node)
            continue
        a, w = node.input[0], node.input[1]
        if w not in done:
            made = _quantized_weight(inits[w], source, writer, precision, w, block)
            new_inits += [p for _, p in made]
            done[w] = {s: p.name for s, p in made}
        q = done[w]
        if precision == "int4":
            k, n = (int(d) for d in inits[w].dims)
            attrs = dict(K=k, N=n, bits=4, block_size=block, **({"accuracy_level": accuracy_level} if accuracy_level else {}))
            nodes.append(helper.make_node("MatMulNBits", [a, q["/q4"], q["/q4_scale"]], [node.output[0]],
                                          name=f"{node.name}/q4", domain="com.microsoft", **attrs))
            continue
        if a not in activations:
            act_nodes, aq, sa = _int8_activation(a)
            nodes += act_nodes
            activations[a] = (aq, sa)
        aq, sa = activations[a]
        p = f"{node.name}/q8"
        nodes += [helper.make_node("MatMulInteger", [aq, q["/q8"], "q8/zp"], [f"{p}/acc"], name=f"{p}/matmul"),
                  helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], name=f"{p}/cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"{p}/accf", sa], [f"{p}/rows"], name=f"{p}/rows"),
                  helper.make_node("Mul", [f"{p}/rows", q["/q8_scale"]], [node.output[0]], name=f"{p}/cols")]
    used = {x for n in nodes for x in n.input}
    kept = []
    for t in graph.initializer:  # the rest (and a weight also read otherwise, a tied lookup) go to weights.bin
        if t.name not in used:
            continue
        if t.data_location == TensorProto.EXTERNAL:
            writer.raw(t, source.bytes(t))
        kept.append(t)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if precision == "int4" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    writer.fh.flush()
    check(dst)
    return dst


def _float32_values(t, source: TensorSource) -> np.ndarray:
    """The float32 values of weight ``t`` (the fp32 graph's bytes, or the checkpoint's); ExportError if any is not
    finite."""
    values = np.frombuffer(source.bytes(t), np.float32)
    if not np.isfinite(values).all():
        raise ExportError(f"the weight {t.name} has non-finite (NaN/inf) values: the model's training diverged or the "
                          "checkpoint is damaged; export an earlier checkpoint")
    return values


def _store_once(t, key, writer: WeightsWriter, done: dict, encode):
    """Point initializer ``t`` at its bytes in weights.bin, made by ``encode() -> (bytes, note)`` and written once
    per ``key`` (a source tensor and the type it is stored as; ``done``: key -> (offset, length, note)). Returns
    the note."""
    if key not in done:
        data, note = encode()
        writer.raw(t, data)
        info = {e.key: e.value for e in t.external_data}
        done[key] = (int(info["offset"]), int(info["length"]), note)
    else:
        point_to(t, WEIGHTS_FILE, *done[key][:2])
    return done[key][2]


def fp16_graph(src: Path, dst: Path, keep: list[str], writer: WeightsWriter, source: TensorSource,
               done: dict) -> Path:
    """The fp16 version of the fp32 graph ``src`` at ``dst`` (beside ``writer``'s weights.bin): ONNX Runtime's
    float16 converter rewrites the graph without its weights (norms and softmaxes stay float32; the inputs and
    outputs in ``keep`` keep their types), then each weight is read (from the fp32 graphs' files or, streamed, the
    checkpoint), cast to the type the converter gave it and written, once per source tensor (``done``)."""
    from unittest import mock

    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.transformers import float16

    from pauserec.export.onnx import FP16_KEEP_FP32, check, toposort

    if dst.parent != writer.path.parent:
        raise ExportError(f"{dst} must be written beside {writer.path} (its external data); report this as a bug")
    model = onnx.load(str(src), load_external_data=False)
    keys = {t.name: source.key(t) for t in model.graph.initializer}  # before the converter retypes them
    # The converter reads each converted initializer's values only to learn its shape: give it the declared dims
    # (the values are external, unread here)
    with mock.patch.object(float16, "make_value_info_from_tensor",
                           lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))):
        model = float16.convert_float_to_float16(model, keep_io_types=keep,
                                                 op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32])
    toposort(model.graph)  # the converter appends its Cast nodes at the end
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        def encode(t=t):
            values = _float32_values(t, source)
            if t.data_type == TensorProto.FLOAT16:
                values = float16.convert_np_to_float16(values)  # the converter's rounding (clamped to float16's range)
            return memoryview(np.ascontiguousarray(values)).cast("B"), None

        _store_once(t, (keys[t.name], t.data_type), writer, done, encode)
    onnx.save(model, str(dst))
    writer.fh.flush()
    check(dst)
    return dst


def fp16_graphs(graphs: dict[str, tuple[Path, str, list[str]]], out_dir: Path, lazy=None) -> dict[str, Path]:
    """Every graph (name -> (fp32 graph file, file name in ``out_dir``, inputs/outputs kept as they are)) in
    fp16, sharing one ``out_dir/weights.bin``; one weight in memory at a time."""
    writer, done = WeightsWriter(out_dir / WEIGHTS_FILE), {}
    try:
        return {n: fp16_graph(path, out_dir / file, keep, writer, TensorSource(path.parent, lazy), done)
                for n, (path, file, keep) in graphs.items()}
    finally:
        writer.close()


def bf16_graph(src: Path, dst: Path, writer: WeightsWriter, source: TensorSource, done: dict) -> bool:
    """The bf16-weights version of the fp32 graph ``src`` at ``dst`` (beside ``writer``'s weights.bin): every
    external float32 weight of the checkpoint is stored as bfloat16 and cast back to float32 where it is read (a
    Gather reads the bfloat16 rows, then casts them), so the graph computes in float32. Each cast sits just before
    its first reader and waits for its activation (``_widen``): in priority order without constant folding
    (``runtime.backends.ort``, ``cast_weights=True``) a call makes one float32 copy at a time. Returns whether every
    weight was a bfloat16 value already (a bf16 checkpoint): then the
    graph computes exactly what the fp32 graph computes."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper

    from pauserec.export.graphs import COMPUTED_CONSTANTS
    from pauserec.export.onnx import check

    if dst.parent != writer.path.parent:
        raise ExportError(f"{dst} must be written beside {writer.path} (its external data); report this as a bug")
    model = onnx.load(str(src), load_external_data=False)
    graph, exact, renamed = model.graph, True, {}
    def as_bf16(t):
        values = _float32_values(t, source)
        half = values.astype(ml_dtypes.bfloat16)  # round to nearest even
        if not np.isfinite(half).all():
            raise ExportError(f"the weight {t.name} has values beyond bfloat16's range; export --precision fp32")
        same = not (values.view(np.uint32) & 0xFFFF).any()  # its low 16 bits are zero: a bfloat16 value
        return memoryview(np.ascontiguousarray(half).view(np.uint16)).cast("B"), same

    for t in graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        if t.data_type != TensorProto.FLOAT or t.name in COMPUTED_CONSTANTS:  # copied as they are
            _store_once(t, source.key(t), writer, done, lambda t=t: (source.bytes(t), True))
            continue
        exact = _store_once(t, source.key(t), writer, done, lambda t=t: as_bf16(t)) and exact
        renamed[t.name] = t.name + BF16_SUFFIX
        t.name, t.data_type = renamed[t.name], TensorProto.BFLOAT16
    constants = {t.name for t in graph.initializer} | set(renamed)
    dims = {t.name: list(t.dims) for t in graph.initializer}
    nodes, cast, made = [], set(), set()
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in renamed:  # the rows, then their cast
            out = node.output[0]
            node.input[0], node.output[0] = renamed[node.input[0]], out + BF16_SUFFIX
            nodes += [node, helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT,
                                             name=f"{node.name or out}{BF16_SUFFIX}.cast")]
            continue
        for name in node.input:
            if name in renamed and name not in cast:
                nodes += _widen(renamed[name], name, dims[renamed[name]], node, constants, made)
                cast.add(name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    writer.fh.flush()
    check(dst)
    return exact


def _widen(src: str, dst: str, dims: list[int], reader, constants: set[str], made: set[str]) -> list:
    """The nodes that cast bfloat16 weight ``src`` (shape ``dims``) to float32 ``dst`` for its first ``reader``.
    A plain Cast reads nothing computed, so ONNX Runtime may run it as soon as the call starts (in priority order
    too, once its optimizers have fused the readers into new nodes: every copy was alive at once, 4.4 GB for a
    1.2 GB Qwen3-0.6B-shape engine; a CastLike on the activation is inlined into such a Cast). So a MatMul's weight
    is first reshaped to its own shape, given as its dims followed by the activation's empty shape slice (a value
    that exists only once the activation does): each copy is made as its layer runs. ``made``: the names already
    written (an activation's slice and a shape are shared)."""
    from onnx import TensorProto, helper

    others = [i for i in reader.input[:2] if i != dst and i not in constants]
    if reader.op_type not in ("MatMul", "Gemm") or not others:
        return [helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT, name=f"{dst}{BF16_SUFFIX}.cast")]
    after, dims_name = f"{others[0]}{BF16_SUFFIX}.after", f"{BF16_SUFFIX}.dims." + "x".join(map(str, dims))
    nodes = []
    if after not in made:
        nodes.append(helper.make_node("Shape", [others[0]], [after], start=0, end=0, name=after))
        made.add(after)
    if dims_name not in made:
        nodes.append(helper.make_node("Constant", [], [dims_name], name=dims_name,
                                      value=helper.make_tensor(dims_name, TensorProto.INT64, [len(dims)], dims)))
        made.add(dims_name)
    return nodes + [
        helper.make_node("Concat", [dims_name, after], [f"{dst}{BF16_SUFFIX}.shape"], axis=0,
                         name=f"{dst}{BF16_SUFFIX}.shape"),
        helper.make_node("Reshape", [src, f"{dst}{BF16_SUFFIX}.shape"], [f"{dst}{BF16_SUFFIX}.ready"],
                         name=f"{dst}{BF16_SUFFIX}.ready"),
        helper.make_node("Cast", [f"{dst}{BF16_SUFFIX}.ready"], [dst], to=TensorProto.FLOAT,
                         name=f"{dst}{BF16_SUFFIX}.cast")]


def bf16_graphs(graphs: dict[str, tuple[Path, str]], out_dir: Path, lazy=None) -> tuple[dict[str, Path], bool]:
    """Every graph (name -> (fp32 graph file, file name in ``out_dir``)) with bfloat16 weights, sharing one
    ``out_dir/weights.bin``; one weight in memory at a time. Also returns whether the engine is exact (every
    weight a bfloat16 value already)."""
    writer, done, exact = WeightsWriter(out_dir / WEIGHTS_FILE), {}, True
    try:
        files = {}
        for n, (path, file) in graphs.items():
            exact = bf16_graph(path, out_dir / file, writer, TensorSource(path.parent, lazy), done) and exact
            files[n] = out_dir / file
        return files, exact
    finally:
        writer.close()


def quantize_graphs(graphs: dict[str, tuple[Path, str]], out_dir: Path, precision: str, lazy=None,
                    accuracy_level: int | None = None, block: int = INT4_BLOCK) -> dict[str, Path]:
    """Every graph (name -> (fp32 graph file, file name in ``out_dir``)) at ``precision``, sharing one
    ``out_dir/weights.bin``; ``lazy``: the checkpoint reader of a streamed export; ``block``: int4's block size
    along K. Returns the written files."""
    writer = WeightsWriter(out_dir / WEIGHTS_FILE)
    try:
        return {n: quantize_graph(path, out_dir / file, precision, writer, TensorSource(path.parent, lazy),
                                  accuracy_level, block)
                for n, (path, file) in graphs.items()}
    finally:
        writer.close()


def to_int8_rows(src: Path, dst: Path) -> Path:
    """The per-row int8 version of the single graph ``src`` at ``dst`` (its weights in ``dst``'s weights.bin)."""
    return quantize_graphs({"graph": (src, dst.name)}, dst.parent, "int8")["graph"]
