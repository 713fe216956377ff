"""TensorRT: the functions the real build uses, run without TensorRT against a stand-in of its API
(profiles, build flags, which ONNX graphs are parsed, the plan validation harness, plan I/O checks),
clear errors without TensorRT, and a real build + run when TensorRT and a GPU are present (skipped
by the runtime's own check)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from pauserec.errors import BackendUnavailable, EngineError, ExportError
from pauserec.export.trt import build_plans, graph_profile, plan_profile, profile, validate_plans
from pauserec.runtime.backends.trt import check_plan, unavailable_reason
from pauserec.runtime.spec import GraphSpec, ModelShape, freeze, graph_specs, resolve_dims

PAUSE = ModelShape(kind="pause", layers=2, kv_heads=2, head_dim=16, vocab=96, codebook_sizes=(4, 5, 6),
                   prefix_len=6, suffix_len=5)
COT = ModelShape(kind="cot", layers=3, kv_heads=1, head_dim=8, vocab=96, codebook_sizes=(4, 5, 6),
                 prefix_len=6, suffix_len=1, max_rationale=7)
TRT_REASON = unavailable_reason()


# -- profiles ------------------------------------------------------------------------------------------
def test_static_profiles_pin_every_input():
    specs = graph_specs(PAUSE)
    pre = graph_profile(specs["prefill"], PAUSE, batch=16, beams=20, hist=80)
    assert pre == {"history_ids": ((16, 80),) * 3, "history_mask": ((16, 80),) * 3}
    dec = graph_profile(specs["decode"], PAUSE, batch=16, beams=20, hist=80)
    assert set(dec) == {"codes", "ctx_key", "ctx_value", "ctx_mask", "beam_key", "beam_value"}  # scalar step: none
    assert dec["codes"] == ((16, 20),) * 3
    assert dec["ctx_key"] == ((2, 16, 2, 85, 16),) * 3  # 20 items x 4 tokens + <think><pause>x3</think>
    assert dec["beam_value"] == ((2, 16, 2, 20, 2, 16),) * 3  # beams carry L - 1 = 2 own positions


def test_prefill_and_decode_profiles_are_separate_regimes():
    specs = graph_specs(COT)
    pre = graph_profile(specs["prefill"], COT, batch=8, beams=10, hist=20, static=False)
    assert pre["history_ids"] == ((1, 1), (8, 20), (8, 20))  # one slot .. five items of 4 tokens
    dec = graph_profile(specs["decode"], COT, batch=8, beams=10, hist=20, static=False)
    assert dec["codes"] == ((1, 1), (8, 10), (8, 10))
    assert dec["ctx_mask"] == ((1, 2), (8, 29), (8, 29))  # cot: + <think> + 7 rationale + </think>
    think = graph_profile(specs["think"], COT, batch=8, beams=10, hist=20, static=False)
    assert think["token"] == ((1,), (8,), (8,)) and think["ctx_key"][2] == (3, 8, 1, 29, 8)


@pytest.mark.parametrize("shape", [PAUSE, COT], ids=["pause", "cot"])
def test_the_build_profile_of_frozen_specs_is_the_static_profile(shape):
    """build_plans takes plan_profile(frozen spec), the pipeline's static specs: equal to graph_profile."""
    for name, spec in graph_specs(shape).items():
        env = resolve_dims(name, shape, 4, 6, 3)
        frozen = freeze(spec, env)
        assert plan_profile(frozen) == graph_profile(spec, shape, 4, 6, 3)
        assert all(isinstance(d, int) for t in frozen.outputs for d in t.dims)


def test_plan_profile_refuses_dynamic_specs():
    with pytest.raises(ExportError, match="--static"):
        plan_profile(graph_specs(PAUSE)["decode"])


def test_unordered_profile_is_an_error():
    spec = graph_specs(PAUSE)["prefill"]
    with pytest.raises(ExportError, match="not ordered"):
        profile(spec, {"batch": 4, "hist": 8}, {"batch": 2, "hist": 8}, {"batch": 4, "hist": 8})


# -- build_plans against a stand-in of the TensorRT API -----------------------------------------------
def fake_tensorrt(log: list) -> types.ModuleType:
    """Just enough of the tensorrt module for build_plans; records what the build asked for."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = type("Flags", (), {})
    trt.BuilderFlag = type("BuilderFlag", (), {"FP16": "FP16", "TF32": "TF32"})

    class Config:
        def set_flag(self, flag):
            log.append(("set_flag", flag))

        def clear_flag(self, flag):
            log.append(("clear_flag", flag))

        def add_optimization_profile(self, prof):
            log.append(("profile", dict(prof.shapes)))

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            self.shapes[name] = (tuple(mn), tuple(op), tuple(mx))

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            log.append(("parse", path))
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"fake plan"

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


def stand_in_tensorrt(monkeypatch) -> list:
    """Installs the stand-in (after torch is imported: torch's tracer probes for a real tensorrt)."""
    import importlib.machinery

    log: list = []
    trt = fake_tensorrt(log)
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr("pauserec.export.trt.require_tensorrt", lambda: None)
    return log


def _engine_specs(path: Path) -> dict[str, GraphSpec]:
    m = json.loads((path / "manifest.json").read_text())
    return {n: GraphSpec.from_manifest(n, d) for n, d in m["graphs"].items()}


def _onnx_input_types(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: i.type.tensor_type.elem_type for i in model.graph.input}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_plans_parses_the_graphs_of_the_engine_precision(tmp_path_factory, tmp_path, monkeypatch, precision):
    pytest.importorskip("torch")
    from test_export import exported

    path = exported(tmp_path_factory, "qwen3", "pause", f"-static-{precision}", static=True, batch=2, beams=3,
                    max_history=3, precision=precision, min_agreement=0.0)
    specs = _engine_specs(path)
    files = {n: path / s.file for n, s in specs.items()}
    log = stand_in_tensorrt(monkeypatch)
    plans = build_plans(files, specs, tmp_path, fp16=precision == "fp16")
    assert plans == {n: f"{n}.plan" for n in specs} and all((tmp_path / f).read_bytes() == b"fake plan" for f in plans.values())
    parsed = [Path(p) for op, p in log if op == "parse"]
    assert parsed == list(files.values())
    kv = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert _onnx_input_types(files["decode"])["ctx_key"] == kv  # the parsed graph has the engine's KV dtype
    flags = [(op, f) for op, f in log if op in ("set_flag", "clear_flag")]
    assert flags == ([("set_flag", "FP16")] * 2 if precision == "fp16" else [("clear_flag", "TF32")] * 2)
    profiles = [p for op, p in log if op == "profile"]
    assert profiles == [plan_profile(specs[n]) for n in files]
    assert profiles[1]["ctx_key"][0] == tuple(next(t.dims for t in specs["decode"].inputs if t.name == "ctx_key"))


# -- the plan validation harness ----------------------------------------------------------------------
class Perturbed:
    """A plan runner stand-in: ONNX Runtime's outputs, with chosen outputs shifted."""

    def __init__(self, graphs, shifts: dict[tuple[str, int], float]) -> None:
        self.graphs, self.shifts, self.sessions = graphs, shifts, graphs.sessions

    def run(self, graph, **feeds):
        out = [np.array(o) for o in self.graphs.run(graph, **feeds)]
        for (g, i), d in self.shifts.items():
            if g == graph:
                finite = np.isfinite(out[i])
                out[i][finite] += np.asarray(d, out[i].dtype)
        return out


def _validation_args(path: Path, arch: str, batch: int, beams: int) -> dict:
    from test_export import tiny_model

    from pauserec.data import Catalog
    from pauserec.prompt.spec import PromptEncoder, PromptSpec
    from pauserec.export.pipeline import build_graphs
    from pauserec.export.validate import References

    m = json.loads((path / "manifest.json").read_text())
    spec = PromptSpec.from_dict(m["prompt"])
    shape = build_graphs(tiny_model(arch), spec, m["scoring"]).shape
    return dict(refs=References(tiny_model(arch), rows=shape.levels - 1),
                encoder=PromptEncoder(spec, Catalog.load(path / "catalog.npz")), shape=shape,
                static_env=resolve_dims("decode", shape, batch, beams, spec.max_history_tokens), seed=0, threads=1)


def test_validate_plans_lists_every_mismatch(tmp_path_factory):
    pytest.importorskip("torch")
    from test_export import exported

    from pauserec.export.validate import OrtGraphs

    path = exported(tmp_path_factory, "qwen3", "pause", "-static-fp32", static=True, batch=2, beams=3, max_history=3,
                    precision="fp32", min_agreement=0.0)
    specs = _engine_specs(path)
    files = {n: path / s.file for n, s in specs.items()}
    args = _validation_args(path, "qwen3", 2, 3)
    same = OrtGraphs(files, threads=1)
    checks = validate_plans({}, files, specs, "fp32", args, runner=same)
    outputs = {(c.graph, c.output) for c in checks}
    assert {("prefill", "logprobs (tensorrt)"), ("decode", "new_key (tensorrt)")} <= outputs
    assert {c.case for c in checks} == {"random", "real"}
    assert all(c.ok and c.against == "onnx" and c.max_abs_err == 0.0 for c in checks)

    shifted = Perturbed(same, {("prefill", 0): 0.5, ("decode", 1): 1e-2})  # logprobs, new_key
    with pytest.raises(ExportError) as err:
        validate_plans({}, files, specs, "fp32", args, runner=shifted)
    msg = str(err.value)
    assert "4 TensorRT plan output(s) differ" in msg  # 2 outputs x 2 cases, each listed
    assert msg.count("prefill [") == 2 and msg.count("decode [") == 2 and "new_key (tensorrt)" in msg


def test_validate_plans_reports_fp16_differences(tmp_path_factory):
    """fp16 plans are not held to a log-prob tolerance (the pipeline judges them by top-10 agreement)."""
    pytest.importorskip("torch")
    from test_export import exported

    from pauserec.export.validate import OrtGraphs

    path = exported(tmp_path_factory, "qwen3", "pause", "-static-fp16", static=True, batch=2, beams=3, max_history=3,
                    precision="fp16", min_agreement=0.0)
    specs = _engine_specs(path)
    files = {n: path / s.file for n, s in specs.items()}
    shifted = Perturbed(OrtGraphs(files, threads=1), {("prefill", 0): 0.5})
    checks = validate_plans({}, files, specs, "fp16", _validation_args(path, "qwen3", 2, 3), runner=shifted)
    assert all(c.ok for c in checks)
    assert max(c.max_abs_err for c in checks) == pytest.approx(0.5, rel=1e-2)


def test_export_with_tensorrt_wires_build_validation_and_ranking(tmp_path_factory, tmp_path, monkeypatch):
    """export_engine --backend tensorrt with stand-ins for TensorRT only: plans parsed from the staged fp16
    graphs, validated against them, the ranking compared on (cpu, tensorrt), all recorded in the manifest."""
    pytest.importorskip("torch")
    from test_export import make_checkpoint

    from pauserec.export import ExportConfig, export_engine
    from pauserec.export.validate import OrtGraphs

    root = tmp_path_factory.getbasetemp() / "pauserec-tiny"
    root.mkdir(exist_ok=True)
    ckpt = make_checkpoint(root, "qwen3", "pause")
    log = stand_in_tensorrt(monkeypatch)
    parsed_types = []
    original = sys.modules["tensorrt"].OnnxParser.parse_from_file
    monkeypatch.setattr(sys.modules["tensorrt"].OnnxParser, "parse_from_file",
                        lambda self, path: parsed_types.append(_onnx_input_types(Path(path))) or original(self, path))
    monkeypatch.setattr("pauserec.export.trt.TrtGraphs",
                        lambda plans, specs: OrtGraphs({n: p.with_suffix(".onnx") for n, p in plans.items()}, 1))
    ranked = []

    def ranking(cfg, src, a, b, providers=("cpu", "cpu")):
        ranked.append(providers)
        return {"sample": 4, "top10_overlap": 1.0, "top1_agreement": 1.0}

    monkeypatch.setattr("pauserec.export.pipeline._ranking_report", ranking)
    out = tmp_path / "eng"
    report = export_engine(ExportConfig(checkpoint=ckpt, out=out, backend="tensorrt", static=True, batch=2, beams=3,
                                        max_history=3, precision="fp16", min_agreement=0.0, threads=1))
    m = json.loads((out / "manifest.json").read_text())
    assert m["plans"] == {n: f"{n}.plan" for n in m["graphs"]} and (out / "decode.plan").is_file()
    assert all(t["ctx_key"] == onnx.TensorProto.FLOAT16 for t in parsed_types if "ctx_key" in t) and parsed_types
    assert ("set_flag", "FP16") in log
    plan_checks = [v for v in m["validation"] if v.get("against") == "onnx"]
    assert plan_checks and all(v["max_abs_err"] == 0.0 for v in plan_checks)
    assert ("cpu", "tensorrt") in ranked  # the plans' ranking against the ONNX engine's
    assert any(v.get("case") == "tensorrt vs onnx ranking sample" for v in m["validation"])
    assert report.backend == "tensorrt"


# -- plan I/O checks -----------------------------------------------------------------------------------
class FakePlan:
    def __init__(self, tensors):  # [(name, is_input, np dtype, dims)]
        self.tensors = tensors
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def _t(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name):
        return "in" if self._t(name)[1] else "out"

    def get_tensor_dtype(self, name):
        return self._t(name)[2]

    def get_tensor_shape(self, name):
        return self._t(name)[3]


FAKE_TRT = types.SimpleNamespace(nptype=lambda d: d, TensorIOMode=types.SimpleNamespace(INPUT="in"))


def test_plan_dtypes_are_checked_against_the_manifest():
    spec = freeze(graph_specs(PAUSE)["prefill"], resolve_dims("prefill", PAUSE, 2, 3, 4))
    spec = GraphSpec.from_manifest("prefill", spec.to_dict("float16"))
    tensors = [(t.name, True, np.dtype(t.dtype).type, t.dims) for t in spec.inputs] + \
              [(t.name, False, np.dtype(t.dtype).type, t.dims) for t in spec.outputs]
    check_plan(FakePlan(tensors), FAKE_TRT, spec, "prefill.plan")  # as declared: fine
    wrong = [(n, i, np.float32 if n == "ctx_key" else d, dims) for n, i, d, dims in tensors]
    with pytest.raises(EngineError, match="output ctx_key: dtype float32 != manifest float16"):
        check_plan(FakePlan(wrong), FAKE_TRT, spec, "prefill.plan")
    int32_ids = [(n, i, np.int32 if n == "history_ids" else d, dims) for n, i, d, dims in tensors]
    with pytest.raises(EngineError, match="input history_ids: dtype int32 != manifest int64"):
        check_plan(FakePlan(int32_ids), FAKE_TRT, spec, "prefill.plan")


# -- without / with TensorRT ----------------------------------------------------------------------------
@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are present")
def test_missing_tensorrt_says_what_to_install(tmp_path):
    from pauserec.export import ExportConfig, export_engine
    from pauserec.export.trt import require_tensorrt

    with pytest.raises(BackendUnavailable, match="tensorrt|cuda-python|GPU"):
        require_tensorrt()
    cfg = ExportConfig(checkpoint=tmp_path / "nowhere", out=tmp_path / "eng", backend="tensorrt", static=True,
                       batch=2, beams=4)
    with pytest.raises(BackendUnavailable, match="install"):
        export_engine(cfg)  # fails before loading anything
    assert not (tmp_path / "eng").exists()


@pytest.mark.gpu
@pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT unusable here: {TRT_REASON}")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_onnx_runtime(tmp_path_factory, precision):
    pytest.importorskip("torch")
    from test_export import exported

    from pauserec.runtime import Engine, Recommender

    path = exported(tmp_path_factory, "qwen3", "pause", f"-trt-{precision}", static=True, batch=2, beams=5,
                    max_history=3, backend="tensorrt", precision=precision, min_agreement=0.0)
    m = json.loads((path / "manifest.json").read_text())
    assert set(m["plans"]) == set(m["graphs"])
    plan_checks = [v for v in m["validation"] if v.get("against") == "onnx"]
    assert plan_checks and (precision == "fp16" or all(v["ok"] for v in plan_checks))
    histories = [["item1", "item5"], ["item7"], ["item2", "item9", "item3"]]
    engine = Engine.load(path, provider="tensorrt")
    assert engine.provider == "tensorrt"
    trt = Recommender(engine).recommend(histories, k=5, beams=5)
    cpu = Recommender(Engine.load(path, provider="cpu")).recommend(histories, k=5, beams=5)
    assert trt.items.tolist() == cpu.items.tolist()
