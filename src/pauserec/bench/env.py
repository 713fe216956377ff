"""The environment every benchmark result records: machine, threads, versions, git revision, load."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

PACKAGES = ("pauserec", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "transformers", "tensorrt")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets ONNX Runtime's MLAS kernels choose between (fp32 GEMM: AVX2/FMA or AVX-512; int8:
# AVX2, AVX-VNNI, AVX-512 VNNI or AMX): two CPUs of one "model name" can differ here.
ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_isa() -> dict:
    """{"family", "model", "isa"}: the CPU's family/model numbers (x86: /proc/cpuinfo) and which of
    ``ISA_FLAGS`` it has; {} where /proc/cpuinfo is not readable."""
    info: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            if key in ("cpu family", "model") and key not in info:
                info[key] = value
            elif key == "flags":
                flags = set(value.split())
                info["isa"] = [f for f in ISA_FLAGS if f in flags]
                break
    except OSError:
        return {}
    return {"family": info.get("cpu family"), "model": info.get("model"), "isa": info.get("isa", [])}


def _git(cwd: Path) -> str | None:
    """HEAD of the git checkout at ``cwd`` ('-dirty' with local changes), None when it is not one."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _build_info() -> str | None:
    """The revision recorded when the installed package was built (cmake/build_info.cmake)."""
    try:
        from pauserec import _build_info  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(_build_info, "GIT_SHA", "") or None


def _direct_url_json() -> dict:
    """The installed distribution's direct_url.json (PEP 610), {} when pip wrote none (a wheel from an index)."""
    try:
        text = metadata.distribution("pauserec").read_text("direct_url.json")
        info = json.loads(text) if text else {}
    except (metadata.PackageNotFoundError, json.JSONDecodeError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def _direct_url() -> tuple[str | None, str | None]:
    """pip's record of where the package came from: a VCS commit, or the local folder it was built from."""
    info = _direct_url_json()
    commit = (info.get("vcs_info") or {}).get("commit_id")
    if commit:
        return commit, "pip VCS install"
    url = info.get("url", "")
    if url.startswith("file://"):
        folder = Path(unquote(urlparse(url).path))
        if folder.is_dir():
            sha = _git(folder)
            if sha:
                return sha, "source folder it was installed from, now"
    return None, None


def git_revision() -> tuple[str | None, str | None]:
    """(revision, where it came from): the checkout this package runs from, else the revision recorded at
    build time, else pip's direct_url.json; (None, None) when nothing tells."""
    sha = _git(Path(__file__).resolve().parent)
    if sha:
        return sha, "checkout"
    sha = _build_info()
    if sha:
        return sha, "recorded at build"
    return _direct_url()


def git_sha() -> str | None:
    """The revision of :func:`git_revision` alone."""
    return git_revision()[0]


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment(threads: int | None = None) -> dict:
    """A JSON-able record of where a measurement was taken (load average: 1, 5, 15 minutes, at the end)."""
    sha, source = git_revision()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cores": os.cpu_count(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "git_sha": sha,
        "git_source": source,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def environment_line(result: dict) -> str:
    env = result.get("environment", {})
    git = env.get("git_sha")
    isa = env.get("cpu_isa") or {}
    cpu = env.get("cpu", "?") + (f" (family {isa.get('family')} model {isa.get('model')}; "
                                 f"{' '.join(isa.get('isa') or []) or 'no AVX2'})" if isa else "")
    return (f"\n_{cpu}, {env.get('cores', '?')} cores, threads {env.get('threads') or 'default'}, "
            f"git {str(git)[:12] if git else 'unknown'}"
            + (f" ({env['git_source']})" if git and env.get("git_source") not in (None, "checkout") else "")
            + f", {env.get('timestamp', '')}_\n")
