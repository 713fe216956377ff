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
    # a score sums one log-prob per SID level and token after it (5 here), each within the export's 1e-4 of HF's:
    # on an AVX2 CPU (AMD Zen 3) ONNX Runtime's and torch's float32 sums differed by 1.2e-4 over a score
    assert eng["agreement"]["max_score_diff"] < 5e-4
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


def test_pause_against_cot_on_the_users_own_onerec_think_models(tmp_path):
    """The paper's latency table on models in a pipeline's own format: a direct, a pause and a cot OneRec-Think
    checkpoint, each exported with its kind, each paired with its own HF baseline, every top-10 identical."""
    from pauserec.bench.latency import LatencyConfig, run_latency
    from pauserec.bench.report import latency_markdown
    from pauserec.export import ExportConfig, export_engine

    prefixes = ("s_a", "s_b", "s_c")
    index = write_index(tmp_path / "o.index.json", 36, prefixes, 6, seed=1)
    write_items(tmp_path / "o.item.json", index)
    engines, ckpts = [], []
    for n, kind in enumerate(("pause", "cot", "direct")):
        ckpt = make_checkpoint(tmp_path / kind, arch="qwen3", sid_tokens=sid_vocab(prefixes, 6), sid_as_special=True,
                               extra_tokens=("<|sid_begin|>", "<|sid_end|>", "<|thought|>"), seed=n)
        engines.append(export_engine(ExportConfig(
            checkpoint=ckpt, out=tmp_path / "engines" / kind, index=tmp_path / "o.index.json", prompt="onerec-think",
            kind=kind, pause_k=5 if kind == "pause" else None, max_rationale=4, check_users=0)).out)
        ckpts.append(ckpt)
    result = run_latency(LatencyConfig(engines=tuple(engines), hf_baselines=tuple(ckpts), batch_sizes=(2,), beams=12,
                                       warmup=0, iters=1, rss=False, history_len=4, threads=1))
    by_kind = {(s["system"], s["kind"]): s for s in result["systems"]}
    for kind in ("pause", "cot", "direct"):
        eng = by_kind[("engine", kind)]
        assert eng["agreement"]["identical_top10"] == eng["agreement"]["users"] == 2, kind
        assert "onerec-think prompt" in eng["facts"]["prompt"]
        assert f"prompt of engine {kind}" in by_kind[("hf-generate", kind)]["facts"]["prompt"]
    assert set(result["ratios"]["pause_vs_cot"]) == {"2"}
    from pauserec.bench.report import finish, headline_lines

    assert any(line.startswith("Pause vs CoT latency") for line in headline_lines(finish(result, "latency")))
    assert "id(s) forced after the rationale" in latency_markdown(result)


def test_quality_on_a_minionerec_dataset_with_its_own_engine(tmp_path):
    """`pauserec-bench quality ENGINE --data DIR` on the layout export's --data reads (MiniOneRec CSVs + index)."""
    from test_data_datasets import write_minionerec

    from pauserec.bench.quality import run_quality
    from pauserec.bench.report import quality_markdown
    from pauserec.export import ExportConfig, export_engine

    data = write_minionerec(tmp_path / "data")
    ckpt = make_checkpoint(tmp_path / "mini", arch="qwen2", sid_tokens=sid_vocab(("a", "b", "c"), 6), tied=True)
    engine = export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "engine", prompt="minionerec",
                                        index=data / "index" / "Toy.index.json", check_users=2)).out
    res = run_quality(engine, data, beams=4)
    assert res["metrics"]["users"] == 3 and 0 <= res["metrics"]["hit@10"] <= 1
    assert res["metrics"]["invalid_rate"] == 0
    assert "the minionerec prompt" in res["prompt"] and "after the SID scored" in res["prompt"]
    assert "minionerec prompt" in quality_markdown({"systems": [res]})


def test_quality_and_latency_on_onerec_think_data_with_its_own_engine(tmp_path):
    """OneRec-Think's own files (Beauty.pretrain.json + sequential_data_processed.txt) are the catalog for export
    (--index NAME.pretrain.json) and the data for export's guard, `quality` and `latency`; the HF baseline on those
    users' histories gives the engine's top-10."""
    import json
    import random

    from pauserec.bench.latency import LatencyConfig, run_latency
    from pauserec.bench.quality import run_quality
    from pauserec.export import ExportConfig, export_engine

    prefixes = ("s_a", "s_b", "s_c")
    index = write_index(tmp_path / "o.index.json", 36, prefixes, 6, seed=1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "Beauty.pretrain.json").write_text(json.dumps(
        {k: {"title": f"t{k}", "description": "", "categories": "Beauty", "sid": "<|sid_begin|>" + "".join(v) +
             "<|sid_end|>"} for k, v in index.items()}))
    rng = random.Random(3)
    (data / "sequential_data_processed.txt").write_text("".join(
        f"{u} {' '.join(rng.choice(list(index)) for _ in range(rng.randint(4, 7)))}\n" for u in range(1, 7)))
    ckpt = make_checkpoint(tmp_path / "ot", arch="qwen3", sid_tokens=sid_vocab(prefixes, 6), sid_as_special=True,
                           extra_tokens=("<|sid_begin|>", "<|sid_end|>"), seed=2)
    exp = export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "engine", index=data / "Beauty.pretrain.json",
                                     prompt="onerec-think", kind="direct", data=data, guard_users=4, check_users=0))
    assert exp.prompt["popularity_guard"]["users"] == 4
    res = run_quality(exp.out, data, beams=8)
    assert res["metrics"]["users"] == 6 and res["metrics"]["invalid_rate"] == 0
    assert "onerec-think prompt" in res["prompt"]
    lat = run_latency(LatencyConfig(engines=(exp.out,), hf_baselines=(ckpt,), batch_sizes=(3,), beams=12, warmup=0,
                                    iters=1, rss=False, data=data, threads=1))
    eng = lat["systems"][0]
    assert eng["agreement"]["identical_top10"] == eng["agreement"]["users"] == 3


def test_ablation_of_a_checkpoint_trained_elsewhere(tmp_path):
    """`pauserec-bench ablation CKPT --prompt P --sid-index I --hf-baseline`: the engines are exported with the
    checkpoint's own prompt, and HF generate runs that prompt too (identical top-10 to the full-vocabulary engine)."""
    from pauserec.bench.ablation import AblationConfig, run_ablation

    ckpt, _ = _engine(tmp_path, "m", ("a", "b", "c"), "qwen2", "minionerec", tied=True)
    cfg = AblationConfig(checkpoint=ckpt, out=tmp_path / "abl", batch_sizes=(2,), beams=10, k=10, iters=1, warmup=0,
                         threads=1, history_len=4, hf_baseline=True, prompt="minionerec",
                         sid_index=tmp_path / "m.index.json")
    result = run_ablation(cfg, say=lambda m: None)
    rows = {v["name"]: v for v in result["variants"]}
    full, hf = rows["full-vocab head"], rows["HF generate"]
    assert full["agreement"]["users"] == hf["agreement"]["users"] == 2
    same = hf["agreement_full_vocab"]
    assert same["identical_top10"] == same["users"] == 2 and same["max_score_diff"] < 1e-4
    from pauserec.runtime.engine import read_manifest

    assert read_manifest(tmp_path / "abl" / "engines" / "full").prompt.layout == "minionerec"
