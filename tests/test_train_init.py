"""Fine-tuning from a real-shape pretrained base (--init-from), and runs that go non-finite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from pauserec.cli.main import app  # noqa: E402
from pauserec.data import write_synthetic  # noqa: E402
from pauserec.prompt.spec import TrainingCard  # noqa: E402
from pauserec.errors import CheckpointError, TrainError  # noqa: E402
from pauserec.train import sft  # noqa: E402
from pauserec.train.model import load_checkpoint  # noqa: E402
from pauserec.train.sft import FINETUNE_GROUNDING_LR, FINETUNE_LR, TrainConfig, peak_lrs, train  # noqa: E402

QWEN3_MODEL_VOCAB = 151_936  # embedding rows of Qwen3-0.6B
QWEN3_TEXT_TOKENS = 151_643  # its BPE pieces; with its 26 added tokens the tokenizer has 151,669

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_base(path, text_tokens: int, model_vocab: int, hidden: int = 64, head_dim: int = 128, layers: int = 2):
    """A random-weight, tied Qwen3 base with a word-level tokenizer of ``text_tokens`` entries (+ eos, <think>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {f"w{i}": i for i in range(text_tokens - 1)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<think>", "</think>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=model_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """Synthetic data with four 256-code levels: 1,024 SID tokens, as many as the real Scientific indexes."""
    return write_synthetic(tmp_path_factory.mktemp("wide"), codebook=256, seed=0)


@pytest.fixture(scope="module")
def real_shape_base(tmp_path_factory):
    """Qwen3-0.6B's vocabulary, tokenizer size, head_dim and tied embeddings; width 64, 2 layers."""
    return _write_base(tmp_path_factory.mktemp("base") / "qwen3-shape", QWEN3_TEXT_TOKENS, QWEN3_MODEL_VOCAB)


def _saved_tensors(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def _tiny_run(data, out, **kw):
    kw = {"kind": "direct", "preset": "tiny", "seed": 0, "threads": 1, "max_steps": 3, **kw}
    return TrainConfig(data=data, index=None, out=out, **kw)


# -- fine-tuning a real-shape base ------------------------------------------------------------------
def test_init_from_a_real_shape_base_saves_finite_weights_with_the_finetuning_lr(real_shape_base, wide_data, tmp_path):
    res = train(TrainConfig(data=wide_data, index=None, kind="pause", out=tmp_path / "ck", init_from=real_shape_base,
                            max_steps=2, threads=1))
    tensors = _saved_tensors(res.out)
    assert tensors and all(bool(t.isfinite().all()) for t in tensors.values()), [
        k for k, t in tensors.items() if not t.isfinite().all()
    ]
    assert all(torch.isfinite(torch.tensor(x)) for x in res.losses)
    card = TrainingCard.load(res.out)
    assert card.train["lr"] == FINETUNE_LR and "fine-tuning" in card.train["lr_source"]
    assert card.train["steps"] == 2
    ck = load_checkpoint(res.out)
    rows = ck.model.get_input_embeddings().weight.shape[0]
    assert rows == ck.tokenizer.get_vocab_size() > QWEN3_MODEL_VOCAB  # the SID tokens made it resize
    assert ck.model.lm_head.weight is ck.model.get_input_embeddings().weight  # still tied


def test_a_zero_embedding_row_no_longer_makes_every_gradient_nan():
    """nn.Embedding zeroes its padding_idx row (Qwen: pad = eos). A position whose input row is zero keeps a
    zero hidden state through every layer, each RMSNorm's gradient at zero is 1/sqrt(eps), and through 28
    layers the gradient overflows: every gradient is NaN at step 1. ``--init-from`` fills such rows first."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=28, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, pad_token_id=5, eos_token_id=5, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg)
    ids = torch.tensor([[5, 11, 12, 13, 14]])  # eos first, as a prompt that opens with the pad/eos token does

    def grad_norm():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    assert not model.get_input_embeddings().weight[5].any() and torch.isnan(grad_norm())  # the failure, at its root
    assert sft.fill_zero_rows(model) == 1 and model.get_input_embeddings().padding_idx is None
    assert torch.isfinite(grad_norm())
    assert torch.equal(model.get_input_embeddings().weight[5], model.lm_head.weight[5])  # still tied


def test_peak_lrs_come_from_lr_then_finetuning_defaults_then_the_preset(tmp_path):
    base = tmp_path / "base"
    assert peak_lrs(_tiny_run(tmp_path, tmp_path, init_from=base)) == (
        FINETUNE_LR, FINETUNE_GROUNDING_LR, "fine-tuning default (--init-from)"
    )
    assert peak_lrs(_tiny_run(tmp_path, tmp_path, init_from=base, lr=3e-4)) == (3e-4, 3e-4, "--lr")
    assert peak_lrs(_tiny_run(tmp_path, tmp_path)) == (6e-3, 6e-3, "preset tiny")
    assert peak_lrs(_tiny_run(tmp_path, tmp_path, preset="small")) == (4e-3, 4e-3, "preset small")


# -- non-finite runs never save ----------------------------------------------------------------------
def test_a_diverging_run_raises_and_writes_no_checkpoint(synthetic_data, tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(TrainError, match=r"stage sft-direct: the (loss|gradient norm) is (nan|inf).* at step \d.*--lr"):
        train(_tiny_run(synthetic_data, out, lr=1e30))
    assert not out.exists()


def test_a_nan_loss_stops_at_its_step(synthetic_data, tmp_path, monkeypatch):
    calls = []

    def nan_on_step_2(*args, **kwargs):
        loss, n = masked_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), n

    masked_loss = sft.masked_loss
    monkeypatch.setattr(sft, "masked_loss", nan_on_step_2)
    out = tmp_path / "ck"
    with pytest.raises(TrainError, match="the loss is nan at step 2 .*no checkpoint was written"):
        train(_tiny_run(synthetic_data, out))
    assert not out.exists()


def test_weights_that_turn_non_finite_on_the_last_step_are_refused(synthetic_data, tmp_path, monkeypatch):
    step = torch.optim.AdamW.step

    def step_then_overflow(self, *args, **kwargs):  # the loss and gradients stay finite; a weight does not
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_overflow)
    out = tmp_path / "ck"
    msg = r"NaN or inf weights after stage sft-direct \(1 steps.*, in 1 of \d+ tensors.*--lr"
    with pytest.raises(TrainError, match=msg):
        train(_tiny_run(synthetic_data, out, max_steps=1))
    assert not out.exists()


def test_an_init_from_checkpoint_with_nan_weights_is_refused(wide_data, tmp_path):
    from transformers import Qwen3ForCausalLM

    base = _write_base(tmp_path / "base", 500, 2048, hidden=32, head_dim=16, layers=1)
    model = Qwen3ForCausalLM.from_pretrained(str(base))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(str(base))
    out = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="NaN or inf weights in the --init-from checkpoint .*up_proj.*Re-create"):
        train(TrainConfig(data=wide_data, index=None, kind="direct", out=out, init_from=base, max_steps=1, threads=1))
    assert not out.exists()


def test_cli_exits_2_and_saves_nothing_when_training_diverges(synthetic_data, tmp_path):
    out = tmp_path / "ck"
    res = CliRunner().invoke(app, ["train", "--data", str(synthetic_data), "--kind", "direct", "--out", str(out),
                                   "--preset", "tiny", "--max-steps", "3", "--lr", "1e30", "--threads", "1"])
    assert res.exit_code == 2, res.output
    assert "no checkpoint was written" in res.output and "--lr" in res.output
    assert not out.exists()


def test_cli_max_steps_and_the_card_lr(synthetic_data, tmp_path):
    out = tmp_path / "ck"
    res = CliRunner().invoke(app, ["train", "--data", str(synthetic_data), "--kind", "direct", "--out", str(out),
                                   "--preset", "tiny", "--max-steps", "2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "pauserec_card.json").read_text())
    assert card["train"]["steps"] == 2 and card["train"]["lr"] == 6e-3 and card["train"]["lr_source"] == "preset tiny"


# -- module structure --------------------------------------------------------------------------------
def test_tokenizer_module_does_not_import_the_model_module():
    code = (
        "import sys, pauserec.train.tokenizer as t; "
        "assert 'pauserec.train.model' not in sys.modules, 'tokenizer imported model'; "
        "assert callable(t.hf_tokenizer) and callable(t.save_hf_tokenizer)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import inspect

    from pauserec.train import tokenizer

    source = inspect.getsource(tokenizer)  # lazy imports inside functions count too
    assert "from pauserec.train.model" not in source and "import pauserec.train.model" not in source
