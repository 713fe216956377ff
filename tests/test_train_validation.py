"""Validation during training: early stopping, best checkpoint, curve in the card; schedule; paired bootstrap."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from pauserec import metrics

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pauserec.errors import TrainError  # noqa: E402
from pauserec.train import validation as val  # noqa: E402
from pauserec.train.model import load_checkpoint  # noqa: E402
from pauserec.train.optim import FLOOR, lr_at, residual_dropout  # noqa: E402
from pauserec.train.sft import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(data, out, **kw):
    kw = {"kind": "direct", "preset": "tiny", "seed": 0, "threads": 1, "val_users": 20, "val_beams": 5, **kw}
    return TrainConfig(data=data, index=None, out=out, **kw)


def _first_weight(model) -> torch.Tensor:
    return model.model.layers[0].mlp.up_proj.weight.detach().clone()


@pytest.fixture
def scripted(monkeypatch):
    """Validator.__call__ replaced by a scripted NDCG@10 sequence; records the weights it saw at each call."""
    seen: list[torch.Tensor] = []

    def install(values):
        def fake(self, model):
            i = len(seen)
            seen.append(_first_weight(model))
            v = values[min(i, len(values) - 1)]
            return {"hit@5": v, "ndcg@5": v, "hit@10": v, "ndcg@10": v, "seconds": 0.0}

        monkeypatch.setattr(val.Validator, "__call__", fake)
        return seen

    return install


# -- early stopping, best checkpoint, card ---------------------------------------------------------------
def test_stops_on_a_plateau_and_saves_the_best_evaluation_not_the_last(synthetic_data, tmp_path, scripted):
    seen = scripted([0.1, 0.3, 0.2, 0.25, 0.3, 0.3])  # best at the 2nd evaluation, then no gain
    res = train(_cfg(synthetic_data, tmp_path / "ck", val_every=3, patience=3, epochs=50))
    v = res.validation
    assert v["stop_reason"] == "early_stopping" and len(seen) == 5 and v["evaluations"] == 5
    assert v["chosen_step"] == 6 and v["best"]["ndcg@10"] == 0.3
    saved = _first_weight(load_checkpoint(res.out).model)
    assert torch.equal(saved, seen[1])  # the 2nd evaluation's weights ...
    assert not torch.equal(saved, seen[-1])  # ... not the last step's
    assert torch.equal(_first_weight(res.model), seen[1])
    card = json.loads((res.out / "pauserec_card.json").read_text())["train"]
    assert card["stop_reason"] == "early_stopping" and card["steps"] == 15
    rec = card["validation"]
    assert [p["step"] for p in rec["curve"]] == [3, 6, 9, 12, 15]
    assert [p["best"] for p in rec["curve"]] == [True, True, False, False, False]
    assert all({"epoch", "train_loss", "lr", "hit@10", "ndcg@10"} <= set(p) for p in rec["curve"])
    assert rec["chosen_epoch"] == rec["curve"][1]["epoch"]
    assert "early stopping" in rec["stop_detail"] and "saved epoch" in rec["stop_detail"]
    assert 0 <= rec["share_of_sft_time"] < 1


def test_a_run_that_ends_between_evaluations_evaluates_its_last_weights(synthetic_data, tmp_path, scripted):
    seen = scripted([0.1, 0.2, 0.5])
    res = train(_cfg(synthetic_data, tmp_path / "ck", val_every=4, max_steps=10))
    assert len(seen) == 3 and res.validation["stop_reason"] == "max_steps"
    assert [p["step"] for p in res.validation["curve"]] == [4, 8, 10]
    assert res.validation["chosen_step"] == 10


def test_real_validation_runs_every_epoch_and_writes_the_curve(synthetic_data, tmp_path):
    pytest.importorskip("matplotlib")
    res = train(_cfg(synthetic_data, tmp_path / "ck", epochs=2))
    v = res.validation
    assert v["evaluations"] == 2 and v["users"] == 20 and v["stop_reason"] == "epochs"
    assert [p["epoch"] for p in v["curve"]] == [1.0, 2.0]
    assert all(0 <= p["hit@10"] <= 1 and p["ndcg@10"] <= p["hit@10"] for p in v["curve"])
    assert (res.out / val.CURVE_FILE).is_file() and v["plot"] == "wrote curve.png"
    card = json.loads((res.out / "pauserec_card.json").read_text())["train"]
    assert card["validation"]["plot"] == "wrote curve.png"


def test_missing_matplotlib_does_not_fail_training(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = train(_cfg(synthetic_data, tmp_path / "ck", max_steps=3))
    assert not (res.out / val.CURVE_FILE).exists()
    assert "matplotlib is not installed" in res.validation["plot"]
    card = json.loads((res.out / "pauserec_card.json").read_text())["train"]
    assert len(card["validation"]["curve"]) == 1


def test_validation_off_saves_the_last_weights(synthetic_data, tmp_path):
    res = train(_cfg(synthetic_data, tmp_path / "ck", val_users=0, max_steps=3))
    assert res.validation is None and not (res.out / val.CURVE_FILE).exists()
    assert json.loads((res.out / "pauserec_card.json").read_text())["train"]["validation"] is None


def test_snapshots_are_a_budget_sweep_a_shorter_run_ends_on_the_same_weights(synthetic_data, tmp_path):
    """benchmarks/budget_sweep.py relies on this: past the decay horizon the schedule and the data order do
    not depend on --epochs, and validation draws no random numbers, so a run capped at 1 epoch (validation
    off, last weights) ends with exactly the epoch-1 snapshot of a longer run."""
    sched = {"decay_epochs": 1.0, "warmup_steps": 2}  # budgets >= the decay horizon (shorter ones compress it)
    long = train(_cfg(synthetic_data, tmp_path / "long", epochs=3, patience=10, snapshots=True, **sched))
    snaps = sorted((long.out / val.SNAPSHOTS_DIR).glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    assert [int(p.stem.split("-")[1]) for p in snaps] == [q["step"] for q in long.validation["curve"]]
    short = train(_cfg(synthetic_data, tmp_path / "short", epochs=1, val_users=0, **sched))
    first = torch.load(snaps[0])
    assert long.validation["curve"][0]["epoch"] == 1.0
    assert all(torch.equal(first[k], v) for k, v in short.model.state_dict().items())
    last = torch.load(snaps[-1])
    assert not torch.equal(last["model.layers.0.mlp.up_proj.weight"], first["model.layers.0.mlp.up_proj.weight"])


def test_snapshots_need_validation(synthetic_data, tmp_path):
    with pytest.raises(TrainError, match="--snapshots .* needs validation"):
        train(_cfg(synthetic_data, tmp_path / "ck", val_users=0, max_steps=1, snapshots=True))


@pytest.mark.parametrize("bad", [{"val_users": -1}, {"patience": 0}, {"val_metric": "mrr"}, {"val_every": 0}])
def test_bad_validation_settings_say_what_to_pass(synthetic_data, tmp_path, bad):
    with pytest.raises(TrainError, match="--val-users|--patience|--val-metric|--val-every"):
        train(_cfg(synthetic_data, tmp_path / "ck", max_steps=1, **bad))
    assert not (tmp_path / "ck").exists()


def test_early_stopping_unit():
    es = val.EarlyStopping(metric="ndcg@10", patience=2)
    model = torch.nn.Linear(2, 2)
    for i, v in enumerate([0.1, 0.2, 0.2, 0.15]):
        with torch.no_grad():
            model.weight.fill_(i)
        es.update({"step": i, "epoch": i, "ndcg@10": v}, model)
    assert es.stop and es.best == 0.2 and es.best_point["step"] == 1  # a tie is not a gain
    es.restore(model)
    assert float(model.weight[0, 0].detach()) == 1.0


def test_validation_sample_is_fixed_by_the_seed():
    a, b, c = val.sample_users(1000, 50, 0), val.sample_users(1000, 50, 0), val.sample_users(1000, 50, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and len(set(a.tolist())) == 50
    assert np.array_equal(val.sample_users(30, 50, 0), np.arange(30))


# -- schedule and dropout ------------------------------------------------------------------------------------
def test_lr_schedule_by_steps():
    peak = 1.0
    assert lr_at(0, peak, 10, 100) == pytest.approx(0.1)
    assert lr_at(10, peak, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, peak, 10, 100) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)
    assert lr_at(100, peak, 10, 100) == pytest.approx(FLOOR) == lr_at(10_000, peak, 10, 100)  # a ceiling, not a stretch
    assert lr_at(20, peak, 10, 100, time_share=1.0) == pytest.approx(FLOOR)  # a binding time budget decays sooner


def test_residual_dropout_is_active_only_while_training_and_only_inside_the_context():
    from pauserec.train.model import build_model

    model = build_model("tiny", 64, 0, 1, seed=0)
    ids = torch.randint(2, 64, (2, 6))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with residual_dropout(model, 0.5) as n:
            assert n == 2 * model.config.num_hidden_layers
            assert torch.equal(model.eval()(input_ids=ids).logits, ref)
            assert not torch.allclose(model.train()(input_ids=ids).logits, ref)
        model.train()
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6)  # hooks removed (attention dropout is 0)
    model.eval()


# -- paired bootstrap and the seeds summary ------------------------------------------------------------------------
def test_bootstrap_of_identical_inputs_is_zero_width_at_zero():
    rng = np.random.default_rng(0)
    a = (rng.random(500) < 0.1).astype(float)
    b = metrics.paired_bootstrap(a, a.copy(), resamples=200)
    assert b["diff"] == 0.0 and b["lo"] == 0.0 and b["hi"] == 0.0 and not b["excludes_zero"] and b["sign"] == 0


def test_bootstrap_finds_a_clear_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = (rng.random((3, 4000)) < 0.08).astype(float)
    better = np.maximum(base, (rng.random((3, 4000)) < 0.05).astype(float))  # same users, ~+5 points
    up = metrics.paired_bootstrap(better, base, resamples=300)
    assert up["sign"] == 1 and up["lo"] > 0.02 and up["lo"] <= up["diff"] <= up["hi"]
    assert metrics.paired_bootstrap(base, better, resamples=300)["sign"] == -1
    noise = metrics.paired_bootstrap(base[:1], (rng.random((1, 4000)) < 0.08).astype(float), resamples=300)
    assert noise["lo"] < noise["diff"] < noise["hi"]
    with pytest.raises(ValueError, match="same"):
        metrics.paired_bootstrap(base, base[:, :10])


def test_per_user_vectors_average_to_hit_ndcg():
    ranked = np.array([[3, 1, 2], [9, 8, 7], [5, 4, 0]])
    targets = np.array([1, 6, 0])
    pu = metrics.per_user(ranked, targets, 3)
    m = metrics.hit_ndcg(ranked, targets, ks=(3,))
    assert pu["hit@3"].tolist() == [1.0, 0.0, 1.0]
    assert pu["hit@3"].mean() == pytest.approx(m["hit@3"]) and pu["ndcg@3"].mean() == pytest.approx(m["ndcg@3"])


def test_seeds_summary_reports_spread_and_intervals_against_direct():
    from pauserec.bench.quality import seeds_markdown, summarize_runs

    rng = np.random.default_rng(1)
    runs, vecs = [], []
    for kind, p in (("direct", 0.08), ("pause", 0.08), ("cot", 0.16)):
        for s in range(3):
            hit = (rng.random(3000) < p).astype(float)
            vecs.append({"hit@10": hit, "ndcg@10": hit * 0.5})
            runs.append({"kind": kind, "name": f"{kind}-s{s}",
                         "metrics": {"hit@5": hit.mean() / 2, "ndcg@5": hit.mean() / 3, "hit@10": hit.mean(),
                                     "ndcg@10": hit.mean() / 2}})
    out = summarize_runs(runs, vecs, resamples=200)
    assert out["kinds"]["pause"]["hit@10"]["n"] == 3 and out["kinds"]["cot"]["hit@10"]["std"] > 0
    assert out["paired_vs_direct"]["cot"]["hit@10"]["sign"] == 1
    assert out["paired_vs_direct"]["pause"]["hit@10"]["sign"] == 0
    assert any(v.startswith("cot beats direct on hit@10") for v in out["verdicts"])
    assert any(v.startswith("pause is not distinguishable from direct") for v in out["verdicts"])
    assert "| cot | 3 |" in seeds_markdown(out)


@pytest.mark.slow  # the shared trained_engines fixture: ~20 s alone on 2 idle cores, free after test_bench.py
def test_quality_cli_with_several_engines_per_kind_reports_seeds_and_intervals(trained_engines, synthetic_data, tmp_path):
    from typer.testing import CliRunner

    from pauserec.cli.bench import app as bench_app

    engines = [str(trained_engines[k]) for k in ("direct", "pause", "pause")]  # pause twice: two "seeds"
    res = CliRunner().invoke(bench_app, ["quality", *engines, "--data", str(synthetic_data), "--limit", "30",
                                         "--resamples", "100", "--threads", "1", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    seeds = json.loads(res.output[res.output.index("{"):])["seeds"]
    assert seeds["users"] == 30 and seeds["kinds"]["pause"]["hit@10"]["n"] == 2
    assert seeds["kinds"]["pause"]["hit@10"]["std"] == 0.0  # the same engine twice
    b = seeds["paired_vs_direct"]["pause"]["ndcg@10"]
    assert b["lo"] <= b["diff"] <= b["hi"]
    assert (tmp_path / "quality-seeds.md").read_text().count("| pause | 2 |") == 1


# -- validation bounded by the time allowed ---------------------------------------------------------------
def test_a_slow_validation_is_cut_to_the_time_allowed(synthetic_data, tmp_path, monkeypatch):
    """A model whose search costs 0.5 s a user (a big model on a CPU): 40 users would take 20 s, more than the
    10 s an evaluation may take this early in training, so the sample is cut to the 20 users that fit."""
    monkeypatch.setattr(val.Validator, "seconds_per_user", lambda self, model, within_s, users=8: 0.5)
    res = train(_cfg(synthetic_data, tmp_path / "ck", val_users=40, val_every=2, max_steps=4))
    v = res.validation
    assert v["sized_to_time"] == {"asked": 40, "used": 20, "seconds_per_user": 0.5, "allowed_s": pytest.approx(10, abs=0.5)}
    assert v["users"] == 20 and v["evaluations"] == 2 and v["skipped_for_time"] == 0


def test_a_validation_that_cannot_fit_is_skipped_and_the_card_says_so(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setattr(val.Validator, "seconds_per_user", lambda self, model, within_s, users=8: 5.0)  # 16 users: 80 s
    called = []
    monkeypatch.setattr(val.Validator, "__call__", lambda self, model: called.append(1))
    res = train(_cfg(synthetic_data, tmp_path / "ck", val_users=40, max_minutes=0.02, epochs=50))
    v = res.validation
    assert not called and v["evaluations"] == 0 and v["skipped_for_time"] >= 1  # the last one too
    assert v["stop_reason"] == "time_budget" and "no evaluation fitted the time allowed" in v["stop_detail"]
    assert res.wall_time_s < 0.02 * 60 + 10  # the budget plus what one evaluation may take, at most


def test_the_time_probe_stops_within_half_the_time_allowed(monkeypatch):
    """A big model is timed on as few users as the time allows, and not at all when none is left."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(val.Validator, "ranked_items", lambda self, model, histories=None: (calls.append(histories),
                                                                                            time.sleep(0.2)))
    v = val.Validator.__new__(val.Validator)
    v.histories, v.targets = [[1], [1, 2], [1, 2, 3]] * 10, np.zeros(30)
    model = SimpleNamespace(training=True, train=lambda mode: None)
    assert v.seconds_per_user(model, within_s=0.3) == pytest.approx(0.2, abs=0.1) and len(calls) == 1
    assert calls[0] == [[1]] and len(calls[0]) == 1  # one user at a time
    calls.clear()
    v.seconds_per_user(model, within_s=100)
    assert len(calls) == val.PROBE_USERS and calls[-1] == [[1, 2, 3]]  # spread from short to long histories
    validation = val.Validation(v, val.EarlyStopping())
    calls.clear()
    assert not validation.fits(model, allowed_s=0) and not calls and validation.skipped == 1
