"""Export and runtime on the oldest onnxruntime the package accepts and on the newest onnxruntime-gpu release.

Each version's CPU wheel is installed beside the environment (``pip install --no-deps --target``, cached under the
virtualenv) and put first on ``PYTHONPATH`` of a subprocess, so one test session checks three onnxruntimes.

The merged model (one If branch per graph; the idle graphs compute nothing) runs on each of them in one prepacked
session. (When idle graphs were run on a batch of zero users, ONNX Runtime before 1.32 could not: its reductions
returned an empty input's shape unreduced and its MatMul refused to broadcast a zero-sized batch dimension.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export import exported, make_checkpoint  # noqa: E402

OLDEST = "1.24.4"  # pyproject.toml: onnxruntime>=1.24 (1.24 is the first whose MatMulNBitsQuantizer takes bits=)
NEWEST_GPU = "1.31.1"  # the newest onnxruntime-gpu release; its CPU twin here
HISTORIES = [["item1", "item5"], ["item7"], ["item2", "item9", "item3", "item12", "item20", "item0", "item8"]]

RUN = """
import json, sys
import onnxruntime
from pauserec.runtime import Engine, Recommender
engine = Engine.load(sys.argv[1], provider="cpu")
out = Recommender(engine).recommend(json.loads(sys.argv[2]), k=5, beams=6)
print(json.dumps({"ort": onnxruntime.__version__, "sessions": sorted({type(s).__name__ for s in engine.sessions.values()}),
                  "items": out.items.tolist(), "scores": out.scores.tolist()}))
"""

EXPORT = """
import sys
from pauserec.export import ExportConfig, export_engine
export_engine(ExportConfig(checkpoint=sys.argv[1], out=sys.argv[2], precision=sys.argv[3], quant_sample=4,
                           min_agreement=0.0))
"""


def _onnxruntime(version: str) -> Path:
    """A folder holding onnxruntime ``version`` (installed once per virtualenv)."""
    target = Path(sys.prefix) / "ort-compat" / version
    if not (target / "onnxruntime" / "__init__.py").is_file():
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              f"onnxruntime=={version}"], capture_output=True, text=True)
        if res.returncode != 0:
            if os.environ.get("CI"):  # CI reaches the package index: a failed install is a failure there
                pytest.fail(f"pip could not install onnxruntime=={version}: {res.stderr[-2000:]}")
            pytest.skip(f"onnxruntime=={version} could not be installed (no package index?)")
    return target


def _python(version: str, code: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_onnxruntime(version)), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, f"onnxruntime {version}:\n{res.stderr[-4000:]}"
    return res.stdout


def _recommend_here(engine: Path) -> dict:
    from pauserec.runtime import Engine, Recommender

    out = Recommender(Engine.load(engine, provider="cpu")).recommend(HISTORIES, k=5, beams=6)
    return {"items": out.items.tolist(), "scores": out.scores.tolist()}


def _same(a: dict, b: dict) -> None:
    assert a["items"] == b["items"]
    np.testing.assert_allclose(np.asarray(a["scores"]), np.asarray(b["scores"]), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def merged_engine(tmp_path_factory) -> Path:
    """A pause engine (fused prefix, think suffix) exported with this environment's onnxruntime, merged model and all."""
    engine = exported(tmp_path_factory, "qwen3", "pause")
    assert json.loads((engine / "manifest.json").read_text())["merged"] == "merged.onnx"
    return engine


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST_GPU])
def test_an_engine_with_a_merged_model_runs_on_older_onnxruntime(merged_engine, version):
    got = json.loads(_python(version, RUN, str(merged_engine), json.dumps(HISTORIES)).strip().splitlines()[-1])
    assert got["ort"] == version
    assert got["sessions"] == ["MergedView"]  # the merged model's one session
    _same(got, _recommend_here(merged_engine))


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST_GPU])
def test_export_on_older_onnxruntime(tmp_path, tmp_path_factory, merged_engine, version):
    """fp32, int4, fp16 and bf16 export there (the quantizer's API is the oldest's too; fp16 and bf16 are checked in
    the merged model and loaded in priority operator order, bf16 without constant folding), merged model and all; the
    fp32 engine recommends what the engine exported with this environment's onnxruntime does."""
    ckpt = make_checkpoint(tmp_path_factory.getbasetemp() / "pauserec-tiny", "qwen3", "pause")
    for precision in ("fp32", "int4", "fp16", "bf16"):
        out = tmp_path / precision
        _python(version, EXPORT, str(ckpt), str(out), precision)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["merged"] == "merged.onnx" and (out / "merged.onnx").exists()
        assert manifest["precision"] == precision
    _same(_recommend_here(tmp_path / "fp32"), _recommend_here(merged_engine))


@pytest.mark.slow
@pytest.mark.parametrize("version", [OLDEST, NEWEST_GPU])
def test_a_float16_kv_engine_runs_on_older_onnxruntime(tmp_path_factory, version):
    """--kv-dtype float16 adds only Cast nodes: the engine runs on its merged session there and recommends what it
    recommends here (int4 scores move by ONNX Runtime's fusions across versions, never beyond a rounding step)."""
    engine = exported(tmp_path_factory, "qwen3", "pause", "-kv16-int4", precision="int4", quant_sample=4,
                      min_agreement=0.0, kv_dtype="float16")  # shared with test_kv_dtype
    got = json.loads(_python(version, RUN, str(engine), json.dumps(HISTORIES)).strip().splitlines()[-1])
    assert got["ort"] == version and got["sessions"] == ["MergedView"]
    here = _recommend_here(engine)
    assert got["items"] == here["items"]
    np.testing.assert_allclose(np.asarray(got["scores"]), np.asarray(here["scores"]), atol=0.05, rtol=0)
