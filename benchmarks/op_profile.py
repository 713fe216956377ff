"""Where an engine's time goes, by phase and operator group, from ONNX Runtime's own profiler.

    python benchmarks/op_profile.py ENGINE [ENGINE ...] --batch 1 --threads 2 --spin --out op-profile.json

Each engine is opened with ONNX Runtime profiling switched on (the one change to the runtime's session options:
this script wraps ``pauserec.runtime.backends.ort.session_options``), warmed up with one call, then serves
``--calls`` recommend calls on seeded random ``--history-len``-item users (beam ``--beams``). Every session run
(``model_run`` in the profile) is one graph call, attributed to the graph whose operators did its work (prefill,
in parts of whole users for long batches; decode steps; cot's think steps). For each phase it reports the wall time of its runs, the sum of its operators' kernel times by group, and
the rest ("between operators": ONNX Runtime's executor and thread pool), plus the recommend call's time outside
the graph runs (the host search loop, top-k, copies). Profiling costs a little per operator: the kernel shares are
what to read, not the absolute times (``pauserec-bench latency`` times the engines).

Operator groups: ``gemm`` (the weight and attention products: MatMul, MatMulInteger, MatMulNBits, FusedMatMul,
Gemm), ``int8-quant`` (the per-row activation quantisation and the rescales of int8 engines), ``shape`` (shape
arithmetic and data movement: Shape, Gather, Unsqueeze, Squeeze, Concat, Reshape, Slice, Split, Transpose,
Expand), ``softmax`` (attention and head normalisation: Exp, ReduceMax, ReduceSum, ReduceLogSumExp, Softmax,
Max, Sub, Div), ``norm`` (SimplifiedLayerNormalization), ``other``.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

GROUPS = {
    "gemm": {"MatMul", "MatMulInteger", "MatMulNBits", "FusedMatMul", "Gemm"},
    "shape": {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape", "Slice", "Split", "Transpose", "Expand"},
    "softmax": {"Exp", "ReduceMax", "ReduceSum", "ReduceLogSumExp", "Softmax", "Max", "Sub", "Div"},
    "norm": {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"},
}
INT8_QUANT = ("/q8/",)  # node names of the int8 lowering (pauserec.export.quantize)


def group_of(op: str, node: str) -> str:
    if any(tag in node for tag in INT8_QUANT) and op not in ("MatMulInteger",):
        return "int8-quant"
    return next((g for g, ops in GROUPS.items() if op in ops), "other")


GRAPHS = ("prefill", "decode", "think")


def phases(events: list[dict]) -> dict:
    """Per phase (the graph a run computes: prefill / decode / think): seconds of graph runs, of kernels by group,
    and operator counts, summed over the runs in ``events``. In the merged model a run computes one graph's ``If``
    branch: it belongs to the graph whose operators (``<graph>/...``) took the most time. The ``If`` nodes are not
    counted as operators (their time is their branch's operators and the executor between them)."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and e.get("args", {}).get("op_name") != "If"), key=lambda e: e["ts"])
    out = {}
    j = 0
    for r in runs:
        t0, t1 = r["ts"], r["ts"] + r["dur"]
        while j < len(nodes) and nodes[j]["ts"] < t0:
            j += 1
        mine = []
        while j < len(nodes) and nodes[j]["ts"] <= t1:
            mine.append(nodes[j])
            j += 1
        own = collections.Counter({g: 0.0 for g in GRAPHS})
        for e in mine:
            own[e["name"].split("/", 1)[0]] += e["dur"]
        phase = max(GRAPHS, key=lambda g: own[g])
        o = out.setdefault(phase, {"runs": 0, "run_s": 0.0, "kernels_s": collections.Counter(), "nodes": 0})
        o["runs"] += 1
        o["run_s"] += r["dur"] / 1e6
        o["nodes"] += len(mine)
        for e in mine:
            o["kernels_s"][group_of(e["args"].get("op_name", ""), e["name"])] += e["dur"] / 1e6
    return out


def profile_engine(path: Path, batch: int, calls: int, threads: int, spin: bool, beams: int, history_len: int,
                   seed: int) -> dict:
    import onnxruntime as ort

    import pauserec.runtime.backends.ort as backend
    from pauserec.runtime import Engine, Recommender

    tmp = Path(tempfile.mkdtemp(prefix="op-profile-"))
    plain = backend.session_options

    def profiling(*args, **kwargs):
        opts = plain(*args, **kwargs)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp / "run")
        return opts

    backend.session_options = profiling
    try:
        engine = Engine.load(path, threads=threads, spin=spin)
    finally:
        backend.session_options = plain
    sessions = {id(x): x for x in (getattr(v, "sess", None) or getattr(getattr(v, "merged", None), "sess", None)
                                   for v in engine.sessions.values()) if x is not None}
    if len(sessions) != 1:  # each session's profile counts time from its own start: runs could not be ordered
        raise SystemExit(f"{path}: {len(sessions)} sessions; this profiles an engine's merged model (one CPU session, "
                         "pauserec-export writes it): re-export the engine, or run it on the CPU")
    rec = Recommender(engine)
    rng = np.random.default_rng(seed)
    ids = list(engine.catalog.item_ids)
    users = [[ids[i] for i in rng.choice(len(ids), size=min(history_len, len(ids)), replace=False)]
             for _ in range(batch)]
    rec.recommend(users, k=10, beams=beams)  # warm-up: its runs are dropped below
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        rec.recommend(users, k=10, beams=beams)
        walls.append(time.perf_counter() - t0)
    profile = Path(next(iter(sessions.values())).end_profiling())
    if not profile.exists():
        raise SystemExit(f"ONNX Runtime wrote no profile for {path} (onnxruntime {ort.__version__})")
    events = json.loads(profile.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    per_call = len(runs) // (calls + 1)
    events = [e for e in events if e.get("ts", 0) >= runs[per_call]["ts"]]  # drop the warm-up call
    ph = phases(events)
    graph_s = sum(p["run_s"] for p in ph.values())
    report = {"engine": path.name, "batch": batch, "calls": calls, "runs_per_call": per_call,
              "wall_s_per_call": float(np.median(walls)), "outside_graphs_s_per_call": (sum(walls) - graph_s) / calls,
              "phases": {}}
    for name, p in ph.items():
        kernels = sum(p["kernels_s"].values())
        report["phases"][name] = {
            "run_s_per_call": p["run_s"] / calls,
            "nodes_per_run": p["nodes"] / max(p["runs"], 1),
            "kernels_s_per_call": {g: v / calls for g, v in sorted(p["kernels_s"].items(), key=lambda kv: -kv[1])},
            "between_operators_s_per_call": (p["run_s"] - kernels) / calls,
        }
    return report


def main() -> None:
    from pauserec.bench.env import environment

    ap = argparse.ArgumentParser()
    ap.add_argument("engines", type=Path, nargs="+")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", action="store_true")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--history-len", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    reports = []
    for path in args.engines:
        r = profile_engine(path, args.batch, args.calls, args.threads, args.spin, args.beams, args.history_len, args.seed)
        reports.append(r)
        print(f"{path.name}: batch {args.batch}, {r['wall_s_per_call']:.3f} s per call (profiled), "
              f"{r['outside_graphs_s_per_call']:.3f} s outside the graphs")
        for name, p in r["phases"].items():
            total = p["run_s_per_call"]
            parts = ", ".join(f"{g} {v:.3f} ({100 * v / total:.0f} %)" for g, v in p["kernels_s_per_call"].items())
            print(f"  {name:7s} {total:.3f} s, {p['nodes_per_run']:.0f} operators a run: {parts}, between operators "
                  f"{p['between_operators_s_per_call']:.3f} ({100 * p['between_operators_s_per_call'] / total:.0f} %)")
    result = {"config": vars(args) | {"engines": [str(p.name) for p in args.engines], "out": None},
              "engines": reports, "environment": environment(threads=args.threads)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
