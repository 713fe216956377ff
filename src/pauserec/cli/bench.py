"""`pauserec-bench`: measurements, each a thin command over a pauserec.bench function."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pauserec.cli.common import console, err_console, handle_errors

app = typer.Typer(
    name="pauserec-bench",
    help="Measure pauserec: kernels, latency and quality of PauseRec vs CoT vs direct models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Measure pauserec: kernels, latency and quality of PauseRec vs CoT vs direct models."""


@app.command()
@handle_errors
def kernel(
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
    repeats: int = typer.Option(7, "--repeats", min=1, help="Timed samples per implementation and cell."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON result to this file."),
) -> None:
    """Trie-masked top-k: NumPy reference vs native CPU (and CUDA when usable), B in {1,16,64}, K in {10,20,50}."""
    from pauserec.bench.kernel import KernelBenchConfig, kernel_table, run_kernel_bench, summary_lines

    progress = None if json_out else (lambda msg: err_console.print(f"[dim]measuring {msg}[/]", highlight=False))
    result = run_kernel_bench(KernelBenchConfig(repeats=repeats), progress=progress)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if json_out:
        typer.echo(text)
        return
    console.print(kernel_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    if out is not None:
        console.print(f"wrote {out}", highlight=False)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} must be a comma-separated list of positive integers, got {text!r}")
    return values


@app.command()
@handle_errors
def latency(
    engines: list[Path] = typer.Argument(None, help="Engine directories; speed-ups are against the first HF "
                                         "baseline (else the first system)."),
    hf_baseline: list[Path] = typer.Option([], "--hf-baseline", help="Checkpoint(s) run through HF generate."),
    optimum_baseline: list[Path] = typer.Option([], "--optimum-baseline", help="Checkpoint(s) exported with optimum "
                                                "and run through ORTModelForCausalLM.generate (its own environment)."),
    optimum_python: Path = typer.Option(None, "--optimum-python", help="Python of the optimum environment "
                                        "(`pauserec-bench optimum-env DIR` makes one; default $PAUSEREC_OPTIMUM_PYTHON)."),
    genai_baseline: list[Path] = typer.Option([], "--genai-baseline", help="Checkpoint(s) built by ONNX Runtime GenAI's "
                                              "model builder and run through its og.Generator beam search (its own "
                                              "environment; no trie)."),
    genai_precision: str = typer.Option("int4", "--genai-precision", help="The model builder's precision(s), comma-"
                                        "separated, one system each: int4, int8, fp32."),
    genai_python: Path = typer.Option(None, "--genai-python", help="Python of the GenAI environment "
                                      "(`pauserec-bench genai-env DIR` makes one; default $PAUSEREC_GENAI_PYTHON)."),
    openvino_baseline: list[Path] = typer.Option([], "--openvino-baseline", help="Checkpoint(s) exported by "
                                                 "optimum-intel and run through OpenVINO GenAI's LLMPipeline beam "
                                                 "search (its own environment; no trie)."),
    openvino_precision: str = typer.Option("int4", "--openvino-precision", help="optimum-intel's --weight-format(s), "
                                           "comma-separated, one system each: int4, int8, fp32."),
    openvino_python: Path = typer.Option(None, "--openvino-python", help="Python of the OpenVINO environment "
                                         "(`pauserec-bench openvino-env DIR` makes one; default "
                                         "$PAUSEREC_OPENVINO_PYTHON)."),
    baseline_cache: Path = typer.Option(None, "--baseline-cache", "--optimum-cache", help="Where the baselines' "
                                        "conversions are kept between runs (one per runtime, checkpoint and "
                                        "precision; default under the temporary folder)."),
    data: Path = typer.Option(None, "--data", help="Take users from this dataset's test split."),
    index: str = typer.Option(None, "--index", help="SID index of --data."),
    batch_sizes: str = typer.Option("1,16,64", "--batch-sizes", help="Comma-separated batch sizes."),
    beams: int = typer.Option(20, "--beams", min=1),
    warmup: int = typer.Option(2, "--warmup", min=0),
    iters: int = typer.Option(10, "--iters", min=1),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads for every system."),
    spin: bool = typer.Option(False, "--spin", help="ONNX Runtime's intra-op threads busy-wait between operators, for "
                              "the engines and the ONNX Runtime baselines alike (its default; off: they sleep)."),
    no_rss: bool = typer.Option(False, "--no-rss", help="Skip the peak-RSS subprocess per system."),
    prepack: bool = typer.Option(False, "--prepack", help="Run each engine twice: unpacked, and prepacked (one "
                                 "packed copy in one session with merged.onnx; one copy per graph without)."),
    history_len: int = typer.Option(20, "--history-len", min=1, help="Items per random history (without --data)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for latency.json/.md/.png."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
) -> None:
    """Latency, throughput and peak RSS of engines (and HF baselines) on the same users, in one run."""
    from pauserec.bench.latency import LatencyConfig, run_latency
    from pauserec.bench.report import finish, markdown, write_report
    from pauserec.bench.workers import GENAI, OPENVINO, WorkerBaseline

    workers = [WorkerBaseline("optimum", p, optimum_python, None, baseline_cache) for p in optimum_baseline]
    workers += [WorkerBaseline("genai", p, genai_python, prec, baseline_cache) for p in genai_baseline
                for prec in _precisions(genai_precision, GENAI, "--genai-precision")]
    workers += [WorkerBaseline("openvino", p, openvino_python, prec, baseline_cache) for p in openvino_baseline
                for prec in _precisions(openvino_precision, OPENVINO, "--openvino-precision")]
    cfg = LatencyConfig(engines=tuple(engines or ()), hf_baselines=tuple(hf_baseline), data=data, index=index,
                        batch_sizes=_ints(batch_sizes, "--batch-sizes"), beams=beams, warmup=warmup, iters=iters,
                        threads=threads, rss=not no_rss, prepack=prepack, history_len=history_len,
                        worker_baselines=tuple(workers), spin=spin)
    total = len(cfg.batch_sizes) * (cfg.warmup + cfg.iters)
    with console.status("measuring") as status:
        done = [0]

        def tick() -> None:
            done[0] += 1
            status.update(f"measuring: iteration {done[0]}/{total}")

        result = finish(run_latency(cfg, tick=tick), "latency", threads=threads, manifests=_manifests(cfg.engines))
    files = write_report(result, out, "latency")
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    for skip in result.get("skipped", []):
        err_console.print(f"[yellow]skipped[/] {skip['system']} {skip['path']}: {skip['reason']}", highlight=False)
    console.print(markdown(result), markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(files.values())}", highlight=False)


@app.command("serve")
@handle_errors
def serve_load(
    engine: Path = typer.Argument(..., help="Engine directory: served here (or its catalog gives the histories "
                                  "for --url)."),
    url: str = typer.Option(None, "--url", help="Load a server already running there instead of starting one."),
    rates: str = typer.Option("0.5,1,2,4", "--rates", help="Offered request rates (req/s), comma-separated."),
    duration: float = typer.Option(30.0, "--duration", min=1, help="Seconds of arrivals per rate (and of the "
                                   "one-at-a-time run)."),
    history_len: int = typer.Option(20, "--history-len", min=1, help="Items per random history."),
    k: int = typer.Option(10, "--k", min=1),
    beams: int = typer.Option(20, "--beams", min=1),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="The server's --max-batch."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="The server's --max-wait-ms."),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="The server's --max-queue."),
    threads: int = typer.Option(None, "--threads", help="The server's intra-op threads."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for serve.json/.md and server.log."),
) -> None:
    """pauserec serve under load: one request at a time, then Poisson arrivals at rising rates (throughput,
    p50/p99, batch sizes, the knee)."""
    from pauserec.bench.report import finish
    from pauserec.bench.serve_load import LoadConfig, run_load, serve_markdown, write

    try:
        rate_list = tuple(float(x) for x in rates.split(",") if x.strip())
    except ValueError:
        rate_list = ()
    if not rate_list or min(rate_list) <= 0:
        raise typer.BadParameter(f"--rates must be a comma-separated list of positive numbers, got {rates!r}")
    cfg = LoadConfig(engine=engine, url=url, rates=rate_list, duration=duration, history_len=history_len, k=k,
                     beams=beams, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, threads=threads,
                     seed=seed)
    result = run_load(cfg, out, progress=lambda m: err_console.print(f"[dim]{m}[/]", highlight=False))
    result = finish(result, "serve", threads=threads, manifests=_manifests((engine,)))
    files = write(result, out)
    console.print(serve_markdown(result), markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(files.values())}", highlight=False)


def _precisions(text: str, runtime, flag: str) -> list[str]:
    from pauserec.bench.workers import PRECISIONS

    values = [p.strip() for p in text.split(",") if p.strip()]
    allowed = PRECISIONS[runtime.name]
    bad = [p for p in values if p not in allowed]
    if not values or bad:
        raise typer.BadParameter(f"{flag} must be a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return values


def _env_command(name: str) -> None:
    from pauserec.bench.workers import RUNTIMES

    runtime = RUNTIMES[name]

    @handle_errors
    def make_env(env_dir: Path = typer.Argument(..., help="Folder for the virtual environment (created if missing).")
                 ) -> None:
        py = runtime.create_env(env_dir, say=lambda m: console.print(m, highlight=False))
        console.print(f"ready: pauserec-bench latency ENGINE --{name}-baseline CKPT --{name}-python {py}",
                      highlight=False)

    make_env.__doc__ = (f"Make the separate environment of the {runtime.what} baseline: "
                        + ", ".join(runtime.requirements()) + ".")
    app.command(f"{name}-env")(make_env)


for _name in ("optimum", "genai", "openvino"):
    _env_command(_name)


@app.command()
@handle_errors
def ablation(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (direct or pause) the engines are exported from."),
    out: Path = typer.Option(..., "--out", help="Folder for ablation.json/.md/.png (and engines/, unless --engines)."),
    engines_dir: Path = typer.Option(None, "--engines", help="Where the sid / sid-recompute / full engines are "
                                     "(exported there when missing; default OUT/engines)."),
    data: Path = typer.Option(None, "--data", help="Take users from this dataset's test split."),
    index: str = typer.Option(None, "--index", help="SID index of --data."),
    batch_sizes: str = typer.Option("1,16", "--batch-sizes", help="Comma-separated batch sizes."),
    beams: int = typer.Option(20, "--beams", min=1),
    warmup: int = typer.Option(1, "--warmup", min=0),
    iters: int = typer.Option(7, "--iters", min=1),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads for every variant."),
    hf_baseline: bool = typer.Option(False, "--hf-baseline", help="Also time HF generate on the checkpoint."),
    prompt: str = typer.Option(None, "--prompt", help="A checkpoint trained elsewhere: its prompt layout (preset or "
                               "JSON file), as pauserec-export --prompt."),
    sid_index: Path = typer.Option(None, "--sid-index", help="A checkpoint trained elsewhere: the item -> SID index "
                                   "it was trained with (pauserec-export --index)."),
    items: Path = typer.Option(None, "--items", help="Item fields the prompt renders (pauserec-export --items)."),
    kind: str = typer.Option(None, "--kind", help="direct | pause, for a layout with several (pauserec-export --kind)."),
    pause_k: int = typer.Option(None, "--pause-k", help="A pause model's pause count (pauserec-export --pause-k)."),
) -> None:
    """Where the speed comes from: the engine with each of its ideas switched off in turn, same users."""
    from pauserec.bench.ablation import AblationConfig, run_ablation, write_ablation
    from pauserec.bench.report import finish, markdown

    cfg = AblationConfig(checkpoint=checkpoint, out=out, engines_dir=engines_dir, data=data, index=index,
                         batch_sizes=_ints(batch_sizes, "--batch-sizes"), beams=beams, warmup=warmup, iters=iters,
                         threads=threads, hf_baseline=hf_baseline, prompt=prompt, sid_index=sid_index, items=items,
                         kind=kind, pause_k=pause_k)
    result = finish(run_ablation(cfg, say=lambda m: console.print(f"[dim]{m}[/]", highlight=False)), "ablation",
                    threads=threads)
    files = write_ablation(result, out)
    console.print(markdown(result), markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(files.values())}", highlight=False)


@app.command()
@handle_errors
def quality(
    engines: list[Path] = typer.Argument(None, help="Engine directories (several per kind: seeds). Leave out with --train."),
    data: Path = typer.Option(..., "--data", help="Dataset folder the model was trained on."),
    index: str = typer.Option(None, "--index", help="SID index name."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    beams: int = typer.Option(20, "--beams", min=1),
    limit: int = typer.Option(None, "--limit", help="Only the first N users."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    threads: int = typer.Option(None, "--threads"),
    out: Path = typer.Option(None, "--out", help="Folder for quality.json/.md (and quality-seeds.json/.md); "
                             "with --train also the runs/ it trains."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
    train: bool = typer.Option(False, "--train", help="Train --seeds seeds of every --kinds kind (best checkpoints), "
                               "export and evaluate them all."),
    kinds: str = typer.Option("direct,pause,cot", "--kinds", help="With --train: comma-separated kinds."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="With --train: seeds per kind (0..N-1)."),
    preset: str = typer.Option("small", "--preset", help="With --train: model preset."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="With --train: ceiling per training run."),
    resamples: int = typer.Option(1000, "--resamples", min=1, help="Paired bootstrap resamples."),
) -> None:
    """Hit/NDCG@5/10 and invalid rate of engines on a dataset split (runs the engines, not torch).

    With several engines of a kind (seeds) or --train: mean ± std over seeds per kind and a paired bootstrap
    95 % interval of pause − direct and cot − direct (Hit@10, NDCG@10); "beats" only when it excludes 0.
    """
    from rich.progress import Progress

    from pauserec.bench.quality import (SeedsConfig, evaluate_engine, run_quality_seeds, seeds_markdown,
                                        summarize_runs, write_seeds_report)
    from pauserec.bench.report import finish, markdown, write_report
    from pauserec.errors import PauserecError

    if train:
        if out is None:
            raise PauserecError("--train needs --out DIR (checkpoints, engines and the report go there)")
        cfg = SeedsConfig(data=data, out=out, index=index, kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                          seeds=seeds, preset=preset, max_minutes=max_minutes, split=split, beams=beams, limit=limit,
                          batch_size=batch_size, threads=threads, resamples=resamples)
        seeded = run_quality_seeds(cfg, say=lambda m: console.print(m, highlight=False))
        runs, summary = seeded["systems"], seeded["summary"]
        extra = {"training": seeded["training"]}
        engines = [Path(r["path"]) for r in runs]
    else:
        if not engines:
            raise PauserecError("give engine directories, or --train --out DIR to train and evaluate seeds per kind")
        runs, vectors = [], []
        with Progress(console=console, transient=True) as bar:
            for engine in engines:
                task = bar.add_task(f"evaluating {engine.name}", total=limit)
                res, vec = evaluate_engine(engine, data, index, split=split, beams=beams, limit=limit,
                                           batch_size=batch_size, threads=threads, tick=lambda n, t=task: bar.advance(t, n))
                runs.append(res)
                vectors.append(vec)
        summary = summarize_runs(runs, vectors, resamples) if len(runs) > 1 else None
        if summary:
            summary["popularity"] = runs[0]["popularity"]
        extra = {}
    result = finish({"systems": runs, "data": str(data), "index": index, **({"seeds": summary} if summary else {}),
                     **extra}, "quality", threads=threads, manifests=_manifests(engines))
    if out is not None:
        write_report(result, out, "quality")
        if summary:
            write_seeds_report({"summary": summary, **extra, "environment": result["environment"]}, out)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(markdown(result), markup=False, soft_wrap=True)
    pop = runs[0]["popularity"]
    console.print(f"popularity baseline: Hit@10 {pop['hit@10']:.4f}, NDCG@10 {pop['ndcg@10']:.4f}", highlight=False)
    if summary:
        console.print(seeds_markdown(summary), markup=False, soft_wrap=True)


@app.command()
@handle_errors
def compare(
    results: list[Path] = typer.Argument(..., help="Result JSON files written by pauserec-bench, or run folders."),
    html_out: Path = typer.Option(None, "--html", help="Write one self-contained HTML page (plots inlined)."),
    md_out: Path = typer.Option(None, "--md", help="Write one Markdown page (plots linked)."),
    title: str = typer.Option("pauserec benchmark run", "--title", help="Title of the page."),
) -> None:
    """Render saved results side by side (one table per file, in the order given); --html / --md: one page."""
    from pauserec.bench.report import collect_results, compare_markdown, compare_page, markdown

    if html_out is not None or md_out is not None:
        for path, text in ((html_out, compare_page(results, title) if html_out else None),
                           (md_out, f"# {title}\n\n" + compare_markdown(results) if md_out else None)):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                console.print(f"wrote {path}", highlight=False)
        return
    for path, result in collect_results(results):
        console.print(f"[bold]{path}[/] ({result.get('benchmark')})")
        console.print(markdown(result), markup=False, soft_wrap=True)


@app.command()
@handle_errors
def shape(
    name: str = typer.Argument(None, help="Shape name, e.g. qwen3-0.6b (see --list)."),
    out: Path = typer.Option(None, "--out", help="Checkpoint directory to write."),
    list_shapes: bool = typer.Option(False, "--list", help="List the known shapes with parameter counts and exit."),
    layers: int = typer.Option(None, "--layers", min=1, help="Override the number of decoder layers."),
    hidden: int = typer.Option(None, "--hidden", min=1, help="Override the hidden size (MLP width keeps its ratio)."),
    data: Path = typer.Option(None, "--data", help="Dataset directory for tokenizer + catalog (default: synthetic)."),
    index: str = typer.Option(None, "--index", help="SID index of --data (e.g. rkmeans_zcr)."),
    kind: str = typer.Option("pause", "--kind", help="direct | pause | cot"),
    pause_k: int = typer.Option(5, "--pause-k", min=1, help="Number of <pause> tokens (pause kind)."),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("float32", "--dtype", help="Stored weight type: float32 | bfloat16 (as 7-8B checkpoints "
                              "ship). Written shard by shard: memory stays at one shard (2 GB)."),
) -> None:
    """Write a real-shape checkpoint with seeded random weights (real sizes and speed, no download)."""
    import time

    from pauserec.bench.shapes import shape_table, write_shape_checkpoint
    from pauserec.prompt.spec import TrainingCard
    from pauserec.errors import PauserecError

    if list_shapes:
        rows = shape_table(layers, hidden)
        console.print("known shapes, float32" + (" (with --layers/--hidden applied)" if layers or hidden else ""),
                      style="bold", highlight=False)
        console.print(f"{'name':<13} {'layers':>6} {'hidden':>6} {'MLP':>6} {'q/kv x dim':>11} {'vocab':>8} "
                      f"{'parameters':>14} {'GB':>6}", highlight=False)
        for r in rows:
            heads = f"{r['q_heads']}/{r['kv_heads']} x {r['head_dim']}"
            console.print(f"{r['name']:<13} {r['layers']:>6} {r['hidden']:>6} {r['intermediate']:>6} {heads:>11} "
                          f"{r['vocab']:>8,} {r['parameters']:>14,} {r['weight_bytes'] / 1e9:>6.2f}", highlight=False)
        console.print("configs of " + ", ".join(f"{r['name']} = {r['source']}" for r in rows) + " (not downloaded)",
                      highlight=False)
        return
    if name is None or out is None:
        raise PauserecError("give a shape name and --out DIR (e.g. `pauserec-bench shape qwen3-0.6b --out ckpt`), "
                            "or --list to see the shapes")
    t0 = time.perf_counter()
    with console.status("starting") as status:
        def progress(msg: str) -> None:
            status.update(f"{msg} [dim]({time.perf_counter() - t0:.0f} s)[/]")
            console.print(f"[dim]{time.perf_counter() - t0:6.1f} s  {msg}[/]", highlight=False)

        path = write_shape_checkpoint(name, out, data=data, index=index, kind=kind, pause_k=pause_k, layers=layers,
                                      hidden=hidden, seed=seed, dtype=dtype, progress=progress)
    card = TrainingCard.load(path).train
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    console.print(f"[bold green]wrote[/] {path}: {card['parameters']:,} parameters, "
                  f"{card['weight_bytes']:,} weight bytes ({card['weight_bytes'] / 1e9:.2f} GB {card['dtype']}; "
                  f"{on_disk / 1e9:.2f} GB on disk) in {time.perf_counter() - t0:.1f} s", highlight=False)
    console.print("[yellow]random weights:[/] sizes, memory and speed are real; recommendations are not", highlight=False)


def _manifests(engines) -> dict:
    out = {}
    for path in engines:
        try:
            m = json.loads((Path(path) / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out[str(path)] = {k: m.get(k) for k in ("format_version", "kind", "pause_k", "precision", "source")}
    return out
