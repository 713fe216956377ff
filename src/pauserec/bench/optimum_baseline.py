"""The ONNX path a user would pick instead of pauserec: optimum's ``ORTModelForCausalLM`` + HF ``generate``.

optimum-onnx requires transformers < 4.58 and pauserec's training side transformers 5, so the
baseline lives in an environment of its own (``pauserec-bench optimum-env DIR`` makes one) and runs
as a subprocess (``optimum_worker.py``, which imports no pauserec module). The benchmark sends it
the same users' prompt token ids as every other system, interleaved round-robin like them, and maps
the returned SID token sequences to items itself, so the top-10 check is the same code path as the
HF baseline's.
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
from pathlib import Path

import numpy as np

from pauserec.errors import PauserecError

ENV_VAR = "PAUSEREC_OPTIMUM_PYTHON"
WORKER = Path(__file__).with_name("optimum_worker.py")
READY_TIMEOUT_S = 1800.0  # the first start exports the checkpoint (minutes for real-shape models)
CALL_TIMEOUT_S = 1800.0


class OptimumUnavailable(PauserecError):
    """The optimum baseline cannot run here; the message says why and how to fix it."""


def requirements() -> list[str]:
    """What the separate environment installs: torch pinned (an unpinned torch pulls a multi-GB CUDA
    build), transformers below optimum-onnx's cap, and the same onnxruntime as this environment."""
    from importlib import metadata

    try:
        ort = f"onnxruntime=={metadata.version('onnxruntime')}"
    except metadata.PackageNotFoundError:
        ort = "onnxruntime"
    return ["torch==2.13.0", "transformers>=4.50,<4.58", "optimum-onnx", ort, "numpy"]


def env_python(env_dir: str | Path) -> Path:
    return Path(env_dir) / "bin" / "python"


def create_env(env_dir: str | Path, say=print) -> Path:
    """``python -m venv DIR && DIR/bin/pip install <requirements()>``; returns DIR's python."""
    env_dir = Path(env_dir)
    py = env_python(env_dir)
    if not py.is_file():
        say(f"creating {env_dir}")
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    reqs = requirements()
    say("installing " + " ".join(reqs))
    proc = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", *reqs])
    if proc.returncode != 0:
        raise PauserecError(f"pip could not install the optimum environment in {env_dir} (exit {proc.returncode}); "
                            "see pip's output above")
    return py


def find_python(explicit: str | Path | None) -> Path:
    """The optimum environment's python: ``explicit``, else $PAUSEREC_OPTIMUM_PYTHON; OptimumUnavailable if none."""
    where = explicit or os.environ.get(ENV_VAR)
    fix = ("create it with `pauserec-bench optimum-env DIR` and pass --optimum-python DIR/bin/python "
           f"(or set {ENV_VAR})")
    if not where:
        raise OptimumUnavailable(f"no optimum environment given; {fix}")
    py = Path(where)
    if not py.is_file():
        raise OptimumUnavailable(f"optimum environment python {py} not found; {fix}")
    return py


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


class OptimumSystem:
    """One checkpoint served by the optimum worker; ``run`` has the benchmark's system interface."""

    system = "optimum-generate"
    scoring = "full"
    label = None

    def __init__(self, ckpt: str | Path, python: str | Path | None, threads: int | None, cache: str | Path | None):
        from pauserec.data.catalog import Catalog
        from pauserec.data.prompts import TrainingCard
        from pauserec.export.bundle import checkpoint_sha256

        self.path = Path(ckpt)
        self.spec = TrainingCard.load(self.path).prompt
        self.kind = self.spec.kind
        if self.kind == "cot":
            raise OptimumUnavailable("the optimum baseline runs direct and pause checkpoints (one beamed generate); "
                                     "a cot checkpoint needs a rationale pass first")
        self.catalog = Catalog.load(self.path / "catalog.npz")
        self.sha = checkpoint_sha256(self.path)
        py = find_python(python)
        root = Path(cache) if cache else Path(tempfile.gettempdir()) / "pauserec-optimum-cache"
        self.cache = root / self.sha[:16]
        self.cache.mkdir(parents=True, exist_ok=True)
        table = self.spec.sid_table()
        codes = self.catalog.trie.sid_codes  # (S, L) distinct SIDs
        sid_tokens = [[int(table[lv, c]) for lv, c in enumerate(row)] for row in codes]
        self._sid_of_tokens = {tuple(t): i for i, t in enumerate(sid_tokens)}
        setup = self.cache / "setup.json"
        setup.write_text(json.dumps({"sid_tokens": sid_tokens, "pad_id": int(self.spec.pad_id)}))
        cmd = [str(py), str(WORKER), "--checkpoint", str(self.path.resolve()), "--cache", str(self.cache),
               "--setup", str(setup)] + (["--threads", str(threads)] if threads else [])
        self.stderr = open(self.cache / "worker.log", "w")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        self.lines = _Lines(self.proc.stdout)
        t0 = time.perf_counter()
        ready = self._read(READY_TIMEOUT_S, "start")
        self.facts = {k: v for k, v in ready.items() if k != "ready"}
        self.facts["start_s"] = time.perf_counter() - t0
        if threads and self.facts.get("session_intra_op_threads") not in (int(threads),):
            self.close()
            raise OptimumUnavailable(f"optimum's ONNX Runtime session runs {self.facts.get('session_intra_op_threads')} "
                                     f"intra-op threads, not the {threads} asked for; not a fair comparison")

    def _read(self, timeout: float, what: str) -> dict:
        line = self.lines.next(timeout)
        if line is None:
            self.close()
            raise OptimumUnavailable(f"the optimum worker gave no answer ({what}); its log is "
                                     f"{self.cache / 'worker.log'}")
        msg = json.loads(line)
        if "error" in msg:
            self.close()
            raise OptimumUnavailable(f"optimum {msg.get('stage', what)} failed: {msg['error']} (versions "
                                     f"{msg.get('versions', {})}; traceback in {self.cache / 'worker.log'})")
        return msg

    def run(self, histories_idx: list[np.ndarray], k: int, beams: int):
        from pauserec.bench.baseline_hf import rank_items

        prompts = [self.spec.prompt_ids(self.catalog.sids[np.asarray(h, dtype=np.int64)]).tolist()
                   for h in histories_idx]
        self.proc.stdin.write(json.dumps({"prompts": prompts, "beams": int(beams)}) + "\n")
        self.proc.stdin.flush()
        out = self._read(CALL_TIMEOUT_S, "generate")
        item_index, scores = rank_items(out["sequences"], np.asarray(out["scores"], np.float32), self._sid_of_tokens,
                                        self.catalog.trie, k)
        return {"generate": float(out["generate_s"])}, item_index, scores

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
