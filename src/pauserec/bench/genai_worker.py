"""The ONNX Runtime GenAI baseline's worker: runs in its own environment (onnxruntime-genai + its model builder).

    python worker_protocol.py genai_worker.py --checkpoint CKPT --cache DIR --setup SETUP.json --precision int4 [--threads N]

It never imports pauserec: the benchmark sends it token ids and gets token ids back. What a user who
wants fast CPU inference would write instead of pauserec: ONNX Runtime GenAI's model builder
(``python -m onnxruntime_genai.models.builder -i CKPT -o DIR -p int4 -e cpu``, run once per checkpoint and
precision, cached in DIR) and ``og.Generator`` with ``search_options(num_beams=K, num_return_sequences=K,
max_length=prompt + SID levels + what the pipeline scores after the SID)``: GenAI's own beam search, one Generator per batch (per prompt length: see ``generate``).

GenAI's beam search cannot be constrained to the catalog's SIDs (``set_logits`` can change a step's
logits, but each beam's prefix is unknown mid-search: ``get_sequence`` then ends the search, and no beam
indices are exposed; its guidance constrains 1-beam search only), so it searches the whole vocabulary; sequences that are not
catalog SIDs come back as they are, and the benchmark drops them when it maps sequences to items.
End-of-sequence is ruled out (``min_length = max_length``), as the HF baseline's ``eos_token_id=None``
does, so every beam is exactly one SID long. GenAI returns no beam scores (the order is best first).

The protocol is ``pauserec.bench.workers``'s (``scores`` null).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

PRECISIONS = ("int4", "int8", "fp32")
protocol: Any = None  # this folder's worker_protocol module: it sets this once it has loaded the file
NAME = "genai"
PACKAGES = ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "onnx-ir", "numpy")


def log(msg: str) -> None:
    protocol.log("genai", msg)


def builder_command(python: str, precision: str, options: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The model builder's command line, as its documentation gives it (CPU execution provider; ``options``:
    its ``--extra_options KEY=VALUE ...``); {CKPT} and {OUT} are filled in by ``protocol.converted``."""
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", "{CKPT}", "-o", "{OUT}", "-p", precision,
           "-e", "cpu", "-c", "{SCRATCH}"]
    return cmd + (["--extra_options", *options] if options else [])


def build_model(ckpt: Path, cache: Path, precision: str, options: list[str] | tuple[str, ...] = ()) -> tuple[Path, dict]:
    """CACHE/model: the builder's GenAI model folder of ``ckpt`` at ``precision``, built once and reused."""
    cmd = builder_command(sys.executable, precision, options)
    shown = " ".join(["python"] + cmd[1:]).replace("{CKPT}", "CKPT").replace("{OUT}", "OUT").replace(" -c {SCRATCH}", "")
    model_dir, facts = protocol.converted(ckpt, cache, cmd, shown, "genai_config.json", protocol.add_architectures)
    return model_dir, {**facts, "precision": precision, "builder_options": list(options)}


def session_overlay(threads: int | None, pad_id: int, spin: bool = False) -> dict:
    """genai_config overrides: the ONNX Runtime options pauserec's engines run with (fixed intra-op threads,
    spinning only with --spin as theirs, one inter-op thread; without --threads ONNX Runtime's default, 0 = one per core, as the
    engines and the optimum baseline get) and the pad token."""
    return {"model": {"pad_token_id": int(pad_id), "decoder": {"session_options": {
        "intra_op_num_threads": int(threads or 0), "inter_op_num_threads": 1, "allow_spinning": "1" if spin else "0"}}}}


def load_model(model_dir: Path, threads: int | None, pad_id: int, spin: bool = False):
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    overlay = session_overlay(threads, pad_id, spin)
    config.overlay(json.dumps(overlay))
    return og.Model(config), overlay["model"]["decoder"]["session_options"]


def generate(model, setup: dict, prompts: list[list[int]], beams: int) -> dict:
    """GenAI's beam search, ``beams`` sequences per user, best first: one Generator per prompt length.

    Prompts of one length run as one batched Generator. Left-padded prompts of different lengths do not:
    onnxruntime-genai 0.18 then returns other sequences for the padded users than for the same prompts alone
    (checked: 0 of 6 beams in common for a user padded by 15 tokens), so a batch of unequal prompts is split
    by length (``generators`` says into how many)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    t0 = time.perf_counter()
    seqs: list = [None] * len(prompts)
    for idx in groups.values():
        for i, s in zip(idx, _generate_equal(model, setup, [prompts[i] for i in idx], beams)):
            seqs[i] = s
    return {"sequences": seqs, "scores": None, "generate_s": time.perf_counter() - t0, "generators": len(groups)}


def _generate_equal(model, setup: dict, prompts: list[list[int]], beams: int) -> list:
    import numpy as np
    import onnxruntime_genai as og

    levels = int(setup.get("new_tokens", len(setup["sid_tokens"][0])))  # the SID and what the pipeline scores after it
    ids = np.asarray(prompts, dtype=np.int32)
    width = ids.shape[1]
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=len(prompts), num_beams=beams, num_return_sequences=beams,
                              max_length=width + levels, min_length=width + levels, do_sample=False,
                              length_penalty=0.0, early_stopping=True)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    return [[[int(t) for t in gen.get_sequence(u * beams + b)[width:]] for b in range(beams)]
            for u in range(len(prompts))]


def start(args, setup: dict, stage) -> tuple[object, dict]:
    import os

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime_genai as og

    if hasattr(og, "disable_telemetry_events"):
        og.disable_telemetry_events()
    stage.name = "model builder"
    model_dir, facts = build_model(args.checkpoint, args.cache, args.precision, args.builder_option)
    stage.name = "load"
    model, facts["session_options"] = load_model(model_dir, args.threads, int(setup["pad_id"]), args.spin)
    return model, facts


def options(ap) -> None:
    ap.add_argument("--precision", choices=PRECISIONS, default="int4")
    ap.add_argument("--builder-option", action="append", default=[], help="KEY=VALUE for the builder's --extra_options")

