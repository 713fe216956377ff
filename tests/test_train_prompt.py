"""`pauserec train --init-from CKPT --prompt LAYOUT`: pause training of a model trained elsewhere, in its own prompt.

Tiny seeded checkpoints in MiniOneRec / OneRec-Think formats (``external_ckpts``) are fine-tuned for a few steps.
The training samples are checked against a reference this file builds on its own: the pipeline's prompt text written
out here, pauses where the layout (or its derived pause template) puts them, tokenised with ``transformers``'
``AutoTokenizer`` of the *saved* checkpoint, then the target's SID tokens. The saved checkpoint must export with the
same ``--prompt`` and no other flag (the export checks its engine against HF ``generate`` itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from external_ckpts import make_checkpoint, sid_vocab, write_index, write_items  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pauserec.errors import CheckpointError, DataError, PauserecError  # noqa: E402
from pauserec.train import sft  # noqa: E402
from pauserec.train.samples import IGNORE  # noqa: E402
from pauserec.train.sft import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ITEMS, CODES, N_USERS = 36, 6, 30
MINI_INSTRUCTION = ("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request. \n\n### Instruction:\n"
                    "Can you predict the next possible item that the user may expect?\n\n")
MINI_USER = ("### User Input: \nCan you predict the next possible item the user may expect, given the following "
             "chronological interaction history: {history}\n\n### Response:\n")
ONEREC_SYSTEM = ("You are a professional recommendation expert who needs to recommend the next possible purchase for "
                 "users based on their purchase history. Please predict the most likely next product that the user "
                 "will purchase based on the user's historical purchase information.")


def _dataset(root: Path, name: str, prefixes, codes: int = CODES) -> tuple[Path, dict, dict]:
    """An LC-Rec dataset folder (inter / item / index json) of seeded users over a seeded index."""
    data = root / f"data-{name}"
    data.mkdir()
    index = write_index(data / f"{name}.index.json", N_ITEMS, prefixes, codes, seed=1)
    items = write_items(data / f"{name}.item.json", index)
    rng = np.random.default_rng(7)
    inter = {str(u): [str(i) for i in rng.integers(0, N_ITEMS, size=int(rng.integers(4, 9)))] for u in range(N_USERS)}
    (data / f"{name}.inter.json").write_text(json.dumps(inter))
    return data, index, items


class Spy:
    """Wraps ``sft.run_stage``: keeps each stage's samples and the pause row as the stage starts."""

    def __init__(self, monkeypatch, pause: str | None = None):
        self.stages, self.rows, self.pause = [], [], pause
        real = sft.run_stage

        def run_stage(model, stage, pad_id, rng, progress=None):
            self.stages.append(stage)
            self.rows.append(model.get_input_embeddings().weight[stage.pause_row].detach().clone()
                             if stage.pause_row is not None else None)
            return real(model, stage, pad_id, rng, progress)

        monkeypatch.setattr(sft, "run_stage", run_stage)


def _train(data, ckpt, out, kind="pause", **kw):
    kw = {"preset": "tiny", "seed": 0, "threads": 1, "max_steps": 2, "val_users": 0, "batch_size": 8, **kw}
    return train(TrainConfig(data=data, index=None, kind=kind, out=out, init_from=ckpt, **kw))


def _train_histories(data, max_history):
    from pauserec.data import load_dataset

    ds = load_dataset(data)
    split = ds.splits(max_history).train
    return ds, [[ds.catalog.item_ids[int(i)] for i in h] for h in split.histories], \
        [ds.catalog.item_ids[int(t)] for t in split.targets]


def _mean_of_checkpoint_rows(ckpt: Path) -> torch.Tensor:
    """The mean input embedding over the tokens the checkpoint's own tokenizer has (read with transformers)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    n = len(transformers.AutoTokenizer.from_pretrained(ckpt))
    return model.get_input_embeddings().weight[:n].mean(dim=0)


def _check_samples(samples, prompts: list[list[int]], targets: list[list[int]]) -> None:
    assert len(samples) == len(prompts)
    for (ids, labels), prompt, target in zip(samples, prompts, targets):
        assert ids.tolist() == prompt + target
        assert labels.tolist() == [IGNORE] * len(prompt) + target  # the loss is on the SID tokens only


def _pause_once(out: Path, token: str, before: int) -> int:
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == before + 1
    assert [t.content for t in tok.added_tokens_decoder.values()].count(token) == 1
    pid = tok.convert_tokens_to_ids(token)
    assert tok(token + token, add_special_tokens=False)["input_ids"] == [pid, pid]
    return pid


def _export_cli(args: list[str]):
    from pauserec.cli.export import app

    return CliRunner().invoke(app, args)


# -- MiniOneRec: Qwen2, plain added SID tokens, two segments; the pause template is derived ----------------------
def test_minionerec_pause_training_and_export_with_the_same_prompt(tmp_path, monkeypatch):
    data, index, _ = _dataset(tmp_path, "mini", ("a", "b", "c"))
    ckpt = make_checkpoint(tmp_path / "mini-sft", arch="qwen2", sid_tokens=sid_vocab(("a", "b", "c"), CODES))
    before = len(transformers.AutoTokenizer.from_pretrained(ckpt))
    spy = Spy(monkeypatch)
    res = _train(data, ckpt, tmp_path / "out", prompt="minionerec", pause_k=3)
    out = res.out
    pid = _pause_once(out, "<pause>", before)
    assert torch.allclose(spy.rows[0], _mean_of_checkpoint_rows(ckpt), atol=1e-6)  # the row started at the mean
    assert not torch.allclose(res.model.get_input_embeddings().weight[pid], spy.rows[0])  # and it trained

    tok = transformers.AutoTokenizer.from_pretrained(out)

    def mini_prompt(history):  # EvalSidDataset.pre, pauses right before the answer: two encodes
        user = MINI_USER.replace("{history}", ", ".join("".join(index[i]) for i in history[-10:])) + "<pause>" * 3
        return tok.encode(MINI_INSTRUCTION, add_special_tokens=False) + tok.encode(user, add_special_tokens=False)

    _, hists, targets = _train_histories(data, 10)
    _check_samples(spy.stages[0].samples, [mini_prompt(h) for h in hists],
                   [tok.convert_tokens_to_ids(index[t]) for t in targets])
    card = json.loads((out / "pauserec_card.json").read_text())
    facts = card["train"]["prompt"]
    assert facts["given"] == "minionerec" and facts["layout"]["name"] == "minionerec" and facts["kind"] == "pause"
    assert facts["pause_k"] == 3 and facts["pause_template"].startswith("derived")
    assert facts["pause_token"] == {"token": "<pause>", "added": True, "id": pid,
                                    "init": "mean of the checkpoint's token rows"}

    engine = tmp_path / "engine"
    res = _export_cli([str(out), "--out", str(engine), "--prompt", "minionerec", "--check-users", "2",
                       "--prompt-sample", "16", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["prompt"]["hf_generate"]["identical_top10"] and report["prompt"]["identical"] == 16
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["kind"] == "pause" and manifest["pause_k"] == 3 and manifest["prompt"]["layout"] == "minionerec"
    assert manifest["prompt"]["suffix_ids"][-3:] == [pid] * 3

    res = _export_cli([str(out), "--out", str(tmp_path / "never"), "--prompt", "lc-rec"])
    assert res.exit_code == 2 and "trained with prompt 'minionerec'" in res.output and "--prompt minionerec" in \
        res.output, res.output
    res = _export_cli([str(out), "--out", str(tmp_path / "never"), "--prompt", "minionerec", "--kind", "direct"])
    assert res.exit_code == 2 and "it is a pause model" in res.output, res.output
    assert not (tmp_path / "never").exists()


# -- OneRec-Think: Qwen3, special SID tokens, padded vocabulary; the layout's own pause template ------------------
def test_onerec_think_pause_training_and_export(tmp_path, monkeypatch):
    prefixes = ("s_a", "s_b", "s_c")
    data, index, _ = _dataset(tmp_path, "onerec", prefixes)
    ckpt = make_checkpoint(tmp_path / "onerec-sft", arch="qwen3", sid_tokens=sid_vocab(prefixes, CODES),
                           extra_tokens=("<|sid_begin|>", "<|sid_end|>"), sid_as_special=True, pad_vocab_multiple=64)
    rows = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    before = len(transformers.AutoTokenizer.from_pretrained(ckpt))
    assert rows > before + 1  # the new token fits in the padded rows: no resize
    spy = Spy(monkeypatch)
    out = _train(data, ckpt, tmp_path / "out", prompt="onerec-think", pause_k=2).out
    pid = _pause_once(out, "<|thought|>", before)
    assert pid == before and json.loads((out / "config.json").read_text())["vocab_size"] == rows
    assert torch.allclose(spy.rows[0], _mean_of_checkpoint_rows(ckpt), atol=1e-6)

    tok = transformers.AutoTokenizer.from_pretrained(out)

    def onerec_prompt(history):
        sids = ["<|sid_begin|>" + "".join(index[i]) + "<|sid_end|>" for i in history[-20:]]
        text = (f"<|im_start|>system\n{ONEREC_SYSTEM}<|im_end|>\n<|im_start|>user\nThe user has purchased the "
                f"following items: {'; '.join(sids)};<|im_end|>\n<|im_start|>assistant\n"
                "<|thought|><|thought|>\n<|sid_begin|>")
        return tok(text)["input_ids"]

    _, hists, targets = _train_histories(data, 20)
    _check_samples(spy.stages[0].samples, [onerec_prompt(h) for h in hists],
                   [tok.convert_tokens_to_ids(index[t]) for t in targets])

    from pauserec.export import ExportConfig, export_engine

    report = export_engine(ExportConfig(checkpoint=out, out=tmp_path / "engine", prompt="onerec-think",
                                        check_users=2, prompt_sample=8))  # the card says kind pause, k = 2
    assert report.manifest["kind"] == "pause" and report.manifest["pause_k"] == 2
    assert report.prompt["hf_generate"]["identical_top10"] and report.prompt["identical"] == 8


# -- a layout rendering titles (text assembly), --items kept in the checkpoint for the export ---------------------
def test_titled_layout_assembled_from_text(tmp_path, monkeypatch):
    data, index, items = _dataset(tmp_path, "titled", ("a", "b", "c"))
    ckpt = make_checkpoint(tmp_path / "titled-sft", arch="qwen3", sid_tokens=sid_vocab(("a", "b", "c"), CODES),
                           tied=False)
    layout = tmp_path / "titled.json"
    layout.write_text(json.dumps({"name": "titled", "template": "Items the user bought: {history}.\nNext item:",
                                  "item": '"{title}" {sid}', "separator": ", ", "max_history": 5}))
    spy = Spy(monkeypatch)
    out = _train(data, ckpt, tmp_path / "out", prompt=str(layout), items=data / "titled.item.json", pause_k=2).out
    spec = json.loads((out / "pauserec_card.json").read_text())["prompt"]
    assert spec["assembly"] == "text" and spec["fields"] == ["title"] and (out / "items.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    _, hists, targets = _train_histories(data, 5)
    prompts = [tok("Items the user bought: " + ", ".join(f'"{items[i]["title"]}" ' + "".join(index[i]) for i in h[-5:])
                   + ".\nNext item:<pause><pause>")["input_ids"] for h in hists]
    _check_samples(spy.stages[0].samples, prompts, [tok.convert_tokens_to_ids(index[t]) for t in targets])

    from pauserec.export import ExportConfig, export_engine

    report = export_engine(ExportConfig(checkpoint=out, out=tmp_path / "engine", prompt=str(layout), check_users=1,
                                        prompt_sample=8))  # no --items: the checkpoint's items.json
    assert report.manifest["prompt"]["assembly"] == "text" and report.prompt["hf_generate"]["identical_top10"]


# -- LoRA: adapters + the pause row, merged into a complete checkpoint ---------------------------------------------
def test_lora_trains_adapters_and_the_pause_row_and_saves_merged_weights(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    data, _, _ = _dataset(tmp_path, "lora", ("a", "b", "c"))
    ckpt = make_checkpoint(tmp_path / "lora-sft", arch="qwen2", sid_tokens=sid_vocab(("a", "b", "c"), CODES),
                           tied=False)
    spy = Spy(monkeypatch)
    out = _train(data, ckpt, tmp_path / "out", prompt="minionerec", pause_k=2, lora=4, lr=1e-2,
                 gradient_checkpointing=True, val_users=4, val_every=1).out
    assert spy.stages[0].lora and not (out / "adapter_config.json").exists()
    init, saved = load_file(str(ckpt / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(saved) == set(init) | {k for k in saved if k not in init} and not any("lora" in k for k in saved)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(saved[q], init[q])  # the adapters were merged in
    emb, emb0 = saved["model.embed_tokens.weight"], init["model.embed_tokens.weight"]
    pid = len(emb0)  # the one new row
    assert emb.shape[0] == pid + 1 and torch.equal(emb[:pid], emb0)  # every other row frozen
    assert not torch.allclose(emb[pid], spy.rows[0])  # the pause row trained
    card = json.loads((out / "pauserec_card.json").read_text())
    assert card["train"]["lora"]["rank"] == 4 and card["train"]["lora"]["saved"] == "merged into the weights"
    assert card["train"]["gradient_checkpointing"] and card["train"]["validation"]["evaluations"] >= 1
    from pauserec.export.bundle import load_sources
    from pauserec.export import ExportConfig

    src = load_sources(ExportConfig(checkpoint=out, out=tmp_path / "never", prompt="minionerec"))
    assert src.spec.kind == "pause" and src.spec.pause_k == 2
    assert src.spec == load_sources(ExportConfig(checkpoint=out, out=tmp_path / "never")).spec  # the card's own
    longer = load_sources(ExportConfig(checkpoint=out, out=tmp_path / "never", prompt="minionerec", pause_k=4))
    assert longer.spec.pause_k == 4 and longer.spec.suffix_ids[-4:] == (pid,) * 4  # --pause-k still overrides


# -- refusals -------------------------------------------------------------------------------------------------------
def test_refusals_say_what_to_do(tmp_path):
    from pauserec.cli.main import app

    data, _, _ = _dataset(tmp_path, "bad", ("a", "b", "c"))
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--kind", "pause", "--out", str(tmp_path / "o"),
                                   "--prompt", "minionerec"])
    assert res.exit_code == 2 and "--init-from" in res.output, res.output
    ckpt = make_checkpoint(tmp_path / "sft", arch="qwen3", sid_tokens=sid_vocab(("a", "b", "c"), CODES))
    with pytest.raises(DataError, match="'minionerec' has no cot template"):
        _train(data, ckpt, tmp_path / "o", kind="cot", prompt="minionerec")
    with pytest.raises(PauserecError, match="--lora R"):
        _train(data, ckpt, tmp_path / "o", kind="pause", lora=4)
    short = make_checkpoint(tmp_path / "short", arch="qwen3", sid_tokens=sid_vocab(("a", "b", "c"), CODES - 2))
    with pytest.raises(CheckpointError, match=r"not single tokens of the model \(<a_4>.*adds none"):
        _train(data, short, tmp_path / "o", prompt="minionerec")
    assert not (tmp_path / "o").exists()


def test_a_pause_token_the_checkpoint_has_keeps_its_row(tmp_path, monkeypatch):
    """OneRec-Think's <|thought|> already in the tokenizer (a pause fork trained further): nothing is added, the row
    the checkpoint has is where training starts."""
    prefixes = ("s_a", "s_b", "s_c")
    data, _, _ = _dataset(tmp_path, "kept", prefixes)
    ckpt = make_checkpoint(tmp_path / "kept-sft", arch="qwen3", sid_tokens=sid_vocab(prefixes, CODES),
                           extra_tokens=("<|sid_begin|>", "<|sid_end|>", "<|thought|>"), sid_as_special=True)
    tok0 = transformers.AutoTokenizer.from_pretrained(ckpt)
    pid = tok0.convert_tokens_to_ids("<|thought|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    row = model.get_input_embeddings().weight[pid]
    spy = Spy(monkeypatch)
    out = _train(data, ckpt, tmp_path / "out", prompt="onerec-think", pause_k=2).out
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == len(tok0)
    assert torch.equal(spy.rows[0], row)
    facts = json.loads((out / "pauserec_card.json").read_text())["train"]["prompt"]
    assert facts["pause_token"] == {"token": "<|thought|>", "added": False, "id": pid, "init": "kept"}
    assert facts["pause_template"] == "the layout's own"
