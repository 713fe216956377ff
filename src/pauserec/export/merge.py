"""Every graph of an engine in one ONNX model, each weight multiplied by one MatMul node (CPU).

ONNX Runtime's CPU MatMul re-lays a constant weight into its GEMM's packed layout once, at session
start ("prepacking"); a call then reads the packed copy instead of packing the weight's panels again.
That pays most when a MatMul has few rows (a decode step multiplies 20 beams' rows per user). But each
MatMul *node* packs into a buffer of its own, and prefill, decode and think are separate graphs,
each with its own session: prepacking the engine's graphs held one packed copy of the weights per
graph (3x the weights at the Qwen3-0.6B shape).

``merge_graphs`` writes ``merged.onnx``: the graphs side by side in one model, their inputs and
outputs named ``<graph>/<name>``, and every weight that several graphs multiply by feeding *one*
MatMul: each graph's rows are flattened to 2-D, concatenated, multiplied, split and reshaped back.
The runtime opens one session on it and runs one graph at a time by feeding the others a batch of
zero users (``pauserec.runtime.backends.ort.MergedSession``), so the packed weights exist once.

It works on the consolidated fp32 graphs (names of shared weights are the same in every graph, their
data in ``weights.bin``); reduced precisions lower the merged model like any other graph.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from pauserec.errors import ExportError

MERGED_FILE = "merged.onnx"
SEP = "/"


def _external_key(t) -> tuple | None:
    """(location, offset, length, dtype, dims) of an external initializer, else None."""
    from onnx import TensorProto

    if t.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    return info.get("location"), info.get("offset", "0"), info.get("length"), t.data_type, tuple(t.dims)


def merge_graphs(files: dict[str, Path], dst: Path) -> dict:
    """Write the merged model of ``files`` (graph name -> consolidated .onnx) to ``dst``; returns a summary
    (graphs, nodes, merged weights). Only external initializers with the same name and bytes are shared."""
    import onnx
    from onnx import helper

    from pauserec.export.onnx import toposort, check

    models = {name: onnx.load(str(path), load_external_data=False) for name, path in files.items()}
    opsets = {(o.domain, o.version) for m in models.values() for o in m.opset_import}
    shared: dict[str, tuple] = {}  # weight name -> external key, when every graph holding it agrees
    conflicts: set[str] = set()
    for m in models.values():
        for t in m.graph.initializer:
            key = _external_key(t)
            if key is None:  # an inline tensor: never shared, and a name it shares with a weight is not either
                conflicts.add(t.name)
            elif shared.setdefault(t.name, key) != key:
                conflicts.add(t.name)
    for name in conflicts:
        shared.pop(name, None)

    graph = helper.make_graph([], "pauserec_merged", [], [])
    kept: set[str] = set()
    for g, m in models.items():
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in m.graph.node for a in n.attribute):
            raise ExportError(f"the {g} graph has control flow (If/Loop), which the merged CPU model does not handle")

        def rename(x: str, g: str = g) -> str:
            return x if (not x or x in shared) else f"{g}{SEP}{x}"

        for t in m.graph.initializer:
            if t.name in shared:
                if t.name not in kept:
                    kept.add(t.name)
                    graph.initializer.append(t)
                continue
            t.name = rename(t.name)
            graph.initializer.append(t)
        for vi, into in [(vi, graph.input) for vi in m.graph.input] + [(vi, graph.output) for vi in m.graph.output]:
            vi.name = rename(vi.name)
            for dim in vi.type.tensor_type.shape.dim:  # each graph's "batch" is its own size
                if dim.dim_param:
                    dim.dim_param = f"{g}{SEP}{dim.dim_param}"
            into.append(vi)
        for n in m.graph.node:
            n.name = f"{g}{SEP}{n.name}"
            n.input[:] = [rename(x) for x in n.input]
            n.output[:] = [rename(x) for x in n.output]
            graph.node.append(n)

    merged = _merge_matmuls(graph, set(shared))
    toposort(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets)])
    model.ir_version = max(m.ir_version for m in models.values())
    onnx.save(model, str(dst))
    check(dst)
    return {"file": dst.name, "graphs": list(files), "nodes": len(graph.node), "merged_weights": merged}


def _merge_matmuls(graph, weights: set[str]) -> int:
    """Give every weight of ``weights`` that two or more MatMuls multiply by (as B) one MatMul node."""
    from onnx import helper, numpy_helper

    import numpy as np

    users: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x in weights:
                users[x].append((node, i))
    done = 0
    drop: set[str] = set()
    stacked: dict[tuple[str, ...], tuple[str, str, list[str]]] = {}  # inputs -> (rows, sizes, leads), built once
    new = []
    for w, uses in users.items():
        if len(uses) < 2 or any(n.op_type != "MatMul" or i != 1 or n.domain not in ("", "ai.onnx") for n, i in uses):
            continue
        dims = next(t.dims for t in graph.initializer if t.name == w)
        if len(dims) != 2:
            continue
        k, n_out = int(dims[0]), int(dims[1])
        base = f"merged{SEP}{w}"
        inputs = tuple(node.input[0] for node, _ in uses)
        if inputs not in stacked:  # q/k/v (and gate/up) projections of a layer multiply the same rows: stack once
            stack = f"merged{SEP}rows{len(stacked)}"
            flat_shape = f"{stack}/flat_shape"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), flat_shape))
            flats, rows, leads = [], [], []
            for j, a in enumerate(inputs):
                flat, row, lead = f"{stack}/flat{j}", f"{stack}/rows{j}", f"{stack}/lead{j}"
                new += [helper.make_node("Reshape", [a, flat_shape], [flat], name=f"{stack}/reshape{j}"),
                        helper.make_node("Shape", [flat], [row], name=f"{stack}/rows{j}", start=0, end=1),
                        helper.make_node("Shape", [a], [lead], name=f"{stack}/lead{j}", start=0, end=-1)]
                flats.append(flat)
                rows.append(row)
                leads.append(lead)
            new += [helper.make_node("Concat", flats, [f"{stack}/rows"], name=f"{stack}/concat", axis=0),
                    helper.make_node("Concat", rows, [f"{stack}/sizes"], name=f"{stack}/sizes", axis=0)]
            stacked[inputs] = (f"{stack}/rows", f"{stack}/sizes", leads)
        rows_all, sizes, leads = stacked[inputs]
        width = f"{base}/width"
        graph.initializer.append(numpy_helper.from_array(np.array([n_out], np.int64), width))
        new += [helper.make_node("MatMul", [rows_all, w], [f"{base}/product"], name=f"{base}/matmul"),
                helper.make_node("Split", [f"{base}/product", sizes], [f"{base}/part{j}" for j in range(len(uses))],
                                 name=f"{base}/split", axis=0)]
        for j, (node, _) in enumerate(uses):
            shape = f"{base}/shape{j}"
            new += [helper.make_node("Concat", [leads[j], width], [shape], name=f"{base}/shape{j}", axis=0),
                    helper.make_node("Reshape", [f"{base}/part{j}", shape], [node.output[0]], name=f"{base}/out{j}")]
            drop.add(node.name)
        done += 1
    graph.node.extend(new)
    keep = [n for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    return done
