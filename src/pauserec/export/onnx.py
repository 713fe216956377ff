"""torch graph -> ONNX file: export, checker, and fp16 (int8 and int4: ``pauserec.export.quantize``).

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)`` at opset 18. Our wrappers are
plain tensor code (no HF cache classes), which it exports in about a second per graph with graphs as
fast on ONNX Runtime as the dynamo exporter's (which takes 10-15 s per graph here). ``dynamo`` stays
selectable (opset 23) for a torch where the TorchScript exporter is gone.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from pauserec.errors import ExportError
from pauserec.runtime.spec import GraphSpec

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


def to_fp16(src: Path, dst: Path, keep: list[str]) -> Path:
    """float16 weights and KV I/O; the inputs and outputs named in ``keep`` (ids, log-probs) keep their types."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=keep, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32]
    )
    _toposort(model.graph)  # the converter appends its Cast nodes at the end
    save_external(model, dst)
    return dst


def kv_to_float16(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Rewrite the graph at ``path`` in place so its KV inputs and outputs are float16; it computes as before.

    A KV output made by stacking the layers (``Concat``) gets each layer cast before the stack, so no float32
    stack is ever built; a KV input read one layer at a time (``Gather`` on the layer axis) is cast back per
    layer after the read, so no float32 copy of the whole context exists either. Any other producer or
    consumer gets one Cast of the whole tensor (same values, less memory saved). The semantics are exactly
    ``graph(kv_in.astype(float32))`` with the KV outputs rounded to float16. Weights are untouched.
    """
    import onnx
    from onnx import TensorProto, helper

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
    casts = []

    def cast(src: str, dst: str, to: int) -> None:
        casts.append(helper.make_node("Cast", [src], [dst], to=to, name=f"kv16/{dst}"))

    for name in outputs:
        p = producer[name]
        if p.op_type == "Concat":
            for j, x in enumerate(p.input):
                cast(x, f"{x}/kv16", TensorProto.FLOAT16)
                p.input[j] = f"{x}/kv16"
        else:
            p.output[list(p.output).index(name)] = f"{name}/kv32"
            cast(f"{name}/kv32", name, TensorProto.FLOAT16)
        io_types[name].type.tensor_type.elem_type = TensorProto.FLOAT16
    for name in inputs:
        whole = None
        for n in consumers.get(name, []):
            if n.op_type == "Gather" and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0:
                y = n.output[0]
                n.output[0] = f"{y}/kv16"
                cast(f"{y}/kv16", y, TensorProto.FLOAT)
            else:
                if whole is None:
                    whole = f"{name}/kv32"
                    cast(name, whole, TensorProto.FLOAT)
                n.input[:] = [whole if x == name else x for x in n.input]
        io_types[name].type.tensor_type.elem_type = TensorProto.FLOAT16
    renamed = {x for c in casts for x in c.output}
    kept = [v for v in g.value_info if v.name not in renamed]
    del g.value_info[:]
    g.value_info.extend(kept)
    g.node.extend(casts)
    _toposort(g)
    onnx.save(model, str(path))
    check(path)


def save_external(model, dst: Path) -> None:
    """Save with every tensor in one external file beside ``dst`` (any size; ``consolidate`` reads it)."""
    import onnx

    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)
    check(dst)


def to_fp16_graphs(sources: dict[str, tuple[Path, str, list[str]]], work: Path, out_dir: Path) -> dict[str, Path]:
    """fp16 versions of the fp32 graphs (name -> (graph, file name, ``keep``)), consolidated into ``out_dir``."""
    from pauserec.export.weights import consolidate

    raw = {}
    for n, (path, file, keep) in sources.items():
        (work / n).mkdir(parents=True)
        raw[n] = to_fp16(path, work / n / file, keep)
    return consolidate(raw, out_dir)


def _toposort(graph) -> None:
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
