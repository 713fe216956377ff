"""Achieved fraction of the machine's own GEMM rate, from a latency run of pauserec-bench.

    python benchmarks/roofline.py LATENCY.json [--threads 2] > roofline.json

For every engine and batch size of LATENCY.json: the matmul FLOPs of one recommend call (prefill +
SID decode steps, from the engine's manifest and the run's history length; ``pauserec.bench.flops``),
the achieved GFLOP/s at the run's p50 latency, and that as a fraction of the fp32 GEMM rate of ONNX
Runtime and numpy measured now, in this process, on the same threads. The run's time split says
where the rest goes (prefill / decode / top-k / other).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from pauserec.bench.env import environment
    from pauserec.bench.flops import gemm_rate, recommend_flops

    ap = argparse.ArgumentParser()
    ap.add_argument("latency", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    run = json.loads(args.latency.read_text())
    threads = args.threads or run["config"].get("threads")
    rate = gemm_rate(threads=threads)
    # the machine's rate: the best median over the measured GEMM sizes, per library
    peak_ort = max(r["onnxruntime"]["gflops_median"] for r in rate["sizes"])
    peak_np = max(r["numpy"]["gflops_median"] for r in rate["sizes"])
    rows = []
    for system in run["systems"]:
        if not system["system"].startswith("engine"):
            continue
        m = json.loads((Path(system["path"]) / "manifest.json").read_text())
        hist_items = int(run["config"].get("history_len", 20))
        for bs, stats in system["by_batch"].items():
            f = recommend_flops(m["model"], batch=int(bs), beams=int(run["config"]["beams"]),
                                hist_tokens=hist_items * (m["sid"]["levels"] + 1),
                                prefix_len=m["shapes"]["prefix_len"], suffix_len=m["shapes"]["suffix_len"],
                                levels=m["sid"]["levels"], codebook_sizes=m["sid"]["codebook_sizes"],
                                scoring=m.get("scoring", "full"))
            p50 = stats["batch_latency_s"]["p50"]
            achieved = f["total"] / p50 / 1e9
            rows.append({"system": system["name"], "batch": int(bs), "precision": m["precision"],
                         "scoring": m.get("scoring", "full"), "gflop_per_call": f["total"] / 1e9,
                         "flops": f, "p50_s": p50, "achieved_gflops": achieved,
                         "fraction_of_ort_gemm": achieved / peak_ort, "fraction_of_numpy_gemm": achieved / peak_np,
                         "time_split_s": stats.get("time_split_s", {})})
    print(json.dumps({"latency_run": str(args.latency), "gemm": rate, "peak_ort_gflops": peak_ort,
                      "peak_numpy_gflops": peak_np, "rows": rows, "env": environment(threads=threads)}, indent=2))


if __name__ == "__main__":
    main()
