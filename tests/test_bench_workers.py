"""Baselines in environments of their own (optimum, ONNX Runtime GenAI, OpenVINO GenAI): what runs without
those environments (the protocol with a fake worker, conversion caching, arguments, clean skips, pairing,
mapping sequences to items, the report), and, where $PAUSEREC_<NAME>_PYTHON names an environment, each
runtime end to end on a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from pauserec.bench import workers as wk
from pauserec.cli.bench import app as bench_app

runner = CliRunner()


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs_env(name: str):
    var = wk.RUNTIMES[name].env_var
    return pytest.mark.skipif(not os.environ.get(var), reason=f"no {name} environment ({var}); make one with "
                              f"`pauserec-bench {name}-env DIR`")


protocol = _load(wk.HERE / "worker_protocol.py", "worker_protocol_under_test")
# OpenVINO 2026.4 dies of SIGFPE with one inference thread under its bf16 default (AMX CPUs); its worker refuses it
THREADS = {"optimum": 1, "genai": 1, "openvino": 2}


# -- without the runtimes' environments -------------------------------------------------------------
def test_requirements_pin_torch_and_the_runtime():
    reqs = {name: r.requirements() for name, r in wk.RUNTIMES.items()}
    assert all("torch==2.13.0" in r for r in reqs.values())  # an unpinned torch pulls a multi-GB CUDA build
    assert any(r.startswith("transformers") and "<4.58" in r for r in reqs["optimum"])
    assert f"onnxruntime-genai=={wk.GENAI_VERSION}" in reqs["genai"] and {"onnx", "onnx-ir"} <= set(reqs["genai"])
    assert f"openvino-genai=={wk.OPENVINO_VERSION}.0" in reqs["openvino"] and "nncf" in reqs["openvino"]


@pytest.mark.parametrize("name", sorted(wk.RUNTIMES))
def test_missing_environment_says_how_to_make_one(name, tmp_path, monkeypatch):
    runtime = wk.RUNTIMES[name]
    monkeypatch.delenv(runtime.env_var, raising=False)
    with pytest.raises(wk.WorkerUnavailable, match=f"pauserec-bench {name}-env DIR"):
        runtime.find_python(None)
    with pytest.raises(wk.WorkerUnavailable, match="not found"):
        runtime.find_python(tmp_path / "nope" / "bin" / "python")
    py = tmp_path / "python"
    py.write_text("")
    monkeypatch.setenv(runtime.env_var, str(py))
    assert runtime.find_python(None) == py


def test_precisions_are_checked():
    assert wk.check_precision(wk.GENAI, "int8") == "int8" and wk.check_precision(wk.OPENVINO, "fp32") == "fp32"
    with pytest.raises(wk.PauserecError, match="int4, int8, fp32"):
        wk.check_precision(wk.GENAI, "fp16")
    for flag in ("--genai-precision", "--openvino-precision"):
        res = runner.invoke(bench_app, ["latency", "--genai-baseline", "ck", "--openvino-baseline", "ck", flag,
                                        "int4,bf16", "--no-rss"])
        assert res.exit_code == 2 and flag in res.output


def test_sequences_map_to_items_best_first_invalid_and_repeats_dropped():
    from pauserec.reference.hf_generate import rank_items

    trie = SimpleNamespace(items_of_sid=lambda sid: {0: [5], 1: [7, 8], 2: [3]}[sid])
    sid_of_tokens = {(10, 20): 0, (10, 21): 1, (11, 20): 2}
    seqs = [[[10, 21], [99, 20], [10, 20], [10, 21]],  # a collision group, an invalid SID, a repeat
            [[99, 99], [98, 98], [97, 97], [96, 96]],  # nothing valid: no items
            [[11, 20], [10, 20], [10, 21], [10, 22]]]  # more items than k
    items, scores = rank_items(seqs, None, sid_of_tokens, trie, 3)
    np.testing.assert_array_equal(items, [[7, 8, 5], [-1, -1, -1], [3, 5, 7]])
    assert np.isnan(scores[0]).all() and np.isneginf(scores[1]).all()  # no beam scores from the runtime
    items, scores = rank_items(seqs, np.array([[-1, -2, -3, -4]] * 3, np.float32), sid_of_tokens, trie, 3)
    np.testing.assert_array_equal(scores[0], [-1, -1, -3])


@pytest.mark.parametrize("name", sorted(wk.RUNTIMES))
def test_workers_stand_alone(name):
    """Each worker runs in an environment without pauserec: it and the protocol file must import none of it."""
    for path in (wk.RUNTIMES[name].worker, wk.HERE / "worker_protocol.py"):
        text = path.read_text()
        assert "import pauserec" not in text and "from pauserec" not in text
    worker = _load(wk.RUNTIMES[name].worker, f"{name}_worker_under_test")
    assert callable(worker.generate) and callable(worker.start) and worker.NAME == name
    if hasattr(worker, "PRECISIONS"):
        assert tuple(worker.PRECISIONS) == wk.PRECISIONS[name]


def test_protocol_pads_left_and_stages_configs(tmp_path):
    ids, mask = protocol.left_pad([[5, 6, 7], [8]], 0, "int32")
    np.testing.assert_array_equal(ids, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    assert ids.dtype == np.int32
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (ckpt / "model.safetensors").write_bytes(b"x")
    staged, notes = protocol.staged_checkpoint(ckpt, tmp_path / "stage", protocol.add_architectures)
    assert staged != ckpt and notes  # a `pauserec-bench shape` checkpoint has no architectures
    assert json.loads((staged / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert (staged / "model.safetensors").read_bytes() == b"x"
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    assert protocol.staged_checkpoint(ckpt, tmp_path / "s2", protocol.add_architectures) == (ckpt, [])


def test_conversion_runs_once_per_command_and_fails_loudly(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write = ("import sys, pathlib; o = pathlib.Path(sys.argv[2]); o.mkdir(parents=True); "
             "(o / 'done').write_text(open(sys.argv[1] + '/config.json').read())")
    cmd = [sys.executable, "-c", write, "{CKPT}", "{OUT}"]
    model, facts = protocol.converted(ckpt, tmp_path / "cache", cmd, "convert v1", "done", protocol.add_architectures)
    assert json.loads((model / "done").read_text())["architectures"] == ["LlamaForCausalLM"]  # the staged config
    assert facts["convert_s"] > 0 and facts["config_changes"] and not facts.get("cached")
    assert protocol.converted(ckpt, tmp_path / "cache", cmd, "convert v1", "done")[1]["cached"] is True
    assert not protocol.converted(ckpt, tmp_path / "cache", cmd, "convert v2", "done")[1].get("cached")
    with pytest.raises(RuntimeError, match="convert v3 exited 3"):
        protocol.converted(ckpt, tmp_path / "cache", [sys.executable, "-c", "raise SystemExit(3)"], "convert v3", "done")
    assert (tmp_path / "cache" / "model" / "done").is_file()  # a failed conversion leaves the last good one


FAKE_WORKER = '''
NAME, PACKAGES = "fake", ("numpy",)
protocol = None  # set by worker_protocol


def start(args, setup, stage):
    stage.name = "convert"
    if {fail!r}:
        raise RuntimeError("no converter for this model")
    return None, {{"session_options": {{"intra_op_num_threads": args.threads}}, "convert_s": 1.5}}


def generate(state, setup, prompts, beams):
    sids = setup["sid_tokens"]
    seqs = [[[7, 7, 7, 7]] + [sids[(len(p) + b) % len(sids)] for b in range(beams - 1)] for p in prompts]
    return {{"sequences": seqs, "scores": None, "generate_s": 0.01, "generators": 2}}
'''


def _fake_runtime(tmp_path: Path, fail: bool = False) -> wk.Runtime:
    script = tmp_path / f"fake_worker_{fail}.py"
    script.write_text(FAKE_WORKER.format(fail=fail))
    return wk.Runtime(system="fake-generate", what="Fake", name="fake", worker=script, requirements=lambda: [],
                      scores=False, trie=False, search="beam search (no trie)", why_no_trie="it cannot")


def test_worker_protocol_end_to_end_with_a_fake_runtime(tiny_checkpoints, tmp_path):
    """The benchmark's side of every worker: start, prompts out, sequences back, items, facts, errors."""
    system = wk.WorkerSystem(_fake_runtime(tmp_path), tiny_checkpoints["pause"], sys.executable, 1, tmp_path / "c",
                             variant="int4")
    try:
        assert system.label.endswith("(Fake int4)") and system.precision == "int4"
        assert system.facts["convert_s"] == 1.5 and system.facts["versions"]["numpy"]
        n = len(system.catalog.item_ids)
        users = [np.arange(3), np.arange(5) % n]
        timings, items, scores = system.run(users, 10, 4)
        assert timings["generate"] == pytest.approx(0.01) and items.shape == (2, 10) and np.isnan(scores[items >= 0]).all()
        first_sid = system.prompt.sid_tokens()[len(system.prompt.ids(users)[0]) % len(system.prompt.sid_tokens())]
        assert system.catalog.trie.items_of_sid(system._sid_of_tokens[first_sid])[0] == items[0, 0]
        f = system.facts
        assert (f["returned_sequences"], f["invalid_sequences"], f["users"]) == (8, 2, 2)  # [7,7,7,7] is no SID
        assert (f["batches"], f["searches"]) == (1, 2)
    finally:
        system.close()
    assert system.proc.poll() is not None  # quit ends the worker
    with pytest.raises(wk.WorkerUnavailable, match=r"Fake convert failed: RuntimeError: no converter"):
        wk.WorkerSystem(_fake_runtime(tmp_path, fail=True), tiny_checkpoints["pause"], sys.executable, 1,
                        tmp_path / "c")


def test_baselines_pair_with_the_engine_of_their_checkpoint_and_precision():
    from pauserec.bench.latency import answer_reference, engine_reference

    def s(system, sha, precision=None, runtime=None):
        return SimpleNamespace(system=system, sha=sha, kind="pause", precision=precision, runtime=runtime)

    systems = [s("engine", "other", "int4"), s("hf-generate", "a"), s("engine", "a", "fp32"),
               s("engine", "a", "int4"), s("genai-generate", "a", "int4", wk.GENAI),
               s("optimum-generate", "a", "fp32", wk.OPTIMUM), s("openvino-generate", "a", "int8", wk.OPENVINO)]
    assert engine_reference(systems, 4) == 3  # same checkpoint, same precision
    assert engine_reference(systems, 6) == 2  # same checkpoint, no int8 engine: the first of it
    assert answer_reference(systems, 4) == 3  # no trie, no scores: checked against the engine
    assert answer_reference(systems, 6) == 2  # scores but no trie: the engine too
    assert answer_reference(systems, 5) == 1  # optimum follows the trie like HF: checked against HF


def _row(name, system, p50, precision=None):
    lat = {"p50": p50, "p95": p50, "p99": p50, "min": p50, "max": p50}
    return {"name": name, "kind": "pause", "system": system, "path": name, "peak_rss_mb": 100.0, "scoring": "full",
            "agreement": None, "facts": {}, "precision": precision,
            "by_batch": {"1": {"batch_latency_s": lat, "per_user_s": p50, "throughput_users_per_s": 1 / p50,
                               "time_split_s": {}, "iters": 2, "spread": 1.0, "loadavg_1m": [1.0, 2.0]}}}


def test_report_says_what_each_runtime_cannot_do():
    from pauserec.bench.latency import ratios
    from pauserec.bench.report import markdown

    eng = _row("pause", "engine", 0.01, "int4")
    gen = _row("pause:ck (ORT GenAI int4)", "genai-generate", 0.05, "int4")
    ov = _row("pause:ck (OpenVINO GenAI int4)", "openvino-generate", 0.03, "int4")
    gen["agreement"] = {"reference": "pause", "users": 4, "identical_top10": 0, "identical_rate": 0.0,
                        "top10_overlap": 0.25, "max_score_diff": None}
    gen["facts"] = {"precision": "int4", "convert_s": 12.5, "convert_command": "python -m onnxruntime_genai.models."
                    "builder -p int4", "session_options": {"intra_op_num_threads": 2}, "returned_sequences": 80,
                    "invalid_sequences": 60, "users": 4, "users_without_a_sid": 1, "batches": 2, "searches": 5,
                    "versions": {"onnxruntime-genai": "0.18.0"}}
    ov["facts"] = {"convert_s": 3.0, "convert_command": "optimum-cli export openvino", "batches": 2, "searches": 2,
                   "returned_sequences": 10, "invalid_sequences": 0, "users": 4, "versions": {}}
    systems = [SimpleNamespace(sha="a")] * 3
    result = {"benchmark": "latency", "systems": [eng, gen, ov], "ratios": ratios([eng, gen, ov], systems),
              "skipped": [], "environment": {}}
    head = result["ratios"]["headline"]
    assert head["engine_vs_genai_int4"]["by_batch"]["1"] == pytest.approx(5.0)
    assert head["engine_vs_openvino_int4"]["by_batch"]["1"] == pytest.approx(3.0)
    md = markdown(result)
    assert "Engine vs ORT GenAI int4 beam search (no trie): faster by **5.0x** at batch 1" in md
    assert "Engine vs OpenVINO GenAI int4 beam search (no trie): faster by **3.0x**" in md
    assert "cannot be constrained to the catalog's SIDs" in md and "only helps its speed" in md
    assert "60 of 80 returned sequences were not catalog SIDs (75.0 %)" in md and "1 of 4 users" in md
    assert "builder -p int4 12.5 s" in md and "intra-op threads 2" in md
    assert "batches split by prompt length: 5 searches for 2 batches" in md
    assert "ORT GenAI returns no beam scores" in md and "OpenVINO GenAI returns no" not in md
    assert "| 0 (0.0 %) | 0.250 | n/a |" in md
    skipped = {**result, "systems": [eng], "ratios": ratios([eng]),
               "skipped": [{"system": "openvino-generate", "path": "ck", "precision": "int8", "reason": "no env"}]}
    assert "Engine vs OpenVINO GenAI int8: not measured (no env)" in markdown(skipped)


def test_latency_skips_each_runtime_cleanly_without_its_environment(trained_engines, tiny_checkpoints, tmp_path):
    ck, none = str(tiny_checkpoints["pause"]), str(tmp_path / "no-such-env" / "bin" / "python")
    args = ["latency", str(trained_engines["pause"]), "--genai-baseline", ck, "--genai-python", none,
            "--openvino-baseline", ck, "--openvino-precision", "int4,fp32", "--openvino-python", none,
            "--batch-sizes", "1", "--iters", "1", "--warmup", "0", "--threads", "1", "--no-rss", "--beams", "10",
            "--out", str(tmp_path)]
    res = runner.invoke(bench_app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "latency.json").read_text())
    assert [s["system"] for s in result["systems"]] == ["engine"]
    got = [(s["system"], s["precision"]) for s in result["skipped"]]
    assert got == [("genai-generate", "int4"), ("openvino-generate", "int4"), ("openvino-generate", "fp32")]
    assert all(f"pauserec-bench {s['system'].split('-')[0]}-env" in s["reason"] for s in result["skipped"])
    md = (tmp_path / "latency.md").read_text()
    assert "Engine vs ORT GenAI int4: not measured" in md and "Engine vs OpenVINO GenAI fp32: not measured" in md


def test_optimum_worker_fixes_what_optimum_gets_wrong_for_qwen3(tmp_path):
    """The worker's two corrections: RoPE theta for transformers 4.x configs, and the past-KV head size."""
    worker = _load(wk.OPTIMUM.worker, "optimum_worker_fixes")
    model = SimpleNamespace(config=SimpleNamespace(head_dim=128), embed_size_per_head=64)  # Qwen3-0.6B: 1024 / 16
    assert worker.fix_head_dim(model) and model.embed_size_per_head == 128
    assert worker.fix_head_dim(model) == []
    cfg = {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
    assert worker.transformers4_config(cfg) and cfg["rope_theta"] == 1e6
    assert worker.build_trie([[1, 2], [1, 3]]) == {1: {2: {}, 3: {}}}


# -- with the environments ($PAUSEREC_<NAME>_PYTHON) ------------------------------------------------
@needs_env("optimum")
def test_optimum_baseline_matches_hf(tiny_checkpoints, tmp_path):
    from pauserec.reference.hf_generate import HFBaseline

    system = wk.WorkerBaseline("optimum", tiny_checkpoints["pause"], cache=tmp_path).start(1)
    try:
        assert system.facts["session_options"]["intra_op_num_threads"] == 1
        rng = np.random.default_rng(0)
        users = [rng.choice(len(system.catalog.item_ids), 6, replace=False) for _ in range(3)]
        _, items, scores = system.run(users, 10, 8)
    finally:
        system.close()
    hf = HFBaseline(tiny_checkpoints["pause"], threads=1).recommend(users, k=10, beams=8)
    np.testing.assert_array_equal(items, hf.item_index)
    np.testing.assert_allclose(scores, hf.scores, atol=1e-4)


@needs_env("genai")
def test_genai_fp32_beam_search_matches_unconstrained_hf(tiny_checkpoints, tmp_path):
    """GenAI's beam search is HF's without the trie: on unpadded prompts its fp32 sequences are HF
    generate's, same order (what makes its items comparable at all)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    system = wk.WorkerBaseline("genai", tiny_checkpoints["pause"], precision="fp32", cache=tmp_path).start(1)
    try:
        rng = np.random.default_rng(0)
        prompts = [p.tolist() for p in system.prompt.ids([rng.choice(len(system.catalog.item_ids), 6, replace=False)
                                                          for _ in range(3)])]
        assert len({len(p) for p in prompts}) == 1
        got = system.generate(prompts, 6)["sequences"]
    finally:
        system.close()
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["pause"], dtype=torch.float32).eval()
    levels = system.spec.levels
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor(prompts), do_sample=False, num_beams=6, num_return_sequences=6,
                             max_new_tokens=levels, min_new_tokens=levels, length_penalty=0.0, early_stopping=True,
                             pad_token_id=system.spec.pad_id, eos_token_id=None)
    want = out[:, len(prompts[0]):].reshape(3, 6, levels).tolist()
    assert [u[0] for u in got] == [u[0] for u in want]  # the best beam
    overlap = np.mean([len({tuple(s) for s in a} & {tuple(s) for s in b}) / 6 for a, b in zip(got, want)])
    assert overlap >= 0.8, (got, want)


@pytest.mark.parametrize("name", ["genai", "openvino"])
def test_a_batch_answers_as_its_users_alone(name, tiny_checkpoints, tmp_path):
    """Prompts of different lengths in one batch get the sequences each gets alone (GenAI by splitting the batch
    by length, OpenVINO by its attention mask)."""
    if not os.environ.get(wk.RUNTIMES[name].env_var):
        pytest.skip(f"no {name} environment ({wk.RUNTIMES[name].env_var})")
    system = wk.WorkerBaseline(name, tiny_checkpoints["pause"], precision="fp32", cache=tmp_path).start(THREADS[name])
    try:
        rng = np.random.default_rng(1)
        prompts = [p.tolist() for p in system.prompt.ids([rng.choice(len(system.catalog.item_ids), n, replace=False)
                                                          for n in (3, 8, 5)])]
        assert len({len(p) for p in prompts}) == 3
        batch = system.generate(prompts, 6)
        alone = [system.generate([p], 6) for p in prompts]
    finally:
        system.close()
    assert batch["sequences"] == [a["sequences"][0] for a in alone]
    if batch["scores"] is not None:
        np.testing.assert_allclose(batch["scores"], [a["scores"][0] for a in alone], atol=1e-4)


@pytest.mark.parametrize("name,precision", [("genai", "int4"), ("openvino", "int8")])  # int4: groups of 128 > hidden 64
def test_latency_with_each_runtime_end_to_end(name, precision, trained_engines, tiny_checkpoints, synthetic_data, tmp_path):
    runtime = wk.RUNTIMES[name]
    if not os.environ.get(runtime.env_var):
        pytest.skip(f"no {name} environment ({runtime.env_var})")
    args = ["latency", str(trained_engines["pause"]), f"--{name}-baseline", str(tiny_checkpoints["pause"]),
            f"--{name}-precision", precision, "--baseline-cache", str(tmp_path / "cache"), "--data", str(synthetic_data),
            "--batch-sizes", "1,3", "--iters", "2", "--warmup", "1", "--threads", str(THREADS[name]), "--no-rss",
            "--beams", "10", "--out", str(tmp_path)]
    res = runner.invoke(bench_app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["skipped"] == []
    eng, base = result["systems"]
    assert base["system"] == runtime.system and base["name"].endswith(f"({runtime.what} {precision})")
    assert set(base["by_batch"]) == {"1", "3"} and base["peak_rss_mb"] > 0
    f = base["facts"]
    assert f["convert_s"] > 0 and f["session_options"]["intra_op_num_threads"] == THREADS[name]
    assert f["returned_sequences"] == 10 * (3 * 1 + 3 * 3) and 0 <= f["invalid_sequences"] <= f["returned_sequences"]
    a = base["agreement"]
    assert a["reference"] == eng["name"] and a["users"] == 2 * (1 + 3)
    assert f"engine_vs_{name}_{precision}" in result["ratios"]["headline"]
    assert f"{runtime.what} baseline" in (tmp_path / "latency.md").read_text()
    res = runner.invoke(bench_app, args)  # the conversion is reused
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "latency.json").read_text())["systems"][1]["facts"]["cached"] is True


def test_spin_reaches_the_onnx_runtime_baselines_only():
    """`pauserec-bench latency --spin` turns on busy-waiting for the engines and the ONNX Runtime baselines alike;
    OpenVINO keeps its own threading."""
    genai = _load(wk.GENAI.worker, "genai_worker_spin")
    assert genai.session_overlay(2, 0, True)["model"]["decoder"]["session_options"]["allow_spinning"] == "1"
    assert genai.session_overlay(2, 0)["model"]["decoder"]["session_options"]["allow_spinning"] == "0"
    optimum = _load(wk.OPTIMUM.worker, "optimum_worker_spin")
    pytest.importorskip("onnxruntime")
    entry = "session.intra_op.allow_spinning"
    assert optimum.session_options(2, True).get_session_config_entry(entry) == "1"
    assert optimum.session_options(2).get_session_config_entry(entry) == "0"
    seen = []

    class Spy(wk.WorkerSystem):
        def __init__(self, runtime, *a, **k):
            seen.append((runtime.name, a[5] if len(a) > 5 else k.get("args", ())))

    real, wk.WorkerSystem = wk.WorkerSystem, Spy
    try:
        for name in ("optimum", "genai", "openvino"):
            wk.WorkerBaseline(name, Path("ck")).start(2, spin=True)
    finally:
        wk.WorkerSystem = real
    assert [("--spin" in args) for _, args in seen] == [True, True, False]
