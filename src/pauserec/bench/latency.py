"""Latency / throughput of several engines (and HF baselines) on the same users, in one run.

Measurement rules: every system sees the same batches; systems are interleaved
round-robin inside each iteration so machine noise hits all of them alike; we report p50/p95/p99
of batch latency, per-user time, throughput, the time split inside the runtime and peak RSS (each
system measured in a fresh subprocess, since a process's peak RSS only grows), and the 1-minute load
average while it ran (a shared machine's noise, on the record).

Same answers: every system's top-k on every timed call is compared with the HF ``generate``
baseline of the same checkpoint (``agreement``: users with identical ordered top-10, mean overlap,
largest score difference). Baselines: HF ``generate`` in this process; optimum's
``ORTModelForCausalLM.generate`` and ONNX Runtime GenAI's model builder + beam search each in an
environment of its own (``pauserec.bench.workers``). A baseline that cannot follow the trie or returns no
scores (GenAI) is checked against the engine of the same checkpoint and precision instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

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
    spin: bool = False  # ONNX Runtime's intra-op threads busy-wait (engines and the ORT-based baselines alike)
    # baselines in environments of their own (optimum, ONNX Runtime GenAI, OpenVINO GenAI; bench.workers)
    worker_baselines: tuple = ()  # of pauserec.bench.workers.WorkerBaseline


@dataclass
class SystemResult:
    name: str
    kind: str  # direct | pause | cot
    system: str  # "engine" | "hf-generate"
    path: str
    by_batch: dict[str, dict] = field(default_factory=dict)  # "16" -> stats
    peak_rss_mb: float | None = None
    scoring: str | None = None  # full (log-softmax over the vocabulary, as HF) | sid
    agreement: dict | None = None  # top-10 identity + max score difference vs the HF baseline, same users
    facts: dict = field(default_factory=dict)  # system-specific (optimum: export time, session threads, versions)
    precision: str | None = None  # an engine's, or a baseline runtime's conversion (GenAI int4 | int8 | fp32)


def system_name(kind: str, path) -> str:
    """'pause' for an engine in a folder named after its kind, else 'pause:<folder>'."""
    folder = Path(path).name
    return kind if folder == kind else f"{kind}:{folder}"


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "min": float(a.min()), "max": float(a.max())}


# -- systems under test ---------------------------------------------------------------------------
# Each system: .system, .kind, .path, .catalog, .sha (source checkpoint), .scoring and
# .run(histories, k, beams) -> (timings dict, item_index (B, k) int32, scores (B, k) float32).
class _EngineSystem:
    system = "engine"

    def __init__(self, path: Path, threads: int | None, prepack: bool | None = None, impl: str = "auto",
                 wrap: Callable | None = None, label: str | None = None, spin: bool = False,
                 kv_memory: int | str | None = None):
        """``kv_memory``: as ``Recommender``'s; None (default): each batch runs as the calls asked, never split."""
        from pauserec.runtime import Engine, Recommender

        self.system = {None: "engine", True: "engine+prepack", False: "engine-unpacked"}[prepack]
        self.engine = Engine.load(path, threads=threads, prepack=prepack, spin=spin)
        self.rec = Recommender(wrap(self.engine) if wrap else self.engine, impl=impl, kv_memory=kv_memory)
        self.path, self.kind = path, self.engine.manifest.kind
        self.catalog = self.engine.catalog
        self.sha = self.engine.manifest.source.get("sha256")
        self.scoring = self.engine.manifest.scoring
        self.precision = self.engine.manifest.precision
        self.facts = {"prompt": self.engine.prompt.describe()}
        from pauserec.runtime.backends.ort import MergedView

        merged = any(isinstance(v, MergedView) for v in self.engine.sessions.values())
        self.label = label or (system_name(self.kind, path) + " (prepacked, one session)" if merged else None)

    def run(self, histories_idx: list[np.ndarray], k: int, beams: int):
        ids = self.catalog.item_ids
        res = self.rec.recommend([[ids[i] for i in h] for h in histories_idx], k=k, beams=beams)
        return dict(getattr(res, "timings", {}) or {}), res.item_index, res.scores


class _HFSystem:
    system = "hf-generate"
    scoring = "full"
    label = None

    def __init__(self, path: Path, threads: int | None, engine: Path | None = None):
        from pauserec.reference.hf_generate import HFBaseline
        from pauserec.export.bundle import checkpoint_sha256

        self.base = HFBaseline(path, threads=threads, engine=engine)
        self.path, self.kind, self.catalog = path, self.base.spec.kind, self.base.catalog
        self.engine = engine  # whose prompt it runs (a checkpoint without a training card)
        self.sha = checkpoint_sha256(Path(path))
        self.facts = {"prompt": self.base.prompt_source}

    def run(self, histories_idx: list[np.ndarray], k: int, beams: int):
        res = self.base.recommend(histories_idx, k=k, beams=beams)
        return res.timings, res.item_index, res.scores


def engine_of(ckpt: Path, engines: tuple[Path, ...]) -> Path | None:
    """For a checkpoint without a training card: the engine exported from it (its manifest's source sha256),
    whose prompt and catalog its HF baseline runs; None for a pauserec checkpoint. PauserecError if none is."""
    from pauserec.prompt.spec import CARD_FILE
    from pauserec.export.bundle import checkpoint_sha256
    from pauserec.runtime.engine import read_manifest

    if (Path(ckpt) / CARD_FILE).is_file():
        return None
    sha = checkpoint_sha256(Path(ckpt))
    for e in engines:
        if read_manifest(Path(e)).source.get("sha256") == sha:
            return Path(e)
    raise PauserecError(f"--hf-baseline {ckpt} has no {CARD_FILE} (not trained by `pauserec train`), and none of the "
                        "engines given was exported from it (their manifests' source sha256 differ): pass the engine "
                        "exported from this checkpoint too, so the baseline runs the engine's prompt and catalog")


SUFFIX = {"engine": "", "engine+prepack": " (prepacked)", "engine-unpacked": " (unpacked)",
          "hf-generate": " (HF generate)", "optimum-generate": " (optimum ORT generate)"}


def display_name(s) -> str:
    return getattr(s, "label", None) or system_name(s.kind, s.path) + SUFFIX.get(s.system, f" ({s.system})")


def load_systems(cfg: LatencyConfig) -> tuple[list, list[dict]]:
    """(systems, skipped): a baseline whose environment or conversion fails is skipped with its reason."""
    from pauserec.bench.workers import RUNTIMES, WorkerUnavailable, check_precision

    for wb in cfg.worker_baselines:  # argument errors before minutes of loading
        if wb.precision is not None:
            check_precision(RUNTIMES[wb.runtime], wb.precision)
    systems = [_EngineSystem(Path(p), cfg.threads, prepack, spin=cfg.spin) for p in cfg.engines
               for prepack in ((False, True) if cfg.prepack else (None,))]
    systems += [_HFSystem(Path(p), cfg.threads, engine_of(Path(p), cfg.engines)) for p in cfg.hf_baselines]
    skipped = []
    for wb in cfg.worker_baselines:
        try:
            systems.append(wb.start(cfg.threads, engine_of(Path(wb.checkpoint), cfg.engines), spin=cfg.spin))
        except WorkerUnavailable as e:
            skipped.append({"system": RUNTIMES[wb.runtime].system, "path": str(wb.checkpoint),
                            "precision": wb.precision, "reason": str(e)})
    if not systems:
        raise PauserecError("give at least one engine directory (or --hf-baseline checkpoint) to measure")
    ref = systems[0].catalog.item_ids
    for s in systems[1:]:
        if list(s.catalog.item_ids) != list(ref):
            close_all(systems)
            raise PauserecError(
                f"{s.path} was built on a different catalog than {systems[0].path}; "
                "compare systems trained on the same dataset and SID index"
            )
    return systems, skipped


def close_all(systems) -> None:
    for s in systems:
        if hasattr(s, "close"):
            s.close()


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
def _measure(systems, users, cfg: LatencyConfig, tick: Callable[[], None] | None):
    """({system index: {batch size: stats}}, {system index: [(item_index, scores) per timed call]}),
    with systems interleaved inside every iteration (alternating order) on the same batches."""
    if cfg.k > cfg.beams:
        from pauserec.errors import PauserecError

        raise PauserecError(f"--k {cfg.k} > --beams {cfg.beams}: a search with {cfg.beams} beams ranks at most "
                            f"{cfg.beams} SIDs; pass --beams >= --k")
    out: dict[int, dict[str, dict]] = {i: {} for i in range(len(systems))}
    answers: dict[int, list] = {i: [] for i in range(len(systems))}
    for bs in cfg.batch_sizes:
        lat: dict[int, list[float]] = {i: [] for i in range(len(systems))}
        split: dict[int, dict[str, float]] = {i: {} for i in range(len(systems))}
        load: list[float] = []
        for it in range(cfg.warmup + cfg.iters):
            batch = users[(it * bs) % len(users) :][:bs]
            if len(batch) < bs:
                batch = (batch + users)[:bs]
            order = range(len(systems)) if it % 2 == 0 else reversed(range(len(systems)))
            for i in order:
                t0 = time.perf_counter()
                timings, items, scores = systems[i].run(batch, cfg.k, cfg.beams)
                dt = time.perf_counter() - t0
                if it >= cfg.warmup:
                    lat[i].append(dt)
                    answers[i].append((np.asarray(items), np.asarray(scores)))
                    for key, v in timings.items():
                        if isinstance(v, (int, float)) and key not in ("users", "calls"):  # seconds only
                            split[i][key] = split[i].get(key, 0.0) + float(v)
            if it >= cfg.warmup:
                load.append(os.getloadavg()[0])
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
                "spread": stats["p95"] / stats["p50"] if stats["p50"] > 0 else None,
                "loadavg_1m": [min(load), max(load)] if load else None,
            }
    return out, answers


def agreement(mine: list, ref: list) -> dict:
    """Top-10 identity of one system against a reference on the same calls: users whose ordered top-k
    lists are identical, mean set overlap, and the largest |score difference| over the items both return."""
    rows = same = 0
    overlap, max_diff = 0.0, 0.0
    for (items, scores), (ritems, rscores) in zip(mine, ref):
        for a, sa, b, sb in zip(items, scores, ritems, rscores):
            rows += 1
            same += bool(np.array_equal(a, b))
            va, vb = set(int(x) for x in a if x >= 0), set(int(x) for x in b if x >= 0)
            overlap += len(va & vb) / max(len(vb), 1)
            score_of = {int(x): float(y) for x, y in zip(b, sb) if x >= 0}
            for x, y in zip(a, sa):
                if int(x) in score_of and np.isfinite(y) and np.isfinite(score_of[int(x)]):
                    max_diff = max(max_diff, abs(float(y) - score_of[int(x)]))
    return {"users": rows, "identical_top10": same, "identical_rate": same / rows if rows else None,
            "top10_overlap": overlap / rows if rows else None, "max_score_diff": max_diff}


def hf_reference(systems, i: int) -> int | None:
    """Index of the HF baseline system i is checked against: same source checkpoint, else same kind."""
    hf = [j for j, s in enumerate(systems) if s.system == "hf-generate" and j != i]
    same = [j for j in hf if systems[j].sha and systems[j].sha == getattr(systems[i], "sha", None)]
    kind = [j for j in hf if systems[j].kind == systems[i].kind]
    return (same or kind or [None])[0]


def engine_reference(systems, i: int) -> int | None:
    """The engine a baseline is paired with: the same checkpoint at the same precision, else the same checkpoint
    (the default engine first), else the same kind."""
    engines = [j for j, s in enumerate(systems) if s.system.startswith("engine")]
    engines.sort(key=lambda j: systems[j].system != "engine")
    sha = getattr(systems[i], "sha", None)
    same = [j for j in engines if sha and getattr(systems[j], "sha", None) == sha]
    precision = getattr(systems[i], "precision", None)
    exact = [j for j in same if precision and getattr(systems[j], "precision", None) == precision]
    kind = [j for j in engines if systems[j].kind == systems[i].kind]
    return (exact or same or kind or [None])[0]


def answer_reference(systems, i: int) -> int | None:
    """The system whose answers system i's are checked against: its HF baseline, or, for a baseline that does
    not follow the trie or returns no scores, the engine it is paired with."""
    runtime = getattr(systems[i], "runtime", None)
    if runtime is None or (runtime.trie and runtime.scores):
        return hf_reference(systems, i)
    ref = engine_reference(systems, i)
    return ref if ref is not None else hf_reference(systems, i)


def peak_rss_mb(system: str, path: Path, batch: int, beams: int, threads: int | None,
                engine: Path | None = None, history_len: int = 20) -> float | None:
    """Peak RSS of a fresh process that loads one system and serves one batch of seeded ``history_len``-item
    histories (``engine``: the engine whose prompt an HF baseline of a checkpoint without a training card runs)."""
    cmd = [sys.executable, "-m", "pauserec.bench.rss", system, str(path), "--batch", str(batch), "--beams", str(beams),
           "--history-len", str(history_len)]
    if threads:
        cmd += ["--threads", str(threads)]
    if engine is not None:
        cmd += ["--engine", str(engine)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def run_latency(cfg: LatencyConfig, tick: Callable[[], None] | None = None) -> dict:
    """Measure every system; returns the result dict (numbers + ratios + answer checks, no environment)."""
    systems, skipped = load_systems(cfg)
    try:
        users = user_histories(cfg, systems[0].catalog)
        stats, answers = _measure(systems, users, cfg, tick)
        results = []
        for i, s in enumerate(systems):
            r = SystemResult(name=display_name(s), kind=s.kind, system=s.system, path=str(s.path), by_batch=stats[i],
                             scoring=getattr(s, "scoring", None), facts=dict(getattr(s, "facts", {}) or {}),
                             precision=getattr(s, "precision", None))
            ref = answer_reference(systems, i)
            if ref is not None:
                r.agreement = {"reference": display_name(systems[ref]), **agreement(answers[i], answers[ref])}
                if not getattr(getattr(s, "runtime", None), "scores", True):
                    r.agreement["max_score_diff"] = None  # the runtime returns no beam scores
            if hasattr(s, "runtime"):
                r.peak_rss_mb = s.peak_rss_mb()  # the worker's own peak, over every batch it served
            elif cfg.rss:
                r.peak_rss_mb = peak_rss_mb(s.system, Path(s.path), max(cfg.batch_sizes), cfg.beams, cfg.threads,
                                            getattr(s, "engine", None) if s.system == "hf-generate" else None,
                                            cfg.history_len)
            results.append(asdict(r))
    finally:
        close_all(systems)
    return {"config": _jsonable(asdict(cfg)), "systems": results, "ratios": ratios(results, systems),
            "skipped": skipped}


def _p50(r: dict, bs: str) -> float:
    return r["by_batch"][bs]["batch_latency_s"]["p50"]


def reference_index(results: list[dict]) -> int:
    """The system every row's speed-up is against: the first HF baseline, else the first system."""
    return next((i for i, r in enumerate(results) if r["system"] == "hf-generate"), 0)


def _speedups(results: list[dict], fast: int, slow: int) -> dict:
    a, b = results[fast], results[slow]
    return {"engine": a["name"], "baseline": b["name"],
            "by_batch": {bs: _p50(b, bs) / _p50(a, bs) for bs in a["by_batch"] if bs in b["by_batch"]}}


def ratios(results: list[dict], systems=None) -> dict:
    """Speed-ups against the reference system (named), headline pairs and pause vs cot, paper style.

    ``vs_first`` (each p50 over the first system's) is kept for results read by older tools."""
    first = results[0]
    ref = reference_index(results)
    out: dict = {"vs_first": {}, "reference": results[ref]["name"], "speedup_vs_reference": {},
                 "pause_vs_cot": {}, "headline": {}}
    for r in results:
        out["vs_first"][r["name"]] = {bs: _p50(r, bs) / _p50(first, bs) for bs in r["by_batch"]}
        out["speedup_vs_reference"][r["name"]] = {bs: _p50(results[ref], bs) / _p50(r, bs) for bs in r["by_batch"]}
    views = [SimpleNamespace(system=r["system"], kind=r["kind"], precision=r.get("precision"),
                             sha=getattr(systems[j], "sha", None) if systems else None) for j, r in enumerate(results)]
    for base, r in enumerate(results):  # each kind of baseline (the first of it) against the engine it pairs with
        if r["system"].startswith("engine"):
            continue
        key = "engine_vs_" + r["system"].removesuffix("-generate") + (f"_{r['precision']}" if r.get("precision") else "")
        eng = engine_reference(views, base)
        if key not in out["headline"] and eng is not None:
            out["headline"][key] = _speedups(results, eng, base)
    engines = [r for r in results if r["system"].startswith("engine")]
    pause = next((r for r in engines if r["kind"] == "pause"), None)
    cot = next((r for r in engines if r["kind"] == "cot"), None)
    if pause and cot:
        for bs in pause["by_batch"]:
            p, c = _p50(pause, bs), _p50(cot, bs)
            out["pause_vs_cot"][bs] = {"reduction": 1 - p / c, "text": f"{-(1 - p / c) * 100:+.1f} %"}
    return out


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, tuple) else v) for k, v in d.items()}
