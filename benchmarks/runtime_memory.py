"""Peak RSS of a batch job with the CPU runtime's memory options, against the same job without them.

    python benchmarks/runtime_memory.py ENGINE --users 200 --batch-size 8 --out results/.../runtime-memory.json

Runs ``pauserec recommend`` over the same synthetic JSONL (1-20 random catalog items per user, so every
batch has other history lengths) twice, each in a fresh process: with the runtime's session options
(``pauserec.runtime.backends.ort``: no memory patterns, ``GatherSliceToSplitFusion`` off, the arena
shrunk after each prefill) and with those three switched back to ONNX Runtime's defaults. Reports
peak RSS (VmHWM), wall time and whether both runs wrote the same items for every user.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pauserec.bench.env import environment
from pauserec.bench.rss import peak_rss_kib


def _child(mode: str, args: list[str]) -> None:
    """Runs the CLI in this process (mode "defaults": ORT's own memory behaviour) and prints VmHWM."""
    if mode == "defaults":
        from pauserec.runtime.backends import ort as backend

        options = backend.session_options

        def with_patterns(threads, prepack=False):
            opts = options(threads, prepack)
            opts.enable_mem_pattern = True
            return opts

        backend.session_options = with_patterns
        backend.DISABLED_OPTIMIZERS.clear()
        backend.SHRINK_AFTER = ()
    from pauserec.cli.main import app

    try:
        app(args, standalone_mode=False)
    finally:
        print(json.dumps({"peak_rss_mb": peak_rss_kib() / 1024}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        return _child(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(prog="python benchmarks/runtime_memory.py")
    ap.add_argument("engine", type=Path)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from pauserec.runtime import Engine

    ids = list(Engine.load(args.engine, prepack=False).catalog.item_ids)
    rng = np.random.default_rng(0)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        users = Path(tmp) / "users.jsonl"
        with open(users, "w") as f:
            for u in range(args.users):
                n = int(rng.integers(1, 21))
                history = [str(ids[i]) for i in rng.choice(len(ids), size=n, replace=False)]
                f.write(json.dumps({"user_id": str(u), "history": history}) + "\n")
        items = {}
        for mode in ("runtime", "defaults"):
            out = Path(tmp) / f"{mode}.parquet"
            cmd = [sys.executable, __file__, "_child", mode, "recommend", str(args.engine), "-i", str(users), "-o",
                   str(out), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{mode} run failed:\n{proc.stderr[-2000:]}")
            peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
            import pyarrow.parquet as pq

            items[mode] = pq.read_table(out).column("items").to_pylist()
            runs[mode] = {"peak_rss_mb": round(peak, 1), "wall_s": round(wall, 2)}
            print(mode, runs[mode], flush=True)
    weights = (args.engine / "weights.bin").stat().st_size / 1e6
    result = {"benchmark": "runtime-memory", "engine": str(args.engine), "users": args.users,
              "batch_size": args.batch_size, "threads": args.threads, "weights_mb": round(weights, 1), "runs": runs,
              "same_items": items["runtime"] == items["defaults"], "environment": environment(args.threads)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}))


if __name__ == "__main__":
    main()
