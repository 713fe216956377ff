"""Peak RSS and step time of a few `pauserec train --init-from CKPT --prompt LAYOUT` steps, one process per setting.

    pauserec-bench shape qwen3-1.7b --dtype bfloat16 --kind direct --data DATA --index rkmeans_zcr --out ckpt/q17
    python benchmarks/train_prompt_memory.py ckpt/q17 --data DATA --index rkmeans_zcr --prompt minionerec \\
        --setting lora16 --setting lora16+gc --steps 3 --out results/train-prompt-memory.json

Each setting runs ``pauserec.train.sft.train`` in a fresh process (``--kind pause --pause-k 5``, batch size
``--batch-size``, ``--val-users 0``) and reports the peak RSS (VmHWM) after loading and preparing the model, the
peak RSS of the training steps alone (VmHWM reset with ``/proc/self/clear_refs`` before the first step) and the
seconds per step. The checkpoint is not written (``prompted.save`` is skipped): saving is not training memory.
Settings: ``full`` (every weight, AdamW), ``loraR`` (``--lora R``), ``+gc`` (``--gradient-checkpointing``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(args) -> None:
    from pauserec.train import prompted, sft
    from pauserec.train.sft import TrainConfig, train

    out: dict = {"setting": args.setting}
    real = sft.run_stage

    def run_stage(model, stage, pad_id, rng, progress=None):
        out["load_peak_rss_mb"] = round(_vmhwm_mb(), 1)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        res = real(model, stage, pad_id, rng, progress)
        out["steps"] = res["steps"]
        out["seconds_per_step"] = round((time.perf_counter() - t0) / max(res["steps"], 1), 2)
        out["steps_peak_rss_mb"] = round(_vmhwm_mb(), 1)
        out["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["mean_prompt_tokens"] = round(sum(len(x) for x, _ in stage.samples) / len(stage.samples), 1)
        return res

    sft.run_stage = run_stage
    prompted.save = lambda *a, **k: None
    setting = args.setting
    lora = int(setting.split("+")[0][4:]) if setting.startswith("lora") else None
    cfg = TrainConfig(data=args.data, index=args.index, kind="pause", pause_k=5, out=Path("/nonexistent"),
                      init_from=args.checkpoint, prompt=args.prompt, lora=lora, gradient_checkpointing="+gc" in setting,
                      max_steps=args.steps, batch_size=args.batch_size, val_users=0, threads=args.threads, seed=0,
                      warmup_steps=0)
    train(cfg)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python benchmarks/train_prompt_memory.py")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--index", default=None)
    ap.add_argument("--prompt", default="minionerec")
    ap.add_argument("--setting", action="append", default=None, help="full | loraR | loraR+gc | full+gc (repeat)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        args.setting = args.setting[0]
        return _child(args)
    results = []
    for setting in args.setting or ["lora16"]:
        cmd = [sys.executable, __file__, str(args.checkpoint), "--data", str(args.data), "--prompt", args.prompt,
               "--setting", setting, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--child"] + (["--index", args.index] if args.index else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        res = json.loads(line[7:]) if line else {"setting": setting, "error": proc.stderr[-2000:]}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "prompt": args.prompt,
                                        "batch_size": args.batch_size, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
