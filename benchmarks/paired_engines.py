"""Variants against a baseline engine on the same users: metrics and a paired bootstrap of variant - baseline.

For one-seed experiments of the same kind (pause k = 10 vs k = 5, other regularisation, ...), which
``pauserec-bench quality`` would pool as seeds of one kind. Every engine ranks the whole split once
(``evaluate_engine``: the engine path, exact trie-constrained search).

    python benchmarks/paired_engines.py BASELINE VARIANT [VARIANT ...] --data DATA --index rkmeans_zcr \
        --out benchmarks/results/training-scientific/seeds/pause-experiments.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from pauserec.bench.env import environment
    from pauserec.bench.quality import evaluate_engine
    from pauserec.metrics import paired_bootstrap

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("variants", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    def run(engine: Path):
        res, vec = evaluate_engine(engine, a.data, a.index, a.split, a.beams, threads=a.threads)
        print(f"{engine.name}: Hit@10 {res['metrics']['hit@10']:.4f}, NDCG@10 {res['metrics']['ndcg@10']:.4f}", flush=True)
        return {"name": engine.name, "kind": res["kind"], "metrics": res["metrics"]}, vec

    base, base_vec = run(a.baseline)
    rows = []
    for v in a.variants:
        res, vec = run(v)
        res["minus_baseline"] = {k: paired_bootstrap(vec[k], base_vec[k], resamples=a.resamples) for k in ("hit@10", "ndcg@10")}
        rows.append(res)
    out = {"benchmark": "paired-engines", "environment": environment(threads=a.threads), "split": a.split,
           "users": int(len(base_vec["hit@10"])), "beams": a.beams, "baseline": base, "variants": rows,
           }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        d = r["minus_baseline"]
        print(f"{r['name']} - {base['name']}: " + ", ".join(
            f"{k} {d[k]['diff']:+.4f} [{d[k]['lo']:+.4f}, {d[k]['hi']:+.4f}]" for k in d))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
