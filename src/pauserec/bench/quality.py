"""Recommendation quality of engines (not torch): Hit/NDCG@5/10, SID-level metrics, invalid rate; seeds.

* ``run_quality``: one engine on a dataset split.
* ``summarize_runs``: several engines (seeds) per kind on the same users -> mean, spread (std over seeds,
  min, max) per kind, and a paired bootstrap interval of pause - direct and cot - direct on Hit@10 and
  NDCG@10 (``pauserec.metrics.paired_bootstrap``: users resampled jointly, seeds resampled per kind).
  A kind is said to beat direct only when the whole interval is above 0.
* ``run_quality_seeds``: the protocol end to end: train every kind with ``seeds`` seeds (``pauserec train``'s
  path: validation, best checkpoint), export each, evaluate all on the same users, summarize.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pauserec import metrics
from pauserec.bench.latency import system_name
from pauserec.errors import PauserecError


def _dedupe_rows(sid_ids: np.ndarray) -> np.ndarray:
    """Per row, the SID ids in first-seen order (padding -1 kept at the end)."""
    out = np.full_like(sid_ids, -1)
    for u, row in enumerate(sid_ids):
        seen = list(dict.fromkeys(int(s) for s in row if s >= 0))
        out[u, : len(seen)] = seen
    return out


def run_quality(engine_path: Path, data: Path, *args, **kwargs) -> dict:
    """Evaluate one engine on a dataset split (arguments of ``evaluate_engine``); returns
    {"name", "kind", "path", "metrics", "popularity"}."""
    return evaluate_engine(engine_path, data, *args, **kwargs)[0]


def evaluate_engine(
    engine_path: Path,
    data: Path,
    index: str | None = None,
    split: str = "test",
    beams: int = 20,
    limit: int | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    tick: Callable[[int], None] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """``run_quality``'s result and the per-user Hit@10 / NDCG@10 vectors, each (U,), for paired comparisons."""
    from pauserec.data import load_dataset
    from pauserec.runtime import Engine, Recommender

    if split not in ("test", "valid"):
        raise PauserecError(f"--split must be test or valid, got {split!r}")
    engine = Engine.load(engine_path, threads=threads)
    dataset = load_dataset(data, index=index)
    cat = engine.catalog
    if list(cat.item_ids) != list(dataset.catalog.item_ids) or not np.array_equal(cat.sids, dataset.catalog.sids):
        raise PauserecError(
            f"engine {engine_path} was exported for another catalog than {data} (index {index or 'default'}); "
            "pass the dataset and --index the model was trained on"
        )
    samples = getattr(dataset.splits(max_history=engine.max_history), split)
    n = len(samples) if limit is None else min(limit, len(samples))
    rec = Recommender(engine, batch_size=batch_size)
    ranked_items = np.full((n, 10), -1, np.int64)
    ranked_codes = np.full((n, 10, cat.levels), -1, np.int64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        hist = [[cat.item_ids[i] for i in samples.histories[u]] for u in range(start, stop)]
        res = rec.recommend(hist, k=min(10, beams), beams=beams)  # fewer beams than 10: the rest stays -1
        ranked_items[start:stop, : res.item_index.shape[1]] = res.item_index
        ranked_codes[start:stop, : res.item_index.shape[1]] = res.sids
        if tick:
            tick(stop - start)
    targets = np.asarray(samples.targets[:n], np.int64)
    item_sid = cat.trie.item_sid
    ranked_sids = _dedupe_rows(np.where(ranked_items >= 0, item_sid[np.maximum(ranked_items, 0)], -1))
    m = metrics.summarize(ranked_items, targets, ranked_sids=ranked_sids, target_sids=item_sid[targets],
                          ranked_codes=ranked_codes, catalog_sids=cat.sids)
    pop = metrics.popularity_metrics(dataset.sequences, len(cat.item_ids), targets, split=split)
    kind = engine.manifest.kind
    res = {"name": system_name(kind, engine_path), "kind": kind, "path": str(engine_path),
           "split": split, "beams": beams, "metrics": m, "popularity": pop, "prompt": engine.prompt.describe()}
    return res, metrics.per_user(ranked_items, targets, 10)


# -- several seeds per kind ------------------------------------------------------------------------------
KEYS = ("hit@5", "ndcg@5", "hit@10", "ndcg@10")
PAIRED = ("hit@10", "ndcg@10")


def _spread(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": len(a)}


def summarize_runs(runs: list[dict], per_user: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    """Per kind: mean and spread over its runs; pause/cot - direct: paired bootstrap intervals (95 %).

    ``runs[i]`` is a ``run_quality`` result, ``per_user[i]`` its per-user vectors (same users in every run).
    """
    sizes = {len(v["hit@10"]) for v in per_user}
    if len(sizes) != 1:
        raise PauserecError(f"the runs were evaluated on different numbers of users ({sorted(sizes)}); "
                            "evaluate every engine on the same split with the same --limit")
    kinds: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        kinds.setdefault(r["kind"], []).append(i)
    out: dict = {"kinds": {}, "paired_vs_direct": {}, "users": sizes.pop(), "resamples": resamples}
    for kind, idx in kinds.items():
        out["kinds"][kind] = {"runs": [runs[i]["name"] for i in idx],
                              **{k: _spread([runs[i]["metrics"][k] for i in idx]) for k in KEYS}}
    if "direct" in kinds:
        for kind in (k for k in kinds if k != "direct"):
            out["paired_vs_direct"][kind] = {
                key: metrics.paired_bootstrap(np.stack([per_user[i][key] for i in kinds[kind]]),
                                              np.stack([per_user[i][key] for i in kinds["direct"]]),
                                              resamples=resamples, seed=seed)
                for key in PAIRED
            }
    out["verdicts"] = verdicts(out)
    return out


def verdicts(summary: dict) -> list[str]:
    """One sentence per (kind, metric) against direct, saying 'beats' only when the interval is above 0."""
    lines = []
    for kind, by_key in summary["paired_vs_direct"].items():
        for key, b in by_key.items():
            word = {1: "beats", -1: "trails", 0: "is not distinguishable from"}[b["sign"]]
            lines.append(f"{kind} {word} direct on {key}: {b['diff']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}] "
                         f"({100 * b['ci']:.0f} % paired bootstrap)")
    return lines


def seeds_markdown(summary: dict) -> str:
    """Mean ± std over seeds per kind, then the paired intervals against direct."""
    text = "| kind | seeds | Hit@5 | Hit@10 | NDCG@5 | NDCG@10 |\n|---|---:|---:|---:|---:|---:|\n"
    for kind, k in summary["kinds"].items():
        cells = " | ".join(f"{k[m]['mean']:.4f} ± {k[m]['std']:.4f}" for m in ("hit@5", "hit@10", "ndcg@5", "ndcg@10"))
        text += f"| {kind} | {k['hit@10']['n']} | {cells} |\n"
    pop = summary.get("popularity")
    if pop:
        text += f"| popularity | | {pop['hit@5']:.4f} | {pop['hit@10']:.4f} | {pop['ndcg@5']:.4f} | {pop['ndcg@10']:.4f} |\n"
    if summary["verdicts"]:
        text += f"\n{summary['users']:,} users, ± = std over seeds; intervals: {summary['resamples']} resamples\n"
        text += "".join(f"- {v}\n" for v in summary["verdicts"])
    return text


@dataclass(frozen=True)
class SeedsConfig:
    data: Path
    out: Path
    index: str | None = None
    kinds: tuple[str, ...] = ("direct", "pause", "cot")
    seeds: int = 3
    preset: str = "small"
    pause_k: int = 5
    max_minutes: float | None = None  # per training run (a ceiling; validation picks the weights)
    epochs: int | None = None
    split: str = "test"
    beams: int = 20
    limit: int | None = None
    batch_size: int = 64
    threads: int | None = None
    resamples: int = 1000
    reuse: bool = True  # an engine already in out/runs/<kind>-s<seed>/engine is evaluated, not retrained


def run_quality_seeds(cfg: SeedsConfig, say: Callable[[str], None] = print) -> dict:
    """Train, export and evaluate ``seeds`` seeds of every kind; -> {"systems", "summary", "training"}."""
    if cfg.seeds < 1:
        raise PauserecError(f"--seeds must be >= 1, got {cfg.seeds}")
    runs, vectors, training = [], [], {}
    for kind in cfg.kinds:
        for seed in range(cfg.seeds):
            engine, facts = _trained_engine(cfg, kind, seed, say)
            training[f"{kind}-s{seed}"] = facts
            res, vec = _evaluated(cfg, engine, kind, seed)
            say(f"{kind} seed {seed}: Hit@10 {res['metrics']['hit@10']:.4f}, NDCG@10 {res['metrics']['ndcg@10']:.4f}")
            runs.append(res)
            vectors.append(vec)
    summary = summarize_runs(runs, vectors, cfg.resamples)
    summary["popularity"] = runs[0]["popularity"]
    return {"systems": runs, "summary": summary, "training": training}


def _evaluated(cfg: SeedsConfig, engine: Path, kind: str, seed: int) -> tuple[dict, dict]:
    """``evaluate_engine`` of one run, cached beside its engine (reused while the engine and settings match)."""
    stem = f"eval-{cfg.split}-b{cfg.beams}-n{cfg.limit or 'all'}"
    js, npz = engine.parent / f"{stem}.json", engine.parent / f"{stem}.npz"
    stamp = (engine / "manifest.json").stat().st_mtime
    if cfg.reuse and js.is_file() and npz.is_file():
        res = json.loads(js.read_text())
        if res.get("engine_mtime") == stamp:
            with np.load(npz) as z:
                return res, {k.replace("_at_", "@"): z[k] for k in z.files}
    t0 = time.perf_counter()
    res, vec = evaluate_engine(engine, cfg.data, cfg.index, cfg.split, cfg.beams, cfg.limit, cfg.batch_size, cfg.threads)
    res.update(name=f"{kind}-s{seed}", seed=seed, eval_s=round(time.perf_counter() - t0, 1), engine_mtime=stamp)
    js.write_text(json.dumps(res, indent=2) + "\n")
    np.savez(npz, **{k.replace("@", "_at_"): v for k, v in vec.items()})
    return res, vec


def _trained_engine(cfg: SeedsConfig, kind: str, seed: int, say) -> tuple[Path, dict]:
    """out/runs/<kind>-s<seed>/{checkpoint,engine}: trained (best checkpoint) and exported unless reused."""
    from pauserec.prompt.spec import TrainingCard

    run = Path(cfg.out) / "runs" / f"{kind}-s{seed}"
    ckpt, engine = run / "checkpoint", run / "engine"
    if not (cfg.reuse and (engine / "manifest.json").is_file()):
        from pauserec.export import ExportConfig, export_engine
        from pauserec.train.sft import TrainConfig, train

        say(f"train {kind} seed {seed} -> {ckpt}")
        train(TrainConfig(data=cfg.data, index=cfg.index, kind=kind, out=ckpt, preset=cfg.preset, pause_k=cfg.pause_k,
                          max_minutes=cfg.max_minutes, epochs=cfg.epochs, seed=seed, threads=cfg.threads))
        export_engine(ExportConfig(checkpoint=ckpt, out=engine, seed=seed, threads=cfg.threads, force=True))
    else:
        say(f"reuse {engine}")
    t = TrainingCard.load(ckpt).train
    v = t.get("validation") or {}
    facts = {k: t.get(k) for k in ("epochs", "steps", "wall_time_s", "stop_reason", "final_loss")}
    facts.update(chosen_epoch=v.get("chosen_epoch"), val_best=v.get("best"), val_share=v.get("share_of_sft_time"))
    return engine, facts


def write_seeds_report(result: dict, out: Path) -> dict[str, str]:
    """quality-seeds.json (numbers, environment) and quality-seeds.md (the table and the verdicts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality-seeds.json", "md": out / "quality-seeds.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(seeds_markdown(result["summary"]))
    return {k: str(v) for k, v in paths.items()}
