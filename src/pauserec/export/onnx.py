"""torch graph -> ONNX file: export, checker, and fp16 (int8 and int4: ``pauserec.export.quantize``).

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)`` at opset 18. Our wrappers are
plain tensor code (no HF cache classes), which it exports in about a second per graph with graphs as
fast on ONNX Runtime as the dynamo exporter's (which takes 10-15 s per graph here). ``dynamo`` stays
selectable (opset 23) for a torch where the TorchScript exporter is gone.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

from pauserec.errors import ExportError
from pauserec.runtime.spec import KV_STORAGE, GraphSpec

OPSETS = {"torchscript": 18, "dynamo": 23}
FP16_KEEP_FP32 = ("Pow", "ReduceMean", "Softmax", "LogSoftmax")  # norms and softmaxes stay in float32


def exporter_info(exporter: str) -> dict:
    import torch

    if exporter not in OPSETS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(OPSETS)}")
    return {"exporter": f"torch.onnx ({exporter})", "opset": OPSETS[exporter], "torch": torch.__version__}


def export_graph(module, spec: GraphSpec, example: tuple, path: Path, dynamic: bool, exporter: str = "torchscript") -> Path:
    """Export one wrapper to ``path`` with the I/O names (and dynamic axes) of ``spec``."""
    import torch

    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                # structure only (weights become inputs named by their state_dict keys), then the
                # weights are written one tensor at a time: export never holds a second copy of them
                torch.onnx.export(
                    module, example, str(path), dynamo=False, opset_version=OPSETS[exporter],
                    input_names=spec.input_names, output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes() if dynamic else None, export_params=False,
                    do_constant_folding=False,
                )
                attach_weights(path, module)
            else:
                _export_dynamo(module, spec, example, path, dynamic)
    except (ExportError, OSError):  # OSError: a full disk is reported as such by the caller
        raise
    except Exception as e:  # torch raises many unrelated types here
        raise ExportError(f"torch.onnx could not export the {spec.name} graph ({type(e).__name__}: {e})") from e
    check(path)
    return path


def attach_weights(path: Path, module) -> None:
    """Turn the graph inputs of ``path`` that name ``module`` state (weights, buffers) into initializers,
    each big tensor in its own external file beside ``path`` (``weights.consolidate`` reads that layout)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from pauserec.export.stream import is_stand_in
    from pauserec.export.weights import INLINE_BYTES, LAZY_FILE, header, point_to

    model = onnx.load(str(path), load_external_data=False)
    state = module.state_dict()
    streamed = getattr(getattr(module, "core", None), "weights", None)  # stand-ins read from the checkpoint
    keep, weights = [], []
    for vi in model.graph.input:
        (weights if vi.name in state else keep).append(vi)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for n, vi in enumerate(weights):
        t = state[vi.name]
        if streamed is not None and streamed.defer and is_stand_in(t):  # read from the checkpoint when quantised
            proto = onnx.TensorProto(name=vi.name, data_type=onnx.TensorProto.FLOAT, dims=tuple(t.shape))
            point_to(proto, LAZY_FILE, streamed.lazy_ref(t), 4 * t.numel())
            (path.parent / LAZY_FILE).touch()
            model.graph.initializer.append(proto)
            continue
        array = streamed.real(t) if streamed is not None and is_stand_in(t) else np.ascontiguousarray(t.cpu().numpy())
        if array.nbytes >= INLINE_BYTES:
            (path.parent / f"w{n}.bin").write_bytes(memoryview(array).cast("B"))
            t = header(array, vi.name)
            point_to(t, f"w{n}.bin", 0, array.nbytes)
        else:
            t = numpy_helper.from_array(array, vi.name)
        model.graph.initializer.append(t)
        del array, t
    onnx.save(model, str(path))


def _export_dynamo(module, spec: GraphSpec, example: tuple, path: Path, dynamic: bool) -> None:
    import torch

    dims: dict[str, object] = {}
    shapes = None
    if dynamic:
        shapes = tuple(
            {ax: dims.setdefault(sym, torch.export.Dim(sym, min=2)) for ax, sym in t.dynamic_axes.items()} or None
            for t in spec.inputs
        )
    prog = torch.onnx.export(
        module, example, dynamo=True, opset_version=OPSETS["dynamo"], input_names=spec.input_names,
        output_names=spec.output_names, dynamic_shapes=shapes, external_data=False,
    )
    prog.save(str(path))


def check(path: Path) -> None:
    """``onnx.checker`` on the saved file; ExportError with the checker's message."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {e}") from e


def float_io(spec: GraphSpec) -> list[str]:
    """The inputs and outputs of ``spec`` that keep their type at every precision (all but the KV)."""
    return [t.name for t in (*spec.inputs, *spec.outputs) if t.dtype != "kv"]


def kv_io(spec: GraphSpec) -> tuple[list[str], list[str]]:
    """The KV inputs and outputs of ``spec`` (the tensors ``float_io`` leaves out)."""
    return [t.name for t in spec.inputs if t.dtype == "kv"], [t.name for t in spec.outputs if t.dtype == "kv"]


def kv_storage(path: Path, inputs: list[str], outputs: list[str], kv_dtype: str) -> None:
    """Rewrite the graph at ``path`` in place so its KV inputs and outputs are held as ``kv_dtype`` ("float16" or
    "int8", ``pauserec.runtime.spec.KV_STORAGE``); it computes in float32 as before.

    A KV output made by stacking the layers (``Concat``) gets each layer encoded before the stack, so no float32
    stack is ever built; a KV input read one layer at a time (``Gather`` on the layer axis) is decoded per layer
    after the read, so no float32 copy of the whole context exists either. Any other producer or consumer gets
    one encoding / decoding of the whole tensor (same values, less memory saved). The semantics are exactly
    ``graph(decode(kv_in))`` with the KV outputs encoded: float16 rounds each value; int8 quantises each vector
    along the last axis (a layer's key or value of one user, head and slot) with a scale of its own
    (``kv_int8_reference``), so a user's KV never depends on the other users of a batch. Weights are untouched.
    """
    import onnx

    codecs = _kv_codecs()
    if kv_dtype not in codecs:
        raise ExportError(f"no KV storage {kv_dtype!r}; choose one of {', '.join(codecs)}")
    encode, decode, elem = codecs[kv_dtype]
    extra = KV_STORAGE[kv_dtype]
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    io_types = {v.name: v for v in (*g.input, *g.output)}
    missing = [x for x in (*inputs, *outputs) if x not in io_types]
    if missing:
        raise ExportError(f"{path.name} has no KV tensor {', '.join(missing)}; the graph is not one pauserec exported")
    added = []
    for name in outputs:
        p = producer[name]
        if p.op_type == "Concat":
            for j, x in enumerate(p.input):
                added += encode(x, f"{x}/kv")
                p.input[j] = f"{x}/kv"
        else:
            p.output[list(p.output).index(name)] = f"{name}/kv32"
            added += encode(f"{name}/kv32", name)
    for name in inputs:
        whole = None
        for n in consumers.get(name, []):
            if n.op_type == "Gather" and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0:
                y = n.output[0]
                n.output[0] = f"{y}/kv"
                added += decode(f"{y}/kv", y)
            else:
                if whole is None:
                    whole = f"{name}/kv32"
                    added += decode(name, whole)
                n.input[:] = [whole if x == name else x for x in n.input]
    for name in (*inputs, *outputs):
        t = io_types[name].type.tensor_type
        t.elem_type = elem
        if extra and t.shape.dim[-1].HasField("dim_value"):
            t.shape.dim[-1].dim_value += extra
    renamed = {x for c in added for x in c.output}
    kept = [v for v in g.value_info if v.name not in renamed]
    del g.value_info[:]
    g.value_info.extend(kept)
    g.node.extend(added)
    toposort(g)
    onnx.save(model, str(path))
    check(path)


def _cast(src: str, dst: str, to: int) -> list:
    from onnx import helper

    return [helper.make_node("Cast", [src], [dst], to=to, name=f"kv/{dst}")]


def _const(name: str, value, dtype="float32"):
    import numpy as np
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name), name=name)


# int8 KV: s = m * 2**(e - 7) with e = floor(log2(amax / 127)) and m = ceil(amax / 127 / 2**(e - 7)) in [128, 256]
# (one off either way where the logarithm rounds across an integer: m stays in [64, 319]), stored as m - 192 and e.
KV8_BIAS, KV8_TINY = 192, 1e-30  # all-zero vectors: scale from 1e-30, e = -100
LN2 = math.log(2.0)


def _pack_int8(src: str, dst: str) -> list:
    """Nodes: float32 ``src`` (..., D) -> int8 ``dst`` (..., D + 2): values, m - 192, e (see KV_STORAGE)."""
    from onnx import TensorProto, helper

    k = f"{dst}/kv8"
    n = helper.make_node
    return [
        _const(f"{k}/axes", [-1], "int64"), _const(f"{k}/127", 127.0), _const(f"{k}/tiny", KV8_TINY),
        _const(f"{k}/ln2", LN2), _const(f"{k}/two", 2.0), _const(f"{k}/seven", 7.0),
        _const(f"{k}/mlo", 64.0), _const(f"{k}/mhi", 319.0), _const(f"{k}/qlo", -127.0), _const(f"{k}/qhi", 127.0),
        _const(f"{k}/bias", float(KV8_BIAS)),
        n("Abs", [src], [f"{k}/abs"], name=f"{k}/abs"),
        n("ReduceMax", [f"{k}/abs", f"{k}/axes"], [f"{k}/amax"], keepdims=1, name=f"{k}/amax"),
        n("Div", [f"{k}/amax", f"{k}/127"], [f"{k}/t0"], name=f"{k}/t0"),
        n("Max", [f"{k}/t0", f"{k}/tiny"], [f"{k}/t"], name=f"{k}/t"),
        n("Log", [f"{k}/t"], [f"{k}/ln"], name=f"{k}/ln"),
        n("Div", [f"{k}/ln", f"{k}/ln2"], [f"{k}/log2"], name=f"{k}/log2"),
        n("Floor", [f"{k}/log2"], [f"{k}/e"], name=f"{k}/e"),
        *_scale(f"{k}/e", f"{k}/p", None, k),  # p = 2**(e - 7)
        n("Div", [f"{k}/t", f"{k}/p"], [f"{k}/m0"], name=f"{k}/m0"),
        n("Ceil", [f"{k}/m0"], [f"{k}/m1"], name=f"{k}/m1"),
        n("Clip", [f"{k}/m1", f"{k}/mlo", f"{k}/mhi"], [f"{k}/m"], name=f"{k}/m"),
        n("Mul", [f"{k}/m", f"{k}/p"], [f"{k}/s"], name=f"{k}/s"),
        n("Div", [src, f"{k}/s"], [f"{k}/x"], name=f"{k}/x"),
        n("Round", [f"{k}/x"], [f"{k}/r"], name=f"{k}/r"),
        n("Clip", [f"{k}/r", f"{k}/qlo", f"{k}/qhi"], [f"{k}/rc"], name=f"{k}/rc"),
        n("Cast", [f"{k}/rc"], [f"{k}/q"], to=TensorProto.INT8, name=f"{k}/q"),
        n("Sub", [f"{k}/m", f"{k}/bias"], [f"{k}/mb"], name=f"{k}/mb"),
        n("Cast", [f"{k}/mb"], [f"{k}/mq"], to=TensorProto.INT8, name=f"{k}/mq"),
        n("Cast", [f"{k}/e"], [f"{k}/eq"], to=TensorProto.INT8, name=f"{k}/eq"),
        n("Concat", [f"{k}/q", f"{k}/mq", f"{k}/eq"], [dst], axis=-1, name=f"{k}/pack"),
    ]


def _scale(e: str, p: str, m: str | None, k: str) -> list:
    """Nodes: ``p`` = 2**(``e`` - 7), times (``m`` + 192) when ``m`` is given (the stored lanes, as float32)."""
    from onnx import helper

    n = helper.make_node
    out = [n("Sub", [e, f"{k}/seven"], [f"{k}/e7"], name=f"{k}/e7"),
           n("Pow", [f"{k}/two", f"{k}/e7"], [p if m is None else f"{k}/p"], name=f"{k}/pow")]
    if m is not None:
        out += [n("Add", [m, f"{k}/bias"], [f"{k}/m"], name=f"{k}/m"),
                n("Mul", [f"{k}/m", f"{k}/p"], [p], name=f"{k}/s")]
    return out


def _unpack_int8(src: str, dst: str) -> list:
    """Nodes: int8 ``src`` (..., D + 2) -> float32 ``dst`` (..., D), the values ``_pack_int8`` stored."""
    from onnx import TensorProto, helper

    k = f"{dst}/kv8"
    n = helper.make_node
    f = TensorProto.FLOAT
    return [
        _const(f"{k}/axes", [-1], "int64"), _const(f"{k}/0", [0], "int64"), _const(f"{k}/-2", [-2], "int64"),
        _const(f"{k}/-1", [-1], "int64"), _const(f"{k}/end", [2**62], "int64"),
        _const(f"{k}/two", 2.0), _const(f"{k}/seven", 7.0), _const(f"{k}/bias", float(KV8_BIAS)),
        n("Slice", [src, f"{k}/0", f"{k}/-2", f"{k}/axes"], [f"{k}/q8"], name=f"{k}/q8"),
        n("Slice", [src, f"{k}/-2", f"{k}/-1", f"{k}/axes"], [f"{k}/m8"], name=f"{k}/m8"),
        n("Slice", [src, f"{k}/-1", f"{k}/end", f"{k}/axes"], [f"{k}/e8"], name=f"{k}/e8"),
        n("Cast", [f"{k}/q8"], [f"{k}/q"], to=f, name=f"{k}/q"),
        n("Cast", [f"{k}/m8"], [f"{k}/mf"], to=f, name=f"{k}/mf"),
        n("Cast", [f"{k}/e8"], [f"{k}/ef"], to=f, name=f"{k}/ef"),
        *_scale(f"{k}/ef", f"{k}/s", f"{k}/mf", k),
        n("Mul", [f"{k}/q", f"{k}/s"], [dst], name=f"{k}/x"),
    ]


def kv_int8_reference(x):
    """NumPy statement of the int8 KV storage: float32 (..., D) -> int8 (..., D + 2) (decoded by ``kv_int8_decode``)."""
    import numpy as np

    x = np.asarray(x, np.float32)
    t = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.float32(KV8_TINY))
    e = np.floor(np.log(t) / np.float32(LN2)).astype(np.float32)
    p = np.power(np.float32(2), e - np.float32(7)).astype(np.float32)
    m = np.clip(np.ceil(t / p), 64, 319).astype(np.float32)
    q = np.clip(np.round(x / (m * p)), -127, 127).astype(np.int8)
    packed = np.concatenate([q, (m - KV8_BIAS).astype(np.int8), e.astype(np.int8)], axis=-1)
    return packed


def kv_int8_decode(packed):
    """float32 values of int8 KV storage (``kv_int8_reference``'s inverse up to the rounding)."""
    import numpy as np

    packed = np.asarray(packed, np.int8)
    m = packed[..., -2:-1].astype(np.float32) + np.float32(KV8_BIAS)
    s = m * np.power(np.float32(2), packed[..., -1:].astype(np.float32) - np.float32(7)).astype(np.float32)
    return packed[..., :-2].astype(np.float32) * s


def _kv_codecs():
    from onnx import TensorProto

    return {"float16": (lambda s, d: _cast(s, d, TensorProto.FLOAT16), lambda s, d: _cast(s, d, TensorProto.FLOAT),
                        TensorProto.FLOAT16),
            "int8": (_pack_int8, _unpack_int8, TensorProto.INT8)}


def toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"the fp16 graph has a cycle or a dangling input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def graph_inputs_and_initializers(path: Path) -> tuple[list[str], dict[str, object]]:
    """Input names and initializers (name -> numpy array) of an ONNX file (for inspection and tests)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], inits
