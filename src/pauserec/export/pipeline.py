"""The export pipeline, step by step (``export_engine`` is the entry point).

1. load the checkpoint (model, PromptSpec, catalog) and refuse non-finite weights;
2. build the torch wrappers and export each graph to ONNX (any size: above 2 GB torch writes
   external data);
3. consolidate: one ``weights.bin`` shared by all graphs, each distinct tensor stored once;
4. validate the fp32 graphs against the HF model (every mismatch reported at once);
5. fp16 / int8 / int4: lower the fp32 graphs, then judge the engine by what ranking depends on:
   top-10 agreement with the fp32 engine (and the Hit@10 change on ``--data``'s test split), failing
   below ``min_agreement``;
6. TensorRT plans (optional): built from the graphs of the engine's precision, each checked against
   its ONNX graph on the validation cases (every mismatch listed), then the plans' top-10 against
   the ONNX engine's; catalog, manifest with checksums;
7. load the staged engine with the runtime and recommend once; only then publish it atomically.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pauserec.errors import ExportError
from pauserec.export.config import (BACKENDS, INT4_BLOCKS, INT4_COMPUTE, KV_DTYPES, PRECISIONS, SCORING, ExportConfig,
                                     ExportReport, Progress)
from pauserec.prompt.spec import PromptEncoder
from pauserec.runtime.memory import release_memory
from pauserec.runtime.spec import CAST_WEIGHTS, DTYPES


def _check_config(cfg: ExportConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ExportError(f"unknown precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.backend not in BACKENDS:
        raise ExportError(f"unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if cfg.scoring not in SCORING:
        raise ExportError(f"unknown scoring rule {cfg.scoring!r}; choose one of {', '.join(SCORING)}")
    if cfg.int4_block not in INT4_BLOCKS:
        raise ExportError(f"--int4-block {cfg.int4_block} is not a block size MatMulNBits takes; choose one of "
                          f"{', '.join(map(str, INT4_BLOCKS))}")
    if cfg.int4_compute not in INT4_COMPUTE:
        raise ExportError(f"unknown --int4-compute {cfg.int4_compute!r}; choose one of {', '.join(INT4_COMPUTE)}")
    if cfg.kv_dtype not in KV_DTYPES:
        raise ExportError(f"unknown --kv-dtype {cfg.kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    if cfg.kv_dtype != "float32" and cfg.precision == "fp32":
        raise ExportError(f"--kv-dtype {cfg.kv_dtype} rounds the KV cache, and an fp32 engine is exact (HF's scores "
                          "within 1e-4): use it with --precision int8 or int4 (ranked against fp32 like their weights)"
                          + (", or export --precision fp16" if cfg.kv_dtype == "float16" else ""))
    if cfg.kv_dtype == "int8" and cfg.precision == "fp16":
        raise ExportError("--kv-dtype int8 is for int8 and int4 engines; fp16 engines hold their KV in float16: drop "
                          "--kv-dtype, or export --precision int8 / int4 --kv-dtype int8")
    if cfg.kv_dtype != "float32" and cfg.backend == "tensorrt" and cfg.precision != "fp16":
        raise ExportError(f"--kv-dtype {cfg.kv_dtype} is for the ONNX Runtime engines (int8, int4); TensorRT plans are "
                          "fp16 and hold their KV in float16 already: use --precision fp16")
    if not 0.0 <= cfg.min_agreement <= 1.0:
        raise ExportError(f"--min-agreement is a top-10 overlap in [0, 1], got {cfg.min_agreement}")
    if cfg.static and (not cfg.batch or not cfg.beams or cfg.batch < 1 or cfg.beams < 1):
        raise ExportError("--static needs --batch B and --beams K (both >= 1), and optionally --max-history N")
    if not cfg.static and (cfg.batch or cfg.beams):
        raise ExportError("--batch/--beams freeze shapes and need --static; drop them for a dynamic engine")
    if cfg.backend == "tensorrt" and not cfg.static:
        raise ExportError("--backend tensorrt builds from static graphs: add --static --batch B --beams K")
    if cfg.backend == "tensorrt" and cfg.precision in ("bf16", "int8", "int4"):
        raise ExportError(f"{cfg.precision} TensorRT plans are not built by pauserec; use --precision fp16")
    from pauserec.export.onnx import OPSETS

    if cfg.exporter not in OPSETS:
        raise ExportError(f"unknown exporter {cfg.exporter!r}; choose one of {', '.join(OPSETS)}")
    if cfg.kind is not None and cfg.kind not in ("direct", "pause", "cot"):
        raise ExportError(f"unknown --kind {cfg.kind!r}; choose direct, pause or cot")


def kv_dtype(cfg: ExportConfig) -> str:
    """The engine's KV dtype: float16 for fp16 engines and where asked (--kv-dtype), else float32."""
    return "float16" if cfg.precision == "fp16" else cfg.kv_dtype


def export_engine(cfg: ExportConfig, progress: Progress | None = None) -> ExportReport:
    """Export, validate and write an engine directory; nothing is left at ``cfg.out`` on failure."""
    from pauserec.export import bundle
    from pauserec.export.validate import torch_threads

    _check_config(cfg)
    out = Path(cfg.out)
    bundle.check_out_dir(out, cfg.force)
    if cfg.backend == "tensorrt":
        from pauserec.export.trt import require_tensorrt

        require_tensorrt()
    say = progress or (lambda stage, detail: None)
    stage_dir: Path | None = None
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


def check_finite(model) -> None:
    """ExportError naming every non-finite weight tensor (a diverged training run, say)."""
    from pauserec.train.sft import nonfinite_parameters

    bad = nonfinite_parameters(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(f"the checkpoint has non-finite (NaN/inf) weights in {len(bad)} tensor(s): {shown}. "
                          "Its training diverged or the file is damaged; retrain it (e.g. with a lower --lr) "
                          "or export an earlier checkpoint")


def _run(cfg: ExportConfig, stage: Path, say: Progress) -> ExportReport:
    from pauserec.export import bundle, merge, onnx, validate, weights
    from pauserec.runtime.spec import freeze, graph_specs, resolve_dims

    clock: dict[str, float] = {}
    t0 = time.perf_counter()
    say("load", str(cfg.checkpoint))
    src = bundle.load_sources(cfg)
    spec = src.spec
    say("prompt", f"{spec.layout} ({spec.kind}" + (f", k={spec.pause_k}" if spec.kind == "pause" else "") +
        f"): {len(spec.prefix_ids)} prefix + {len(spec.suffix_ids)} suffix ids fused, history assembled from "
        f"{spec.assembly}, at most {spec.max_history} items / {spec.max_history_tokens} ids")
    if spec.after_ids and (cfg.scoring == "sid" or not cfg.after_sid):
        if not cfg.after_sid:
            say("prompt", f"--no-after-sid: the {len(spec.after_ids)} token(s) the {spec.layout!r} pipeline scores "
                "after the SID are not scored; beams are ranked by the SID alone (fewer decode steps; the order may "
                "differ from the pipeline's own generate)")
        else:  # a one-token level normalises to 0 under the sid rule
            src.warnings.append(f"the {spec.layout!r} pipeline scores {len(spec.after_ids)} token(s) after the SID, "
                                "but the sid rule normalises over each level's codes and has nothing to add: beams are "
                                "ranked by the SID alone, which may order them differently from the pipeline's own "
                                "generate")
        spec = src.spec = spec.replace(after_ids=())
        src.encoder = PromptEncoder(spec, src.catalog, src.tokenizer, src.item_fields)
    elif spec.after_ids:
        say("prompt", f"{len(spec.after_ids)} token(s) after the SID scored as the pipeline's generate scores them: "
            f"{list(spec.after_ids)}")
    for warning in src.warnings:  # (kept in the report's prompt section too)
        say("WARNING", warning)
    if src.streamed is None:  # (streamed: each tensor is checked as it is read)
        check_finite(src.model)
    t1 = time.perf_counter()
    prompt_check = check_prompts(cfg, src)
    clock["prompt_check"] = time.perf_counter() - t1
    source_sha = bundle.checkpoint_sha256(Path(cfg.checkpoint))
    # streamed int8 / int4 / fp16 / bf16: no fp32 engine is written (cot fp16 / bf16 go through one: their ranking
    # reference is it)
    deferred = src.streamed is not None and (cfg.precision in ("int8", "int4") or
                                             (cfg.precision in CAST_WEIGHTS and spec.kind != "cot"))
    if deferred and spec.kind == "cot":
        raise ExportError(f"--stream at {cfg.precision} ranks the engine against the HF model computed one layer at "
                          "a time, which does not generate a cot model's rationales; export this cot model without "
                          "--stream, or with --stream at fp32 or fp16")
    if deferred:  # the fp32 graphs name the checkpoint's tensors; the lowering reads them: no fp32 weights written
        src.streamed.defer = True
    built = build_graphs(src.model, src.spec, cfg.scoring, cfg.fuse_prefix, src.streamed)
    specs = graph_specs(built.shape)
    env = {n: resolve_dims(n, built.shape, cfg.batch, cfg.beams, src.spec.max_history_tokens) for n in specs} if cfg.static else None
    if env:
        specs = {n: freeze(s, env[n]) for n, s in specs.items()}
    clock["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    raw, fp32_dir = stage / "_raw", stage / "_fp32"
    exported = {}
    for name, spec in specs.items():
        say("export", f"{name} graph ({onnx.exporter_info(cfg.exporter)['exporter']})")
        (raw / name).mkdir(parents=True)
        exported[name] = onnx.export_graph(built.modules[name], spec, built.example(name, env[name] if env else None),
                                           raw / name / spec.file, not cfg.static, cfg.exporter)
    say("weights", "one weights.bin for every graph")
    files32 = weights.consolidate(exported, fp32_dir)
    shutil.rmtree(raw)
    merged = None if cfg.static else merge.MERGED_FILE  # static shapes are for TensorRT, which runs the graphs
    if merged and not deferred:  # (deferred: the merged model is built from the lowered graphs)
        say("merge", f"every graph in one CPU model ({merged}), one If branch each: each weight packed once")
        merge.merge_graphs(files32, fp32_dir / merged)
    clock["export"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say("validate", "HF references, then the fp32 graphs against them")
    static_env = env["decode" if "decode" in specs else "prefill"] if env else None
    refs = validate.collect_references(src.model, src.encoder, built.shape, list(specs), static_env,
                                       cfg.seed, cfg.threads, src.streamed)
    t1 = time.perf_counter()
    hf_top = hf_reference_topk(cfg, src, prompt_check, say)
    clock["hf_generate"] = time.perf_counter() - t1
    dims, shape = built.dims, built.shape
    refs.release_model()  # the HF weights go before the engine's are mapped: never both resident
    src.model, built = None, None
    release_memory()
    validate_args = dict(refs=refs, encoder=src.encoder, shape=shape, static_env=static_env,
                         seed=cfg.seed, threads=cfg.threads)
    atol = cfg.atol if cfg.atol is not None else validate.ATOL["fp32"]
    if deferred:  # no fp32 engine exists: the quantized graphs are checked against the same references below
        say("validate", f"no fp32 graphs to run (--stream at {cfg.precision}): the {cfg.precision} graphs are reported "
            "against the HF references, and ranked against the HF model's own top-10")
    checks = [] if deferred else validate.validate_graphs(files=files32, atol=atol, **validate_args)
    if merged and not deferred:
        say("validate", f"{merged} (one prepacked session) against the same references")
        release_memory()  # the graphs' sessions and mapped weights go first: one copy resident at a time
        checks += validate.merged_checks(validate.validate_graphs(
            files=validate.MergedGraphs(fp32_dir / merged, specs, cfg.threads), atol=atol, **validate_args))
    validate.raise_mismatches(checks, "fp32")
    clock["validate"] = time.perf_counter() - t0

    common = dict(spec=src.spec, catalog=src.catalog, dims=dims, shape=shape, graphs=specs,
                  static_env=static_env, exporter=onnx.exporter_info(cfg.exporter), source=Path(cfg.checkpoint),
                  source_sha=source_sha, prefix="fused" if cfg.fuse_prefix else "recomputed", merged=merged)
    quantized = None
    if cfg.precision == "fp32":
        for path in (*files32.values(), fp32_dir / weights.WEIGHTS_FILE, *([fp32_dir / merged] if merged else [])):
            path.replace(stage / path.name)
    else:
        t0 = time.perf_counter()
        lower, quantized = _lower_precision(cfg, src, specs, files32, stage, common, validate_args, say)
        checks += lower
        clock[cfg.precision] = time.perf_counter() - t0
    plans: dict[str, str] = {}
    plan_ranking = None
    if cfg.backend == "tensorrt":
        t0 = time.perf_counter()
        plans, plan_checks, plan_ranking = _tensorrt(cfg, src, specs, stage, common, validate_args, say)
        checks += plan_checks
        clock["tensorrt"] = time.perf_counter() - t0
    shutil.rmtree(fp32_dir, ignore_errors=True)

    say("write", "catalog.npz + manifest.json")
    src.catalog.save(stage / bundle.CATALOG_FILE)
    bundle.write_prompt_files(stage, src)
    validation = validate.summarize(checks) + ([{"graph": "engine", "case": "ranking sample", **quantized}]
                                               if quantized else [])
    if plan_ranking:
        validation.append({"graph": "engine", "case": "tensorrt vs onnx ranking sample", **plan_ranking})
    manifest = bundle.finish(stage, bundle.build_manifest(**common, precision=cfg.precision, backend=cfg.backend,
                                                         validation=validation, plans=plans, kv_dtype=kv_dtype(cfg)))
    t0 = time.perf_counter()
    release_memory()  # what the checks above freed (their engines, the layer-by-layer reference) before one more load
    say("check", "load the engine with the runtime and recommend once")
    rec = smoke_test(stage, src, cfg)  # the staged engine, loaded once for every check below
    if hf_top is not None:
        say("check", f"the engine's top-10 against HF generate + trie on {len(hf_top['histories'])} HF-built prompts")
        prompt_check["hf_generate"] = compare_with_hf(rec, hf_top)
    t1 = time.perf_counter()
    guard = popularity_guard(rec, cfg, src, say)
    del rec
    clock["guard"] = time.perf_counter() - t1
    if guard is not None:
        prompt_check["popularity_guard"] = guard
    clock["check"] = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted(stage.iterdir()) if p.is_file()}
    return ExportReport(out=Path(cfg.out), kind=src.spec.kind, precision=cfg.precision, backend=cfg.backend,
                        static=cfg.static, files=files, checks=validate.summarize(checks), quantized=quantized,
                        seconds=clock, manifest=manifest.to_dict(),
                        prompt={k: v for k, v in prompt_check.items() if k not in ("histories", "prompts")})


def check_histories(cfg: ExportConfig, src, n: int) -> list:
    """``n`` seeded histories of 1..max_history catalog items (dense indices), the longest first."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed + 1)
    items, most = src.catalog.n_items, src.spec.max_history + 2  # longer than kept: truncation is checked too
    lengths = [most, 1] + [int(x) for x in rng.integers(1, most + 1, size=max(0, n - 2))]
    return [rng.integers(0, items, size=k) for k in lengths[:n]]


def check_prompts(cfg: ExportConfig, src) -> dict:
    """The engine's prompt ids against the checkpoint's HF tokenizer on a sample, and every item's text tokenised by
    both (ExportError at a difference); the export's warnings about the prompt go with them."""
    from pauserec.prompt import hf

    histories = check_histories(cfg, src, cfg.prompt_sample)
    said = {"warnings": list(src.warnings)} if src.warnings else {}
    if src.layout is None or src.hf_tok is None:
        why = "the checkpoint has no tokenizer" if src.hf_tok is None else "its card's prompt has no text layout"
        return {"users": 0, "skipped": f"prompt ids not checked against an HF tokenizer: {why}",
                "histories": histories, "prompts": [src.encoder.full(h) for h in histories], **said}
    prompts = hf.check_prompts(src.encoder, src.layout, src.hf_tok, src.catalog, histories, src.item_fields)
    items = hf.check_item_texts(src.layout, src.hf_tok, src.tokenizer, src.catalog, src.item_fields)
    return {"users": len(histories), "identical": len(histories), "item_texts_identical": items,
            "histories": histories, "prompts": prompts, **said}


def hf_reference_topk(cfg: ExportConfig, src, prompt_check: dict, say) -> dict | None:
    """HF ``generate`` + trie top-10 on the HF-built prompts of the first ``check_users`` histories (None when
    the engine cannot be compared: reduced precisions, the ``sid`` scoring rule, or no users asked for)."""
    if cfg.check_users < 1 or cfg.precision != "fp32" or cfg.scoring != "full" or src.streamed is not None:
        return None  # (streamed: generate needs the whole model; the graphs are validated layer by layer instead)
    from pauserec.reference.hf_generate import HFBaseline

    import numpy as np

    n = min(cfg.check_users, len(prompt_check["histories"]))
    beams = cfg.beams or 20
    say("reference", f"HF generate + trie on {n} users (beam {beams}), one user at a time")
    hf = HFBaseline.from_parts(src.model, src.spec, src.catalog)
    # One user per call: generate repeats each prompt per beam before its prefill, and holds full-vocabulary
    # logits of every prompt position; batching users multiplies that memory (9 GB at Qwen3-0.6B for 8 users).
    res = [hf.recommend_prompts([p], 10, beams) for p in prompt_check["prompts"][:n]]
    return {"histories": prompt_check["histories"][:n], "items": np.concatenate([r.item_index for r in res]),
            "scores": np.concatenate([r.scores for r in res]), "beams": beams}


def compare_with_hf(rec, ref: dict, atol: float = 1e-3) -> dict:
    """The engine's (``rec``: a Recommender) top-10 must equal HF's, up to the order of items whose scores tie
    within ``atol``."""
    import numpy as np

    ids = rec.catalog.item_ids
    k = min(10, ref["beams"])  # a search of fewer beams than 10 ranks that many SIDs
    out = rec.recommend([[ids[int(i)] for i in h] for h in ref["histories"]], k=k, beams=ref["beams"])
    ref = {**ref, "items": ref["items"][:, :k], "scores": ref["scores"][:, :k]}
    for u in range(len(ref["histories"])):
        if not same_top(out.item_index[u], out.scores[u], ref["items"][u], ref["scores"][u], atol):
            show = lambda items, scores: ", ".join(f"{ids[int(i)]}:{s:.4f}" for i, s in zip(items, scores) if i >= 0)  # noqa: E731
            raise ExportError(f"the engine's top-10 differs from HF generate + trie for user {u}:\n  engine: "
                              f"{show(out.item_index[u], out.scores[u])}\n  HF:     "
                              f"{show(ref['items'][u], ref['scores'][u])}\nnothing was written; report this with the "
                              "checkpoint's config.json and the prompt layout")
    return {"users": len(ref["histories"]), "identical_top10": True, "beams": ref["beams"],
            "max_score_diff": float(np.max(np.abs(np.where(np.isfinite(out.scores), out.scores, 0) -
                                                  np.where(np.isfinite(ref["scores"]), ref["scores"], 0))))}


def same_top(a_items, a_scores, b_items, b_scores, atol: float) -> bool:
    """Two best-first top-k lists agree: same scores position by position (within ``atol``), and any item in only
    one of them scores within ``atol`` of the other list's last score (a tie at the cut)."""
    import numpy as np

    a_scores, b_scores = np.asarray(a_scores, np.float64), np.asarray(b_scores, np.float64)
    if (a_items >= 0).sum() != (b_items >= 0).sum():
        return False
    valid = a_items >= 0
    if not np.allclose(a_scores[valid], b_scores[valid], atol=atol, rtol=0):
        return False
    sa, sb = dict(zip(a_items[valid].tolist(), a_scores[valid])), dict(zip(b_items[valid].tolist(), b_scores[valid]))
    for item in set(sa) ^ set(sb):
        score, other = (sa[item], b_scores[valid][-1]) if item in sa else (sb[item], a_scores[valid][-1])
        if abs(score - other) > atol:
            return False
    return all(abs(sa[i] - sb[i]) <= atol for i in set(sa) & set(sb))


def smoke_test(engine_dir: Path, src, cfg: ExportConfig):
    """The staged engine loads with the runtime (checksums verified) and recommends valid items; returns its
    ``Recommender`` for the checks that follow."""
    import numpy as np

    from pauserec.errors import PauserecError
    from pauserec.export.validate import check_recommender

    try:
        rec = check_recommender(engine_dir, "cpu", cfg.beams or 20, cfg.threads)
        ids = src.catalog.item_ids
        history = [ids[i] for i in range(min(3, len(ids)))]
        out = rec.recommend([history], k=1, beams=cfg.beams or 2)
    except PauserecError as e:
        raise ExportError(f"the exported engine does not run ({e}); nothing was written. Report this with the "
                          "checkpoint's config.json") from e
    if out.item_index[0, 0] < 0 or not np.isfinite(out.scores[0, 0]):
        raise ExportError("the exported engine recommends nothing valid for a catalog history; nothing was written")
    return rec


def _tensorrt(cfg: ExportConfig, src, specs, stage: Path, common: dict, validate_args: dict, say):
    """Plans from the staged graphs of the engine's precision, each validated against its ONNX graph
    (every mismatch listed), then the plan engine's top-10 against the ONNX engine's on a sample."""
    from pauserec.export import bundle
    from pauserec.export.trt import build_plans, validate_plans

    onnx_files = {n: stage / s.file for n, s in specs.items()}  # fp16 engines: the fp16 graphs
    say("tensorrt", f"building .plan files from the {cfg.precision} graphs")
    plans = build_plans(onnx_files, specs, stage, fp16=cfg.precision == "fp16")
    say("tensorrt", "plans vs the ONNX graphs on the validation cases")
    checks = validate_plans({n: stage / f for n, f in plans.items()}, onnx_files, specs, cfg.precision, validate_args)
    src.catalog.save(stage / bundle.CATALOG_FILE)
    bundle.finish(stage, bundle.build_manifest(**common, precision=cfg.precision, backend=cfg.backend, validation=[],
                                              plans=plans))
    say("tensorrt", f"top-10 agreement of the plans with the ONNX engine on {cfg.quant_sample} users")
    ranking = _ranking_report(cfg, src, stage, stage, providers=("cpu", "tensorrt"))
    floor = cfg.min_agreement if cfg.precision == "fp16" else max(cfg.min_agreement, 0.95)  # fp32: near-ties only
    if ranking["top10_overlap"] < floor:
        raise ExportError(
            f"the TensorRT plans agree with the ONNX engine on only {ranking['top10_overlap']:.3f} of the top-10 "
            f"(floor {floor:.3f}; top-1 {ranking['top1_agreement']:.3f}) on {ranking['sample']} users; nothing was "
            "written. Export without --backend tensorrt, or report this with the TensorRT version and GPU")
    return plans, checks, ranking


def _lower_precision(cfg: ExportConfig, src, specs, files32, stage: Path, common: dict, validate_args: dict, say):
    """bf16 / fp16 / int8 / int4 graphs from the validated fp32 ones, judged by ranking agreement (an exact bf16
    engine, a bf16 checkpoint's with a float32 KV cache, is also held to fp32's tolerance against the HF model)."""
    from pauserec.export import bundle, merge, onnx, quantize, validate

    say(cfg.precision, quantize.LOWERING[cfg.precision] + (f", block {cfg.int4_block}, {cfg.int4_compute} compute"
                                                           if cfg.precision == "int4" else ""))
    fp32_dir = next(iter(files32.values())).parent  # two complete engines, to compare recommendations
    sources = {n: (files32[n], s.file, onnx.float_io(s)) for n, s in specs.items()}
    exact = False  # a bf16 engine that computes what the fp32 engine computes
    if cfg.precision == "fp16":
        files = quantize.fp16_graphs(sources, stage, lazy=src.streamed)
    elif cfg.precision == "bf16":
        files, exact = quantize.bf16_graphs({n: (path, file) for n, (path, file, _) in sources.items()}, stage,
                                            lazy=src.streamed)
        exact = exact and cfg.kv_dtype == "float32"
        say("bf16", "every weight is a bfloat16 value (a bf16 checkpoint): the engine is exact, held to fp32's "
            "tolerance" if exact else "weights rounded to bfloat16" + (" and a rounded KV cache" if cfg.kv_dtype
                                                                       != "float32" else "") + ": ranking decides")
    else:
        files = quantize.quantize_graphs({n: (path, file) for n, (path, file, _) in sources.items()}, stage,
                                         cfg.precision, lazy=src.streamed, accuracy_level=INT4_COMPUTE[cfg.int4_compute],
                                         block=cfg.int4_block)
    if cfg.precision != "fp16" and cfg.kv_dtype != "float32":
        say("kv", f"{cfg.kv_dtype} KV cache at the graphs' boundaries ("
            + ("cast" if cfg.kv_dtype == "float16" else "one scale per key or value vector") + " per layer; compute unchanged)")
        for n, path in files.items():
            onnx.kv_storage(path, *onnx.kv_io(specs[n]), cfg.kv_dtype)
    if common["merged"]:  # built from the final graphs: it computes what they compute
        merge.merge_graphs(files, stage / common["merged"])
    kv = DTYPES[kv_dtype(cfg)]
    atol = (cfg.atol if cfg.atol is not None else validate.ATOL["fp32"]) if exact else validate.ATOL[cfg.precision]
    verdict = "must match it" if exact else "reported; ranking decides"
    if cfg.precision in CAST_WEIGHTS and common["merged"]:
        # The CPU provider has no float16 or bfloat16 MatMul: a graph's own session casts every weight to a float32
        # copy as it loads (the fp32 model whole, beside the fp16 / bf16). The merged model, which the runtime runs,
        # reads the weights inside its branches: there each cast is made in the call, one weight at a time.
        say("validate", f"{cfg.precision} {common['merged']} vs the HF model ({verdict})")
        runner = validate.MergedGraphs(stage / common["merged"], specs, cfg.threads, kv_dtype(cfg), cast_weights=True)
        checks = validate.merged_checks(validate.validate_graphs(
            files=runner, atol=atol, kv_dtype=kv, precision=cfg.precision, **validate_args))
        del runner
    else:
        say("validate", f"{cfg.precision} graphs vs the HF model ({verdict})")
        checks = validate.validate_graphs(files=files, atol=atol, kv_dtype=kv, precision=cfg.precision,
                                          **validate_args)
    if exact:
        validate.raise_mismatches(checks, cfg.precision)
    deferred = src.streamed is not None and src.streamed.defer
    for folder, precision in ((stage, cfg.precision),) if deferred else ((fp32_dir, "fp32"), (stage, cfg.precision)):
        src.catalog.save(folder / bundle.CATALOG_FILE)
        bundle.finish(folder, bundle.build_manifest(**common, precision=precision, backend="onnx", validation=[],
                                                   plans={}, kv_dtype=kv_dtype(cfg) if folder == stage else "float32"))
    reference = "the HF model (one decoder layer at a time)" if deferred else "fp32"
    say(cfg.precision, f"top-10 agreement with {reference} on {cfg.quant_sample} users")
    report = _ranking_report(cfg, src, None if deferred else fp32_dir, stage)
    report["reference"] = "hf-layerwise" if deferred else "fp32-engine"
    if cfg.precision == "bf16":
        report["exact"] = exact
    if cfg.precision == "int4":
        report["int4_compute"] = cfg.int4_compute
        report["int4_block"] = cfg.int4_block
    if report["top10_overlap"] < cfg.min_agreement:
        raise ExportError(
            f"the {cfg.precision} engine agrees with {reference} on only {report['top10_overlap']:.3f} of the top-10 "
            f"(floor {cfg.min_agreement}; top-1 agreement {report['top1_agreement']:.3f}) on {report['sample']} "
            "users; nothing was written. Use a higher precision (bf16 / fp16 > int8 > int4), or lower --min-agreement "
            "if that ranking change is acceptable")
    return checks, report


def _ranking_report(cfg: ExportConfig, src, fp32_dir: Path | None, q_dir: Path, providers=("cpu", "cpu")) -> dict:
    """Sample of the test split (``--data``), else of random catalog histories (no targets then); the reference is
    the engine at ``fp32_dir``, or (None: a streamed quantized export) the HF model one decoder layer at a time."""
    import numpy as np

    from pauserec.export.validate import compare_quantized, compare_with_reference

    n = cfg.quant_sample
    ids = src.catalog.item_ids
    targets = None
    if cfg.data is not None:
        histories, targets, _ = test_split_sample(cfg, src, n)
    else:
        rng = np.random.default_rng(cfg.seed)
        histories = [[ids[i] for i in rng.integers(0, len(ids), size=int(rng.integers(1, src.spec.max_history + 1)))]
                     for _ in range(n)]
    beams = cfg.beams or 20
    if fp32_dir is not None:
        return compare_quantized(fp32_dir, q_dir, histories, targets, beams=beams, providers=providers)
    from pauserec.export.stream import layerwise_topk

    prompts = [src.encoder.full(src.catalog.indices_of(h)[0]) for h in histories]
    items, _ = layerwise_topk(src.streamed, prompts, src.spec, src.catalog, beams, min(10, beams), cfg.scoring)
    ref = np.where(items >= 0, np.asarray(src.catalog.item_ids, dtype=object)[np.maximum(items, 0)], "").astype(str)
    return compare_with_reference(q_dir, histories, ref, targets, beams=beams, provider=providers[1])


def test_split_sample(cfg: ExportConfig, src, n: int) -> tuple[list[list[str]], list[str], object]:
    """``n`` seeded users of ``--data``'s test split: histories and targets as item ids, and the dataset."""
    import numpy as np

    from pauserec.data import load_dataset

    index = str(cfg.index) if cfg.index else (src.card.index if src.card and src.card.index else None)
    ds = load_dataset(cfg.data, index)
    test = ds.splits(src.spec.max_history).test
    ids = ds.catalog.item_ids
    missing = sorted({str(x) for x in ids} - {str(x) for x in src.catalog.item_ids})
    if missing:
        raise ExportError(f"--data {cfg.data} has {len(missing)} items the engine's index lacks (e.g. "
                          f"{', '.join(missing[:3])}); pass the dataset the index was built for")
    pick = np.random.default_rng(cfg.seed).permutation(len(test))[:n]
    return [[ids[i] for i in test.histories[p]] for p in pick], [ids[int(test.targets[p])] for p in pick], ds


def popularity_guard(rec, cfg: ExportConfig, src, say) -> dict | None:
    """With ``--data``: the engine's Hit@10 on a test sample against the most popular items', a warning when the
    model is no better (a prompt that is not the one it was trained with, say). None without ``--data``."""
    if cfg.data is None or cfg.guard_users < 1:
        return None
    import numpy as np

    from pauserec.metrics import popularity_ranking

    histories, targets, ds = test_split_sample(cfg, src, cfg.guard_users)
    say("guard", f"Hit@10 against popularity on {len(targets)} test users of {cfg.data}")
    popular = {ds.catalog.item_ids[i] for i in popularity_ranking(ds.sequences, ds.catalog.n_items, "test", 10)}
    beams = cfg.beams or 20
    got = rec.recommend(histories, k=min(10, beams), beams=beams)
    hit = float(np.mean([t in set(row) for t, row in zip(targets, got.items.tolist())]))
    pop = float(np.mean([t in popular for t in targets]))
    out = {"users": len(targets), "hit10": hit, "popularity_hit10": pop}
    if hit <= pop:
        out["warning"] = (f"the model does no better than popularity under the declared prompt (Hit@10 {hit:.4f} vs "
                          f"{pop:.4f} on {len(targets)} test users): check --prompt (the template, separator, "
                          "history length) and --index against what the model was trained with")
        say("WARNING", out["warning"])
    return out


@dataclass
class BuiltGraphs:
    dims: object
    shape: object
    modules: dict
    example: Callable


def build_graphs(model, spec, scoring: str = "full", fuse_prefix: bool = True, streamed=None) -> BuiltGraphs:
    """The torch wrappers of one engine plus example inputs for the exporter (``fuse_prefix=False``:
    the prefill graph recomputes the instruction prefix for every row, an ablation; ``streamed``: ``model`` is
    the weightless skeleton of these ``StreamedWeights``)."""
    import torch

    from pauserec.export.graphs import Core, DecodeGraph, PrefillGraph, ThinkGraph
    from pauserec.runtime.spec import ModelShape

    core = Core(model, streamed)
    d = core.dims
    sid = [list(x) for x in spec.sid_token_ids]
    after = [[int(t)] for t in spec.after_ids]  # decode steps whose one "code" is the token scored after the SID
    if not spec.embeds_any_token:  # history, suffix and SID tokens are all these graphs embed
        core.restrict_embedding(spec.embedded_ids() + ([] if fuse_prefix else list(spec.prefix_ids)))
    if not (spec.embeds_any_token and core.tied):  # (a tied cot engine embeds through the whole head_t)
        core.split_head()
    shape = ModelShape(kind=spec.kind, layers=d.layers, kv_heads=d.kv_heads, head_dim=d.head_dim, vocab=d.vocab,
                       codebook_sizes=tuple(len(x) for x in sid), prefix_len=len(spec.prefix_ids),
                       suffix_len=len(spec.suffix_ids), max_rationale=spec.max_rationale if spec.kind == "cot" else 0,
                       scoring=scoring, after=len(after),
                       after_think=len(spec.after_think_ids) if spec.kind == "cot" else 0)
    modules = {"prefill": PrefillGraph(core, spec.prefix_ids, spec.suffix_ids,
                                       None if spec.kind == "cot" else sid[0], scoring, fuse_prefix)}
    if shape.steps:
        modules["decode"] = DecodeGraph(core, spec.prefix_ids, sid + after, scoring)
    if spec.kind == "cot":
        modules["think"] = ThinkGraph(core, spec.prefix_ids)
    dtype = core.embed.weight.dtype

    def example(name: str, env: dict | None) -> tuple:
        e = env or {"batch": 2, "beams": 3, "hist": 2 * (shape.levels + 1), "ctx": 2 * (shape.levels + 1) + shape.suffix_len}
        # (example sizes only: the graphs are exported with dynamic batch, beams, hist and ctx)
        b, k, t, c = e["batch"], e["beams"], e["hist"], e["ctx"]
        kv = torch.zeros(d.layers, b, d.kv_heads, c, d.head_dim, dtype=dtype)
        cmask = torch.ones(b, c, dtype=torch.long)
        if name == "prefill":
            return torch.full((b, t), spec.pad_id, dtype=torch.long), torch.ones(b, t, dtype=torch.long)
        if name == "think":
            return torch.zeros(b, dtype=torch.long), kv, kv.clone(), cmask
        bkv = torch.zeros(d.layers, b, d.kv_heads, k, shape.steps, d.head_dim, dtype=dtype)
        return torch.zeros(b, k, dtype=torch.long), torch.tensor(0), kv, kv.clone(), cmask, bkv, bkv.clone()

    return BuiltGraphs(dims=d, shape=shape, modules=modules, example=example)
