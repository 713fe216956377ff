"""Baselines that run in environments of their own: one mechanism for all of them.

The runtimes a user could pick instead of pauserec (optimum's ``ORTModelForCausalLM``, ONNX Runtime
GenAI, OpenVINO GenAI) pin transformers, torch or onnxruntime versions that pauserec's own environment
cannot hold. Each lives in a virtual environment of its own (``pauserec-bench <name>-env DIR`` makes
one) and runs as a subprocess: ``worker_protocol.py <name>_worker.py ...``, files beside this module that
import no pauserec module.

The protocol is the same for every worker, one JSON object per line. Startup: stdout gets
``{"ready": true, ...facts}`` or ``{"error": ..., "stage": ...}``. Then each stdin line
``{"prompts": [[ids]...], "beams": K}`` gets ``{"sequences": [[[tokens after the prompt] per beam] per
user], "scores": [[per beam] per user] or null, "generate_s": s}``; ``{"quit": true}`` stops it. The
benchmark sends every worker the same users' prompt token ids as every other system (``BaselinePrompt``)
and maps the returned SID token sequences to items itself (``rank_items``), so the top-10 check is the
same code path as the HF baseline's.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pauserec.errors import PauserecError

HERE = Path(__file__).parent
READY_TIMEOUT_S = 3600.0  # the first start converts the checkpoint (minutes for real-shape models)
CALL_TIMEOUT_S = 1800.0


class WorkerUnavailable(PauserecError):
    """A baseline's worker cannot run here; the message says why and how to fix it."""


@dataclass(frozen=True)
class Runtime:
    """One baseline runtime: its worker script, its environment and how the report names it."""

    system: str  # "optimum-generate": the system name in results
    what: str  # "optimum": how messages and reports name it
    name: str  # "optimum": --NAME-baseline, --NAME-python, `pauserec-bench NAME-env`
    worker: Path
    requirements: Callable[[], list[str]]
    scores: bool  # whether it returns beam scores
    trie: bool  # whether its search follows the catalog's trie (else it searches the full vocabulary)
    search: str  # what its search is, for headlines: "beam search (no trie)"
    why_no_trie: str = ""  # for a runtime that does not follow it: why it cannot
    after_install: Callable[[Path, Callable], None] | None = None  # (env python, say): repairs pip cannot express

    @property
    def env_var(self) -> str:
        return f"PAUSEREC_{self.name.upper()}_PYTHON"

    def find_python(self, explicit: str | Path | None) -> Path:
        """The environment's python: ``explicit``, else $PAUSEREC_<NAME>_PYTHON; WorkerUnavailable if none."""
        where = explicit or os.environ.get(self.env_var)
        fix = (f"create it with `pauserec-bench {self.name}-env DIR` and pass --{self.name}-python DIR/bin/python "
               f"(or set {self.env_var})")
        if not where:
            raise WorkerUnavailable(f"no {self.what} environment given; {fix}")
        py = Path(where)
        if not py.is_file():
            raise WorkerUnavailable(f"{self.what} environment python {py} not found; {fix}")
        return py

    def create_env(self, env_dir: str | Path, say=print) -> Path:
        """``python -m venv DIR && DIR/bin/pip install <requirements>``; returns DIR's python."""
        env_dir = Path(env_dir)
        py = env_dir / "bin" / "python"
        if not py.is_file():
            say(f"creating {env_dir}")
            subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
        reqs = self.requirements()
        say("installing " + " ".join(reqs))
        proc = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", *reqs])
        if proc.returncode != 0:
            raise PauserecError(f"pip could not install the {self.what} environment in {env_dir} (exit "
                                f"{proc.returncode}); see pip's output above")
        if self.after_install:
            self.after_install(py, say)
        return py


def same_version(name: str, fallback: str) -> str:
    """``name==<the version installed here>`` (so a baseline runs the same library as the engine), else fallback."""
    from importlib import metadata

    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return fallback


# -- the runtimes ------------------------------------------------------------------------------------
def _optimum_requirements() -> list[str]:
    """torch pinned (an unpinned torch pulls a multi-GB CUDA build), transformers below optimum-onnx's cap
    (pauserec's training side needs transformers 5), the same onnxruntime as this environment."""
    return ["torch==2.13.0", "transformers>=4.50,<4.58", "optimum-onnx", same_version("onnxruntime", "onnxruntime"),
            "numpy"]


OPTIMUM = Runtime(system="optimum-generate", what="optimum", name="optimum", worker=HERE / "optimum_worker.py",
                  requirements=_optimum_requirements, scores=True, trie=True,
                  search="ORTModelForCausalLM.generate")

GENAI_VERSION = "0.18.0"  # the onnxruntime-genai release this baseline was written and checked against
GENAI_PRECISIONS = ("int4", "int8", "fp32")  # the model builder's CPU precisions (its fp16/bf16 are for GPUs)
# The builder's own switch for this case ("compute only last-token logits during prefill", default off):
# without it the prefill returns full-vocabulary logits for every prompt position of every beam (at the
# Qwen3-0.6B shape, batch 8 x 20 beams x ~100 positions x 151,936 fp32 = 12 GB, killed for memory here).
GENAI_BUILDER_OPTIONS = ("prune_lm_head=true",)
NO_TRIE_EFFECT = ("so it searches the full vocabulary at every step: that only helps its speed (no trie check per "
                  "step); sequences that are not catalog SIDs are dropped when mapped to items")


def _genai_requirements() -> list[str]:
    """onnxruntime-genai and the same onnxruntime and transformers as this environment, torch pinned, and what
    the model builder imports (onnx, onnx-ir)."""
    return [f"onnxruntime-genai=={GENAI_VERSION}", same_version("onnxruntime", "onnxruntime>=1.31"), "torch==2.13.0",
            same_version("transformers", "transformers>=4.57"), "onnx", "onnx-ir", "numpy"]


GENAI = Runtime(system="genai-generate", what="ORT GenAI", name="genai", worker=HERE / "genai_worker.py",
                requirements=_genai_requirements, scores=False, trie=False,
                why_no_trie="GenAI's beam search cannot be constrained to the catalog's SIDs (set_logits can mask a "
                            "step, but no beam's prefix is exposed mid-search; its guidance constrains 1-beam search "
                            "only)",
                search="beam search (no trie)")
OPENVINO_VERSION = "2026.4.1"  # the openvino-genai release this baseline was written and checked against
OPENVINO_PRECISIONS = ("int4", "int8", "fp32")  # optimum-intel's --weight-format for the CPU


def _openvino_requirements() -> list[str]:
    """openvino-genai (which pins openvino and openvino-tokenizers), optimum-intel with nncf for the export's
    weight compression (optimum-intel picks its transformers), torch pinned."""
    return [f"openvino-genai=={OPENVINO_VERSION}.0", "optimum-intel[openvino]", "nncf", "torch==2.13.0", "numpy"]


def _drop_broken_torchvision(py: Path, say) -> None:
    """optimum-intel requires torchvision, and pip may pair the CPU torch with a torchvision built for another
    torch ("operator torchvision::nms does not exist"), which breaks every optimum-intel export. Text models
    never use torchvision: if it does not import, remove it."""
    ok = subprocess.run([str(py), "-c", "import torchvision.ops"], capture_output=True).returncode == 0
    if not ok:
        say("torchvision does not import with this torch (a build for another torch); removing it, as text models "
            "do not need it")
        subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)


OPENVINO = Runtime(system="openvino-generate", what="OpenVINO GenAI", name="openvino",
                   worker=HERE / "openvino_worker.py", requirements=_openvino_requirements, scores=True, trie=False,
                   why_no_trie="OpenVINO GenAI's beam search cannot be constrained to the catalog's SIDs (its "
                               "structured output is not applied to beam search, and its Python API has no logits "
                               "processor)",
                   search="beam search (no trie)", after_install=_drop_broken_torchvision)
RUNTIMES = {r.name: r for r in (OPTIMUM, GENAI, OPENVINO)}


# what each runtime's conversion can give
PRECISIONS = {"optimum": ("fp32",), "genai": GENAI_PRECISIONS, "openvino": OPENVINO_PRECISIONS}


def check_precision(runtime: Runtime, precision: str) -> str:
    allowed = PRECISIONS[runtime.name]
    if precision not in allowed:
        raise PauserecError(f"--{runtime.name}-precision {precision!r}: {runtime.what}'s CPU precisions are "
                            f"{', '.join(allowed)}")
    return precision


@dataclass(frozen=True)
class WorkerBaseline:
    """One baseline system of a benchmark run: a checkpoint through a runtime (at a precision where the
    runtime converts it), in the environment of ``python`` (else $PAUSEREC_<NAME>_PYTHON)."""

    runtime: str  # a key of RUNTIMES
    checkpoint: Path
    python: Path | None = None
    precision: str | None = None
    cache: Path | None = None  # where the runtime's conversion of each checkpoint is kept between runs

    def start(self, threads: int | None, engine: Path | None = None, spin: bool = False) -> WorkerSystem:
        """The running system (``engine``: the engine whose prompt a checkpoint without a training card gets;
        ``spin``: ONNX Runtime's intra-op threads busy-wait, as the engines' do with ``spin``; OpenVINO keeps
        its own threading)."""
        runtime = RUNTIMES[self.runtime]
        spin_arg = ("--spin",) if spin and runtime is not OPENVINO else ()
        if runtime is OPTIMUM:
            return WorkerSystem(OPTIMUM, self.checkpoint, self.python, threads, self.cache, engine, spin_arg,
                                precision="fp32")
        precision = check_precision(runtime, self.precision or "int4")
        args = ("--precision", precision, *spin_arg)
        if runtime is GENAI:
            args += tuple(f"--builder-option={o}" for o in GENAI_BUILDER_OPTIONS)
        return WorkerSystem(runtime, self.checkpoint, self.python, threads, self.cache, engine, args, variant=precision)


class _Lines:
    """Lines of a subprocess's stdout, read by a thread so that waiting for one can time out."""

    def __init__(self, stream) -> None:
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.q.put(line)
        self.q.put(None)

    def next(self, timeout: float) -> str | None:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None


class WorkerSystem:
    """One checkpoint served by a runtime's worker; ``run`` has the benchmark's system interface.

    ``engine``: for a checkpoint without a training card, the engine exported from it, whose prompt and
    catalog the worker is fed (as for the HF baseline). ``args``: the worker's own command-line options;
    ``variant`` names the cache folder and label of one configuration (a precision)."""

    scoring = "full"

    def __init__(self, runtime: Runtime, ckpt: str | Path, python: str | Path | None, threads: int | None,
                 cache: str | Path | None, engine: str | Path | None = None, args: tuple[str, ...] = (),
                 variant: str | None = None, precision: str | None = None):
        from pauserec.reference.hf_generate import baseline_prompt
        from pauserec.bench.latency import system_name
        from pauserec.export.bundle import checkpoint_sha256

        self.runtime, self.system = runtime, runtime.system
        self.precision = precision or variant  # what the engine it is paired with should run
        self.path = Path(ckpt)
        py = runtime.find_python(python)
        self.prompt = baseline_prompt(self.path, engine)
        self.spec, self.catalog = self.prompt.spec, self.prompt.catalog
        self.kind = self.spec.kind
        if self.kind == "cot":
            raise WorkerUnavailable(f"the {runtime.what} baseline runs direct and pause checkpoints (one beamed "
                                    "generate); a cot checkpoint needs a rationale pass first")
        self.label = f"{system_name(self.kind, self.path)} ({runtime.what}{' ' + variant if variant else ''})"
        self.sha = checkpoint_sha256(self.path)
        root = Path(cache) if cache else Path(tempfile.gettempdir()) / "pauserec-baselines"
        self.cache = root / runtime.name / self.sha[:16] / (variant or "")
        self.cache.mkdir(parents=True, exist_ok=True)
        sid_tokens = self.prompt.sid_tokens()
        self._sid_of_tokens = {t: i for i, t in enumerate(sid_tokens)}
        setup = self.cache / "setup.json"
        after = [int(t) for t in self.spec.after_ids]  # what the pipeline scores after the SID: generated too
        eos = int(self.spec.eos_id) if after and after[-1] == self.spec.eos_id else None
        setup.write_text(json.dumps({"sid_tokens": [list(t) for t in sid_tokens], "pad_id": int(self.spec.pad_id),
                                     "after_ids": after, "eos_id": eos, "new_tokens": self.spec.levels + len(after)}))
        cmd = [str(py), str(HERE / "worker_protocol.py"), str(runtime.worker), "--checkpoint", str(self.path.resolve()), "--cache", str(self.cache),
               "--setup", str(setup), *args] + (["--threads", str(threads)] if threads else [])
        self.stderr = open(self.cache / "worker.log", "w")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        self.lines = _Lines(self.proc.stdout)
        t0 = time.perf_counter()
        ready = self._read(READY_TIMEOUT_S, "start")
        self.facts = {k: v for k, v in ready.items() if k != "ready"}
        self.facts["start_s"] = time.perf_counter() - t0
        self.facts["prompt"] = self.prompt.source
        self.facts.update(returned_sequences=0, invalid_sequences=0, users=0, users_without_a_sid=0, batches=0,
                          searches=0)
        got = (self.facts.get("session_options") or {}).get("intra_op_num_threads")
        if threads and got not in (None, int(threads)):
            self.close()
            raise WorkerUnavailable(f"{runtime.what}'s session runs {got} intra-op threads, not the {threads} asked "
                                    "for; not a fair comparison")

    def _read(self, timeout: float, what: str) -> dict:
        line = self.lines.next(timeout)
        if line is None:
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            died = ""
            if code is not None and code < 0:
                import signal

                died = f", it died of {signal.Signals(-code).name}"
            elif code is not None:
                died = f", it exited {code}"
            raise WorkerUnavailable(f"the {self.runtime.what} worker gave no answer ({what}{died}); its log is "
                                    f"{self.cache / 'worker.log'}")
        msg = json.loads(line)
        if "error" in msg:
            self.close()
            raise WorkerUnavailable(f"{self.runtime.what} {msg.get('stage', what)} failed: {msg['error']} (versions "
                                    f"{msg.get('versions', {})}; traceback in {self.cache / 'worker.log'})")
        return msg

    def generate(self, prompts: list[list[int]], beams: int) -> dict:
        """The worker's answer for prompt ids (see the module's protocol)."""
        self.proc.stdin.write(json.dumps({"prompts": [[int(t) for t in p] for p in prompts], "beams": int(beams)}) + "\n")
        self.proc.stdin.flush()
        return self._read(CALL_TIMEOUT_S, "generate")

    def run(self, histories_idx: list[np.ndarray], k: int, beams: int):
        from pauserec.reference.hf_generate import rank_items

        out = self.generate(self.prompt.ids(histories_idx), beams)
        levels = self.spec.levels  # (tokens generated after the SID are scored, not part of it)
        seqs = [[list(s)[:levels] for s in user] for user in out["sequences"]]
        scores = None if out.get("scores") is None else np.asarray(out["scores"], np.float32)
        item_index, item_scores = rank_items(seqs, scores, self._sid_of_tokens, self.catalog.trie, k)
        f = self.facts
        f["returned_sequences"] += sum(len(u) for u in seqs)
        f["invalid_sequences"] += sum(tuple(int(t) for t in s) not in self._sid_of_tokens for u in seqs for s in u)
        f["users"] += len(histories_idx)
        f["batches"] += 1
        f["searches"] += int(out.get("generators", 1))  # a runtime that must split a batch says into how many
        f["users_without_a_sid"] += int((item_index[:, 0] < 0).sum())
        return {"generate": float(out["generate_s"])}, item_index, item_scores

    def peak_rss_mb(self) -> float | None:
        """The worker's peak RSS so far (VmHWM), i.e. over every batch it served."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"quit": True}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()
        if getattr(self, "stderr", None):
            self.stderr.close()
            self.stderr = None
