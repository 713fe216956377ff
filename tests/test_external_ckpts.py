"""Tests of the tests/external_ckpts.py helper (tiny offline stand-ins for externally trained checkpoints)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from external_ckpts import (  # noqa: E402
    ARCHS,
    QWEN3_CHAT_TEMPLATE,
    base_tokenizer_json,
    raw_tokenizer,
    make_checkpoint,
    sid_vocab,
    write_index,
    write_items,
)

SIDS = sid_vocab(("a", "b", "c"), 8)
EXTRAS = ("<|sid_begin|>", "<|sid_end|>", "<pause>")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("external_ckpts")
    return {
        arch: make_checkpoint(
            root / arch, arch=arch, sid_tokens=SIDS, extra_tokens=EXTRAS, chat_template=QWEN3_CHAT_TEMPLATE
        )
        for arch in ARCHS
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_loads_and_runs_with_sid_tokens(ckpts, arch):
    out = ckpts[arch]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads  # Qwen2Config: derived
    assert (cfg.hidden_size, cfg.num_hidden_layers, head_dim, cfg.intermediate_size) == (64, 2, 16, 128)
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 16
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)

    # Added tokens: extras then SIDs, contiguous, in the given order, after the trained vocabulary.
    ids = tok.convert_tokens_to_ids([*EXTRAS, *SIDS])
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[-1] == len(tok) - 1

    prompt = "Given the items this user interacted with, in order, recommend the next item. <a_1><b_2><c_3>, <a_7><b_0>"
    enc = tok(prompt, return_tensors="pt")
    assert set(tok.convert_tokens_to_ids(["<a_1>", "<b_2>", "<c_3>", "<a_7>"])) <= set(enc["input_ids"][0].tolist())
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    # std-0.5 init: clearly separated next-token log-probs (no near-flat distribution).
    top = logits[0, -1].log_softmax(-1).topk(2).values
    assert top[0] > -3.0 and top[0] - top[1] > 1e-3

    if arch == "llama":
        assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
        assert tok("x")["input_ids"][0] == tok.bos_token_id == model.config.bos_token_id
        assert tok.bos_token_id not in tok("x", add_special_tokens=False)["input_ids"]
        assert model.config.eos_token_id == tok.eos_token_id
    else:
        assert tok.bos_token is None and model.config.bos_token_id is None
        assert tok.eos_token == tok.pad_token == "<|endoftext|>"
        assert model.config.eos_token_id == model.config.pad_token_id == tok.eos_token_id
        assert tok("x")["input_ids"] == tok("x", add_special_tokens=False)["input_ids"]
    # AutoTokenizer (Qwen2Tokenizer for qwen) agrees with tokenizer.json read alone.
    assert enc["input_ids"][0].tolist() == raw_tokenizer(out).encode(prompt).ids


def test_qwen2_has_qkv_biases_and_qwen3_llama_do_not(ckpts):
    for arch in ARCHS:
        attn = AutoModelForCausalLM.from_pretrained(ckpts[arch]).model.layers[0].self_attn
        has = [getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")]
        assert has == [arch == "qwen2"] * 3, arch
        assert attn.o_proj.bias is None
    q3 = AutoModelForCausalLM.from_pretrained(ckpts["qwen3"]).model.layers[0].self_attn
    assert torch.equal(q3.q_norm.weight, torch.ones_like(q3.q_norm.weight))  # norms kept at 1


def test_llama_rope_is_llama3(ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["llama"])
    rp = model.config.rope_parameters
    assert rp["rope_type"] == "llama3"
    assert (rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]) == (8.0, 1.0, 4.0)
    assert rp["original_max_position_embeddings"] == 64
    assert model.model.rotary_emb.rope_type == "llama3"
    assert json.loads((ckpts["llama"] / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"


def test_padded_vocab_and_untied_head(tmp_path):
    out = make_checkpoint(tmp_path / "p", arch="qwen3", sid_tokens=SIDS, pad_vocab_multiple=256, tied=False, seed=3)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size % 256 == 0 and model.config.vocab_size > len(tok)
    assert model.config.tie_word_embeddings is False
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb.shape == head.shape == (model.config.vocab_size, 64)
    assert emb.data_ptr() != head.data_ptr() and not torch.equal(emb, head)
    assert 0.4 < emb.std().item() < 0.6 and 0.4 < head.std().item() < 0.6


def test_tied_head_shares_embedding(ckpts):
    model = AutoModelForCausalLM.from_pretrained(ckpts["qwen3"])
    assert model.config.tie_word_embeddings is True
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_bf16_sharded_save_loads_back(tmp_path):
    out = make_checkpoint(
        tmp_path / "bf", arch="qwen2", sid_tokens=SIDS, dtype="bfloat16", max_shard_size="100KB", tied=False
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers 5: dtype="auto" by default -> bf16
    assert model.dtype == torch.bfloat16
    model32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7] + AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(SIDS[:3])])
    with torch.no_grad():
        assert torch.isfinite(model32(ids).logits).all()


def test_same_seed_same_weights_other_seed_differs(tmp_path, ckpts):
    kw = dict(arch="llama", sid_tokens=SIDS, extra_tokens=EXTRAS)
    a = make_checkpoint(tmp_path / "a", chat_template=QWEN3_CHAT_TEMPLATE, **kw)
    b = make_checkpoint(tmp_path / "b", seed=1, **kw)
    assert (a / "model.safetensors").read_bytes() == (ckpts["llama"] / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_bpe_merges_across_punctuation_newline_boundary(ckpts, arch):
    tok = AutoTokenizer.from_pretrained(ckpts[arch])
    vocab = tok.get_vocab()
    assert {"?ĊĊ", ":Ċ", "ĠĊĊ"} <= set(vocab)  # "?\n\n", ":\n", " \n\n" are single tokens

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    whole = "x?\n\n### Response:\n"
    assert enc(whole) != enc("x?") + enc("\n\n### Response:\n")  # "?\n\n" merges
    assert enc(whole) != enc("x?\n\n### Response:") + enc("\n")  # ":\n" merges
    # Split where the pre-tokenizer splits anyway ("?\n\n" | "###"): no merge crosses it.
    assert enc(whole) == enc("x?\n\n") + enc("### Response:\n")
    assert tok.decode(enc(whole)) == whole


@pytest.mark.parametrize("special", [False, True])
def test_sid_and_extra_tokens_special_or_plain(tmp_path, special):
    out = make_checkpoint(tmp_path / "t", arch="qwen3", sid_tokens=SIDS, extra_tokens=EXTRAS, sid_as_special=special)
    tok = AutoTokenizer.from_pretrained(out)
    dec = tok.added_tokens_decoder
    for t in (*EXTRAS, *SIDS):
        (i,) = tok(t, add_special_tokens=False)["input_ids"]
        assert dec[i].content == t and dec[i].special is special
    think = tok.convert_tokens_to_ids(["<think>", "</think>"])
    assert [dec[i].special for i in think] == [False, False]  # Qwen3 style
    assert dec[tok.convert_tokens_to_ids("<|im_start|>")].special is True
    ids = tok("<think>\n\n</think>\n\n<a_1><b_2>", add_special_tokens=False)["input_ids"]
    kept = tok.decode(ids, skip_special_tokens=True)
    assert "<think>" in kept and ("<a_1>" in kept) is (not special)


def test_chat_template_enable_thinking_false(ckpts):
    tok = AutoTokenizer.from_pretrained(ckpts["qwen3"])
    msgs = [{"role": "user", "content": "Recommend the next item."}]
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off == "<|im_start|>user\nRecommend the next item.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert on.endswith("<|im_start|>assistant\n")
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, return_dict=True)
    ids = enc["input_ids"]
    assert tok.convert_tokens_to_ids("<think>") in ids


def test_build_is_fast(tmp_path, ckpts):
    t0 = time.perf_counter()
    make_checkpoint(tmp_path / "f", arch="qwen2", sid_tokens=sid_vocab(("s_a", "s_b", "s_c", "s_d"), 64))
    assert time.perf_counter() - t0 < 5.0


def test_sid_vocab():
    assert sid_vocab(("a", "b"), 3) == ["<a_0>", "<a_1>", "<a_2>", "<b_0>", "<b_1>", "<b_2>"]
    assert sid_vocab(("s_a", "s_b", "s_c"), 2)[-1] == "<s_c_1>"


def test_write_index_collisions_and_items(tmp_path):
    prefixes, size, n = ("a", "b", "c"), 8, 60
    index = write_index(tmp_path / "x.index.json", n, prefixes, size, seed=5, collisions=2)
    assert json.loads((tmp_path / "x.index.json").read_text()) == index
    assert list(index) == [str(i) for i in range(n)]
    allowed = [set(sid_vocab((p,), size)) for p in prefixes]
    assert all(len(s) == 3 and all(c in allowed[k] for k, c in enumerate(s)) for s in index.values())
    counts: dict[tuple, int] = {}
    for s in index.values():
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    assert sorted(c for c in counts.values() if c > 1) == [2, 2]
    assert write_index(tmp_path / "y.json", n, prefixes, size, seed=5) == index
    no_coll = write_index(tmp_path / "z.json", 10, prefixes, size, collisions=0)
    assert len({tuple(s) for s in no_coll.values()}) == 10

    items = write_items(tmp_path / "x.item.json", index)
    assert json.loads((tmp_path / "x.item.json").read_text(encoding="utf-8")) == items
    assert list(items) == list(index)
    titles = [v["title"] for v in items.values()]
    assert all(v["description"] for v in items.values())
    assert any('"' in t for t in titles) and any("," in t for t in titles)
    assert any(not t.isascii() for t in titles) and any(any(ch.isdigit() for ch in t) for t in titles)
    tok = Tokenizer.from_str(base_tokenizer_json("qwen3"))
    assert len({len(tok.encode(t).ids) for t in titles}) >= 4

