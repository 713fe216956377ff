"""`pauserec-bench latency --hf-baseline` on checkpoints trained elsewhere: the HF baseline runs the engine's own
prompt and catalog (no training card), and the engine gives its top-10."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from external_ckpts import make_checkpoint, sid_vocab, write_index, write_items  # noqa: E402

from pauserec.errors import CheckpointError, PauserecError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _engine(tmp_path: Path, name: str, prefixes, arch: str, prompt: str, **ckpt) -> tuple[Path, Path]:
    from pauserec.export import ExportConfig, export_engine

    index = write_index(tmp_path / f"{name}.index.json", 36, prefixes, 6, seed=1)
    write_items(tmp_path / f"{name}.item.json", index)
    make_checkpoint(tmp_path / name, arch=arch, sid_tokens=sid_vocab(prefixes, 6), **ckpt)
    out = export_engine(ExportConfig(checkpoint=tmp_path / name, out=tmp_path / f"engine-{name}",
                                     index=tmp_path / f"{name}.index.json", prompt=prompt, check_users=0)).out
    return tmp_path / name, out


@pytest.mark.parametrize("fmt", ["minionerec", "lc-rec:0"])
def test_the_hf_baseline_of_an_external_checkpoint_runs_the_engines_prompt(tmp_path, fmt):
    from pauserec.bench.latency import LatencyConfig, run_latency

    arch = "qwen2" if fmt == "minionerec" else "llama"
    prefixes = ("a", "b", "c") if fmt == "minionerec" else ("a", "b", "c", "d")
    ckpt, engine = _engine(tmp_path, "m", prefixes, arch, fmt, tied=fmt == "minionerec")
    result = run_latency(LatencyConfig(engines=(engine,), hf_baselines=(ckpt,), batch_sizes=(3,), beams=12, warmup=0,
                                       iters=1, rss=False, history_len=4, threads=1))
    eng, hf = result["systems"]
    assert hf["system"] == "hf-generate" and "prompt of engine engine-m" in hf["facts"]["prompt"]
    assert eng["agreement"]["identical_top10"] == eng["agreement"]["users"] == 3
    assert eng["agreement"]["max_score_diff"] < 1e-4
    from pauserec.bench.report import latency_markdown

    assert "runs the prompt of engine engine-m" in latency_markdown(result)


def test_an_external_checkpoint_without_its_engine_is_refused(tmp_path):
    from pauserec.reference.hf_generate import HFBaseline
    from pauserec.bench.latency import LatencyConfig, run_latency

    ckpt, engine = _engine(tmp_path, "m", ("a", "b", "c"), "qwen2", "minionerec", tied=True)
    other, other_engine = _engine(tmp_path, "o", ("a", "b", "c"), "qwen2", "minionerec", tied=True, seed=5)
    with pytest.raises(PauserecError, match="none of the engines given was exported from it"):
        run_latency(LatencyConfig(engines=(other_engine,), hf_baselines=(ckpt,), batch_sizes=(1,), warmup=0, iters=1,
                                  rss=False))
    with pytest.raises(CheckpointError, match="pass the engine exported from it"):
        HFBaseline(ckpt)
