"""Every graph of an engine in one ONNX model, so its weights are packed once (CPU).

ONNX Runtime's CPU MatMul kernels re-lay a constant weight into their GEMM's packed layout once, at session
start ("prepacking"); a call then reads the packed copy instead of packing the weight's panels again. That pays
most when a MatMul has few rows (a decode step multiplies 20 beams' rows per user). But prefill, decode and think
are separate graphs, and one session per graph packs its own copy of every weight (3x the weights at the Qwen3-0.6B
shape). Within one session ONNX Runtime packs a weight once for every kernel that multiplies by it.

``merge_graphs`` writes ``merged.onnx``: one model whose inputs and outputs are the graphs' own, named
``<graph>/<name>``, plus one boolean input ``<graph>/run`` per graph. Each graph is the ``then`` branch of its own
``If`` node on that flag (its nodes and tensors renamed ``<graph>:<name>`` inside the branch); the ``else`` branch
returns empty tensors. The weights are the model's initializers, shared by every branch that names them (same
name, same bytes in ``weights.bin``). The runtime opens one session on it and runs one graph at a time by setting
that graph's flag alone (``pauserec.runtime.backends.ort.MergedSession``): the idle graphs compute nothing.

It is built from an engine's final graphs (fp32, or after the lowering to fp16 / int8 / int4 and the KV storage),
so the merged model computes exactly what they compute. Each branch holds its graph's small constants as
initializers, each distinct value once (``_equal_constants``): ONNX Runtime then simplifies a branch as far as the
same graph in a session of its own.
"""

from __future__ import annotations

from pathlib import Path

from pauserec.runtime.spec import merged_name, run_flag

MERGED_FILE = "merged.onnx"


def _external_key(t) -> tuple | None:
    """(location, offset, length, dtype, dims) of an external initializer, else None."""
    from onnx import TensorProto

    if t.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info.get("location"), info.get("offset", "0"), info.get("length"), t.data_type, tuple(t.dims)


def _shared_weights(models: dict) -> set[str]:
    """Names of the external initializers whose every holder stores the same bytes: one tensor of the merged model."""
    keys: dict[str, tuple] = {}
    conflicts: set[str] = set()
    for m in models.values():
        for t in m.graph.initializer:
            key = _external_key(t)
            if key is None or keys.setdefault(t.name, key) != key:  # inline, or other bytes under that name
                conflicts.add(t.name)
    return set(keys) - conflicts


def merge_graphs(files: dict[str, Path], dst: Path) -> dict:
    """Write the merged model of ``files`` (graph name -> .onnx whose weights are in one ``weights.bin`` beside
    ``dst``) to ``dst``; returns a summary (graphs, nodes, shared weights)."""
    import onnx
    from onnx import helper

    from pauserec.errors import ExportError
    from pauserec.export.onnx import check

    models = {name: onnx.load(str(path), load_external_data=False) for name, path in files.items()}
    shared = _shared_weights(models)
    graph = helper.make_graph([], "pauserec_merged", [], [])
    kept: set[str] = set()
    nodes = 0
    for g, m in models.items():
        inputs = {vi.name for vi in m.graph.input}
        if any(merged_name(g, x) == run_flag(g) for x in inputs):
            raise ExportError(f"the {g} graph has an input named like the merged model's flag {run_flag(g)!r}")

        def rename(x: str, g: str = g, inputs: set = inputs) -> str:
            if not x or x in shared:
                return x
            return merged_name(g, x) if x in inputs else f"{g}:{x}"  # graph inputs are the model's, read from outside

        body, values = [], list(m.graph.initializer)  # a Constant node's value becomes an initializer too
        for n in m.graph.node:
            value = _constant_value(n)
            if value is None:
                body.append(n)
            else:
                values.append(value)
        alias = _equal_constants(values)
        local = []  # the graph's own constants are its branch's initializers, each distinct value once
        for t in values:
            if t.name in shared:
                if t.name not in kept:
                    kept.add(t.name)
                    graph.initializer.append(t)
            elif t.name not in alias:
                t.name = rename(t.name)
                local.append(t)
        for vi in m.graph.input:
            vi.name = rename(vi.name)
            _scope_dims(vi, g)
            graph.input.append(vi)
        graph.input.append(helper.make_tensor_value_info(run_flag(g), onnx.TensorProto.BOOL, []))
        for n in body:
            n.input[:] = [rename(alias.get(x, x)) for x in n.input]
            n.output[:] = [rename(x) for x in n.output]
            n.name = merged_name(g, n.name)
        nodes += len(body)
        ran, idle, idle_nodes = [], [], []
        for vi in m.graph.output:
            tt = vi.type.tensor_type
            ran.append(helper.make_tensor_value_info(rename(vi.name), tt.elem_type, None))
            empty = f"{g}:idle/{vi.name}"  # (0, ..., 0) of the output's rank: nothing computed
            idle_nodes.append(helper.make_node("Constant", [], [empty], name=empty,
                                               value=helper.make_tensor(empty, tt.elem_type, [0] * len(tt.shape.dim), [])))
            idle.append(helper.make_tensor_value_info(empty, tt.elem_type, None))
            vi.name = merged_name(g, vi.name)
            _scope_dims(vi, g)
            graph.output.append(vi)
        graph.node.append(helper.make_node(
            "If", [run_flag(g)], [vi.name for vi in m.graph.output], name=merged_name(g, "if"),
            then_branch=helper.make_graph(body, f"{g}_run", [], ran, local),
            else_branch=helper.make_graph(idle_nodes, f"{g}_idle", [], idle)))
    opsets = {(o.domain, o.version) for m in models.values() for o in m.opset_import}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets)])
    model.ir_version = max(m.ir_version for m in models.values())
    onnx.save(model, str(dst))
    check(dst)
    return {"file": dst.name, "graphs": list(files), "nodes": nodes, "shared_weights": len(kept)}


def _constant_value(node):
    """The value of a ``Constant`` node as an initializer named like its output, else None."""
    import numpy as np
    from onnx import helper, numpy_helper

    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        value = type(a.t)()
        value.CopyFrom(a.t)
    elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
        value = numpy_helper.from_array(np.array(helper.get_attribute_value(a),
                                                 dtype=np.float32 if "float" in a.name else np.int64))
    else:
        return None
    value.name = node.output[0]
    return value


def _equal_constants(initializers) -> dict[str, str]:
    """name -> the first name of an equal inline constant, for each inline initializer that repeats an earlier one.

    The exporter writes a small constant (an axis, a shape part) as a Constant node per use. ONNX Runtime merges
    equal nodes (Unsqueeze of x on axis 0 ...) only when they read the same constant, and it shares equal constants
    in the main graph but not in an If branch: left as exported, a decode branch keeps ~1,100 shape operators more
    than the same graph in a session of its own (Qwen3-0.6B shape)."""
    from onnx import TensorProto

    first: dict[bytes, str] = {}
    alias = {}
    for t in initializers:
        if t.data_location == TensorProto.EXTERNAL:
            continue
        value = TensorProto()
        value.CopyFrom(t)
        value.name = ""
        key = value.SerializeToString(deterministic=True)
        if key in first:
            alias[t.name] = first[key]
        else:
            first[key] = t.name
    return alias


def _scope_dims(vi, graph: str) -> None:
    """Each graph's symbolic sizes ("batch", ...) are its own: ``<graph>/<symbol>``."""
    for dim in vi.type.tensor_type.shape.dim:
        if dim.dim_param:
            dim.dim_param = merged_name(graph, dim.dim_param)
