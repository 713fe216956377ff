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
    engines: list[Path] = typer.Argument(None, help="Engine directories; ratios are against the first."),
    hf_baseline: list[Path] = typer.Option([], "--hf-baseline", help="Checkpoint(s) run through HF generate."),
    data: Path = typer.Option(None, "--data", help="Take users from this dataset's test split."),
    index: str = typer.Option(None, "--index", help="SID index of --data."),
    batch_sizes: str = typer.Option("1,16,64", "--batch-sizes", help="Comma-separated batch sizes."),
    beams: int = typer.Option(20, "--beams", min=1),
    warmup: int = typer.Option(2, "--warmup", min=0),
    iters: int = typer.Option(10, "--iters", min=1),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads for every system."),
    no_rss: bool = typer.Option(False, "--no-rss", help="Skip the peak-RSS subprocess per system."),
    prepack: bool = typer.Option(False, "--prepack", help="Also run each engine with prepacked weights "
                                 "(faster small batches, one more copy of the weights per graph)."),
    history_len: int = typer.Option(20, "--history-len", min=1, help="Items per random history (without --data)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for latency.json/.md/.png."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
) -> None:
    """Latency, throughput and peak RSS of engines (and HF baselines) on the same users, in one run."""
    from pauserec.bench.latency import LatencyConfig, run_latency
    from pauserec.bench.report import finish, markdown, write_report

    cfg = LatencyConfig(engines=tuple(engines or ()), hf_baselines=tuple(hf_baseline), data=data, index=index,
                        batch_sizes=_ints(batch_sizes, "--batch-sizes"), beams=beams, warmup=warmup, iters=iters,
                        threads=threads, rss=not no_rss, prepack=prepack, history_len=history_len)
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
    console.print(markdown(result), markup=False, soft_wrap=True)
    console.print(f"wrote {', '.join(files.values())}", highlight=False)


@app.command()
@handle_errors
def quality(
    engine: Path = typer.Argument(..., help="Engine directory."),
    data: Path = typer.Option(..., "--data", help="Dataset folder the model was trained on."),
    index: str = typer.Option(None, "--index", help="SID index name."),
    split: str = typer.Option("test", "--split", help="test or valid."),
    beams: int = typer.Option(20, "--beams", min=1),
    limit: int = typer.Option(None, "--limit", help="Only the first N users."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    threads: int = typer.Option(None, "--threads"),
    out: Path = typer.Option(None, "--out", help="Folder for quality.json/.md."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON result."),
) -> None:
    """Hit/NDCG@5/10 and invalid rate of an engine on a dataset split (runs the engine, not torch)."""
    from rich.progress import Progress

    from pauserec.bench.quality import run_quality
    from pauserec.bench.report import finish, markdown, write_report

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=limit)
        res = run_quality(engine, data, index, split=split, beams=beams, limit=limit, batch_size=batch_size,
                          threads=threads, tick=lambda n: bar.advance(task, n))
    result = finish({"systems": [res], "data": str(data), "index": index}, "quality", threads=threads,
                    manifests=_manifests((engine,)))
    if out is not None:
        write_report(result, out, "quality")
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(markdown(result), markup=False, soft_wrap=True)
    pop = res["popularity"]
    console.print(f"popularity baseline: Hit@10 {pop['hit@10']:.4f}, NDCG@10 {pop['ndcg@10']:.4f}", highlight=False)


@app.command()
@handle_errors
def compare(results: list[Path] = typer.Argument(..., help="Result JSON files written by pauserec-bench.")) -> None:
    """Render saved results side by side (one table per file, in the order given)."""
    from pauserec.bench.report import load_result, markdown

    for path in results:
        console.print(f"[bold]{path}[/] ({load_result(path).get('benchmark')})")
        console.print(markdown(load_result(path)), markup=False, soft_wrap=True)


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
) -> None:
    """Write a real-shape checkpoint with seeded random weights (real sizes and speed, no download)."""
    import time

    from pauserec.bench.shapes import shape_table, write_shape_checkpoint
    from pauserec.data.prompts import TrainingCard
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
                                      hidden=hidden, seed=seed, progress=progress)
    card = TrainingCard.load(path).train
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    console.print(f"[bold green]wrote[/] {path}: {card['parameters']:,} parameters, "
                  f"{card['weight_bytes']:,} weight bytes ({card['weight_bytes'] / 1e9:.2f} GB float32; "
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
