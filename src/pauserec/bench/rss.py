"""`python -m pauserec.bench.rss engine|hf-generate PATH`: peak RSS of one system serving one batch.

Run in a fresh process by the latency benchmark, because a process's peak RSS never goes down.
Prints one JSON line: {"peak_rss_mb": ..., "loaded_rss_mb": ..., "load_peak_rss_mb": ..., "torch_imported": ...}:
the peak while serving, what stays resident once the system is loaded, and the peak while loading.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pauserec.bench.rss")
    ap.add_argument("system", choices=["engine", "engine+prepack", "engine-unpacked", "hf-generate"])
    ap.add_argument("path", type=Path)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--history-len", type=int, default=20, help="items per user's history (seeded random)")
    ap.add_argument("--engine", type=Path, default=None, help="hf-generate of a checkpoint without a training card: "
                    "the engine whose prompt and catalog it runs")
    ap.add_argument("--kv-memory", default=None, help="engine: the Recommender's kv_memory (e.g. 300MB, auto); "
                    "default: none, the batch runs as one call")
    args = ap.parse_args(argv)
    from pauserec.bench.latency import _EngineSystem, _HFSystem

    if args.system == "hf-generate":
        system = _HFSystem(args.path, args.threads, args.engine)
    else:
        prepack = {"engine": None, "engine+prepack": True, "engine-unpacked": False}[args.system]
        system = _EngineSystem(args.path, args.threads, prepack=prepack, kv_memory=args.kv_memory)
    loaded, load_peak = rss_kib("VmRSS"), peak_rss_kib()
    rng = np.random.default_rng(0)
    n = len(system.catalog.item_ids)
    users = [rng.choice(n, size=min(args.history_len, n), replace=False) for _ in range(args.batch)]
    timings = system.run(users, 10, args.beams)[0]
    calls = {"calls": int(timings["calls"])} if "calls" in timings else {}  # search calls the batch took
    print(json.dumps({"peak_rss_mb": peak_rss_kib() / 1024, "loaded_rss_mb": loaded / 1024, **calls,
                      "load_peak_rss_mb": load_peak / 1024, "torch_imported": "torch" in sys.modules}))


def rss_kib(field: str = "VmRSS") -> float:
    """A line of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the peak); 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def peak_rss_kib() -> float:
    """This program's peak RSS. VmHWM belongs to the address space made at exec; ru_maxrss would
    also count the parent's pages this process had before exec (a fork of a big benchmark)."""
    return rss_kib("VmHWM") or float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    main()
