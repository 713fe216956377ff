"""`pauserec-export CKPT --out ENGINE`: checkpoint -> validated engine directory (see pauserec.export)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from pauserec.cli.common import console, handle_errors

app = typer.Typer(add_completion=False, help="Export a PauseRec checkpoint to an ONNX/TensorRT engine directory.")


@app.command()
@handle_errors
def export(
    checkpoint: Path = typer.Argument(..., help="HF checkpoint directory (save_pretrained model + tokenizer), or a "
                                      "PEFT adapter directory with --base."),
    out: Path = typer.Option(..., "--out", "-o", help="Engine directory to write."),
    prompt: str = typer.Option(None, "--prompt", help="Prompt layout the model was trained with: a preset "
                               "(pauserec, minionerec, lc-rec[:N], onerec-think) or a JSON layout file. Needed for "
                               "checkpoints not trained by `pauserec train`."),
    index: Path = typer.Option(None, "--index", help="Item -> SID index the model was trained with (LC-Rec / "
                               "MiniOneRec NAME.index.json, OneRec-Think NAME.pretrain.json); item ids are its keys."),
    items: Path = typer.Option(None, "--items", help="Item fields the prompt renders (titles): LC-Rec .item.json "
                               "or MiniOneRec info .txt."),
    base: Path = typer.Option(None, "--base", help="Base checkpoint of a PEFT LoRA adapter (merged at export)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (bfloat16 weights, float32 "
                                  "compute: exact for a bf16 checkpoint at half fp32's bytes) | fp16 | int8 (activations "
                                  "per row) | int4 (weight-only, MatMulNBits)."),
    int4_compute: str = typer.Option("int8", "--int4-compute", help="int4: int8 (activations quantised per block: "
                                     "integer kernels, faster) | fp32 (activations stay float)."),
    int4_block: int = typer.Option(32, "--int4-block", help="int4: weights per scale along K (16, 32, 64, 128, "
                                   "256); larger blocks give a smaller engine and fewer scales to apply, coarser "
                                   "weights."),
    kv_dtype: str = typer.Option("float32", "--kv-dtype", help="bf16/int8/int4: float16 holds the KV cache in half the "
                                 "memory (cast per layer at the graphs' boundaries), int8 in about a quarter (one "
                                 "scale per key or value vector); ranked against fp32 like the weights. fp32 engines "
                                 "keep float32 (exact); fp16 engines always use float16."),
    scoring: str = typer.Option("full", "--scoring", help="full: log-softmax over the vocabulary (HF parity) | "
                                "sid: over each level's codebook only (less work per step)."),
    after_sid: bool = typer.Option(True, "--after-sid/--no-after-sid", help="Score the tokens the layout's "
                                   "pipeline generates after the SID (its after_sid: '\\n'+EOS for minionerec, EOS "
                                   "for lc-rec), so beams rank as its own generate ranks them; --no-after-sid ranks "
                                   "by the SID alone (fewer decode steps)."),
    recompute_prefix: bool = typer.Option(False, "--recompute-prefix", help="Ablation: do not fuse the instruction "
                                          "prefix's KV into the graphs; every row recomputes it (same results)."),
    min_agreement: float = typer.Option(0.8, "--min-agreement", help="fp16/int8/int4: least top-10 overlap with "
                                        "the fp32 engine (int8/int4 with --stream: with the HF model, one decoder "
                                        "layer at a time) on the sample, else the export fails."),
    static: bool = typer.Option(False, "--static", help="Freeze batch, beams and history length (TensorRT)."),
    batch: int = typer.Option(None, "--batch", help="Static batch size (users per call)."),
    beams: int = typer.Option(None, "--beams", help="Static beam width."),
    max_history: int = typer.Option(None, "--max-history", help="Items of history kept (default: the checkpoint "
                                    "card's, or the --prompt layout's)."),
    backend: str = typer.Option("onnx", "--backend", help="onnx | tensorrt (also builds .plan files)."),
    atol: float = typer.Option(None, "--atol", help="fp32 validation tolerance on log-probs (default 1e-4)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    kind: str = typer.Option(None, "--kind", help="Model kind: direct | pause | cot (when the layout has several)."),
    pause_k: int = typer.Option(None, "--pause-k", help="Pause tokens the model was trained with (pause models)."),
    catalog: Path = typer.Option(None, "--catalog", help="catalog.npz to use instead of the checkpoint's."),
    data: Path = typer.Option(None, "--data", help="Dataset folder: reduced precisions' Hit@10 change is measured "
                              "on its test split."),
    sample: int = typer.Option(64, "--sample", min=1, help="Users in the reduced-precision ranking comparison."),
    prompt_sample: int = typer.Option(64, "--prompt-sample", min=1, help="Users whose prompt ids must equal the "
                                      "checkpoint's own HF tokenizer's."),
    check_users: int = typer.Option(8, "--check-users", min=0, help="Users whose top-10 must equal HF generate + "
                                    "trie on prompts built by the checkpoint's own tokenizer (0: skip; only fp32 "
                                    "with --scoring full and without --stream)."),
    guard_users: int = typer.Option(500, "--guard-users", min=0, help="With --data: test users of the Hit@10 "
                                    "against popularity guard."),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (opset 18, fast) | dynamo (opset 23)."),
    threads: int = typer.Option(None, "--threads", help="Threads for torch and ONNX Runtime (default: 1 / all)."),
    stream: bool = typer.Option(False, "--stream", help="Never load the model: trace the graphs over a weightless "
                                "skeleton and read each weight from the checkpoint's safetensors as it is written; "
                                "validate against HF's layers one at a time (no HF generate check). For models "
                                "larger than this machine's memory in float32."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Export, validate against the HF model, and write an engine directory."""
    from pauserec.export import ExportConfig, export_engine

    cfg = ExportConfig(checkpoint=checkpoint, out=out, precision=precision, backend=backend, static=static,
                       batch=batch, beams=beams, max_history=max_history, atol=atol, force=force, kind=kind,
                       pause_k=pause_k, catalog=catalog, data=data, exporter=exporter, threads=threads,
                       scoring=scoring, after_sid=after_sid, min_agreement=min_agreement, quant_sample=sample,
                       int4_compute=int4_compute, int4_block=int4_block, kv_dtype=kv_dtype,
                       fuse_prefix=not recompute_prefix, prompt=prompt, index=index, items=items, base=base,
                       check_users=check_users, guard_users=guard_users, prompt_sample=prompt_sample, stream=stream)
    t0 = time.perf_counter()

    def progress(stage: str, detail: str) -> None:
        if not as_json:
            console.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] [bold]{stage:<9}[/] {detail}", highlight=False)

    report = export_engine(cfg, progress=progress)
    if as_json:
        typer.echo(json.dumps(_report_dict(report), indent=2))
    else:
        _print_summary(report)


def _report_dict(report) -> dict:
    return {
        "out": str(report.out), "kind": report.kind, "precision": report.precision, "backend": report.backend,
        "static": report.static, "files": report.files, "max_abs_err": report.max_abs_err,
        "checks": report.checks, "quantized": report.quantized, "seconds": report.seconds,
        "opset": report.manifest.get("opset"), "exporter": report.manifest.get("exporter"),
        "prompt": report.prompt,
    }


def _print_summary(report) -> None:
    from rich.table import Table

    m = report.manifest
    table = Table(title=f"engine {report.out}", show_header=False)
    table.add_row("kind", f"{report.kind}" + (f" (k={m['pause_k']})" if report.kind == "pause" else ""))
    table.add_row("SID levels", " x ".join(map(str, m["sid"]["codebook_sizes"])))
    spec = m["prompt"]
    table.add_row("prompt", f"{spec['layout']}: {len(spec['prefix_ids'])} prefix + {len(spec['suffix_ids'])} suffix "
                  f"ids fused, history from {spec['assembly']} (<= {spec['max_history']} items, "
                  f"{spec['max_history_tokens']} ids)")
    p = report.prompt
    table.add_row("prompt ids vs HF tokenizer", p.get("skipped") or f"identical for {p['identical']} users")
    if "item_texts_identical" in p:
        table.add_row("item texts vs HF tokenizer", f"identical for {p['item_texts_identical']} items")
    if "hf_generate" in p:
        table.add_row("top-10 vs HF generate", f"identical for {p['hf_generate']['users']} users "
                      f"(beam {p['hf_generate']['beams']})")
    guard = p.get("popularity_guard")
    if guard:
        table.add_row("Hit@10 vs popularity", f"{guard['hit10']:.4f} vs {guard['popularity_hit10']:.4f} "
                      f"({guard['users']} test users)")
    table.add_row("precision / backend", f"{report.precision} / {report.backend}")
    table.add_row("scoring", m["scoring"])
    shapes = m["shapes"]
    table.add_row("shapes", f"static B={shapes['batch']} K={shapes['beams']} hist={shapes['hist']}"
                  if report.static else f"dynamic (max history {shapes['max_history']} items)")
    table.add_row("exporter", f"{m['exporter']}, opset {m['opset']}")
    for graph, err in report.max_abs_err.items():
        table.add_row(f"max |err| {graph}", f"{err:.2e}")
    if report.quantized:
        against = "HF (layer by layer)" if report.quantized.get("reference") == "hf-layerwise" else "fp32"
        table.add_row(f"{report.precision} vs {against}", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in report.quantized.items()))
    for name, size in report.files.items():
        table.add_row(name, f"{size / 1e6:.2f} MB")
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))
    console.print(table)
    for warning in [*p.get("warnings", []), *([guard["warning"]] if guard and "warning" in guard else [])]:
        console.print(f"[bold red]WARNING:[/] {warning}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
