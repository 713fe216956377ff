"""`pauserec demo`: the whole pipeline on a fresh machine, no downloads, a few minutes on 2 cores.

data (synthetic unless --data) -> train direct / pause / cot (``pauserec train``'s path: validation every
epoch, early stopping, the best checkpoint) -> export three engines -> quality and
latency benchmarks (+ the HF ``generate`` baseline) -> one report (JSON, Markdown, PNG, and one
self-contained index.html with the tables and plot). Both reports carry cot's Hit@10 / NDCG@10 beside direct's
(``cot_quality``, with the epochs each kind trained) next to the pause vs CoT latency headline, and a WARNING
(also on the console) when cot is under ``report.COT_QUALITY_FLOOR`` of direct's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pauserec.errors import PauserecError

KINDS = ("direct", "pause", "cot")


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("pauserec-demo")
    data: Path | None = None  # None: a seeded synthetic dataset (documented as synthetic)
    index: str | None = None
    preset: str = "tiny"
    train_minutes: float = 1.5  # per model
    epochs: int | None = 6
    beams: int = 20
    batch_sizes: tuple[int, ...] = (1, 16)
    iters: int = 5
    quality_users: int | None = 500  # None: the whole test split
    hf_baseline: bool = True
    seed: int = 0
    threads: int | None = None  # torch / ONNX Runtime threads (None: their defaults)
    force: bool = False


def _prepare_out(cfg: DemoConfig) -> None:
    if cfg.out.exists() and any(cfg.out.iterdir()):
        if not cfg.force:
            raise PauserecError(f"demo output folder {cfg.out} is not empty; pass --force or another --out")
        import shutil

        shutil.rmtree(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Run every stage; returns {"quality": ..., "latency": ..., "files": {...}, "seconds": {...}}."""
    from pauserec.bench.latency import LatencyConfig, run_latency
    from pauserec.bench.quality import run_quality
    from pauserec.bench.report import (
        compare_page,
        cot_quality_check,
        cot_quality_line,
        finish,
        markdown,
        quality_title,
        write_report,
    )
    from pauserec.data.synthetic import write_synthetic
    from pauserec.export import ExportConfig, export_engine
    from pauserec.train.sft import TrainConfig, train

    say = (console or Console()).print
    _prepare_out(cfg)
    clock: dict[str, float] = {}
    t_all = time.perf_counter()
    data = cfg.data
    if data is None:
        data = write_synthetic(cfg.out / "data", seed=cfg.seed)
        say(f"[bold]data[/]: synthetic catalog and user histories (seeded) in {data}")
    else:
        say(f"[bold]data[/]: {data} (index {cfg.index or 'default'})")

    ckpts, engines, epochs = {}, {}, {}
    for kind in KINDS:
        t0 = time.perf_counter()
        say(f"[bold]train[/] {kind} ({cfg.preset}, <= {cfg.train_minutes:g} min)")
        res = train(TrainConfig(data=data, index=cfg.index, kind=kind, out=cfg.out / "checkpoints" / kind,
                                preset=cfg.preset, max_minutes=cfg.train_minutes, epochs=cfg.epochs,
                                seed=cfg.seed, threads=cfg.threads, progress=True))
        ckpts[kind], epochs[kind] = res.out, res.epochs
        if res.validation:  # the same path as `pauserec train`: the checkpoint is the best validation epoch
            say(f"  {res.validation['stop_detail']} ({res.validation['users']} validation users)")
        clock[f"train_{kind}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        say(f"[bold]export[/] {kind} -> ONNX engine (validated against the PyTorch model)")
        rep = export_engine(ExportConfig(checkpoint=res.out, out=cfg.out / "engines" / kind, seed=cfg.seed,
                                         threads=cfg.threads))
        engines[kind] = rep.out
        clock[f"export_{kind}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("[bold]quality[/]: Hit/NDCG on the test split, from the engines")
    systems = [run_quality(engines[k], data, cfg.index, beams=cfg.beams, limit=cfg.quality_users, threads=cfg.threads)
               for k in KINDS]
    quality = finish({"systems": systems, "data": str(data), "index": cfg.index}, "quality", threads=cfg.threads)
    cot_check = quality["cot_quality"] = cot_quality_check(quality, epochs)  # in both reports, beside the headline
    clock["quality"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("[bold]latency[/]: engines side by side" + (" + HF generate baseline" if cfg.hf_baseline else ""))
    lcfg = LatencyConfig(engines=tuple(engines[k] for k in ("cot", "pause", "direct")),
                         hf_baselines=(ckpts["pause"],) if cfg.hf_baseline else (), data=data, index=cfg.index,
                         batch_sizes=cfg.batch_sizes, beams=cfg.beams, iters=cfg.iters, warmup=1, seed=cfg.seed,
                         threads=cfg.threads)
    latency = finish({**run_latency(lcfg), "cot_quality": cot_check}, "latency", threads=cfg.threads,
                     manifests=_manifests(engines))
    clock["latency"] = time.perf_counter() - t0

    files = {**write_report(quality, cfg.out / "report", "quality"), **{
        f"latency_{k}": v for k, v in write_report(latency, cfg.out / "report", "latency").items()}}
    page = cfg.out / "report" / "index.html"  # one self-contained page: tables + plot inlined
    page.write_text(compare_page([Path(files["json"]), Path(files["latency_json"])], title="pauserec demo"))
    files["html"] = str(page)
    clock["total"] = time.perf_counter() - t_all
    (cfg.out / "report" / "timings.json").write_text(json.dumps(clock, indent=2) + "\n")
    say("\n[bold]" + quality_title(quality) + "[/]")
    say(markdown(quality), markup=False, soft_wrap=True)
    pop = systems[0]["popularity"]
    say(f"popularity baseline: Hit@10 {pop['hit@10']:.4f}, NDCG@10 {pop['ndcg@10']:.4f}\n")
    say("[bold]Latency[/]")
    say(markdown(latency), markup=False, soft_wrap=True)
    if cot_check and not cot_check["comparable"]:  # loud, last: the pause vs CoT headline is not like with like
        say("[bold red]" + cot_quality_line(cot_check).replace("**", "") + "[/]", highlight=False)
    say(f"report: {cfg.out / 'report'} (one page: {page})  (total {clock['total']:.0f}s)")
    return {"quality": quality, "latency": latency, "files": files, "seconds": clock}


def _manifests(engines: dict) -> dict:
    from pauserec.runtime.engine import read_manifest

    out = {}
    for kind, path in engines.items():
        m = read_manifest(Path(path))
        out[kind] = {"format_version": m.format_version, "kind": m.kind, "pause_k": m.pause_k,
                     "precision": m.precision, "source": m.source}
    return out
