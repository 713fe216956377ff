"""pauserec-bench latency/quality/compare, the HF baseline and the demo, on tiny trained models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from pauserec.cli.bench import app as bench_app  # noqa: E402

runner = CliRunner()


def test_hf_baseline_equals_engine_top10(tiny_checkpoints, trained_engines, synthetic_data):
    """The baseline people use today and our engine agree on the top-10 (the speed claim rests on it)."""
    from pauserec.reference.hf_generate import HFBaseline
    from pauserec.data import load_dataset
    from pauserec.runtime import Engine, Recommender

    test = load_dataset(synthetic_data).splits().test
    histories = [test.histories[i] for i in range(8)]
    for kind in ("direct", "pause", "cot"):
        hf = HFBaseline(tiny_checkpoints[kind], threads=1).recommend(histories, k=10, beams=20)
        eng = Engine.load(trained_engines[kind])
        ours = Recommender(eng).recommend([[eng.catalog.item_ids[i] for i in h] for h in histories], k=10, beams=20)
        np.testing.assert_array_equal(hf.item_index, ours.item_index, err_msg=kind)
        np.testing.assert_allclose(hf.scores, ours.scores, atol=1e-4, err_msg=kind)


def test_latency_cli_report(trained_engines, tiny_checkpoints, synthetic_data, tmp_path):
    args = ["latency", str(trained_engines["cot"]), str(trained_engines["pause"]), "--hf-baseline",
            str(tiny_checkpoints["pause"]), "--data", str(synthetic_data), "--batch-sizes", "1,4",
            "--iters", "2", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]
    res = runner.invoke(bench_app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["schema"] == "pauserec-bench/1" and result["benchmark"] == "latency"
    assert {"cpu", "cores", "versions", "git_sha"} <= set(result["environment"])
    names = [s["name"] for s in result["systems"]]
    assert len(names) == 3 and names[2].endswith("(HF generate)")
    for s in result["systems"]:
        assert set(s["by_batch"]) == {"1", "4"}
        lat = s["by_batch"]["4"]["batch_latency_s"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert s["peak_rss_mb"] and s["peak_rss_mb"] > 0
    assert result["systems"][0]["by_batch"]["1"]["time_split_s"]["rationale"] > 0  # cot generates a rationale
    assert set(result["ratios"]["pause_vs_cot"]) == {"1", "4"}
    assert result["ratios"]["vs_first"][names[0]]["1"] == pytest.approx(1.0)
    assert (tmp_path / "latency.md").read_text().count("|") > 20
    res = runner.invoke(bench_app, ["compare", str(tmp_path / "latency.json")])
    assert res.exit_code == 0 and "Pause vs CoT" in res.output


def test_quality_cli(trained_engines, synthetic_data, tmp_path):
    res = runner.invoke(bench_app, ["quality", str(trained_engines["pause"]), "--data", str(synthetic_data),
                                    "--limit", "40", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output[res.output.index("{"):])
    m = result["systems"][0]["metrics"]
    assert m["users"] == 40 and m["invalid_rate"] == 0.0
    assert 0 <= m["ndcg@10"] <= m["hit@10"] <= 1 and m["hit@5"] <= m["hit@10"]
    assert "hit@10" in result["systems"][0]["popularity"]


def test_quality_refuses_another_catalog(trained_engines, scientific):
    res = runner.invoke(bench_app, ["quality", str(trained_engines["pause"]), "--data", str(scientific),
                                    "--index", "rkmeans_zcr", "--limit", "5"])
    assert res.exit_code == 2 and "another catalog" in res.output


def test_bad_inputs_exit_2(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    assert runner.invoke(bench_app, ["compare", str(tmp_path / "x.json")]).exit_code == 2
    assert runner.invoke(bench_app, ["latency", str(tmp_path / "missing-engine"), "--no-rss"]).exit_code == 2
    res = runner.invoke(bench_app, ["latency", "--batch-sizes", "1,x"])
    assert res.exit_code != 0


def test_demo_synthetic_tiny_budget(tmp_path):
    from pauserec.bench.demo import DemoConfig, run_demo

    out = run_demo(DemoConfig(out=tmp_path / "demo", train_minutes=0.05, epochs=1, batch_sizes=(1, 2), iters=1,
                              quality_users=20, hf_baseline=False, threads=1))
    files = {k: Path(v) for k, v in out["files"].items()}
    assert all(p.is_file() for p in files.values())
    quality = json.loads(files["json"].read_text())
    assert [s["kind"] for s in quality["systems"]] == ["direct", "pause", "cot"]
    assert all(s["metrics"]["invalid_rate"] == 0.0 for s in quality["systems"])
    latency = json.loads(files["latency_json"].read_text())
    assert "pause_vs_cot" in latency["ratios"]
    check = quality["cot_quality"]  # cot's quality beside the pause vs CoT headline, in both reports
    assert check is not None and latency["cot_quality"] == check and set(check["epochs"]) == {"direct", "pause", "cot"}
    line = ("WARNING: the CoT model is far below direct" if not check["comparable"]
            else "CoT quality, for the pause vs CoT latency")
    assert line in Path(files["md"]).read_text() and line in Path(files["latency_md"]).read_text()
    for kind in ("direct", "pause", "cot"):
        assert (tmp_path / "demo" / "engines" / kind / "manifest.json").is_file()
