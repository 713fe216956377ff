"""pauserec train / eval commands, --init-from a local HF checkpoint, and the real Scientific data."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from pauserec.cli.main import app  # noqa: E402
from pauserec.data import load_dataset  # noqa: E402
from pauserec.errors import CheckpointError  # noqa: E402
from pauserec.train import tokenizer as tk  # noqa: E402
from pauserec.train.model import load_checkpoint  # noqa: E402
from pauserec.train.rationale import rationale_text  # noqa: E402
from pauserec.train.reference import ReferenceRecommender  # noqa: E402
from pauserec.train.sft import IGNORE, TrainConfig, encode_split, train  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_and_eval_commands(synthetic_data, tmp_path):
    runner = CliRunner()
    ck = tmp_path / "ck"
    res = runner.invoke(app, ["train", "--data", str(synthetic_data), "--kind", "pause", "--pause-k", "3",
                              "--out", str(ck), "--preset", "tiny", "--epochs", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "saved" in res.output
    assert load_checkpoint(ck, load_weights=False).spec.pause_k == 3
    res = runner.invoke(app, ["eval", str(ck), "--data", str(synthetic_data), "--limit", "12", "--beams", "5",
                              "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.output)
    assert m["users"] == 12 and m["beams"] == 5 and m["kind"] == "pause" and m["invalid_rate"] == 0.0
    assert {"hit@5", "ndcg@5", "hit@10", "ndcg@10"} <= set(m["popularity"])
    res = runner.invoke(app, ["eval", str(ck), "--data", str(synthetic_data), "--limit", "4", "--beams", "5"])
    assert res.exit_code == 0 and "popularity" in res.output


def test_commands_report_bad_input_with_exit_code_2(synthetic_data, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path), "--data", str(synthetic_data)])
    assert res.exit_code == 2 and "config.json" in res.output
    res = runner.invoke(app, ["train", "--data", str(synthetic_data), "--kind", "nope", "--out", str(tmp_path / "x"),
                              "--preset", "tiny"])
    assert res.exit_code == 2 and "unknown kind" in res.output
    res = runner.invoke(app, ["train", "--data", str(synthetic_data), "--kind", "direct", "--out", str(tmp_path / "x"),
                              "--preset", "huge"])
    assert res.exit_code == 2 and "unknown preset" in res.output


def _tiny_llama(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a small text corpus for a tiny llama", "given the items recommend the next"], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return tok.get_vocab_size()


def test_init_from_a_local_llama_extends_tokenizer_and_embeddings(synthetic_data, tmp_path):
    base_vocab = _tiny_llama(tmp_path / "llama")
    res = train(TrainConfig(data=synthetic_data, index=None, kind="pause", out=tmp_path / "ck",
                            init_from=tmp_path / "llama", max_steps=3, threads=1))
    ck = load_checkpoint(res.out)
    assert ck.model.config.model_type == "llama"
    assert ck.card.preset == "init:llama"
    n = ck.tokenizer.get_vocab_size()
    assert n > base_vocab and ck.model.get_input_embeddings().weight.shape[0] >= n
    assert ck.tokenizer.id_to_token(ck.spec.eos_id) == "</s>"  # the checkpoint's own eos is kept
    assert all(i >= base_vocab for level in ck.spec.sid_token_ids for i in level)
    out = ReferenceRecommender(ck.model, ck.spec, ck.catalog, beams=4, top_n=4).recommend([np.array([0, 1, 2])])
    assert (out.items >= 0).all()


def test_init_from_a_directory_that_is_not_a_model(synthetic_data, tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        train(TrainConfig(data=synthetic_data, index=None, kind="direct", out=tmp_path / "ck", init_from=tmp_path,
                          max_steps=1))


def test_real_scientific_index_fits_the_tokenizer_and_template(scientific):
    d = load_dataset(scientific, "rkmeans_zcr")
    tok = tk.train_tokenizer(d.items, d.catalog, 4096)
    spec = tk.build_prompt_spec(tok, d.catalog, "cot")
    assert spec.codebook_sizes == (256, 256, 256, 256)
    split = d.splits().train
    assert len(split) == 33_541
    sub = type(split)(split.users[:300], split.histories[:300], split.targets[:300])
    samples = encode_split(spec, d, sub, tok)
    rat_len = [int((y != IGNORE).sum()) - 1 - spec.levels for _, y in samples]
    assert max(rat_len) <= spec.max_rationale
    assert np.mean([r < spec.max_rationale for r in rat_len]) > 0.95  # rationales fit: the model can learn to stop
    assert tk.decode_ids(tok, tk.encode_text(tok, rationale_text(d.items, sub.histories[0]))) == rationale_text(
        d.items, sub.histories[0]
    )
