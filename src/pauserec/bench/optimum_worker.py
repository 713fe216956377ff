"""The optimum baseline's worker: runs in its own environment (transformers < 4.58 + optimum-onnx).

    python worker_protocol.py optimum_worker.py --checkpoint CKPT --cache DIR --setup SETUP.json [--threads N]

It never imports pauserec (whose training side needs transformers 5): the benchmark sends it token
ids and gets token ids back (the protocol of ``pauserec.bench.workers``). What a user would write
instead of pauserec: Hugging Face optimum's ``ORTModelForCausalLM`` exported from the checkpoint, then
``generate(num_beams=K, prefix_allowed_tokens_fn=trie)`` on ONNX Runtime.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

ONNX_DIR = "onnx"
protocol: Any = None  # this folder's worker_protocol module: it sets this once it has loaded the file
NAME = "optimum"
PACKAGES = ("optimum", "optimum-onnx", "transformers", "torch", "onnxruntime", "numpy")


def build_trie(sid_tokens: list[list[int]], after: list[int] = ()) -> dict:
    """Nested dict of SID token ids, each SID followed by the tokens the pipeline scores after it, the way such
    code is usually written (as the HF baseline does)."""
    root: dict = {}
    for seq in sid_tokens:
        node = root
        for tok in (*seq, *after):
            node = node.setdefault(int(tok), {})
    return root


def transformers4_config(cfg: dict) -> list[str]:
    """config.json edits for transformers 4.x: transformers 5 writes RoPE as ``rope_parameters``; 4.x reads
    ``rope_theta`` / ``rope_scaling`` and would silently fall back to its default theta."""
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
    return notes


def session_options(threads: int | None, spin: bool = False):
    """The same ONNX Runtime options pauserec's engines run with (fixed threads; spinning only with --spin, as theirs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
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


def load_model(ckpt: Path, cache: Path, threads: int | None, spin: bool = False) -> tuple[object, dict]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    if threads:
        torch.set_num_threads(int(threads))
    opts = session_options(threads, spin)
    onnx_dir = cache / ONNX_DIR
    facts: dict = {"convert_s": None, "config_changes": [],
                   "convert_command": "ORTModelForCausalLM.from_pretrained(CKPT, export=True)"}
    if not (onnx_dir / "model.onnx").is_file():
        src, facts["config_changes"] = protocol.staged_checkpoint(ckpt, cache / "checkpoint", transformers4_config)
        t0 = time.perf_counter()
        model = ORTModelForCausalLM.from_pretrained(src, export=True, use_cache=True, use_io_binding=False,
                                                    provider="CPUExecutionProvider", session_options=opts)
        facts["convert_s"] = time.perf_counter() - t0
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
    facts["session_options"] = {"intra_op_num_threads": session_threads(model)}
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


def start(args, setup: dict, stage) -> tuple[tuple, dict]:
    stage.name = "import"
    import optimum.onnxruntime  # noqa: F401

    stage.name = "export"
    model, facts = load_model(args.checkpoint, args.cache, args.threads, args.spin)
    return (model, build_trie(setup["sid_tokens"], setup.get("after_ids", []))), facts


def generate(state: tuple, setup: dict, prompts: list[list[int]], beams: int) -> dict:
    import torch

    model, trie = state
    pad_id, new = int(setup["pad_id"]), int(setup.get("new_tokens", len(setup["sid_tokens"][0])))
    ids, mask = (torch.from_numpy(a) for a in protocol.left_pad(prompts, pad_id))
    width = ids.shape[1]

    def allowed(batch_id: int, input_ids) -> list[int]:
        node = trie
        for tok in input_ids[width:].tolist():
            node = node.get(tok, {})
        return list(node.keys())

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=beams, num_return_sequences=beams,
            max_new_tokens=new, length_penalty=0.0, early_stopping=True, prefix_allowed_tokens_fn=allowed,
            output_scores=True, return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=setup.get("eos_id"),
        )
    dt = time.perf_counter() - t0
    seqs = out.sequences[:, width:].reshape(len(prompts), beams, -1).tolist()
    scores = out.sequences_scores.reshape(len(prompts), beams).float().tolist()
    return {"sequences": seqs, "scores": scores, "generate_s": dt}

