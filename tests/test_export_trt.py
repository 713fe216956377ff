"""TensorRT: optimisation profiles from the I/O spec (pure functions), clear errors without TensorRT,
and a real build + run when TensorRT and a GPU are present (skipped by the runtime's own check)."""

from __future__ import annotations

import pytest

from pauserec.errors import BackendUnavailable, ExportError
from pauserec.runtime.spec import ModelShape, freeze, graph_specs, resolve_dims
from pauserec.export.trt import graph_profile, profile
from pauserec.runtime.backends.trt import unavailable_reason

PAUSE = ModelShape(kind="pause", layers=2, kv_heads=2, head_dim=16, vocab=96, codebook_sizes=(4, 5, 6),
                   prefix_len=6, suffix_len=5)
COT = ModelShape(kind="cot", layers=3, kv_heads=1, head_dim=8, vocab=96, codebook_sizes=(4, 5, 6),
                 prefix_len=6, suffix_len=1, max_rationale=7)


def test_static_profiles_pin_every_input():
    specs = graph_specs(PAUSE)
    pre = graph_profile(specs["prefill"], PAUSE, batch=16, beams=20, max_history=20)
    assert pre == {"history_ids": ((16, 80),) * 3, "history_mask": ((16, 80),) * 3}
    dec = graph_profile(specs["decode"], PAUSE, batch=16, beams=20, max_history=20)
    assert set(dec) == {"codes", "ctx_key", "ctx_value", "ctx_mask", "beam_key", "beam_value"}  # scalar step: none
    assert dec["codes"] == ((16, 20),) * 3
    assert dec["ctx_key"] == ((2, 16, 2, 85, 16),) * 3  # 20 items x 4 tokens + <think><pause>x3</think>
    assert dec["beam_value"] == ((2, 16, 2, 20, 2, 16),) * 3  # beams carry L - 1 = 2 own positions


def test_prefill_and_decode_profiles_are_separate_regimes():
    specs = graph_specs(COT)
    pre = graph_profile(specs["prefill"], COT, batch=8, beams=10, max_history=5, static=False)
    assert pre["history_ids"] == ((1, 4), (8, 20), (8, 20))  # one item .. five items
    dec = graph_profile(specs["decode"], COT, batch=8, beams=10, max_history=5, static=False)
    assert dec["codes"] == ((1, 1), (8, 10), (8, 10))
    assert dec["ctx_mask"] == ((1, 5), (8, 29), (8, 29))  # cot: + <think> + 7 rationale + </think>
    think = graph_profile(specs["think"], COT, batch=8, beams=10, max_history=5, static=False)
    assert think["token"] == ((1,), (8,), (8,)) and think["ctx_key"][2] == (3, 8, 1, 29, 8)


def test_frozen_specs_match_static_profiles():
    specs = graph_specs(PAUSE)
    env = resolve_dims("decode", PAUSE, 4, 6, 3)
    frozen = freeze(specs["decode"], env)
    prof = graph_profile(specs["decode"], PAUSE, 4, 6, 3)
    for t in frozen.inputs:
        if t.dims:
            assert prof[t.name] == (t.dims, t.dims, t.dims)
    assert all(isinstance(d, int) for t in frozen.outputs for d in t.dims)


def test_unordered_profile_is_an_error():
    spec = graph_specs(PAUSE)["prefill"]
    with pytest.raises(ExportError, match="not ordered"):
        profile(spec, {"batch": 4, "hist": 8}, {"batch": 2, "hist": 8}, {"batch": 4, "hist": 8})


@pytest.mark.skipif(unavailable_reason() is None, reason="TensorRT and a GPU are present")
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
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"TensorRT unusable here: {unavailable_reason()}")
def test_tensorrt_engine_matches_onnx_runtime(tmp_path_factory):
    pytest.importorskip("torch")
    from test_export import exported

    from pauserec.runtime import Engine, Recommender

    path = exported(tmp_path_factory, "qwen3", "pause", "-trt", static=True, batch=2, beams=5, max_history=3,
                    backend="tensorrt")
    histories = [["item1", "item5"], ["item7"], ["item2", "item9", "item3"]]
    trt = Recommender(Engine.load(path, provider="tensorrt")).recommend(histories, k=5, beams=5)
    cpu = Recommender(Engine.load(path, provider="cpu")).recommend(histories, k=5, beams=5)
    assert trt.items.tolist() == cpu.items.tolist()
