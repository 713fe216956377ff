"""The batch job at scale: peak memory against the number of users, and users/s local vs a Ray cluster.

    python benchmarks/batch_job.py memory ENGINE --users 10000 100000 1000000 --out results/batch-job/memory.json
    python benchmarks/batch_job.py throughput ENGINE --users 4000 --out results/batch-job/throughput.json

``memory`` runs ``run_batch`` over synthetic JSONL inputs of growing size, each in a fresh process
(peak RSS = VmHWM of that process), once with the real engine on the smallest input and once per
size with a constant-time stub recommender, which isolates what the job itself holds (streaming
input, parts, merge, duplicate detection) from the engine. Flat peak RSS = memory does not grow
with the input.

``throughput`` runs the same input through the local job (a fresh process, 1 and all threads) and
through ``run_ray`` on a simulated cluster grown from 1 to ``--nodes`` worker nodes of ``--node-cpus``
CPUs (one actor per node; the engine read from a ``file://`` URI into per-node caches), checks that
every run writes the same items for every user, and reports users/s (median of ``--repeats``) and
each actor's peak RSS. The simulated nodes share this machine's cores: more nodes than cores
measure the pool's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pauserec.bench.env import environment


def write_users(path: Path, ids: list[str], n: int, seed: int = 0) -> None:
    """n users with 1..20 random catalog items each (a duplicate id and a bad row every 10,000)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            if i % 10_000 == 9_999:
                f.write('{"user_id": "broken", "history": [\n')
                continue
            hist = [ids[j] for j in rng.integers(0, len(ids), size=int(rng.integers(1, 21)))]
            f.write(json.dumps({"user_id": f"u{i - 1 if i % 10_000 == 5_000 else i}", "history": hist}) + "\n")


STUB = '''
import numpy as np
class Stub:
    """Constant-time recommender: the job's own cost and memory, without an engine."""
    max_history = 20
    def __init__(self, ids): self.ids = ids
    def validate_history(self, h): return None if h else "empty history"
    def validate_filter(self, ids, what): return None
    def recommend(self, histories, k=10, beams=20, **filters):
        class R: pass
        r = R(); b = len(histories)
        r.item_index = np.tile(np.arange(k, dtype=np.int32), (b, 1))
        r.items = np.array(self.ids[:k])[r.item_index]
        r.scores = np.tile(-np.arange(k, dtype=np.float32), (b, 1))
        r.sids = np.zeros((b, k, 4), np.int32)
        return r
'''

RUN = '''
import json, sys, time
from pathlib import Path
from pauserec.bench.rss import peak_rss_kib
from pauserec.frontends.batch import BatchConfig, run_batch
mode, engine, inp, out, threads = sys.argv[1:6]
if mode == "stub":
    from pauserec.data import Catalog
    exec(STUB)
    ids = list(Catalog.load(Path(engine) / "catalog.npz").item_ids)
    rec = Stub(ids)
else:
    from pauserec.runtime import Engine, Recommender
    rec = Recommender(Engine.load(engine, threads=int(threads)))
t0 = time.perf_counter()
report = run_batch(BatchConfig(input=Path(inp), output=Path(out), k=10, beams=20, batch_size=64), rec)
print(json.dumps({"seconds": time.perf_counter() - t0, "rows_in": report.input_rows, "ok": report.ok,
                  "errors": report.errors, "duplicates": report.duplicates, "peak_rss_mb": peak_rss_kib() / 1024}))
'''


def _run_job(mode: str, engine: Path, inp: Path, out: Path, threads: int) -> dict:
    code = f"STUB = {STUB!r}\n" + RUN
    res = subprocess.run([sys.executable, "-c", code, mode, str(engine), str(inp), str(out), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory(args) -> dict:
    from pauserec.data import Catalog

    ids = list(Catalog.load(args.engine / "catalog.npz").item_ids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.users:
            inp = Path(tmp) / f"users-{n}.jsonl"
            write_users(inp, ids, n)
            modes = ["stub"] + (["engine"] if n <= args.engine_users else [])
            for mode in modes:
                out = Path(tmp) / f"recs-{mode}-{n}.parquet"
                r = _run_job(mode, args.engine, inp, out, args.threads)
                r.update(mode=mode, users=n, input_mb=inp.stat().st_size / 2**20,
                         output_mb=out.stat().st_size / 2**20)
                print(json.dumps(r), flush=True)
                rows.append(r)
                out.unlink()
            inp.unlink()
    return {"runs": rows}


def throughput(args) -> dict:
    """Users/s of the local job (1 and all threads, each in a fresh process) and of the Ray job on a cluster of
    1..--nodes simulated worker nodes of --node-cpus CPUs each (``ray.cluster_utils.Cluster`` on this machine:
    the nodes share its cores), same input, interleaved repeats; every run must write the same items."""
    import ray
    from ray.cluster_utils import Cluster

    from pauserec.data import Catalog
    from pauserec.frontends.batch import BatchConfig
    from pauserec.runtime.engine_cache import CACHE_ENV
    from pauserec.frontends.ray_job import run_ray

    ids = list(Catalog.load(args.engine / "catalog.npz").item_ids)
    runs: list[dict] = []
    items: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inp = tmp / "users.jsonl"
        write_users(inp, ids, args.users)
        os.environ[CACHE_ENV] = str(tmp / "cache-driver")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            for nodes in range(1, args.nodes + 1):
                cluster.add_node(num_cpus=args.node_cpus, env_vars={CACHE_ENV: str(tmp / f"cache-node{nodes}")})
                cluster.wait_for_nodes()
                for rep in range(args.repeats):
                    systems = [f"ray-{nodes}-nodes"] + ([f"local-{t}-threads" for t in sorted({1, args.threads})]
                                                        if nodes == 1 or rep == 0 else [])
                    for name in systems:
                        out = tmp / f"{name}-{rep}.jsonl"
                        if name.startswith("local"):
                            r = _run_job("engine", args.engine, inp, out, int(name.split("-")[1]))
                            run = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
                        else:
                            cfg = BatchConfig(input=inp, output=out, k=10, beams=20, batch_size=64)
                            t0 = time.perf_counter()
                            run_ray(cfg, args.engine.resolve().as_uri(), threads=args.node_cpus)
                            seconds = time.perf_counter() - t0
                            runner = json.loads(cfg.summary_path.read_text())["runner"]
                            run = {"seconds": seconds, "actors": len(runner["actor_stats"]),
                                   "actor_peak_rss_mb": [round(a["peak_rss_bytes"] / 2**20, 1)
                                                         for a in runner["actor_stats"]],
                                   "rows_per_actor": [a["rows"] for a in runner["actor_stats"]]}
                        run.update(system=name, repeat=rep, users_per_s=args.users / run["seconds"])
                        items[name] = [r["items"] for r in map(json.loads, out.read_text().splitlines())]
                        print(json.dumps(run), flush=True)
                        runs.append(run)
                        for f in tmp.glob(f"{name}-{rep}*"):
                            f.unlink()
        finally:
            ray.shutdown()
            cluster.shutdown()
    by: dict[str, list[float]] = {}
    for r in runs:
        by.setdefault(r["system"], []).append(r["users_per_s"])
    local = statistics.median(by[f"local-{args.threads}-threads"])
    return {"users": args.users, "node_cpus": args.node_cpus, "machine_cores": os.cpu_count(),
            "same_items_for_every_user": all(v == items[f"local-{args.threads}-threads"] for v in items.values()),
            "users_per_s": {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                            for n, v in by.items()},
            "vs_local_all_threads": {n: statistics.median(v) / local for n, v in by.items()}, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["memory", "throughput"])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--users", type=int, nargs="+", default=None)
    ap.add_argument("--engine-users", type=int, default=10_000, help="memory: also run the real engine up to this size")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3, help="throughput: simulated Ray worker nodes (1..N)")
    ap.add_argument("--node-cpus", type=int, default=1, help="throughput: CPUs of each simulated node")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.what == "memory":
        args.users = args.users or [10_000, 100_000, 1_000_000]
        result = memory(args)
    else:
        args.users = (args.users or [4000])[0]
        result = throughput(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result["load_average_after"] = os.getloadavg()  # other work on the machine skews users/s
    args.out.write_text(json.dumps({"benchmark": f"batch-job-{args.what}", "engine": str(args.engine.name),
                                    "environment": environment(threads=args.threads), **result}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
