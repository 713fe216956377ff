"""Real-shape checkpoints with random weights, for sizing hardware without a download.

``SHAPES`` holds the configs of real model families (transformers 5.x field names, checked against
``Qwen3Config`` / ``LlamaConfig``). ``write_shape_checkpoint(name, out)`` writes a complete pauserec
checkpoint directory of that shape (see ``pauserec.train.model``): seeded random weights (the HF
initialisation: normal(0, initializer_range), norms at 1), a small BPE tokenizer trained on the
dataset's items, the training card and the catalog. The model keeps the family's real vocabulary
(e.g. 151,936 rows); the rows past the tokenizer simply exist, as in a real fine-tuned checkpoint.

Sizes, memory and speed of such a checkpoint are real; its recommendations are noise.

``layers`` / ``hidden`` overrides make small models of the same family (same vocabulary, heads and
head_dim; the MLP width keeps the family's intermediate/hidden ratio) for tests and quick sizing.

Memory stays at one shard: the tensor names and shapes come from a weightless meta-device model, and
each tensor is drawn (normal(0, initializer_range) for matrices, ones for norms, zeros for biases, the
pad row zero, as transformers initialises these families; seeded per tensor name), cast to the chosen
dtype (``float32`` or ``bfloat16``, as 7-8B checkpoints ship) and written to safetensors shards of at
most ``SHARD_BYTES`` with the usual index, so an 8B checkpoint is written on a machine a fraction of its
size.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pauserec.errors import CheckpointError

TEXT_VOCAB = 2048  # BPE pieces besides the special tokens (the model's vocabulary stays the real one)
DTYPES = {"float32": 4, "bfloat16": 2}  # stored weight type -> bytes per parameter
SHARD_BYTES = 2_000_000_000  # safetensors shard size (a bigger single tensor gets a shard of its own)
ROW_CHUNK = 8192  # rows drawn at a time (bounds the float32 temporary of a bfloat16 tensor)


@dataclass(frozen=True)
class Shape:
    """One real model family config."""

    arch: str  # HF model_type: "qwen3" or "llama"
    source: str  # the HF model whose config this mirrors (not downloaded)
    config: dict[str, Any]  # config kwargs, transformers 5.x names (pad/bos/eos ids come from our tokenizer)
    sid_rows: bool = False  # the vocabulary grows by one row per SID token (LC-Rec adds them to Llama's 32,000)


_QWEN3 = dict(
    vocab_size=151_936, num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=40_960, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=True,
    attention_bias=False, use_sliding_window=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)

SHAPES: dict[str, Shape] = {
    "qwen3-0.6b": Shape("qwen3", "Qwen/Qwen3-0.6B", dict(
        _QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28)),
    "qwen3-1.7b": Shape("qwen3", "Qwen/Qwen3-1.7B", dict(
        _QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28)),
    "qwen3-4b": Shape("qwen3", "Qwen/Qwen3-4B", dict(
        _QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32)),
    "qwen3-8b": Shape("qwen3", "Qwen/Qwen3-8B", dict(
        _QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        tie_word_embeddings=False)),
    "llama-2-7b": Shape("llama", "meta-llama/Llama-2-7b-hf (LC-Rec's base)", dict(
        vocab_size=32_000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
        max_position_embeddings=4096, initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    ), sid_rows=True),
    "llama-3.2-1b": Shape("llama", "meta-llama/Llama-3.2-1B", dict(
        vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
        max_position_embeddings=131_072, initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )),
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise CheckpointError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)} "
                              "(`pauserec-bench shape --list` shows their sizes)")
    return SHAPES[name]


def shape_config(name: str, layers: int | None = None, hidden: int | None = None) -> dict[str, Any]:
    """The config kwargs of a shape with the ``layers`` / ``hidden`` overrides applied."""
    shape = get_shape(name)
    cfg = dict(shape.config)
    cfg["rope_parameters"] = dict(cfg["rope_parameters"])
    for what, value in (("layers", layers), ("hidden", hidden)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise CheckpointError(f"--{what} must be a positive integer, got {value!r}")
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if hidden is not None:
        ratio = cfg["intermediate_size"] / cfg["hidden_size"]
        cfg["hidden_size"] = hidden
        cfg["intermediate_size"] = max(1, round(hidden * ratio))
    return cfg


def _config_class(arch: str):
    from transformers import LlamaConfig, Qwen3Config

    return {"qwen3": Qwen3Config, "llama": LlamaConfig}[arch]


def _model_class(arch: str):
    from transformers import LlamaForCausalLM, Qwen3ForCausalLM

    return {"qwen3": Qwen3ForCausalLM, "llama": LlamaForCausalLM}[arch]


def count_parameters(name: str, layers: int | None = None, hidden: int | None = None) -> int:
    """Parameters of a shape (tied embeddings counted once), from a weightless meta-device model."""
    import torch

    from pauserec.train.model import quiet_hf

    shape = get_shape(name)
    quiet_hf()
    cfg = _config_class(shape.arch)(**shape_config(name, layers, hidden))
    with torch.device("meta"):
        model = _model_class(shape.arch)(cfg)
    return sum(p.numel() for p in model.parameters())


def shape_table(layers: int | None = None, hidden: int | None = None) -> list[dict[str, Any]]:
    """One row per known shape: family, sizes, parameters and float32 weight bytes."""
    rows = []
    for name, shape in SHAPES.items():
        cfg = shape_config(name, layers, hidden)
        params = count_parameters(name, layers, hidden)
        rows.append({
            "name": name, "arch": shape.arch, "source": shape.source, "layers": cfg["num_hidden_layers"],
            "hidden": cfg["hidden_size"], "intermediate": cfg["intermediate_size"],
            "q_heads": cfg["num_attention_heads"], "kv_heads": cfg["num_key_value_heads"],
            "head_dim": cfg["head_dim"], "vocab": cfg["vocab_size"], "tied": cfg["tie_word_embeddings"],
            "parameters": params, "weight_bytes": params * DTYPES["float32"],
        })
    return rows


def random_model(arch: str, config: dict[str, Any], seed: int = 0):
    """A seeded, randomly initialised causal LM (float32, eval mode) holding one copy of its weights.

    Built on the meta device, given uninitialised CPU storage (``to_empty`` does not touch the pages, so
    the untied LM head it allocates costs nothing before ``tie_weights`` drops it), then initialised in
    place by transformers' own ``initialize_weights`` (normal(0, initializer_range) for linear and
    embedding weights, ones for norms, RoPE buffers recomputed).
    """
    import torch

    from pauserec.train.model import quiet_hf

    quiet_hf()
    cfg = _config_class(arch)(**config)
    with torch.device("meta"):
        model = _model_class(arch)(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(seed)
    model.initialize_weights()
    with torch.no_grad():
        emb = model.get_input_embeddings()
        if emb.padding_idx is not None:  # as an HF from-scratch init leaves it
            emb.weight[emb.padding_idx].zero_()
    return model.float().eval()


def mean_row(weight, chunk: int = 8192):
    """Mean of all rows of a (V, H) matrix, summed in row chunks (float64) so no copy of the matrix is made."""
    import torch

    total = torch.zeros(weight.shape[1], dtype=torch.float64)
    for rows in weight.detach().split(chunk):
        total += rows.sum(dim=0, dtype=torch.float64)
    return (total / weight.shape[0]).to(weight.dtype)


def _load_data(data: Path | None, index: str | None, seed: int, tmp: Path):
    from pauserec.data import load_dataset, write_synthetic

    if data is None:
        return load_dataset(write_synthetic(tmp / "synthetic", seed=seed))
    return load_dataset(data, index)


def _init_rule(name: str, dims: tuple[int, ...]) -> str:
    """How transformers initialises this tensor in these families: "ones" (norms), "zeros" (biases), "normal"."""
    if name.endswith(".bias"):
        return "zeros"
    return "ones" if len(dims) == 1 else "normal"


def _draw(name: str, dims: tuple[int, ...], std: float, seed: int, dtype, pad_row: int | None):
    """One tensor of the random checkpoint, drawn ROW_CHUNK rows at a time (float32, then cast)."""
    import zlib

    import torch

    rule = _init_rule(name, dims)
    if rule != "normal":
        return (torch.ones if rule == "ones" else torch.zeros)(dims, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(dims, dtype=dtype)
    for start in range(0, dims[0], ROW_CHUNK):
        rows = out[start : start + ROW_CHUNK]
        rows.copy_(torch.empty(rows.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
    if pad_row is not None:
        out[pad_row].zero_()
    if not bool(torch.isfinite(out).all()):
        raise CheckpointError(f"tensor {name} of the random model is not finite; this is a bug, please report it")
    return out


def write_weights(out: Path, arch: str, config: dict[str, Any], dtype: str, seed: int, pause_id: int,
                  say: Callable[[str], None] = lambda _m: None) -> int:
    """Write ``config.json``, ``generation_config.json`` and the seeded random weights of an ``arch`` model as
    safetensors shards (one shard in memory at a time); returns the number of parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from pauserec.train.model import quiet_hf

    if dtype not in DTYPES:
        raise CheckpointError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    quiet_hf()
    cfg = _config_class(arch)(**config, dtype=dtype)
    with torch.device("meta"):
        meta = _model_class(arch)(cfg)
    tied = bool(cfg.tie_word_embeddings)
    names = [(n, tuple(t.shape)) for n, t in meta.state_dict().items() if not (tied and n == "lm_head.weight")]
    del meta
    nbytes = DTYPES[dtype]
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, dims in names:  # plan the shards first: their names carry the count
        b = nbytes * int(torch.Size(dims).numel())
        if shards[-1] and size + b > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += b
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    GenerationConfig.from_model_config(cfg).save_pretrained(str(out))
    torch_dtype = getattr(torch, dtype)
    emb = "model.embed_tokens.weight"
    weight_map, params = {}, 0
    for file, shard in zip(files, shards):
        say(f"drawing {len(shard)} tensors into {file}")
        tensors = {}
        for name, dims in shard:
            t = _draw(name, dims, cfg.initializer_range, seed, torch_dtype, cfg.pad_token_id if name == emb else None)
            if name == emb:  # the <pause> row starts at the mean of all rows, as in training
                t[pause_id] = mean_row(t)
            tensors[name] = t
            weight_map[name] = file
            params += t.numel()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": params * nbytes}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return params


def write_shape_checkpoint(
    name: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    index: str | None = None,
    kind: str = "pause",
    pause_k: int = 5,
    layers: int | None = None,
    hidden: int | None = None,
    seed: int = 0,
    max_history: int = 20,
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a complete pauserec checkpoint of shape ``name`` with seeded random weights to ``out``.

    ``data=None``: a seeded synthetic dataset (written to a temporary folder, removed afterwards);
    otherwise a dataset directory and its SID ``index``. ``dtype``: the stored weights' type (float32 or
    bfloat16). ``progress`` receives a short status line before each stage. Returns ``out``;
    ``pauserec.train.model.load_checkpoint(out)`` opens it.
    """
    from pauserec.prompt.spec import KINDS, TrainingCard
    from pauserec.train import tokenizer as tk
    from pauserec.train.model import CATALOG_FILE, load_checkpoint

    say = progress or (lambda _msg: None)
    shape = get_shape(name)
    config = shape_config(name, layers, hidden)
    if kind not in KINDS:
        raise CheckpointError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pauserec-shape-") as tmp:
        say("loading the dataset" if data is not None else "writing a synthetic dataset")
        dataset = _load_data(None if data is None else Path(data), index, seed, Path(tmp))
    say(f"training a {TEXT_VOCAB}-piece BPE tokenizer on {len(dataset.items):,} items")
    tok = tk.train_tokenizer(dataset.items, dataset.catalog, TEXT_VOCAB)
    if shape.sid_rows:  # LC-Rec: the SID tokens are rows added to the base vocabulary
        config["vocab_size"] += sum(dataset.catalog.codebook_sizes)
    if tok.get_vocab_size() > config["vocab_size"]:
        raise CheckpointError(
            f"the tokenizer has {tok.get_vocab_size():,} tokens (SID codes + BPE) but shape {name} has a "
            f"{config['vocab_size']:,}-row vocabulary; use an index with smaller codebooks"
        )
    spec = tk.build_prompt_spec(tok, dataset.catalog, kind, pause_k, max_history)
    config.update(pad_token_id=spec.pad_id, eos_token_id=spec.eos_id, bos_token_id=spec.eos_id, use_cache=True)

    say(f"initialising {name} ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"vocab {config['vocab_size']:,}, {dtype}) with seed {seed}")
    params = write_weights(out, shape.arch, config, dtype, seed, spec.pause_id, say)
    card = TrainingCard(
        prompt=spec, dataset=dataset.name, index=index or (dataset.index or ""), seed=seed, preset=f"shape:{name}",
        model_config=json.loads((out / "config.json").read_text()),
        train={
            "untrained": True,
            "note": "random weights (normal(0, initializer_range), seeded): real sizes, memory and speed; "
                    "the recommendations are noise",
            "shape": name, "source_config": shape.source, "layers_override": layers, "hidden_override": hidden,
            "parameters": params, "weight_bytes": params * DTYPES[dtype], "dtype": dtype,
            "kind": kind, "pause_k": spec.pause_k, "max_history": max_history, "epochs": 0, "steps": 0,
            "final_loss": None, "train_samples": 0, "init_from": None, "grounding": False,
            "pause_pretrain": False,
            "data": f"synthetic: pauserec.data.write_synthetic(dir, seed={seed})" if data is None else dataset.name,
            "build_time_s": round(time.perf_counter() - t0, 2),
        },
    )
    tk.save_hf_tokenizer(tok, out, tk.PAD, tk.EOS)
    card.save(out)
    dataset.catalog.save(out / CATALOG_FILE)
    say("checking the checkpoint's parts agree")
    load_checkpoint(out, load_weights=False)
    return out
