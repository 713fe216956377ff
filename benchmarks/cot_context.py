"""cot think step: the whole preallocated context buffer (now) vs a prefix slice of it (before).

    python benchmarks/cot_context.py COT_ENGINE --batches 1,4 --repeats 3 --out results/cot-context/NAME.json

A prefix slice ``buf[:, :, :, :used]`` of the (layers, B, Hkv, C, D) buffer is not contiguous, so ONNX
Runtime copied the whole context on every rationale token; now the graph reads the whole buffer with
the unwritten slots masked. Both variants run interleaved on the same users; the top-10 must match.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from pauserec.bench.env import environment
from pauserec.runtime import Engine, Recommender, beam

WHOLE = beam.BeamSearch._think_step


def sliced(self, tok):
    """The think step before: a prefix slice of the buffer (copied by ONNX Runtime)."""
    e, upto = self.e, self.used
    lp, nk, nv = e.think(tok, self.buf_key[:, :, :, :upto], self.buf_value[:, :, :, :upto], self.buf_mask[:, :upto])
    self.buf_key[:, :, :, self.used], self.buf_value[:, :, :, self.used] = nk[:, :, :, 0], nv[:, :, :, 0]
    return lp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rec = Recommender(Engine.load(args.engine, threads=args.threads))
    ids = list(rec.catalog.item_ids)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        users = [[ids[j] for j in rng.integers(0, len(ids), size=10)] for _ in range(batch)]
        runs = {"sliced": [], "whole": []}
        items = {}
        for _ in range(args.repeats):
            for name, fn in (("sliced", sliced), ("whole", WHOLE)):
                beam.BeamSearch._think_step = fn
                t0 = time.perf_counter()
                r = rec.recommend(users, k=10, beams=20)
                runs[name].append({"total_s": time.perf_counter() - t0, "rationale_s": r.timings["rationale"]})
                items[name] = r.items.tolist()
        beam.BeamSearch._think_step = WHOLE
        row = {"batch": batch, "same_top10": items["sliced"] == items["whole"]}
        for name, v in runs.items():
            row[name] = {k: statistics.median(x[k] for x in v) for k in ("total_s", "rationale_s")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "cot-context", "engine": args.engine.name, "rows": rows,
                                    "load_average_after": os.getloadavg(),
                                    "environment": environment(threads=args.threads)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
