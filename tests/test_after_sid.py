"""Scores as the pipeline scores: the tokens a pipeline's own ``generate`` produces after the SID ("\\n", EOS).

The reference is the one ``test_export_external`` builds on its own (HF ``generate`` with the pipeline's trie,
which forces and scores the tokens after the SID, and its EOS); here: the layout switch, the sid rule, the
device-step search and the resolution against the checkpoint's own tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export_external import _export, _histories, _setup, assert_same_top10, encoder_prompts, hf_top10  # noqa: E402

from pauserec.errors import DataError  # noqa: E402
from pauserec.prompt.layout import load_layout, preset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("after")
    ckpt, index, _ = _setup(root, "mini", ("a", "b", "c"), "qwen2", tied=True)
    return root, ckpt, json.loads((root / "mini.index.json").read_text())


def test_presets_say_what_their_pipeline_scores_after_the_sid():
    assert preset("minionerec").after_sid == "\n{eos}"
    assert preset("lc-rec:3").after_sid == "{eos}"
    assert preset("onerec-think").after_sid == "<|sid_end|>{eos}"
    assert preset("pauserec").after_sid is None


@pytest.mark.parametrize("bad", ["{eos}\n", "{eos}{eos}", "\n{title}", ""])
def test_bad_after_sid_is_refused(tmp_path, bad):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"template": "History: {history}\n", "max_history": 4, "after_sid": bad}))
    with pytest.raises(DataError, match="after_sid"):
        load_layout(path)


def test_after_ids_are_the_pipelines_target_tokens(mini, tmp_path):
    """MiniOneRec's target: the SID's text + "\\n" tokenised as one string, then EOS."""
    root, ckpt, index = mini
    report = _export(tmp_path, ckpt, "mini.index.json", prompt="minionerec", check_users=3)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    sid = next(iter(index.values()))
    whole = tok("".join(sid) + "\n", add_special_tokens=False)["input_ids"]
    assert report.manifest["prompt"]["after_ids"] == whole[len(sid):] + [tok.eos_token_id]
    assert report.manifest["shapes"]["beam_slots"] == len(sid) - 1 + 2
    assert report.prompt["hf_generate"]["identical_top10"]  # export's own check, generate as the pipeline runs it


def test_a_layout_that_says_nothing_ranks_by_the_sid_alone(mini, tmp_path):
    root, ckpt, index = mini
    layout = {**preset("minionerec").to_dict(), "name": "mini-sid-only", "after_sid": None}
    path = tmp_path / "mini-sid-only.json"
    path.write_text(json.dumps(layout))
    report = _export(tmp_path, ckpt, "mini.index.json", prompt=str(path), check_users=2)
    assert report.manifest["prompt"]["after_ids"] == []
    histories = _histories(4)
    prompts = encoder_prompts(report.out, histories)
    assert_same_top10(report.out, histories, hf_top10(ckpt, prompts, index))  # generate stopping at the SID


def test_no_after_sid_ranks_a_preset_by_the_sid_alone(mini, tmp_path):
    """`pauserec-export --no-after-sid`: the preset's after-SID tokens are dropped on request (no warning), and the
    engine's top-10 is generate's stopping at the SID."""
    root, ckpt, index = mini
    report = _export(tmp_path, ckpt, "mini.index.json", prompt="minionerec", after_sid=False, check_users=2)
    assert report.manifest["prompt"]["after_ids"] == [] and not report.prompt.get("warnings")
    assert report.manifest["shapes"]["beam_slots"] == len(next(iter(index.values()))) - 1
    histories = _histories(4)
    assert_same_top10(report.out, histories, hf_top10(ckpt, encoder_prompts(report.out, histories), index))


def test_the_sid_rule_has_nothing_to_add_and_says_so(mini, tmp_path):
    root, ckpt, _ = mini
    report = _export(tmp_path, ckpt, "mini.index.json", prompt="minionerec", scoring="sid", check_users=0)
    assert report.manifest["prompt"]["after_ids"] == []
    assert any("nothing to add" in w for w in report.prompt["warnings"])


def test_device_steps_and_filters_score_after_the_sid_too(mini, tmp_path):
    """The search on the device-step path (run on the host) and with an item filter: the same beams as the host
    search, and the filter's exclusions hold through the levels after the SID."""
    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.device import HostOps

    root, ckpt, _ = mini
    report = _export(tmp_path, ckpt, "mini.index.json", prompt="minionerec", check_users=0)
    histories = _histories(5)
    host = Recommender(Engine.load(report.out, provider="cpu")).recommend(histories, k=10, beams=12)
    engine = Engine.load(report.out, provider="cpu")
    engine.ops = HostOps()
    device = Recommender(engine).recommend(histories, k=10, beams=12)
    assert (device.item_index == host.item_index).all()
    assert np.allclose(device.scores, host.scores, atol=1e-5)
    drop = {str(x) for x in host.items[0][:3]}
    filtered = Recommender(Engine.load(report.out, provider="cpu")).recommend(histories[:1], k=10, beams=12,
                                                                               exclude=drop)
    kept = [x for x in host.items[0] if x not in drop]
    assert not drop & set(filtered.items[0])
    assert list(filtered.items[0][: len(kept)]) == kept  # the others keep their order and scores
    assert np.allclose(filtered.scores[0][: len(kept)], [s for x, s in zip(host.items[0], host.scores[0])
                                                         if x not in drop], atol=1e-5)
