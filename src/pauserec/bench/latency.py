"""Latency / throughput of several engines (and HF baselines) on the same users, in one run.

Measurement rules (DESIGN §12): every system sees the same batches; systems are interleaved
round-robin inside each iteration so machine noise hits all of them alike; we report p50/p95/p99
of batch latency, per-user time, throughput, the time split inside the runtime and peak RSS (each
system measured in a fresh subprocess, since a process's peak RSS only grows).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pauserec.errors import PauserecError


@dataclass(frozen=True)
class LatencyConfig:
    engines: tuple[Path, ...]
    hf_baselines: tuple[Path, ...] = ()
    data: Path | None = None  # users come from this dataset's test split; else random catalog histories
    index: str | None = None
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    beams: int = 20
    k: int = 10
    warmup: int = 2
    iters: int = 10
    threads: int | None = None
    history_len: int = 20  # for random histories
    seed: int = 0
    rss: bool = True
    prepack: bool = False  # also run every engine with ONNX Runtime's per-session prepacked weights


@dataclass
class SystemResult:
    name: str
    kind: str  # direct | pause | cot
    system: str  # "engine" | "hf-generate"
    path: str
    by_batch: dict[str, dict] = field(default_factory=dict)  # "16" -> stats
    peak_rss_mb: float | None = None


def system_name(kind: str, path) -> str:
    """'pause' for an engine in a folder named after its kind, else 'pause:<folder>'."""
    folder = Path(path).name
    return kind if folder == kind else f"{kind}:{folder}"


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "min": float(a.min()), "max": float(a.max())}


# -- systems under test ---------------------------------------------------------------------------
class _EngineSystem:
    system = "engine"

    def __init__(self, path: Path, threads: int | None, prepack: bool | None = None):
        from pauserec.runtime import Engine, Recommender

        self.system = {None: "engine", True: "engine+prepack", False: "engine-unpacked"}[prepack]
        self.engine = Engine.load(path, threads=threads, prepack=prepack)
        self.rec = Recommender(self.engine)
        self.path, self.kind = path, self.engine.manifest["kind"]
        self.catalog = self.engine.catalog

    def run(self, histories_idx: list[np.ndarray], k: int, beams: int) -> dict[str, float]:
        ids = self.catalog.item_ids
        res = self.rec.recommend([[ids[i] for i in h] for h in histories_idx], k=k, beams=beams)
        return dict(getattr(res, "timings", {}) or {})


class _HFSystem:
    system = "hf-generate"

    def __init__(self, path: Path, threads: int | None):
        from pauserec.bench.baseline_hf import HFBaseline

        self.base = HFBaseline(path, threads=threads)
        self.path, self.kind, self.catalog = path, self.base.spec.kind, self.base.catalog

    def run(self, histories_idx: list[np.ndarray], k: int, beams: int) -> dict[str, float]:
        return self.base.recommend(histories_idx, k=k, beams=beams).timings


def load_systems(cfg: LatencyConfig) -> list:
    systems = [_EngineSystem(Path(p), cfg.threads, prepack) for p in cfg.engines
               for prepack in ((False, True) if cfg.prepack else (None,))]
    systems += [_HFSystem(Path(p), cfg.threads) for p in cfg.hf_baselines]
    if not systems:
        raise PauserecError("give at least one engine directory (or --hf-baseline checkpoint) to measure")
    ref = systems[0].catalog.item_ids
    for s in systems[1:]:
        if list(s.catalog.item_ids) != list(ref):
            raise PauserecError(
                f"{s.path} was built on a different catalog than {systems[0].path}; "
                "compare systems trained on the same dataset and SID index"
            )
    return systems


def user_histories(cfg: LatencyConfig, catalog) -> list[np.ndarray]:
    """The users every system sees: the dataset's test histories, or seeded random ones."""
    need = max(cfg.batch_sizes) * max(cfg.iters, 1)
    if cfg.data is not None:
        from pauserec.data import load_dataset

        test = load_dataset(cfg.data, index=cfg.index).splits().test
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(test))
        return [np.asarray(test.histories[i]) for i in np.resize(order, need)]
    rng = np.random.default_rng(cfg.seed)
    n = len(catalog.item_ids)
    return [rng.choice(n, size=min(cfg.history_len, n), replace=False) for _ in range(need)]


# -- measuring ------------------------------------------------------------------------------------
def _measure(systems, users, cfg: LatencyConfig, tick: Callable[[], None] | None) -> dict[int, dict[str, dict]]:
    """{system index: {batch size: stats}} with systems interleaved inside every iteration."""
    out: dict[int, dict[str, dict]] = {i: {} for i in range(len(systems))}
    for bs in cfg.batch_sizes:
        lat: dict[int, list[float]] = {i: [] for i in range(len(systems))}
        split: dict[int, dict[str, float]] = {i: {} for i in range(len(systems))}
        for it in range(cfg.warmup + cfg.iters):
            batch = users[(it * bs) % len(users) :][:bs]
            if len(batch) < bs:
                batch = (batch + users)[:bs]
            order = range(len(systems)) if it % 2 == 0 else reversed(range(len(systems)))
            for i in order:
                t0 = time.perf_counter()
                timings = systems[i].run(batch, cfg.k, cfg.beams)
                dt = time.perf_counter() - t0
                if it >= cfg.warmup:
                    lat[i].append(dt)
                    for key, v in timings.items():
                        if isinstance(v, (int, float)) and key != "users":  # seconds only
                            split[i][key] = split[i].get(key, 0.0) + float(v)
            if tick:
                tick()
        for i in lat:
            stats = percentiles(lat[i])
            total = sum(lat[i])
            out[i][str(bs)] = {
                "batch_latency_s": stats,
                "per_user_s": stats["p50"] / bs,
                "throughput_users_per_s": bs * len(lat[i]) / total,
                "time_split_s": {key: v / len(lat[i]) for key, v in split[i].items()},
                "iters": len(lat[i]),
            }
    return out


def peak_rss_mb(system: str, path: Path, batch: int, beams: int, threads: int | None) -> float | None:
    """Peak RSS of a fresh process that loads one system and serves one batch."""
    cmd = [sys.executable, "-m", "pauserec.bench.rss", system, str(path), "--batch", str(batch), "--beams", str(beams)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run_latency(cfg: LatencyConfig, tick: Callable[[], None] | None = None) -> dict:
    """Measure every system; returns the result dict (numbers + ratios, no environment)."""
    systems = load_systems(cfg)
    users = user_histories(cfg, systems[0].catalog)
    stats = _measure(systems, users, cfg, tick)
    results = []
    for i, s in enumerate(systems):
        suffix = {"engine": "", "engine+prepack": " (prepacked)", "engine-unpacked": " (unpacked)"}.get(
            s.system, " (HF generate)")
        r = SystemResult(name=system_name(s.kind, s.path) + suffix,
                         kind=s.kind, system=s.system, path=str(s.path), by_batch=stats[i])
        if cfg.rss:
            r.peak_rss_mb = peak_rss_mb(s.system, Path(s.path), max(cfg.batch_sizes), cfg.beams, cfg.threads)
        results.append(asdict(r))
    return {"config": _jsonable(asdict(cfg)), "systems": results, "ratios": ratios(results)}


def ratios(results: list[dict]) -> dict:
    """Each system's p50 batch latency against the first; pause vs cot reductions, paper style."""
    first = results[0]
    out: dict = {"vs_first": {}, "pause_vs_cot": {}}
    for r in results:
        out["vs_first"][r["name"]] = {
            bs: r["by_batch"][bs]["batch_latency_s"]["p50"] / first["by_batch"][bs]["batch_latency_s"]["p50"]
            for bs in r["by_batch"]
        }
    engines = [r for r in results if r["system"].startswith("engine")]
    pause = next((r for r in engines if r["kind"] == "pause"), None)
    cot = next((r for r in engines if r["kind"] == "cot"), None)
    if pause and cot:
        for bs in pause["by_batch"]:
            p = pause["by_batch"][bs]["batch_latency_s"]["p50"]
            c = cot["by_batch"][bs]["batch_latency_s"]["p50"]
            out["pause_vs_cot"][bs] = {"reduction": 1 - p / c, "text": f"{-(1 - p / c) * 100:+.1f} %"}
    return out


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v) for k, v in d.items()}
