"""Recommend latency on a GPU: engines on ONNX Runtime's CUDA EP (and TensorRT, and the CPU for scale)
against HF ``generate(prefix_allowed_tokens_fn=trie)`` on the same GPU, one run, one machine.

Every system sees the same users (seeded random catalog histories) in the same batches, systems
interleaved inside each iteration; the report gives p50/p95/p99 batch latency, per-user time,
throughput, which search ran (``device``: the search with CudaOps, KV and log-probs on the GPU; ``host``:
the host loop) and the pause vs cot reduction per provider and batch size (the paper: -71.3 %, A100,
fp16, batch 16). A system that cannot run here (no CUDA EP, no TensorRT, no CUDA torch) is listed
under ``skipped`` with the reason instead of failing the run.

    python benchmarks/gpu/latency_gpu.py --engines E1 E2 --hf CK1 CK2 --providers cuda,cpu --out r.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "min": float(a.min()), "max": float(a.max())}


class EngineSystem:
    def __init__(self, path: Path, provider: str, threads: int | None) -> None:
        from pauserec.runtime import Engine, Recommender

        self.engine = Engine.load(path, provider=provider, threads=threads)
        self.rec = Recommender(self.engine)
        self.kind, self.catalog = self.engine.kind, self.engine.catalog
        self.search = "device" if self.engine.device_ops() is not None else "host"
        self.name = f"{self.kind}:{path.name} on {self.engine.provider} ({self.search} search)"
        self.facts = {"provider": self.engine.provider, "search": self.search,
                      "precision": self.engine.manifest.precision, "path": str(path),
                      "ort_providers": {g: getattr(s, "providers", None) for g, s in self.engine.sessions.items()}}

    def run(self, histories: list[np.ndarray], k: int, beams: int) -> np.ndarray:
        ids = self.catalog.item_ids
        return self.rec.recommend([[ids[i] for i in h] for h in histories], k=k, beams=beams).item_index

    def rationale_tokens(self, histories: list[np.ndarray], beams: int) -> float | None:
        """cot: mean generated rationale length on these users (what the cot latency pays for)."""
        if self.kind != "cot":
            return None
        import pauserec.runtime.recommender as rec_mod

        searches, original = [], rec_mod.beam_search
        rec_mod.beam_search = lambda *a, **kw: searches.append(original(*a, **kw)) or searches[-1]
        try:
            self.run(histories, 10, beams)
        finally:
            rec_mod.beam_search = original
        lengths = [len(r) for s in searches for r in s.rationales]
        return float(np.mean(lengths)) if lengths else None


class HFSystem:
    def __init__(self, path: Path, device: str, dtype: str, threads: int | None) -> None:
        import torch

        from pauserec.reference.hf_generate import HFBaseline

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        self.base = HFBaseline(path, threads=threads)
        self.base.model = self.base.model.to(device=device, dtype=getattr(torch, dtype))
        self.device = device
        generate = self.base.model.generate

        def on_device(input_ids=None, attention_mask=None, **kw):  # inputs to the GPU, results back
            out = generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kw)
            if isinstance(out, torch.Tensor):
                return out.cpu()
            for key in ("sequences", "sequences_scores"):
                if getattr(out, key, None) is not None:
                    setattr(out, key, getattr(out, key).float().cpu() if key == "sequences_scores"
                            else getattr(out, key).cpu())
            return out

        self.base.model.generate = on_device
        self.kind, self.catalog = self.base.spec.kind, self.base.catalog
        self.name = f"{self.kind}:{path.name} HF generate on {device} ({dtype})"
        self.facts = {"device": device, "dtype": dtype, "path": str(path), "torch": torch.__version__}

    def run(self, histories: list[np.ndarray], k: int, beams: int) -> np.ndarray:
        import torch

        out = self.base.recommend(histories, k=k, beams=beams).item_index
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out


def users(catalog, n: int, history_len: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    items = len(catalog.item_ids)
    return [rng.choice(items, size=min(history_len, items), replace=False) for _ in range(n)]


def measure(systems, histories, batch_sizes, beams: int, warmup: int, iters: int, budget_s: float) -> dict:
    t_start = time.perf_counter()
    out: dict[int, dict] = {i: {} for i in range(len(systems))}
    for bs in batch_sizes:
        if time.perf_counter() - t_start > budget_s:
            for i in out:
                out[i][str(bs)] = {"skipped": f"time budget of {budget_s:.0f} s used up"}
            continue
        lat: dict[int, list[float]] = {i: [] for i in range(len(systems))}
        for it in range(warmup + iters):
            batch = [histories[(it * bs + j) % len(histories)] for j in range(bs)]
            order = range(len(systems)) if it % 2 == 0 else reversed(range(len(systems)))
            for i in order:
                t0 = time.perf_counter()
                systems[i].run(batch, 10, beams)
                if it >= warmup:
                    lat[i].append(time.perf_counter() - t0)
        for i, xs in lat.items():
            stats = percentiles(xs)
            out[i][str(bs)] = {"batch_latency_s": stats, "per_user_s": stats["p50"] / bs,
                               "throughput_users_per_s": bs * len(xs) / sum(xs), "iters": len(xs)}
        print(f"batch {bs}: " + "; ".join(f"{systems[i].name} {out[i][str(bs)]['batch_latency_s']['p50'] * 1e3:.1f} ms"
                                          for i in lat), flush=True)
    return out


def reductions(results: list[dict]) -> dict:
    """pause vs cot (and pause vs HF generate) p50 reduction per provider and batch size."""
    out: dict = {}
    by = {(r["kind"], r["facts"].get("provider") or "hf:" + r["facts"].get("device", "?")): r for r in results}
    for (kind, where), r in by.items():
        if kind != "pause":
            continue
        for other, label in ((by.get(("cot", where)), f"pause vs cot on {where}"),):
            if other is None:
                continue
            cells = {}
            for bs, cell in r["by_batch"].items():
                o = other["by_batch"].get(bs, {})
                if "batch_latency_s" in cell and "batch_latency_s" in o:
                    red = 1 - cell["batch_latency_s"]["p50"] / o["batch_latency_s"]["p50"]
                    cells[bs] = {"reduction": red, "text": f"{-red * 100:+.1f} %"}
            out[label] = cells
    return out


def environment() -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("onnxruntime", "torch", "transformers", "numpy", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # not installed, or broken
            env[mod] = f"unavailable ({type(e).__name__})"
    try:
        import onnxruntime as ort

        env["ort_available_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    from pauserec.runtime.trie_topk import available_impls, built_cuda_archs

    env["trie_topk_impls"], env["cuda_archs"] = list(available_impls()), built_cuda_archs()
    try:
        env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["gpu"] = None
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", nargs="*", default=[], type=Path)
    ap.add_argument("--hf", nargs="*", default=[], type=Path, help="checkpoints run through HF generate")
    ap.add_argument("--providers", default="cuda,cpu", help="engine providers, comma-separated")
    ap.add_argument("--hf-device", default="cuda")
    ap.add_argument("--hf-dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--history-len", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new batch sizes after this")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]

    systems, skipped = [], []
    for path in args.engines:
        for provider in [p.strip() for p in args.providers.split(",") if p.strip()]:
            try:
                systems.append(EngineSystem(path, provider, args.threads))
            except Exception as e:  # BackendUnavailable and anything a broken GPU stack raises
                skipped.append({"system": f"{path.name} on {provider}", "reason": f"{type(e).__name__}: {e}"})
    for path in args.hf:
        try:
            systems.append(HFSystem(path, args.hf_device, args.hf_dtype, args.threads))
        except Exception as e:
            skipped.append({"system": f"{path.name} HF generate on {args.hf_device}", "reason": f"{type(e).__name__}: {e}"})
    for s in skipped:
        print(f"skipped {s['system']}: {s['reason']}", flush=True)
    result = {"benchmark": "gpu-latency", "label": args.label, "environment": environment(), "skipped": skipped,
              "config": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                         for k, v in vars(args).items()}}
    if systems:
        ref = list(systems[0].catalog.item_ids)
        systems = [s for s in systems if list(s.catalog.item_ids) == ref]
        histories = users(systems[0].catalog, max(batch_sizes) * max(args.iters + args.warmup, 1), args.history_len, 0)
        stats = measure(systems, histories, batch_sizes, args.beams, args.warmup, args.iters, args.budget_s)
        for s in systems:
            if isinstance(s, EngineSystem) and s.kind == "cot":
                s.facts["mean_rationale_tokens"] = s.rationale_tokens(histories[:16], args.beams)
        result["systems"] = [{"name": s.name, "kind": s.kind, "facts": s.facts, "by_batch": stats[i]}
                             for i, s in enumerate(systems)]
        result["reductions"] = reductions(result["systems"])
        for label, cells in result["reductions"].items():
            print(label + ": " + ", ".join(f"batch {bs} {c['text']}" for bs, c in cells.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if systems else 1


if __name__ == "__main__":
    sys.exit(main())
