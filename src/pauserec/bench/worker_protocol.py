"""What every baseline worker shares: the entry point, the line protocol, the start-up and the checkpoint staging.

    python worker_protocol.py RUNTIME_worker.py --checkpoint CKPT --cache DIR --setup SETUP.json [--threads N] ...

This file runs inside a baseline's own environment and imports no pauserec module. Run as a script, it
loads the runtime's worker file beside it (which defines ``NAME``, ``PACKAGES``, ``start``, ``generate`` and
optionally ``options``), gives it this module as ``protocol``, and serves the protocol described in
``pauserec.bench.workers``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(who: str, msg: str) -> None:
    sys.stderr.write(f"[{who} worker] {msg}\n")
    sys.stderr.flush()


def versions(names: tuple[str, ...]) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def add_architectures(cfg: dict) -> list[str]:
    """Converters pick the model class from ``config.architectures[0]``, which a checkpoint written from a
    config (``pauserec-bench shape``) does not carry; it is the causal-LM class of ``model_type``."""
    if cfg.get("architectures") or cfg.get("model_type") not in ARCHITECTURES:
        return []
    cfg["architectures"] = [ARCHITECTURES[cfg["model_type"]]]
    return [f"architectures -> {cfg['architectures']} (from model_type {cfg['model_type']})"]


def staged_checkpoint(ckpt: Path, stage: Path, *edits: Callable[[dict], list[str]]) -> tuple[Path, list[str]]:
    """``ckpt`` itself, or, when ``edits`` change its config.json, a folder of links to its files with the
    edited config.json; returns (dir, what was changed)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    before = json.dumps(cfg, sort_keys=True)
    notes = [note for edit in edits for note in edit(cfg)]
    if json.dumps(cfg, sort_keys=True) == before:
        return ckpt, notes
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f.resolve(), stage / f.name)
    (stage / "config.json").write_text(json.dumps(cfg, indent=2))
    return stage, notes


CONVERTED = "model"
CONVERT_FACTS = "pauserec_convert.json"


def converted(ckpt: Path, cache: Path, command: list[str], shown: str, done_file: str,
              *edits: Callable[[dict], list[str]]) -> tuple[Path, dict]:
    """CACHE/model: the runtime's conversion of ``ckpt``, made once by running ``command`` (a list in which the
    strings "{CKPT}", "{OUT}" and "{SCRATCH}" stand for the staged checkpoint, the output folder and a scratch
    folder removed after; ``shown`` is how the
    report writes it) and reused while the command is the same. The converter's output goes to stderr; its
    time, the model's size and the config edits are kept in CACHE/model/pauserec_convert.json."""
    model_dir = cache / CONVERTED
    facts_file = model_dir / CONVERT_FACTS
    if facts_file.is_file() and (model_dir / done_file).is_file():
        try:
            facts = json.loads(facts_file.read_text())
            if facts.get("convert_command") == shown:
                return model_dir, {**facts, "cached": True}
        except (OSError, json.JSONDecodeError):
            pass
    tmp = cache / (CONVERTED + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    src, notes = staged_checkpoint(ckpt, cache / "checkpoint", *edits)
    scratch = cache / "scratch"
    fill = {"{CKPT}": str(src), "{OUT}": str(tmp), "{SCRATCH}": str(scratch)}
    cmd = [fill.get(c, c) for c in command]
    log("convert", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    dt = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    if src != ckpt:
        shutil.rmtree(src, ignore_errors=True)
    if proc.returncode != 0 or not (tmp / done_file).is_file():
        raise RuntimeError(f"{shown} exited {proc.returncode} without {done_file} (its output is in the worker log)")
    facts = {"convert_s": dt, "convert_command": shown, "config_changes": notes,
             "model_bytes": sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())}
    (tmp / CONVERT_FACTS).write_text(json.dumps(facts))
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.replace(model_dir)
    return model_dir, facts


def left_pad(prompts: list[list[int]], pad_id: int, dtype="int64"):
    """(B, width) ids left-padded with pad_id and the (B, width) attention mask."""
    import numpy as np

    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=dtype)
    mask = np.zeros((len(prompts), width), dtype=dtype)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


class Stage:
    """What the worker is doing, for the error it reports."""

    name = "import"


def serve(who: str, argv: list[str] | None, start: Callable, generate: Callable, packages: tuple[str, ...],
          add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse the common options, ``start(args, setup, stage) -> (state, facts)``, check one tiny generate,
    say ready, then answer ``generate(state, setup, prompts, beams) -> {"sequences", "scores", "generate_s"}``
    per request line until quit. Whatever the runtime raises is reported on stdout with its stage."""
    ap = argparse.ArgumentParser(prog=f"{who}_worker.py")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--setup", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--spin", action="store_true", help="ONNX Runtime's intra-op threads busy-wait between operators")
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    stage = Stage()

    def fail(e: Exception, where: str, extra: dict) -> None:
        log(who, traceback.format_exc())
        say({"error": f"{type(e).__name__}: {e}", "stage": where, "traceback": traceback.format_exc()[-4000:], **extra})

    try:
        setup = json.loads(args.setup.read_text())
        args.cache.mkdir(parents=True, exist_ok=True)
        state, facts = start(args, setup, stage)
        stage.name = "generate (start-up check)"
        generate(state, setup, [setup["sid_tokens"][0]], 2)
    except Exception as e:  # report why, whatever the runtime raised
        fail(e, stage.name, {"versions": versions(packages)})
        return 1
    say({"ready": True, "versions": versions(packages), **facts})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            say(generate(state, setup, req["prompts"], int(req["beams"])))
        except Exception as e:
            fail(e, "generate", {})
    return 0


def run_worker(script: str | Path, argv: list[str] | None = None) -> int:
    """Load a runtime's worker file, give it this module as ``protocol``, and serve it."""
    spec = importlib.util.spec_from_file_location(f"pauserec_{Path(script).stem}", str(script))
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    worker.protocol = sys.modules[__name__]
    return serve(worker.NAME, argv, worker.start, worker.generate, worker.PACKAGES, getattr(worker, "options", None))


if __name__ == "__main__":
    # Run as a script, Python puts this folder first on sys.path, where pauserec's own modules would shadow
    # the environment's packages (imported by the workers' start): the worker imports only the environment's.
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    if len(sys.argv) < 2:
        sys.exit("usage: worker_protocol.py RUNTIME_worker.py --checkpoint CKPT --cache DIR --setup SETUP.json ...")
    sys.exit(run_worker(sys.argv[1], sys.argv[2:]))
