"""pauserec.bench.shapes (real-shape random checkpoints), pauserec.bench.flops and `pauserec-bench shape`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pauserec.bench.flops import gemm_rate, layer_flops_per_token, recommend_flops  # noqa: E402
from pauserec.bench.shapes import SHAPES, count_parameters, shape_config, write_shape_checkpoint  # noqa: E402
from pauserec.cli.bench import app as bench_app  # noqa: E402
from pauserec.errors import PauserecError  # noqa: E402
from pauserec.train.model import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
TINY = {"layers": 1, "hidden": 64}  # real vocabulary, heads and head_dim; small otherwise


@pytest.fixture(scope="module")
def tiny_shape(tmp_path_factory):
    return write_shape_checkpoint("qwen3-0.6b", tmp_path_factory.mktemp("shape") / "ck", seed=0, **TINY)


# -- shapes ---------------------------------------------------------------------------------------
def test_real_family_configs():
    q = SHAPES["qwen3-0.6b"].config
    assert (q["hidden_size"], q["intermediate_size"], q["num_hidden_layers"]) == (1024, 3072, 28)
    assert (q["num_attention_heads"], q["num_key_value_heads"], q["head_dim"], q["vocab_size"]) == (16, 8, 128, 151_936)
    assert q["tie_word_embeddings"] and q["rms_norm_eps"] == 1e-6 and q["rope_parameters"]["rope_theta"] == 1e6
    big = SHAPES["qwen3-1.7b"].config
    assert (big["hidden_size"], big["intermediate_size"], big["num_hidden_layers"]) == (2048, 6144, 28)
    ll = SHAPES["llama-3.2-1b"].config
    assert (ll["hidden_size"], ll["intermediate_size"], ll["num_hidden_layers"], ll["head_dim"]) == (2048, 8192, 16, 64)
    assert ll["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
    # the published sizes (tied embeddings counted once)
    assert count_parameters("qwen3-0.6b") == 596_049_920
    assert count_parameters("llama-3.2-1b") == 1_235_814_400


def test_tiny_shape_checkpoint_loads(tiny_shape):
    ck = load_checkpoint(tiny_shape)
    m, cfg = ck.model, ck.model.config
    assert cfg.model_type == "qwen3" and cfg.vocab_size == 151_936 and cfg.head_dim == 128
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (1, 64, 192)
    assert m.get_input_embeddings().weight.shape == (151_936, 64)
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()  # tied
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.equal(m.model.norm.weight, torch.ones(64))
    std = float(m.model.layers[0].mlp.up_proj.weight.detach().std())
    assert abs(std - cfg.initializer_range) < 0.002
    params = sum(p.numel() for p in m.parameters())
    card = ck.card
    assert card.preset == "shape:qwen3-0.6b" and card.dataset == "synthetic"
    assert card.train["untrained"] is True and card.train["steps"] == 0
    assert card.train["parameters"] == params == count_parameters("qwen3-0.6b", **TINY)
    assert card.train["weight_bytes"] == 4 * params
    assert card.model_config["vocab_size"] == 151_936
    assert card.prompt.kind == "pause" and card.prompt.pause_k == 5
    assert card.prompt.codebook_sizes == ck.catalog.codebook_sizes
    assert ck.tokenizer.get_vocab_size() < cfg.vocab_size
    with torch.no_grad():  # the model runs on a real prompt
        ids = torch.tensor(card.prompt.prompt_ids(ck.catalog.sids[:3]))[None]
        assert torch.isfinite(m(input_ids=ids).logits).all()


def test_seed_deterministic(tiny_shape, tmp_path):
    again = write_shape_checkpoint("qwen3-0.6b", tmp_path / "again", seed=0, **TINY)
    other = write_shape_checkpoint("qwen3-0.6b", tmp_path / "other", seed=1, **TINY)
    weights = "model.safetensors"
    assert (again / weights).read_bytes() == (tiny_shape / weights).read_bytes()
    assert (again / "tokenizer.json").read_text() == (tiny_shape / "tokenizer.json").read_text()
    assert (other / weights).read_bytes() != (tiny_shape / weights).read_bytes()


def test_llama_shape_direct(tmp_path):
    out = write_shape_checkpoint("llama-3.2-1b", tmp_path / "ll", kind="direct", **TINY)
    ck = load_checkpoint(out)
    cfg = ck.model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == 128_256 and cfg.head_dim == 64
    assert cfg.rope_parameters["rope_type"] == "llama3" and ck.card.prompt.kind == "direct"
    assert all(torch.isfinite(p).all() for p in ck.model.parameters())


def test_real_data(scientific, tmp_path):
    out = write_shape_checkpoint("qwen3-0.6b", tmp_path / "sci", data=scientific, index="rkmeans_zcr", layers=1, hidden=32)
    ck = load_checkpoint(out, load_weights=False)
    assert ck.card.index == "rkmeans_zcr" and ck.catalog.n_items > 1000


def test_errors(tmp_path):
    with pytest.raises(PauserecError, match="qwen3-0.6b, qwen3-1.7b"):
        write_shape_checkpoint("qwen9-70b", tmp_path / "x")
    with pytest.raises(PauserecError, match="layers"):
        shape_config("qwen3-0.6b", layers=0)
    with pytest.raises(PauserecError, match="kind"):
        write_shape_checkpoint("qwen3-0.6b", tmp_path / "x", kind="chat", **TINY)
    assert not (tmp_path / "x").exists()


# -- FLOPs ----------------------------------------------------------------------------------------
TINY_MODEL = {"arch": "qwen3", "layers": 1, "q_heads": 2, "kv_heads": 1, "head_dim": 4, "hidden": 8, "vocab": 50}
CALL = dict(batch=2, beams=3, hist_tokens=5, prefix_len=2, suffix_len=1, levels=3, codebook_sizes=(4, 5, 6))


def test_recommend_flops_by_hand():
    f = recommend_flops(TINY_MODEL, intermediate=16, **CALL)
    # one token through the layer: q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16 -> 2 * 576
    per_token = 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)
    assert layer_flops_per_token({**TINY_MODEL, "intermediate": 16}) == per_token == 1152
    attn = 2 * 2 * 2 * 4  # scores + probs @ values, 2 q heads x head_dim 4, per query and key
    n = 5 + 1  # history + suffix tokens per user
    assert f["prefill"] == {
        "layers": 2 * n * per_token,  # 2 users
        "attention": 2 * n * (2 + n) * attn,  # every query sees prefix + all 6 context slots
        "head": 2 * 2 * 8 * 50,  # last position only, full vocabulary
    }
    rows = 2 * 3  # users x beams per decode step; 2 steps (levels - 1)
    assert f["decode"] == {
        "layers": 2 * rows * per_token,
        "attention": rows * ((2 + n + 1) + (2 + n + 2)) * attn,  # ctx + the SID tokens so far
        "head": 2 * rows * 2 * 8 * 50,
    }
    assert f["total"] == sum(f["prefill"].values()) + sum(f["decode"].values()) == 45_568
    # the manifest's model dict with "intermediate" added gives the same numbers
    assert recommend_flops({**TINY_MODEL, "intermediate": 16}, **CALL) == f


def test_recommend_flops_sid_scoring_smaller_head():
    full = recommend_flops(TINY_MODEL, intermediate=16, **CALL)
    sid = recommend_flops(TINY_MODEL, intermediate=16, scoring="sid", **CALL)
    assert sid["prefill"]["head"] == 2 * 2 * 8 * 4 and sid["decode"]["head"] == 6 * 2 * 8 * (5 + 6)
    assert sid["prefill"]["head"] < full["prefill"]["head"] and sid["decode"]["head"] < full["decode"]["head"]
    for phase in ("prefill", "decode"):
        assert sid[phase]["layers"] == full[phase]["layers"] and sid[phase]["attention"] == full[phase]["attention"]
    assert sid["total"] < full["total"]


def test_recommend_flops_errors():
    with pytest.raises(PauserecError, match="intermediate"):
        recommend_flops(TINY_MODEL, **CALL)
    with pytest.raises(PauserecError, match="codebook_sizes"):
        recommend_flops(TINY_MODEL, intermediate=16, **{**CALL, "codebook_sizes": (4, 5)})
    with pytest.raises(PauserecError, match="scoring"):
        recommend_flops(TINY_MODEL, intermediate=16, scoring="top", **CALL)
    with pytest.raises(PauserecError, match="vocab"):
        recommend_flops({k: v for k, v in TINY_MODEL.items() if k != "vocab"}, intermediate=16, **CALL)


def test_gemm_rate_tiny():
    r = gemm_rate(threads=1, sizes=((16, 24, 32),), repeats=3, min_sample_s=0.002)
    assert r["threads"] == 1 and "openblas_coretype" in r
    (s,) = r["sizes"]
    assert (s["m"], s["n"], s["k"], s["flops"]) == (16, 24, 32, 2 * 16 * 24 * 32)
    for lib in ("numpy", "onnxruntime"):
        t = s[lib]
        assert 0 < t["gflops_min"] <= t["gflops_median"] <= t["gflops_max"] and np.isfinite(t["gflops_max"])
        assert t["samples"] == 3
    json.dumps(r)  # JSON-able
    with pytest.raises(PauserecError):
        gemm_rate(sizes=((16, 24),), repeats=1)


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_shape(tmp_path):
    res = runner.invoke(bench_app, ["shape", "--list"])
    assert res.exit_code == 0, res.output
    assert "qwen3-1.7b" in res.output and "596,049,920" in res.output and "1,235,814,400" in res.output
    out = tmp_path / "cli"
    res = runner.invoke(bench_app, ["shape", "qwen3-1.7b", "--out", str(out), "--layers", "1", "--hidden", "32",
                                    "--kind", "direct", "--seed", "3"])
    assert res.exit_code == 0, res.output
    params = count_parameters("qwen3-1.7b", layers=1, hidden=32)
    assert f"{params:,} parameters" in res.output and f"{4 * params:,} weight bytes" in res.output
    ck = load_checkpoint(out, load_weights=False)
    assert ck.card.seed == 3 and ck.card.prompt.kind == "direct" and ck.card.preset == "shape:qwen3-1.7b"
    res = runner.invoke(bench_app, ["shape", "gpt-5", "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "qwen3-0.6b" in res.output
    res = runner.invoke(bench_app, ["shape"])
    assert res.exit_code == 2 and "--list" in res.output


def test_big_family_configs():
    """Qwen3-8B (untied head) and LC-Rec's Llama-2-7B base: the published parameter counts."""
    q = SHAPES["qwen3-8b"].config
    assert (q["hidden_size"], q["intermediate_size"], q["num_hidden_layers"]) == (4096, 12288, 36)
    assert (q["num_attention_heads"], q["num_key_value_heads"], q["head_dim"]) == (32, 8, 128)
    assert not q["tie_word_embeddings"] and q["vocab_size"] == 151_936
    assert count_parameters("qwen3-8b") == 8_190_735_360
    ll = SHAPES["llama-2-7b"].config
    assert (ll["hidden_size"], ll["num_hidden_layers"], ll["num_key_value_heads"], ll["vocab_size"]) == (4096, 32, 32, 32_000)
    assert count_parameters("llama-2-7b") == 6_738_415_616 and SHAPES["llama-2-7b"].sid_rows


def test_bfloat16_shards_one_at_a_time(tmp_path, monkeypatch):
    """bfloat16 weights in several safetensors shards with an index (each shard at most SHARD_BYTES unless one
    tensor is larger); transformers loads them; Llama-2-7B's vocabulary grows by the SID rows."""
    from safetensors import safe_open

    import pauserec.bench.shapes as shapes

    monkeypatch.setattr(shapes, "SHARD_BYTES", 3_000_000)  # the 4.2 MB embedding and head: a shard each
    out = write_shape_checkpoint("llama-2-7b", tmp_path / "ll2", dtype="bfloat16", **TINY)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all((out / f).is_file() for f in files)
    for f in files:
        with safe_open(str(out / f), "pt") as st:
            sizes = [st.get_slice(k).get_shape() for k in st.keys()]
            nbytes = [2 * int(np.prod(s)) for s in sizes]
            assert sum(nbytes) <= 3_000_000 or len(nbytes) == 1
    ck = load_checkpoint(out)
    cfg, m = ck.model.config, ck.model
    assert cfg.vocab_size == 32_000 + sum(ck.catalog.codebook_sizes)
    assert m.lm_head.weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()  # untied, as Llama-2
    assert ck.card.train["dtype"] == "bfloat16" and ck.card.train["weight_bytes"] == 2 * ck.card.train["parameters"]
    with safe_open(str(out / index["weight_map"]["model.embed_tokens.weight"]), "pt") as st:
        emb = st.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.bfloat16 and bool((emb[cfg.pad_token_id] == 0).all())
    assert abs(float(emb.float().std()) - cfg.initializer_range) < 0.002
