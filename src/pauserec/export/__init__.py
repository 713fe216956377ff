"""Checkpoint -> engine directory: our graph wrappers, ONNX export, validation, manifest, TensorRT.

``export_engine(ExportConfig(checkpoint, out, ...)) -> ExportReport`` is the one entry point (the
``pauserec-export`` command is a thin layer over it). torch, transformers and onnx are imported
inside the functions, so importing this package stays cheap.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pauserec.errors import ExportError

PRECISIONS = ("fp32", "fp16", "int8")
BACKENDS = ("onnx", "tensorrt")
Progress = Callable[[str, str], None]  # (stage, detail)


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    out: Path
    precision: str = "fp32"
    backend: str = "onnx"
    static: bool = False
    batch: int | None = None  # static only
    beams: int | None = None  # static only
    max_history: int | None = None  # default: the card's
    atol: float | None = None  # default per precision: fp32 1e-4, fp16 5e-2 (int8: reported, never fails)
    force: bool = False
    kind: str | None = None  # overrides of (or stand-ins for) the training card
    pause_k: int | None = None
    catalog: Path | None = None
    max_rationale: int | None = None
    data: Path | None = None  # dataset folder: int8 Hit@10 is measured on its test split
    quant_sample: int = 64  # users in the int8 comparison sample
    exporter: str = "torchscript"
    seed: int = 0
    threads: int | None = None


@dataclass(frozen=True)
class ExportReport:
    out: Path
    kind: str
    precision: str
    backend: str
    static: bool
    files: dict[str, int]  # file -> bytes
    checks: list[dict]  # every validation check (graph, case, output, max_abs_err, atol, precision, ok)
    quantized: dict | None  # int8: Hit@10 / top-10 agreement with the fp32 graphs
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    @property
    def max_abs_err(self) -> dict[str, float]:
        """Largest log-prob error per graph, of the graphs in the engine (this precision)."""
        out: dict[str, float] = {}
        for c in self.checks:
            if c["precision"] == self.precision:
                err = float("inf") if c["max_abs_err"] is None else c["max_abs_err"]
                out[c["graph"]] = max(out.get(c["graph"], 0.0), err)
        return out


def _check_config(cfg: ExportConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.backend not in BACKENDS:
        raise ExportError(f"unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if cfg.static and (not cfg.batch or not cfg.beams or cfg.batch < 1 or cfg.beams < 1):
        raise ExportError("--static needs --batch B and --beams K (both >= 1), and optionally --max-history N")
    if not cfg.static and (cfg.batch or cfg.beams):
        raise ExportError("--batch/--beams freeze shapes and need --static; drop them for a dynamic engine")
    if cfg.backend == "tensorrt" and not cfg.static:
        raise ExportError("--backend tensorrt builds from static graphs: add --static --batch B --beams K")
    if cfg.backend == "tensorrt" and cfg.precision == "int8":
        raise ExportError("int8 TensorRT plans need calibration, which pauserec does not do; use --precision fp16")
    from pauserec.export.onnx import OPSETS

    if cfg.exporter not in OPSETS:
        raise ExportError(f"unknown exporter {cfg.exporter!r}; choose one of {', '.join(OPSETS)}")
    if cfg.kind is not None and cfg.kind not in ("direct", "pause", "cot"):
        raise ExportError(f"unknown --kind {cfg.kind!r}; choose direct, pause or cot")


def export_engine(cfg: ExportConfig, progress: Progress | None = None) -> ExportReport:
    """Export, validate and write an engine directory; nothing is left at ``cfg.out`` on failure."""
    from pauserec.export import bundle

    _check_config(cfg)
    out = Path(cfg.out)
    bundle.check_out_dir(out, cfg.force)
    if cfg.backend == "tensorrt":
        from pauserec.export.trt import require_tensorrt

        require_tensorrt()
    say = progress or (lambda stage, detail: None)
    stage_dir: Path | None = None
    from pauserec.export.validate import torch_threads

    try:
        stage_dir = bundle.staging_dir(out)
        with torch_threads(cfg.threads):
            report = _run(cfg, stage_dir, say)
        say("publish", str(out))
        bundle.publish(stage_dir, out)
        stage_dir = None
        return report
    except OSError as e:
        raise bundle.write_failure(out, e) from e
    finally:
        if stage_dir is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)


def _run(cfg: ExportConfig, stage: Path, say: Progress) -> ExportReport:
    from pauserec.export import bundle, onnx, validate
    from pauserec.export.spec import freeze, graph_specs, resolve_dims

    clock: dict[str, float] = {}
    t0 = time.perf_counter()
    say("load", str(cfg.checkpoint))
    src = bundle.load_sources(Path(cfg.checkpoint), cfg.kind, cfg.pause_k, cfg.catalog, cfg.max_history,
                              cfg.max_rationale)
    source_sha = bundle.checkpoint_sha256(Path(cfg.checkpoint))
    built = build_graphs(src.model, src.spec)
    specs = graph_specs(built.shape)
    env = {n: resolve_dims(n, built.shape, cfg.batch, cfg.beams, src.spec.max_history) for n in specs} if cfg.static else None
    if env:
        specs = {n: freeze(s, env[n]) for n, s in specs.items()}
    clock["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fp32_dir = stage / "_fp32"
    fp32_dir.mkdir()
    files32 = {}
    for name, spec in specs.items():
        say("export", f"{name} graph ({onnx.exporter_info(cfg.exporter)['exporter']})")
        files32[name] = onnx.export_graph(built.modules[name], spec, built.example(name, env[name] if env else None),
                                          fp32_dir / spec.file, not cfg.static, cfg.exporter)
    clock["export"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("validate", "fp32 graphs vs the HF model")
    static_env = env["decode" if "decode" in specs else "prefill"] if env else None
    validate_args = dict(model=src.model, spec=src.spec, catalog=src.catalog, shape=built.shape,
                         static_env=static_env, seed=cfg.seed, threads=cfg.threads)
    atol = cfg.atol if cfg.atol is not None and cfg.precision == "fp32" else validate.ATOL["fp32"]
    checks = validate.validate_graphs(files=files32, atol=atol, **validate_args)
    validate.raise_mismatches(checks, "fp32")
    clock["validate"] = time.perf_counter() - t0

    common = dict(spec=src.spec, catalog=src.catalog, dims=built.dims, shape=built.shape, graphs=specs,
                  static_env=static_env, exporter=onnx.exporter_info(cfg.exporter), source=Path(cfg.checkpoint),
                  source_sha=source_sha)
    quantized = None
    if cfg.precision != "fp32":
        t0 = time.perf_counter()
        lower, quantized = _lower_precision(cfg, src, specs, files32, stage, common, validate_args, say)
        checks += lower
        clock[cfg.precision] = time.perf_counter() - t0
    plans: dict[str, str] = {}
    if cfg.backend == "tensorrt":
        from pauserec.export.trt import build_plans

        t0 = time.perf_counter()
        say("tensorrt", "building .plan files")
        plans = build_plans(files32, specs, stage, fp16=cfg.precision == "fp16")
        clock["tensorrt"] = time.perf_counter() - t0
    if cfg.precision == "fp32":
        for path in files32.values():
            path.replace(stage / path.name)
    shutil.rmtree(fp32_dir)

    say("write", "catalog.npz + manifest.json")
    src.catalog.save(stage / bundle.CATALOG_FILE)
    validation = validate.summarize(checks) + ([{"graph": "engine", "case": "int8 sample", **quantized}] if quantized else [])
    manifest = bundle.finish(stage, bundle.manifest_dict(**common, precision=cfg.precision, backend=cfg.backend,
                                                         validation=validation, plans=plans))
    files = {p.name: p.stat().st_size for p in sorted(stage.iterdir()) if p.is_file()}
    return ExportReport(out=Path(cfg.out), kind=src.spec.kind, precision=cfg.precision, backend=cfg.backend,
                        static=cfg.static, files=files, checks=validate.summarize(checks), quantized=quantized,
                        seconds=clock, manifest=manifest)


def _lower_precision(cfg, src, specs, files32, stage: Path, common: dict, validate_args: dict, say):
    """fp16: convert + validate (within --atol). int8: quantize, measure errors, compare engines."""
    import numpy as np

    from pauserec.export import bundle, onnx, validate

    if cfg.precision == "fp16":
        say("fp16", "converting weights and KV to float16")
        files = {n: onnx.to_fp16(files32[n], stage / s.file, s) for n, s in specs.items()}
        say("validate", "fp16 graphs vs the HF model")
        atol = cfg.atol if cfg.atol is not None else validate.ATOL["fp16"]
        checks = validate.validate_graphs(files=files, atol=atol, kv_dtype=np.float16, precision="fp16",
                                          **validate_args)
        validate.raise_mismatches(checks, "fp16")
        return checks, None
    say("int8", "onnxruntime dynamic quantization")
    files = {n: onnx.to_int8(files32[n], stage / s.file) for n, s in specs.items()}
    checks = validate.validate_graphs(files=files, atol=validate.ATOL["int8"], precision="int8", **validate_args)
    fp32_dir = next(iter(files32.values())).parent  # two complete engines, to compare recommendations
    for folder, precision in ((fp32_dir, "fp32"), (stage, "int8")):
        src.catalog.save(folder / bundle.CATALOG_FILE)
        bundle.finish(folder, bundle.manifest_dict(**common, precision=precision, backend="onnx", validation=[],
                                                   plans={}))
    say("int8", "Hit@10 change on a sample")
    return checks, _quantized_report(cfg, src, fp32_dir, stage)


def _quantized_report(cfg: ExportConfig, src, fp32_dir: Path, q_dir: Path) -> dict:
    """Sample of the test split (``--data``), else of random catalog histories (no targets then)."""
    import numpy as np

    from pauserec.export.validate import compare_quantized

    n = cfg.quant_sample
    ids = src.catalog.item_ids
    targets = None
    if cfg.data is not None:
        from pauserec.data import load_dataset

        test = load_dataset(cfg.data, src.card.index if src.card and src.card.index else None).splits(
            src.spec.max_history).test
        pick = np.random.default_rng(cfg.seed).permutation(len(test))[:n]
        histories = [[ids[i] for i in test.histories[p]] for p in pick]
        targets = [ids[int(test.targets[p])] for p in pick]
    else:
        rng = np.random.default_rng(cfg.seed)
        histories = [[ids[i] for i in rng.integers(0, len(ids), size=int(rng.integers(1, src.spec.max_history + 1)))]
                     for _ in range(n)]
    beams = cfg.beams or 20
    return compare_quantized(fp32_dir, q_dir, histories, targets, beams=beams)


@dataclass
class BuiltGraphs:
    dims: object
    shape: object
    modules: dict
    example: Callable


def build_graphs(model, spec) -> BuiltGraphs:
    """The torch wrappers of one engine plus example inputs for the exporter."""
    import torch

    from pauserec.export.graphs import Core, DecodeGraph, PrefillGraph, ThinkGraph
    from pauserec.export.spec import ModelShape

    core = Core(model)
    d = core.dims
    sid = [list(x) for x in spec.sid_token_ids]
    shape = ModelShape(kind=spec.kind, layers=d.layers, kv_heads=d.kv_heads, head_dim=d.head_dim, vocab=d.vocab,
                       codebook_sizes=tuple(len(x) for x in sid), prefix_len=len(spec.instruction_ids),
                       suffix_len=len(spec.think_suffix), max_rationale=spec.max_rationale if spec.kind == "cot" else 0)
    modules = {"prefill": PrefillGraph(core, spec.instruction_ids, spec.think_suffix,
                                       None if spec.kind == "cot" else sid[0])}
    if shape.levels > 1:
        modules["decode"] = DecodeGraph(core, spec.instruction_ids, sid)
    if spec.kind == "cot":
        modules["think"] = ThinkGraph(core, spec.instruction_ids)
    dtype = core.embed.weight.dtype

    def example(name: str, env: dict | None) -> tuple:
        e = env or {"batch": 2, "beams": 3, "hist": 2 * (shape.levels + 1), "ctx": 2 * (shape.levels + 1) + shape.suffix_len}
        b, k, t, c = e["batch"], e["beams"], e["hist"], e["ctx"]
        kv = torch.zeros(d.layers, b, d.kv_heads, c, d.head_dim, dtype=dtype)
        cmask = torch.ones(b, c, dtype=torch.long)
        if name == "prefill":
            return torch.full((b, t), spec.pad_id, dtype=torch.long), torch.ones(b, t, dtype=torch.long)
        if name == "think":
            return torch.zeros(b, dtype=torch.long), kv, kv.clone(), cmask
        bkv = torch.zeros(d.layers, b, d.kv_heads, k, shape.levels - 1, d.head_dim, dtype=dtype)
        return torch.zeros(b, k, dtype=torch.long), torch.tensor(0), kv, kv.clone(), cmask, bkv, bkv.clone()

    return BuiltGraphs(dims=d, shape=shape, modules=modules, example=example)


__all__ = ["BACKENDS", "PRECISIONS", "ExportConfig", "ExportReport", "build_graphs", "export_engine"]
