"""Reports people can read at a glance: headlines, the named speed-up column, the answer check against HF
generate, the optimum baseline's clean skip, the one-page compare, the git revision fallback, the ablation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("torch")

from pauserec.cli.bench import app as bench_app  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def latency_run(trained_engines, tiny_checkpoints, synthetic_data, tmp_path_factory) -> Path:
    """cot + pause engines, HF generate of the pause checkpoint, an optimum baseline whose environment is absent."""
    out = tmp_path_factory.mktemp("latency_run")
    args = ["latency", str(trained_engines["cot"]), str(trained_engines["pause"]), "--hf-baseline",
            str(tiny_checkpoints["pause"]), "--optimum-baseline", str(tiny_checkpoints["pause"]), "--optimum-python",
            str(out / "no-such-env" / "bin" / "python"), "--data", str(synthetic_data), "--batch-sizes", "1,2",
            "--iters", "2", "--warmup", "0", "--threads", "1", "--no-rss", "--out", str(out)]
    res = runner.invoke(bench_app, args)
    assert res.exit_code == 0, res.output
    return out


def test_headlines_and_named_reference_column(latency_run):
    result = json.loads((latency_run / "latency.json").read_text())
    hf = next(s["name"] for s in result["systems"] if s["system"] == "hf-generate")
    assert result["ratios"]["reference"] == hf  # not whichever system came first (cot here)
    assert result["ratios"]["speedup_vs_reference"][hf] == {"1": pytest.approx(1.0), "2": pytest.approx(1.0)}
    head = result["ratios"]["headline"]["engine_vs_hf"]
    assert head["baseline"] == hf and head["engine"].startswith("pause") and set(head["by_batch"]) == {"1", "2"}
    md = (latency_run / "latency.md").read_text()
    first_lines = md.split("| system")[0]
    assert "Engine vs HF generate: faster by" in first_lines and "Pause vs CoT latency" in first_lines
    assert "Same answers:" in first_lines
    assert f"speed-up vs {hf} |" in md and "vs first" not in md


def test_every_latency_report_checks_answers_against_hf(latency_run):
    result = json.loads((latency_run / "latency.json").read_text())
    pause = next(s for s in result["systems"] if s["system"] == "engine" and s["kind"] == "pause")
    a = pause["agreement"]
    assert a["reference"].endswith("(HF generate)")
    assert a["users"] == 2 * (1 + 2)  # every timed call of every batch size
    assert a["identical_top10"] == a["users"] and a["top10_overlap"] == 1.0
    assert 0 <= a["max_score_diff"] < 1e-3
    cot = next(s for s in result["systems"] if s["kind"] == "cot")
    assert cot["agreement"] is None  # no HF baseline of that checkpoint in the run
    assert all(st["loadavg_1m"] for s in result["systems"] for st in s["by_batch"].values())
    assert "| identical top-10 |" in (latency_run / "latency.md").read_text()


def test_optimum_baseline_skips_cleanly_without_its_environment(latency_run):
    result = json.loads((latency_run / "latency.json").read_text())
    assert not any(s["system"] == "optimum-generate" for s in result["systems"])
    (skip,) = result["skipped"]
    assert skip["system"] == "optimum-generate" and "pauserec-bench optimum-env" in skip["reason"]
    assert "Engine vs optimum: not measured" in (latency_run / "latency.md").read_text()


def test_compare_page_is_one_self_contained_file(latency_run, tmp_path):
    page = tmp_path / "run.html"
    res = runner.invoke(bench_app, ["compare", str(latency_run), "--html", str(page), "--md", str(tmp_path / "run.md")])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<table>" in text and "Engine vs HF generate" in text
    srcs = [s.split('"')[0] for s in text.split('src="')[1:]]
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch beside it
    assert "<link" not in text and "<script" not in text
    if (latency_run / "latency.png").is_file():
        assert len(srcs) == 1
    assert "Engine vs HF generate" in (tmp_path / "run.md").read_text()
    assert runner.invoke(bench_app, ["compare", str(tmp_path / "empty-dir-x"), "--html", str(page)]).exit_code == 2


def test_git_revision_fallbacks(monkeypatch):
    from pauserec.bench import env
    from pauserec.bench.env import environment_line

    monkeypatch.setattr(env, "_git", lambda cwd: None)  # not a checkout (an installed package)
    monkeypatch.setattr(env, "_build_info", lambda: "0123456789abcdef0123")
    assert env.git_revision() == ("0123456789abcdef0123", "recorded at build")
    monkeypatch.setattr(env, "_build_info", lambda: None)

    monkeypatch.setattr(env, "_direct_url_json", lambda: {"url": "https://example.invalid/pauserec.git",
                                                          "vcs_info": {"vcs": "git", "commit_id": "feedbeef"}})
    assert env.git_revision() == ("feedbeef", "pip VCS install")
    monkeypatch.setattr(env, "_direct_url_json", lambda: {})  # a wheel from an index: no direct_url.json
    assert env.git_revision() == (None, None)
    e = env.environment(1)
    assert e["git_sha"] is None and "git unknown" in environment_line({"environment": e})


def test_git_revision_in_a_checkout():
    from pauserec.bench.env import git_revision

    sha, source = git_revision()
    if sha is None:
        pytest.skip("not running from a git checkout")
    assert source == "checkout" and len(sha.split("-")[0]) == 40


def test_quality_title_counts_the_users_evaluated():
    from pauserec.bench.report import quality_title

    result = {"systems": [{"metrics": {"users": 400}}, {"metrics": {"users": 400}}]}
    assert quality_title(result) == "Quality (test split, 400 users)"


def test_recompute_prefix_engine_gives_the_same_answers(tiny_checkpoints, trained_engines, tmp_path):
    from pauserec.export import ExportConfig, export_engine
    from pauserec.runtime import Engine, Recommender

    rep = export_engine(ExportConfig(checkpoint=tiny_checkpoints["pause"], out=tmp_path / "recompute",
                                     fuse_prefix=False, threads=1))
    assert rep.manifest["shapes"]["prefix"] == "recomputed"
    assert json.loads((trained_engines["pause"] / "manifest.json").read_text())["shapes"]["prefix"] == "fused"
    fused, unfused = Engine.load(trained_engines["pause"]), Engine.load(rep.out)
    ids = fused.catalog.item_ids
    histories = [[ids[i] for i in range(j, j + 4)] for j in range(5)]
    a = Recommender(fused).recommend(histories, k=8, beams=8)
    b = Recommender(unfused).recommend(histories, k=8, beams=8)
    np.testing.assert_array_equal(a.item_index, b.item_index)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_ablation_variants_on_a_tiny_model(tiny_checkpoints, tmp_path):
    from pauserec.bench.ablation import VARIANTS, AblationConfig, run_ablation, write_ablation
    from pauserec.bench.report import finish, markdown

    cfg = AblationConfig(checkpoint=tiny_checkpoints["pause"], out=tmp_path, batch_sizes=(1, 2), beams=6, k=6,
                         iters=1, warmup=0, threads=1, history_len=5)
    result = finish(run_ablation(cfg, say=lambda m: None), "ablation", threads=1)
    names = [v["name"] for v in result["variants"]]
    assert names == [v.name for v in VARIANTS]
    for v in result["variants"]:
        assert set(v["by_batch"]) == {"1", "2"} and v["agreement"]["users"] == 3
        if v["scoring"] == "sid":  # the same engine math, reorganised: the same answers
            assert v["agreement"]["identical_top10"] == 3, v["name"]
            assert v["agreement"]["max_score_diff"] < 1e-4, v["name"]
    assert result["variants"][0]["slowdown_vs_all_on"] == {"1": 1.0, "2": 1.0}
    files = write_ablation(result, tmp_path)
    md = Path(files["md"]).read_text()
    assert "| idea switched off |" in md and "context KV per beam" in md and "git " in md
    assert "idea switched off" in markdown(result)


def test_environment_names_the_cpus_instruction_sets(tmp_path, monkeypatch):
    """Two CPUs of one model name can differ in what MLAS uses (AVX2 only, AVX-512 VNNI, AMX): the record says which."""
    from pauserec.bench import env
    from pauserec.bench.env import environment_line

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\ncpu family\t: 25\n")
    real = env.Path
    monkeypatch.setattr(env, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real(p))
    assert env.cpu_isa() == {"family": "25", "model": "1", "isa": ["avx2", "fma", "avx512f", "avx512_vnni"]}
    e = env.environment(2)
    assert "(family 25 model 1; avx2 fma avx512f avx512_vnni)" in environment_line({"environment": e})


def _quality(cot_hit: float, cot_ndcg: float) -> dict:
    def m(h, n):
        return {"users": 400, "hit@5": h / 2, "hit@10": h, "ndcg@5": n / 2, "ndcg@10": n, "invalid_rate": 0.0}

    return {"schema": "pauserec-bench/1", "benchmark": "quality", "environment": {},
            "systems": [{"name": k, "kind": k, "metrics": m(h, n)} for k, h, n in
                        (("direct", 0.315, 0.16), ("pause", 0.308, 0.15), ("cot", cot_hit, cot_ndcg))]}


def test_pause_vs_cot_headline_warns_when_cot_is_far_below_direct(tmp_path):
    """The demo's reports put cot's quality beside the pause vs CoT latency headline: loud when it is far apart."""
    from pauserec.bench.report import compare_page, cot_quality_check, headline_lines, write_report

    latency = {"schema": "pauserec-bench/1", "benchmark": "latency", "environment": {}, "systems": [],
               "ratios": {"pause_vs_cot": {"1": {"reduction": 0.86, "text": "-86.0 %"}},
                          "reference": "pause (HF generate)", "speedup_vs_reference": {}}}
    bad = cot_quality_check(_quality(0.040, 0.018), {"direct": 6.0, "pause": 6.0, "cot": 4.1})
    assert bad["comparable"] is False and bad["share_of_direct"]["hit@10"] == pytest.approx(0.040 / 0.315)
    lines = headline_lines({**latency, "cot_quality": bad})
    i = next(i for i, h in enumerate(lines) if h.startswith("Pause vs CoT latency"))
    warning = lines[i + 1]  # right below the latency ratio
    assert "WARNING" in warning and "Hit@10 0.0400 vs direct 0.3150 (13 %)" in warning and "cot 4.1" in warning
    quality = {**_quality(0.040, 0.018), "cot_quality": bad}
    files = {**write_report(quality, tmp_path, "quality"), **{
        f"latency_{k}": v for k, v in write_report({**latency, "cot_quality": bad}, tmp_path, "latency").items()}}
    assert "WARNING: the CoT model is far below direct" in Path(files["md"]).read_text()
    assert "WARNING: the CoT model is far below direct" in Path(files["latency_md"]).read_text()
    page = compare_page([Path(files["json"]), Path(files["latency_json"])])
    assert page.count("<b>WARNING: the CoT model is far below direct</b>") == 2

    good = cot_quality_check(_quality(0.30, 0.15))
    assert good["comparable"] is True
    line = headline_lines({**latency, "cot_quality": good})[-1]
    assert line.startswith("CoT quality, for the pause vs CoT latency: Hit@10 0.3000 vs direct 0.3150 (95 %)")
    assert "WARNING" not in line
    assert cot_quality_check(_quality(0.30, 0.10))["comparable"] is False  # NDCG@10 at 62 % of direct's
    assert headline_lines(latency)[-1].startswith("Pause vs CoT")  # no quality known: the ratio alone, as before
