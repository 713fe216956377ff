"""The OpenVINO GenAI baseline's worker: runs in its own environment (openvino-genai + optimum-intel).

    python worker_protocol.py openvino_worker.py --checkpoint CKPT --cache DIR --setup SETUP.json --precision int4 [--threads N]

It never imports pauserec: the benchmark sends it token ids and gets token ids back (the protocol of
``pauserec.bench.workers``). What a user who wants fast CPU inference would write instead of pauserec:
optimum-intel's export (``optimum-cli export openvino --task text-generation-with-past --weight-format
int4``, run once per checkpoint and precision, cached in DIR) and ``openvino_genai.LLMPipeline`` with
``GenerationConfig(num_beams=K, num_return_sequences=K, max_new_tokens=min_new_tokens=SID levels + what the pipeline scores after the SID)``:
OpenVINO GenAI's own beam search, which shares the prompt's KV cache across beams, one call per batch.

It cannot be constrained to the catalog's SIDs (its structured output is not applied to beam search: set
with 4 beams, 2026.4 returned the same unconstrained sequences; and its Python API has no logits
processor), so it searches the whole vocabulary;
sequences that are not catalog SIDs come back as they are, and the benchmark drops them when it maps
sequences to items. End-of-sequence is ruled out (``ignore_eos``), as the HF baseline's
``eos_token_id=None`` does. Everything else is OpenVINO's CPU default, as a user gets it: on a CPU with
AMX or AVX512-BF16 its inference precision is bf16 even for an fp32 export, and its KV cache is u8 (the
worker records both).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

PRECISIONS = ("int4", "int8", "fp32")
protocol: Any = None  # this folder's worker_protocol module: it sets this once it has loaded the file
NAME = "openvino"
PACKAGES = ("openvino-genai", "openvino", "openvino-tokenizers", "optimum-intel", "nncf", "transformers", "torch",
            "numpy")
CPU_DEFAULTS = ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "DYNAMIC_QUANTIZATION_GROUP_SIZE")


def export_command(python: str, precision: str) -> list[str]:
    """optimum-intel's export, as OpenVINO GenAI's documentation gives it; {CKPT} and {OUT} are filled in by
    ``protocol.converted``."""
    cli = str(Path(python).with_name("optimum-cli"))
    return [cli, "export", "openvino", "--model", "{CKPT}", "--task", "text-generation-with-past",
            "--weight-format", precision, "{OUT}"]


def cpu_defaults() -> dict:
    """What OpenVINO's CPU plugin does unless told otherwise (precision hint, KV cache type, activation
    quantization group): what this baseline runs with."""
    import openvino as ov

    core, out = ov.Core(), {}
    for key in CPU_DEFAULTS:
        try:
            value = core.get_property("CPU", key)
            out[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)  # ov.Type: "bf16"
        except Exception:  # a property this OpenVINO does not have
            pass
    return out


def start(args, setup: dict, stage) -> tuple[object, dict]:
    import openvino_genai as og

    stage.name = "optimum-intel export"
    cmd = export_command(sys.executable, args.precision)
    shown = " ".join(["optimum-cli"] + cmd[1:]).replace("{CKPT}", "CKPT").replace("{OUT}", "OUT")
    model_dir, facts = protocol.converted(args.checkpoint, args.cache, cmd, shown, "openvino_model.xml",
                                          protocol.add_architectures)
    stage.name = "load"
    defaults = cpu_defaults()
    if args.threads == 1 and defaults.get("INFERENCE_PRECISION_HINT") == "bf16":
        raise RuntimeError("OpenVINO 2026.4 dies of SIGFPE in generate with INFERENCE_NUM_THREADS=1 under its bf16 "
                           "default (a CPU with AMX / AVX512-BF16); run this baseline with --threads 2 or more")
    props = {"INFERENCE_NUM_THREADS": int(args.threads)} if args.threads else {}
    pipe = og.LLMPipeline(str(model_dir), "CPU", **props)
    facts.update(precision=args.precision, cpu_defaults=defaults,
                 session_options={"intra_op_num_threads": int(args.threads) if args.threads else 0})
    return pipe, facts


def generate(pipe, setup: dict, prompts: list[list[int]], beams: int) -> dict:
    """One ``generate`` for the whole batch (left-padded, with its attention mask): ``beams`` sequences per
    user, best first, with OpenVINO's beam scores (summed log-probabilities; length penalty 0)."""
    import openvino as ov
    import openvino_genai as og

    levels = int(setup.get("new_tokens", len(setup["sid_tokens"][0])))  # the SID and what the pipeline scores after it
    t0 = time.perf_counter()
    ids, mask = protocol.left_pad(prompts, int(setup["pad_id"]))
    cfg = og.GenerationConfig()
    cfg.num_beams, cfg.num_return_sequences, cfg.num_beam_groups = beams, beams, 1
    cfg.max_new_tokens = cfg.min_new_tokens = levels
    cfg.do_sample, cfg.length_penalty, cfg.ignore_eos = False, 0.0, True
    cfg.stop_criteria = og.StopCriteria.EARLY
    out = pipe.generate(og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(mask)), cfg)
    dt = time.perf_counter() - t0
    tokens, scores = list(out.tokens), list(out.scores)
    if len(tokens) != len(prompts) * beams:
        raise RuntimeError(f"OpenVINO GenAI returned {len(tokens)} sequences for {len(prompts)} prompts x {beams} beams")
    seqs = [[[int(t) for t in tokens[u * beams + b][-levels:]] for b in range(beams)] for u in range(len(prompts))]
    return {"sequences": seqs, "scores": [[float(scores[u * beams + b]) for b in range(beams)] for u in range(len(prompts))],
            "generate_s": dt}


def options(ap) -> None:
    ap.add_argument("--precision", choices=PRECISIONS, default="int4")

