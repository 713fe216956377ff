"""The optimum baseline's worker: runs in its own environment (transformers < 4.58 + optimum-onnx).

    python optimum_worker.py --checkpoint CKPT --cache DIR --setup SETUP.json [--threads N]

It never imports pauserec (whose training side needs transformers 5): the benchmark sends it token
ids and gets token ids back. What a user would write instead of pauserec: Hugging Face optimum's
``ORTModelForCausalLM`` exported from the checkpoint, then ``generate(num_beams=K,
prefix_allowed_tokens_fn=trie)`` on ONNX Runtime.

Protocol, one JSON object per line. Startup: stdout gets ``{"ready": true, ...facts}`` or
``{"error": ..., "stage": ...}`` (then exit 1). Then each stdin line ``{"prompts": [[ids]...],
"beams": K}`` gets ``{"sequences": [[[SID tokens] per beam] per user], "scores": [[...]],
"generate_s": s}``; ``{"quit": true}`` or end of input stops it. SETUP.json: ``{"sid_tokens":
[[tok, ...] per catalog SID], "pad_id": int}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

ONNX_DIR = "onnx"
# Run as a script, Python puts this folder first on sys.path, where pauserec's own modules would
# shadow installed packages; this worker imports only the optimum environment's.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)


def say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg: str) -> None:
    sys.stderr.write(f"[optimum worker] {msg}\n")
    sys.stderr.flush()


def build_trie(sid_tokens: list[list[int]]) -> dict:
    """Nested dict of SID token ids, the way such code is usually written (as the HF baseline does)."""
    root: dict = {}
    for seq in sid_tokens:
        node = root
        for tok in seq:
            node = node.setdefault(int(tok), {})
    return root


def staged_checkpoint(ckpt: Path, stage: Path) -> tuple[Path, list[str]]:
    """The checkpoint with its config.json written for transformers 4.x; returns (dir, what was changed).

    transformers 5 writes RoPE as ``rope_parameters``; 4.x reads ``rope_theta`` / ``rope_scaling``
    and would silently fall back to its default theta.
    """
    cfg = json.loads((ckpt / "config.json").read_text())
    notes: list[str] = []
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
            notes.append(f"rope_parameters.rope_theta -> rope_theta ({rope['rope_theta']})")
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
            notes.append("rope_parameters -> rope_scaling")
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    stage.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "config.json":
            target = stage / f.name
            if not target.exists():
                os.symlink(f.resolve(), target)
    (stage / "config.json").write_text(json.dumps(cfg, indent=2))
    return stage, notes


def session_options(threads: int | None):
    """The same ONNX Runtime options pauserec's engines run with (no spinning, fixed threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def session_threads(model) -> int | None:
    """intra_op_num_threads of the loaded model's ONNX Runtime session (0 = ORT's default)."""
    for attr in ("session", "model"):
        sess = getattr(model, attr, None)
        if sess is not None and hasattr(sess, "get_session_options"):
            return int(sess.get_session_options().intra_op_num_threads)
    return None


def load_model(ckpt: Path, cache: Path, threads: int | None) -> tuple[object, dict]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    if threads:
        torch.set_num_threads(int(threads))
    opts = session_options(threads)
    onnx_dir = cache / ONNX_DIR
    facts: dict = {"export_s": None, "config_changes": []}
    if not (onnx_dir / "model.onnx").is_file():
        src, facts["config_changes"] = staged_checkpoint(ckpt, cache / "checkpoint")
        t0 = time.perf_counter()
        model = ORTModelForCausalLM.from_pretrained(src, export=True, use_cache=True, use_io_binding=False,
                                                    provider="CPUExecutionProvider", session_options=opts)
        facts["export_s"] = time.perf_counter() - t0
        tmp = cache / (ONNX_DIR + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        (tmp / "pauserec_export.json").write_text(json.dumps(facts))
        del model
        tmp.replace(onnx_dir)
    else:
        try:
            facts.update(json.loads((onnx_dir / "pauserec_export.json").read_text()), cached=True)
        except (OSError, json.JSONDecodeError):
            facts["cached"] = True
    model = ORTModelForCausalLM.from_pretrained(onnx_dir, use_cache=True, use_io_binding=False,
                                                provider="CPUExecutionProvider", session_options=opts)
    facts["patches"] = fix_head_dim(model)
    facts["session_intra_op_threads"] = session_threads(model)
    facts["onnx_bytes"] = sum(f.stat().st_size for f in onnx_dir.iterdir() if f.is_file())
    return model, facts


def fix_head_dim(model) -> list[str]:
    """optimum-onnx 0.1.0 sizes the empty past KV of the first step as hidden_size // num_attention_heads
    for every model type but a few (gemma, ...); Qwen3-0.6B has head_dim 128 != 1024 / 16, and ONNX
    Runtime then rejects past_key_values ("Got: 64 Expected: 128"). Use the config's head_dim."""
    head_dim = getattr(model.config, "head_dim", None)
    have = getattr(model, "embed_size_per_head", None)
    if head_dim and have and int(have) != int(head_dim):
        model.embed_size_per_head = int(head_dim)
        return [f"ORTModelForCausalLM.embed_size_per_head {have} -> config.head_dim {head_dim}"]
    return []


def smoke_test(model, trie: dict, pad_id: int, levels: int, prompt: list[int]) -> None:
    """One tiny constrained generate at start-up, so a model optimum cannot run fails here, not mid-benchmark."""
    generate(model, trie, pad_id, levels, [prompt], 2)


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("optimum", "optimum-onnx", "transformers", "torch", "onnxruntime", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def generate(model, trie: dict, pad_id: int, levels: int, prompts: list[list[int]], beams: int) -> dict:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1

    def allowed(batch_id: int, input_ids) -> list[int]:
        node = trie
        for tok in input_ids[width:].tolist():
            node = node.get(tok, {})
        return list(node.keys())

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=beams, num_return_sequences=beams,
            max_new_tokens=levels, length_penalty=0.0, early_stopping=True, prefix_allowed_tokens_fn=allowed,
            output_scores=True, return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=None,
        )
    dt = time.perf_counter() - t0
    seqs = out.sequences[:, width:].reshape(len(prompts), beams, -1).tolist()
    scores = out.sequences_scores.reshape(len(prompts), beams).float().tolist()
    return {"sequences": seqs, "scores": scores, "generate_s": dt}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="optimum_worker.py")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--setup", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    stage = "import"
    try:
        import optimum.onnxruntime  # noqa: F401

        stage = "export"
        setup = json.loads(args.setup.read_text())
        trie = build_trie(setup["sid_tokens"])
        levels = len(setup["sid_tokens"][0])
        args.cache.mkdir(parents=True, exist_ok=True)
        model, facts = load_model(args.checkpoint, args.cache, args.threads)
        stage = "generate (start-up check)"
        smoke_test(model, trie, int(setup["pad_id"]), levels, setup["sid_tokens"][0])
    except Exception as e:  # report why, whatever optimum raised
        log(traceback.format_exc())
        say({"error": f"{type(e).__name__}: {e}", "stage": stage, "traceback": traceback.format_exc()[-4000:],
             "versions": versions()})
        return 1
    say({"ready": True, "versions": versions(), **facts})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            say(generate(model, trie, int(setup["pad_id"]), levels, req["prompts"], int(req["beams"])))
        except Exception as e:
            log(traceback.format_exc())
            say({"error": f"{type(e).__name__}: {e}", "stage": "generate", "traceback": traceback.format_exc()[-4000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
