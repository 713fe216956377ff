"""pauserec.export: tiny random Qwen2/Qwen3/Llama checkpoints export, validate, and make valid engines.

The helpers at the top (tiny catalog, prompt spec, checkpoints, cached engine exports) are shared
with test_runtime.py: engines are exported once per session into the pytest base temp directory.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pauserec.data import Catalog  # noqa: E402
from pauserec.prompt.spec import PromptSpec, TrainingCard  # noqa: E402
from pauserec.errors import CheckpointError, ExportError  # noqa: E402

VOCAB = 96
SID_BASE = 40
LEVEL_SIZES = (4, 5, 6)

# architecture -> (config class, config kwargs): GQA groups 2 / 4 / 1, tied and untied heads,
# Qwen2 q/k/v biases, Qwen3 q/k norms, a non-default rope_theta, Llama with llama3 rope scaling.
ARCHS = {
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, rope_theta=50000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=1, rope_theta=1000.0, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                "rope_theta": 20000.0})),
}


def tiny_catalog(seed: int = 0) -> Catalog:
    """20 unique 3-level SIDs (4 x 5 x 6 codes) plus a collision group of 3 items sharing one SID."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(v) for v in LEVEL_SIZES], indexing="ij"), -1).reshape(-1, 3)
    inner = grid[1:-1]  # the first and last SIDs are always in: every code range is used
    picked = np.concatenate([grid[:1], inner[np.sort(rng.choice(len(inner), 18, replace=False))], grid[-1:]])
    sids = np.concatenate([picked, picked[[3, 3]]])
    return Catalog([f"item{i}" for i in range(len(sids))], sids, ("a", "b", "c"), name="tiny")


def tiny_spec(kind: str, pause_k: int = 3, max_history: int = 4, max_rationale: int = 3) -> PromptSpec:
    sid_ids, start = [], SID_BASE
    for v in LEVEL_SIZES:
        sid_ids.append(tuple(range(start, start + v)))
        start += v
    suffix = {"direct": (2, 3), "pause": (2, *[4] * pause_k, 3), "cot": (2,)}[kind]
    return PromptSpec(kind=kind, pause_k=pause_k if kind == "pause" else 0, max_history=max_history,
                      prefix_ids=(6, 7, 8, 9, 10, 11), suffix_ids=suffix, item_tail_ids=(5,), item_sep_id=5, think_id=2,
                      think_end_id=3, pause_id=4 if kind == "pause" else -1, eos_id=1, pad_id=0,
                      sid_token_ids=tuple(sid_ids), max_rationale=max_rationale)


def tiny_model(arch: str, seed: int = 0):
    name, kwargs = ARCHS[arch]
    cfg = getattr(transformers, name)(vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0,
                                      eos_token_id=1, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # larger logits than the default init: log-probs far from uniform
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def make_checkpoint(root: Path, arch: str, kind: str, card: bool = True, **spec_kw) -> Path:
    path = root / f"ckpt-{arch}-{kind}"
    if (path / "config.json").is_file():
        return path
    model = tiny_model(arch)
    model.save_pretrained(path)
    if card:
        TrainingCard(prompt=tiny_spec(kind, **spec_kw), dataset="tiny").save(path)
    tiny_catalog().save(path / "catalog.npz")
    return path


def exported(factory, arch: str, kind: str, suffix: str = "", **cfg) -> Path:
    """Export (once per test session) the tiny checkpoint ``arch``/``kind``; returns the engine dir."""
    from pauserec.export import ExportConfig, export_engine

    root = factory.getbasetemp() / "pauserec-tiny"
    root.mkdir(exist_ok=True)
    out = root / f"engine-{arch}-{kind}{suffix}"
    if not (out / "manifest.json").is_file():
        export_engine(ExportConfig(checkpoint=make_checkpoint(root, arch, kind), out=out, **cfg))
    return out


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- exports of every architecture --------------------------------------------------------------
@pytest.fixture(scope="session")
def engines(tmp_path_factory) -> dict[str, Path]:
    return {
        "qwen3-pause": exported(tmp_path_factory, "qwen3", "pause"),
        "qwen2-direct": exported(tmp_path_factory, "qwen2", "direct"),
        "llama-cot": exported(tmp_path_factory, "llama", "cot"),
    }


@pytest.mark.parametrize("name", ["qwen3-pause", "qwen2-direct", "llama-cot"])
def test_every_graph_validates_against_hf(engines, name):
    m = manifest(engines[name])
    checks = m["validation"]
    graphs = {c["graph"] for c in checks}
    assert graphs == set(m["graphs"]) | {f"merged:{g}" for g in m["graphs"]}  # every graph, also in merged.onnx
    assert {c["case"] for c in checks} == {"random", "real"}
    assert all(c["ok"] and c["max_abs_err"] < 1e-4 for c in checks), checks
    assert m["opset"] == 18 and m["precision"] == "fp32"


def test_manifest_describes_the_engine(engines):
    path = engines["qwen3-pause"]
    m = manifest(path)
    assert m["format_version"] == 5 and m["kind"] == "pause" and m["pause_k"] == 3 and m["scoring"] == "full"
    assert m["sid"] == {"levels": 3, "codebook_sizes": list(LEVEL_SIZES), "token_prefixes": ["a", "b", "c"]}
    assert PromptSpec.from_dict(m["prompt"]) == tiny_spec("pause")
    assert m["model"]["arch"] == "qwen3" and m["model"]["kv_heads"] == 2 and m["model"]["q_heads"] == 4
    assert set(m["files"]) == {"prefill.onnx", "decode.onnx", "merged.onnx", "weights.bin", "catalog.npz"}
    assert m["merged"] == "merged.onnx"
    assert len(m["source"]["sha256"]) == 64
    assert m["shapes"]["static"] is False and m["shapes"]["prefix_len"] == 6 and m["shapes"]["suffix_len"] == 5
    decode = {t["name"]: t for t in m["graphs"]["decode"]["inputs"]}
    assert decode["ctx_key"]["dims"] == [2, "batch", 2, "ctx", 16]
    assert decode["beam_key"]["dims"] == [2, "batch", 2, "beams", 2, 16]
    out = {t["name"]: t for t in m["graphs"]["decode"]["outputs"]}
    assert out["logprobs"]["dims"] == ["batch", "beams", max(LEVEL_SIZES[1:])]
    assert Catalog.load(path / "catalog.npz") == tiny_catalog()
    cot = manifest(engines["llama-cot"])
    assert set(cot["graphs"]) == {"prefill", "decode", "think"}
    assert cot["graphs"]["prefill"]["outputs"][0]["dims"] == ["batch", VOCAB]  # cot: full vocabulary first


def test_pause_suffix_and_prefix_are_graph_constants(engines):
    """The runtime feeds only history ids + mask; <think><pause>x3</think> and the prefix KV live in the graph."""
    from pauserec.export.onnx import graph_inputs_and_initializers

    spec = tiny_spec("pause")
    inputs, inits = graph_inputs_and_initializers(engines["qwen3-pause"] / "prefill.onnx")
    assert inputs == ["history_ids", "history_mask"]
    suffix = list(spec.suffix_ids)
    assert suffix == [2, 4, 4, 4, 3]
    assert any(v.dtype == np.int64 and v.ravel().tolist() == suffix for v in inits.values())
    from pauserec.export.graphs import Core, prefix_kv

    keys, values = prefix_kv(Core(tiny_model("qwen3")), list(spec.prefix_ids))  # (layers, Hkv, P, D)
    for const in (keys, values):  # the prefix KV of every layer is stored as an initializer
        want = const.numpy()
        assert any(v.shape == want.shape and np.allclose(v, want, atol=1e-6) for v in inits.values())
    d_inputs, _ = graph_inputs_and_initializers(engines["qwen3-pause"] / "decode.onnx")
    assert "think" not in " ".join(d_inputs) and "pause" not in " ".join(d_inputs)


def graphs_of(model) -> list:
    """The model's graph and its If branches (merged.onnx holds each engine graph in a branch)."""
    out = [model.graph]
    for node in model.graph.node:
        out += [a.g for a in node.attribute if a.name in ("then_branch", "else_branch")]
    return out


def _unnamed(t):
    import onnx

    c = onnx.TensorProto()
    c.CopyFrom(t)
    c.name = ""
    return c


@pytest.mark.parametrize("name", ["qwen3-pause", "qwen2-direct", "llama-cot"])
def test_merged_model_runs_one_graph_per_call_and_recommends_the_same(engines, name):
    """merged.onnx: one If per graph on its "<graph>/run" flag, every weight one initializer of the model that
    the branches share (so ONNX Runtime packs it once); its per-graph views recommend what the separate graphs do."""
    import onnx

    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.backends.ort import MergedView
    from pauserec.runtime.spec import run_flag

    path = engines[name]
    model = onnx.load(str(path / "merged.onnx"), load_external_data=False)
    graphs = set(manifest(path)["graphs"])
    assert [n.op_type for n in model.graph.node] == ["If"] * len(graphs)
    assert {n.input[0] for n in model.graph.node} == {run_flag(g) for g in graphs}
    assert {i.name.split("/")[0] for i in model.graph.input} == graphs
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    readers: dict[str, set] = {}
    for node in model.graph.node:
        branch = next(a.g for a in node.attribute if a.name == "then_branch")
        assert not external & {t.name for t in branch.initializer}  # the weights are the model's, not a branch's
        # its small constants are initializers, each value once (so ONNX Runtime can merge equal shape operators)
        assert "Constant" not in {n.op_type for n in branch.node}
        values = [t.SerializeToString(deterministic=True) for t in map(_unnamed, branch.initializer)]
        assert len(values) == len(set(values))
        for inner in branch.node:
            for x in inner.input:
                if x in external:
                    readers.setdefault(x, set()).add(node.input[0])
    assert len(readers) == len(external)  # every weight read by a branch
    if len(graphs) > 1:  # the decoder's weights are one tensor for every graph
        assert max(len(r) for r in readers.values()) == len(graphs)

    merged = Engine.load(path, provider="cpu")  # default: prepacked, one session for every graph
    split = Engine.load(path, provider="cpu", prepack=False)
    assert all(isinstance(s, MergedView) for s in merged.sessions.values())
    assert len({id(s.merged) for s in merged.sessions.values()}) == 1 and set(merged.sessions) == graphs
    assert not any(isinstance(s, MergedView) for s in split.sessions.values())
    rng = np.random.default_rng(3)
    ids = merged.catalog.item_ids
    histories = [[ids[i] for i in rng.integers(0, len(ids), size=n)] for n in (1, 2, 4, 4, 3)]
    a = Recommender(merged).recommend(histories, k=5, beams=6)
    b = Recommender(split).recommend(histories, k=5, beams=6)
    assert (a.item_index == b.item_index).all()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_decode_reads_each_layers_kv_where_it_needs_it(tmp_path, engines):
    """ONNX Runtime's GatherSliceToSplitFusion would copy every layer's context and beam KV at the start of
    each decode step (+300 MB at batch 8 x beam 20 at the 0.6B shape): the runtime's sessions keep one
    Gather per layer, next to the layer that reads it."""
    import onnx
    import onnxruntime as ort

    from pauserec.runtime.backends.ort import DISABLED_OPTIMIZERS, session_options

    def kv_readers(disabled: list[str]) -> set[str]:
        opts = session_options(1)
        opts.optimized_model_filepath = str(tmp_path / f"opt{len(disabled)}.onnx")
        ort.InferenceSession(str(engines["qwen3-pause"] / "decode.onnx"), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        return {n.op_type for n in graph.node for x in n.input if x in ("ctx_key", "ctx_value", "beam_key", "beam_value")}

    assert "Split" in kv_readers([])  # what ORT does by default
    assert kv_readers(DISABLED_OPTIMIZERS) == {"Gather"}


@pytest.mark.parametrize("name", ["qwen3-pause", "qwen2-direct", "llama-cot"])
def test_no_layer_reads_a_size_off_its_tensors(tmp_path, engines, name):
    """Sizes (users, beams, context) are read once per graph from its inputs: a size read off a layer's tensor
    (a traced ``x.shape``) is a Shape / Gather / Unsqueeze / Concat chain per use that ONNX Runtime cannot fold,
    ~40 extra operators per decode layer. None is left after the runtime's own graph optimisation."""
    import re

    import onnx
    import onnxruntime as ort

    from pauserec.runtime.backends.ort import DISABLED_OPTIMIZERS, session_options

    for path in sorted(engines[name].glob("*.onnx")):
        if path.name == "merged.onnx":
            continue
        opts = session_options(1)
        opts.optimized_model_filepath = str(tmp_path / path.name)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS)
        graph = onnx.load(opts.optimized_model_filepath, load_external_data=False).graph
        in_layer = {t.name for t in graph.initializer if re.search(r"\.w\d+_|layers\.\d+\.", t.name)}
        for node in graph.node:  # topological: a tensor computed from a layer's weights is a layer's tensor
            if node.op_type != "Shape" and any(x in in_layer for x in node.input):
                in_layer.update(node.output)
        reads = [n.input[0] for n in graph.node if n.op_type == "Shape" and n.input[0] in in_layer]
        assert not reads, f"{path.name}: sizes read off layer tensors {reads[:5]}"


def test_engine_without_merged_model_keeps_one_unpacked_copy(tmp_path, engines):
    """An engine exported before merged.onnx existed loads as before: fp32 unpacked, the graphs' sessions sharing
    the mapped weights (prepacking them would hold one copy per graph); prepack=True still works."""
    import shutil

    from pauserec.runtime import Engine
    from pauserec.runtime.backends.ort import MergedView, OrtSession

    old = tmp_path / "old"
    shutil.copytree(engines["qwen3-pause"], old)
    (old / "merged.onnx").unlink()
    m = manifest(old)
    del m["merged"], m["files"]["merged.onnx"]
    (old / "manifest.json").write_text(json.dumps(m))
    engine = Engine.load(old, provider="cpu")
    assert all(isinstance(s, OrtSession) and s.weights is not None for s in engine.sessions.values())
    opts = {s.sess.get_session_options().get_session_config_entry("session.disable_prepacking")
            for s in engine.sessions.values()}
    assert opts == {"1"}
    assert not any(isinstance(s, MergedView) for s in Engine.load(old, provider="cpu", prepack=True).sessions.values())


def test_spin_reaches_every_session_and_changes_no_result(tmp_path, engines):
    """--spin (busy-waiting intra-op threads) is a scheduling option: the merged session and per-graph sessions
    both get it, and the recommendations are the same to the bit."""
    import shutil

    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.backends.ort import MergedView

    def spinning(engine) -> set:
        out = set()
        for s in engine.sessions.values():
            out.add(s.sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning"))
        return out

    path = engines["qwen3-pause"]
    quiet, busy = Engine.load(path, provider="cpu"), Engine.load(path, provider="cpu", spin=True)
    assert any(isinstance(s, MergedView) for s in busy.sessions.values())
    assert spinning(quiet) == {"0"} and spinning(busy) == {"1"}
    ids = quiet.catalog.item_ids
    users = [list(ids[:5]), list(ids[3:12])]
    a, b = (Recommender(e).recommend(users, k=10, beams=10) for e in (quiet, busy))
    np.testing.assert_array_equal(a.item_index, b.item_index)
    np.testing.assert_array_equal(a.scores, b.scores)
    old = tmp_path / "old"  # per-graph sessions (an engine without merged.onnx)
    shutil.copytree(path, old)
    (old / "merged.onnx").unlink()
    m = manifest(old)
    del m["merged"], m["files"]["merged.onnx"]
    (old / "manifest.json").write_text(json.dumps(m))
    assert spinning(Engine.load(old, provider="cpu", spin=True)) == {"1"}


def test_export_is_deterministic(tmp_path, engines):
    from pauserec.export import ExportConfig, export_engine

    ckpt = engines["qwen2-direct"].parent / "ckpt-qwen2-direct"
    export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "again"))
    assert manifest(tmp_path / "again")["files"] == manifest(engines["qwen2-direct"])["files"]


# -- bad input -----------------------------------------------------------------------------------
def test_non_empty_output_needs_force(tmp_path, engines):
    from pauserec.export import ExportConfig, export_engine

    ckpt = engines["qwen2-direct"].parent / "ckpt-qwen2-direct"
    out = tmp_path / "eng"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        export_engine(ExportConfig(checkpoint=ckpt, out=out))
    assert (out / "old.txt").is_file()
    export_engine(ExportConfig(checkpoint=ckpt, out=out, force=True))
    assert not (out / "old.txt").exists() and (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no staging or old directories left


def test_disk_full_leaves_no_engine(tmp_path, engines, monkeypatch):
    from pauserec.export import ExportConfig, export_engine

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pauserec.runtime.manifest.Manifest.write", full)
    ckpt = engines["qwen2-direct"].parent / "ckpt-qwen2-direct"
    with pytest.raises(ExportError, match="disk is full"):
        export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng"))
    assert list(tmp_path.iterdir()) == []


def test_every_mismatch_is_listed_at_once(tmp_path, engines):
    from pauserec.export import ExportConfig, export_engine

    ckpt = engines["qwen2-direct"].parent / "ckpt-qwen2-direct"
    with pytest.raises(ExportError) as info:  # an impossible tolerance: every check fails
        export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng", atol=1e-12))
    msg = str(info.value)
    # 6 of the graphs and the same 6 in merged.onnx, each within its rows and in its rows' common offset
    assert msg.startswith("24 fp32 graph output(s) differ")
    for line in ("prefill [random] logprobs", "prefill [real] logprobs", "decode [random] logprobs[level 2]",
                 "decode [real] logprobs[level 3]", "merged:prefill [real] logprobs", "merged:decode [random] logprobs"):
        assert line in msg
    assert list(tmp_path.iterdir()) == []


def test_a_rows_common_offset_is_held_to_ten_times_the_tolerance():
    """A trained model's fp32 rows differed from HF's by a common 1.2e-4 (the log-normaliser: float32 rounding of
    the row's largest logits) and by 3e-6 within the row: that passes; a 1.2e-4 difference within a row does not."""
    from pauserec.export.validate import NORMALISER, _Case, _err

    rng = np.random.default_rng(0)
    ref = -np.abs(rng.standard_normal(256)) * 10
    within, offset = _err(ref + 1.2e-4 + rng.uniform(-3e-6, 3e-6, 256), ref)
    assert within < 1e-5 and offset == pytest.approx(1.2e-4, abs=4e-6)
    bent = ref.copy()
    bent[:5] += 1.2e-4
    assert _err(bent, ref)[0] == pytest.approx(1.2e-4) and _err(bent, ref)[1] == 0.0
    assert _err(np.full(3, np.nan), ref[:3]) == (float("inf"), float("inf"))
    case = _Case.__new__(_Case)
    case.checks = {}
    case.record("decode", "logprobs", (2e-6, 1.2e-4))
    assert case.checks == {("decode", "logprobs"): 2e-6, ("decode", "logprobs" + NORMALISER): 1.2e-4}


def test_checkpoint_without_card_names_the_flags(tmp_path):
    from pauserec.export import ExportConfig, export_engine

    ckpt = make_checkpoint(tmp_path, "qwen2", "direct", card=False)
    (ckpt / "catalog.npz").unlink()
    with pytest.raises(CheckpointError, match="--index INDEX.json.*--prompt"):
        export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng"))
    assert not (tmp_path / "eng").exists()


def _word_tokenizer(path: Path, skip: str | None = None) -> None:
    """A word-level tokenizer.json whose ids match tiny_spec (specials, instruction words, SID tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from pauserec.prompt.spec import INSTRUCTION

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<think>", "</think>", "<pause>", "<item_sep>"])}
    for w in INSTRUCTION.split():
        vocab.setdefault(w, len(vocab))
    while len(vocab) < SID_BASE:
        vocab[f"w{len(vocab)}"] = len(vocab)
    for level, prefix in enumerate("abc"):
        for c in range(LEVEL_SIZES[level]):
            vocab[f"<{prefix}_{c}>" if f"<{prefix}_{c}>" != skip else f"<unused_{level}_{c}>"] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


def test_sid_tokens_missing_from_tokenizer_or_vocab(tmp_path):
    from pauserec.export import ExportConfig
    from pauserec.export.bundle import load_sources

    ckpt = make_checkpoint(tmp_path, "qwen3", "direct")
    _word_tokenizer(ckpt, skip="<b_2>")
    with pytest.raises(CheckpointError, match="<b_2>"):
        load_sources(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng"))
    (ckpt / "tokenizer.json").unlink()
    spec = tiny_spec("direct").to_dict()
    spec["sid_token_ids"][2] = [VOCAB + i for i in range(LEVEL_SIZES[2])]  # ids beyond the embedding
    TrainingCard(prompt=PromptSpec.from_dict(spec)).save(ckpt)
    with pytest.raises(CheckpointError, match="6 SID tokens are missing.*<c_0>"):
        load_sources(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng"))


def test_unsupported_architecture(tmp_path):
    from pauserec.export import ExportConfig
    from pauserec.export.bundle import load_sources

    ckpt = make_checkpoint(tmp_path, "qwen2", "direct")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported architecture 'gpt2'"):
        load_sources(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng"))


def test_bad_config_combinations(tmp_path):
    from pauserec.export import ExportConfig, export_engine

    for cfg, msg in [
        (dict(static=True, batch=2), "--beams"),
        (dict(batch=2), "--static"),
        (dict(backend="tensorrt"), "static"),
        (dict(precision="fp8"), "precision"),
        (dict(static=True, batch=1, beams=2, backend="tensorrt", precision="int8"), "not built"),
        (dict(static=True, batch=1, beams=2, backend="tensorrt", precision="bf16"), "not built"),
        (dict(scoring="top"), "scoring"),
        (dict(min_agreement=1.5), "min-agreement"),
        (dict(precision="int4", int4_block=48), "--int4-block 48 is not a block size MatMulNBits takes"),
    ]:
        with pytest.raises(ExportError, match=msg):
            export_engine(ExportConfig(checkpoint=tmp_path, out=tmp_path / "eng", **cfg))


# -- graph wrappers vs HF, in torch (fast: no ONNX) ----------------------------------------------
@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 3000.0},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0},
])
def test_rope_scaling_types_match_hf(rope):
    from pauserec.export.graphs import Core, PrefillGraph

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, rope_scaling=rope,
                                   max_position_embeddings=128)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    spec = tiny_spec("pause")
    graph = PrefillGraph(Core(model), spec.prefix_ids, spec.suffix_ids, None)
    hist = [12, 13, 14, 15, 16, 17, 18]
    with torch.no_grad():
        lp, _, _ = graph(torch.tensor([hist]), torch.ones(1, len(hist), dtype=torch.long))
        ref = model(torch.tensor([[*spec.prefix_ids, *hist, *spec.suffix_ids]])).logits[0, -1].log_softmax(-1)
    assert float((lp[0] - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("columns", [7, 32, VOCAB])
def test_head_in_blocks_gives_the_whole_vocabulary_log_softmax(columns):
    """Blocks of the head (a remainder block too): the full log-probs, and a level's codes read under the
    whole vocabulary from the blocks' log-normaliser, equal log_softmax over all tokens."""
    from pauserec.export.graphs import Core

    core = Core(tiny_model("qwen3"))
    core.split_head(columns)
    assert len(core.head_blocks) == -(-VOCAB // columns)
    h = torch.randn(3, 2, core.dims.hidden)
    with torch.no_grad():
        ref = torch.log_softmax(core.norm(h) @ core.lm_head.weight.t(), dim=-1)
        codes = [40, 41, 44, 90]
        valid = torch.tensor([True, True, False, True])
        lp = core.level_logprobs(h, core.head_rows_t(codes), valid)
        full = core.logprobs(h)
    assert float((full - ref).abs().max()) < 1e-5
    assert float((lp[..., valid] - ref[..., codes][..., valid]).abs().max()) < 1e-5
    assert torch.isneginf(lp[..., 2]).all()


def test_position_dependent_rope_is_rejected():
    from pauserec.export.graphs import model_dims

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ExportError, match="'dynamic' is not supported"):
        model_dims(transformers.LlamaForCausalLM(cfg))


# -- precisions, static shapes, CLI ----------------------------------------------------------------
def test_fp16_export_is_judged_by_ranking(tmp_path_factory):
    path = exported(tmp_path_factory, "qwen3", "pause", "-fp16", precision="fp16", quant_sample=16, min_agreement=0.5)
    m = manifest(path)
    assert m["precision"] == "fp16" and m["kv_dtype"] == "float16"
    kv = [t for t in m["graphs"]["decode"]["inputs"] if t["name"] == "ctx_key"][0]
    assert kv["dtype"] == "float16"
    errors = [c["max_abs_err"] for c in m["validation"] if c["graph"] != "engine"]
    assert max(errors) < 5e-2  # reported per output, as for fp32
    # the fp16 graphs are checked as the runtime runs them on a CPU: in the merged model (whose casts of the
    # weights to float32 happen in a call, one at a time, not all at a graph session's load)
    assert {c["graph"] for c in m["validation"] if c.get("precision") == "fp16"} == {"merged:prefill", "merged:decode"}
    q = [c for c in m["validation"] if c["graph"] == "engine"][0]
    assert q["sample"] == 16 and q["top10_overlap"] >= 0.5  # a random tiny model: near-ties everywhere


def test_agreement_below_the_floor_fails_the_export(tmp_path, monkeypatch):
    from pauserec.export import ExportConfig, export_engine, validate

    def half(*args, **kw):  # the measured agreement of a badly quantised engine
        return {"sample": 16, "top10_overlap": 0.5, "top1_agreement": 0.25}

    monkeypatch.setattr(validate, "compare_quantized", half)
    ckpt = make_checkpoint(tmp_path, "qwen2", "direct")
    with pytest.raises(ExportError, match="agrees with fp32 on only 0.500 of the top-10 .floor 0.8"):
        export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng", precision="int4", quant_sample=16))
    assert not (tmp_path / "eng").exists()


def test_int8_reports_agreement_instead_of_failing(tmp_path_factory):
    path = exported(tmp_path_factory, "qwen2", "direct", "-int8", precision="int8", quant_sample=16, min_agreement=0.0)
    m = manifest(path)
    q = [c for c in m["validation"] if c["graph"] == "engine"][0]
    assert q["sample"] == 16 and 0.0 <= q["top10_overlap"] <= 1.0
    assert {c["graph"] for c in m["validation"]} == {"prefill", "decode", "merged:prefill", "merged:decode", "engine"}


def test_static_export_freezes_shapes(tmp_path_factory):
    import onnx

    path = exported(tmp_path_factory, "qwen3", "cot", "-static", static=True, batch=2, beams=5, max_history=3)
    m = manifest(path)
    assert m["shapes"] | {"batch": 2, "beams": 5, "hist": 12, "static": True} == m["shapes"]
    for name in ("prefill", "decode", "think"):
        model = onnx.load(str(path / f"{name}.onnx"))
        for vi in (*model.graph.input, *model.graph.output):
            dims = vi.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), (name, vi.name)
    ctx = [t for t in m["graphs"]["decode"]["inputs"] if t["name"] == "ctx_mask"][0]["dims"]
    assert ctx == [2, 12 + 1 + 3 + 1]  # history + <think> + rationale cap + </think>


def test_cli_json(tmp_path, engines):
    from typer.testing import CliRunner

    from pauserec.cli.export import app

    ckpt = engines["qwen2-direct"].parent / "ckpt-qwen2-direct"
    res = CliRunner().invoke(app, [str(ckpt), "--out", str(tmp_path / "eng"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["kind"] == "direct" and report["opset"] == 18 and report["max_abs_err"]["decode"] < 1e-4
    res = CliRunner().invoke(app, [str(ckpt), "--out", str(tmp_path / "eng")])
    assert res.exit_code == 2 and "--force" in res.output
    res = CliRunner().invoke(app, [str(ckpt), "--out", str(tmp_path / "eng2"), "--precision", "fp8"])
    assert res.exit_code == 2 and "precision" in res.output
    shutil.rmtree(tmp_path / "eng")


# -- real shapes: a 151,936-token vocabulary, head_dim 128, tied (tiny in layers and width) ---------
REAL_VOCAB = 151_936


def real_shape_checkpoint(root: Path, kind: str) -> Path:
    """A Qwen3-0.6B-shaped vocabulary, head_dim and tied embedding on a 1-layer, 64-wide body."""
    path = root / f"ckpt-real-{kind}"
    if (path / "config.json").is_file():
        return path
    cfg = transformers.Qwen3Config(vocab_size=REAL_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True,
                                   max_position_embeddings=128, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(path)
    TrainingCard(prompt=tiny_spec(kind), dataset="tiny").save(path)
    tiny_catalog().save(path / "catalog.npz")
    return path


def weight_bytes(ckpt: Path) -> int:
    """Bytes of the checkpoint's distinct weight tensors (a tied embedding counted once)."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


@pytest.fixture(scope="session")
def real_engines(tmp_path_factory) -> dict[str, Path]:
    from pauserec.export import ExportConfig, export_engine

    root = tmp_path_factory.mktemp("real-shape")
    out = {}
    for name, kind, cfg in [("cot", "cot", {}), ("pause", "pause", {}), ("pause-sid", "pause", {"scoring": "sid"}),
                            ("pause-sid-int4", "pause", {"scoring": "sid", "precision": "int4", "quant_sample": 8,
                                                          "min_agreement": 0.0})]:
        out[name] = export_engine(ExportConfig(checkpoint=real_shape_checkpoint(root, kind), out=root / name, **cfg)).out
    out["ckpt"] = real_shape_checkpoint(root, "pause")
    return out


def test_real_shape_engine_holds_one_copy_of_the_weights(real_engines):
    """cot keeps the whole tied table once (lookup and head read the same W^T); graphs carry no weights."""
    import onnx

    weights = weight_bytes(real_engines["ckpt"])
    cot = real_engines["cot"]
    assert (cot / "weights.bin").stat().st_size <= 1.05 * weights
    for graph in ("prefill.onnx", "decode.onnx", "think.onnx", "merged.onnx"):
        assert (cot / graph).stat().st_size < 200_000, graph  # structure only
        model = onnx.load(str(cot / graph), load_external_data=False)
        big = [t for g in graphs_of(model) for t in g.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024]
        assert big == []
    m = manifest(cot)
    assert m["model"]["vocab"] == REAL_VOCAB and m["model"]["head_dim"] == 128 and m["model"]["tied_embeddings"]
    assert all(c["ok"] for c in m["validation"])


def test_sid_rule_drops_the_vocabulary_matrix(real_engines):
    """pause + the SID-level head embeds and scores only SID-sized tables: far below the checkpoint's bytes."""
    weights = weight_bytes(real_engines["ckpt"])
    full = (real_engines["pause"] / "weights.bin").stat().st_size
    sid = (real_engines["pause-sid"] / "weights.bin").stat().st_size
    int4 = (real_engines["pause-sid-int4"] / "weights.bin").stat().st_size
    vocab_matrix = REAL_VOCAB * 64 * 4
    assert full <= 1.05 * weights  # the head's W^T; the lookup keeps only the SID rows
    assert all(c["ok"] for c in manifest(real_engines["pause"])["validation"])  # head in blocks, vs HF
    assert sid < weights - 0.9 * vocab_matrix
    assert int4 < sid
    assert all(c["ok"] for c in manifest(real_engines["pause-sid"])["validation"])


def test_no_weight_is_larger_than_one_head_block(real_engines):
    """A runtime that repacks weights while loading holds one weight twice at a time: the 151,936-token
    head is stored as blocks of HEAD_BLOCK columns, each multiplied by its own MatMul."""
    import onnx

    from pauserec.export.graphs import HEAD_BLOCK

    model = onnx.load(str(real_engines["pause"] / "merged.onnx"), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for g in graphs_of(model) for t in g.initializer}
    blocks = [n for n in sizes if n.startswith("core.head_t")]
    assert len(blocks) == -(-REAL_VOCAB // HEAD_BLOCK)
    assert max(sizes.values()) <= HEAD_BLOCK * 64
    runs = [a.g for n in model.graph.node for a in n.attribute if a.name == "then_branch"]
    assert len(runs) == 2
    for graph in runs:  # each graph's branch (prefill, decode): every block its own MatMul, once
        matmuls = [n for n in graph.node if n.op_type == "MatMul" and set(n.input) & set(blocks)]
        assert sorted(x for n in matmuls for x in n.input if x in blocks) == sorted(blocks)


def test_int4_engine_uses_matmulnbits_and_reports_agreement(real_engines):
    import onnx

    path = real_engines["pause-sid-int4"]
    for graph in ("decode.onnx", "merged.onnx"):
        model = onnx.load(str(path / graph), load_external_data=False)
        nodes = [n for g in graphs_of(model) for n in g.node if n.op_type == "MatMulNBits"]
        assert nodes  # int8 compute by default: activations quantised per block (MLAS integer kernels)
        assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}
    q = [c for c in manifest(path)["validation"] if c["graph"] == "engine"][0]
    assert q["sample"] == 8 and 0.0 <= q["top10_overlap"] <= 1.0 and 0.0 <= q["top1_agreement"] <= 1.0
    assert q["int4_compute"] == "int8" and q["int4_block"] == 32


def test_engine_sessions_share_one_mapped_weights_file(real_engines):
    """Every graph's initializers come from the one mapped file (no per-session copy of the weights)."""
    from pauserec.runtime import Engine

    engine = Engine.load(real_engines["cot"], provider="cpu", prepack=False)
    stores = {id(s.weights) for s in engine.sessions.values()}
    assert len(stores) == 1
    store = next(iter(engine.sessions.values())).weights
    assert store.data.filename is not None  # a memory map, not a loaded copy
    assert len(store._values) > 0


def test_consolidate_reads_per_tensor_external_files_and_dedups(tmp_path):
    """Above 2 GB torch writes one external file per tensor: consolidate reads that layout; equal tensors once."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pauserec.export.weights import consolidate
    from pauserec.runtime.weights import WeightStore, external_tensors

    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y"]), helper.make_node("MatMul", ["y", "w2"], ["z0"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((1, 32 * 16), np.float32))),
             helper.make_node("Slice", ["c", "s0", "s1", "ax"], ["c32"]), helper.make_node("Add", ["z0", "c32"], ["z"])]
    small = [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([32], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32])],
                              [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w[:32].copy(), "w2"), *small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    inline = model.SerializeToString()  # onnx.save(save_as_external_data) rewrites ``model`` in place
    src = tmp_path / "raw"
    src.mkdir()
    onnx.save(model, str(src / "prefill.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0, convert_attribute=True)  # as the quantizers save: Constant tensors external too
    assert (src / "w1").is_file()  # one file per tensor, named after it
    twin = tmp_path / "raw2"
    twin.mkdir()
    (twin / "decode.onnx").write_bytes(inline)  # inline tensors, same content
    files = consolidate({"prefill": src / "prefill.onnx", "decode": twin / "decode.onnx"}, tmp_path / "eng")
    store = WeightStore(tmp_path / "eng" / "weights.bin")
    assert store.nbytes < w.nbytes + w[:32].nbytes + 128  # stored once for both graphs
    for f in files.values():
        t = {x.name: x for x in external_tensors(onnx.load(str(f), load_external_data=False))}
        np.testing.assert_array_equal(store.array(t["w1"]), w)
        np.testing.assert_array_equal(store.array(t["w2"]), w[:32])
    import onnxruntime as ort

    from pauserec.runtime.backends.ort import session_options

    opts = session_options(1)
    store.add_to(opts, files["prefill"])
    sess = ort.InferenceSession(str(files["prefill"]), opts, providers=["CPUExecutionProvider"])
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w @ w[:32] + 1, rtol=1e-5)


def test_non_finite_weights_are_named(tmp_path):
    from pauserec.export import ExportConfig, export_engine

    ckpt = make_checkpoint(tmp_path, "qwen3", "direct")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(ckpt)
    with pytest.raises(ExportError, match="non-finite.*layers.1.mlp.down_proj.weight.*lower --lr"):
        export_engine(ExportConfig(checkpoint=ckpt, out=tmp_path / "eng"))
    assert not (tmp_path / "eng").exists()
