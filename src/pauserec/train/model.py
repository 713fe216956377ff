"""Models and checkpoints: Qwen3 presets, local HF checkpoints, the checkpoint directory contract.

A pauserec checkpoint directory holds::

    config.json, model.safetensors, generation_config.json   (HF save_pretrained)
    tokenizer.json (+ tokenizer_config.json)                  (HF tokenizers, with every special token)
    pauserec_card.json                                        (TrainingCard: PromptSpec + training facts)
    catalog.npz                                               (Catalog.save: SIDs, collision groups, trie)

``load_checkpoint(path)`` reads all four and checks they agree; export and benchmarks start there.
Supported architectures: Qwen3 (our presets), Qwen2 and Llama (local checkpoints via ``--init-from``).
This module imports ``pauserec.train.tokenizer`` (tokenizer files of a checkpoint); tokenizer.py never
imports this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pauserec.errors import CheckpointError, PauserecError
from pauserec.train.tokenizer import check_sid_tokens, load_tokenizer, save_hf_tokenizer

SUPPORTED_TYPES = ("qwen3", "qwen2", "llama")
CATALOG_FILE = "catalog.npz"


@dataclass(frozen=True)
class Preset:
    """A model size plus the training settings that go with it."""

    config: dict[str, Any]  # Qwen3Config kwargs (vocab size and token ids are filled in later)
    text_vocab: int  # BPE pieces (alphabet + merges) besides the special tokens
    lr: float
    batch_size: int
    epochs: int  # a ceiling: validation (early stopping) usually ends the run first
    threads: int | None = None  # torch threads when the run does not say (None: torch's default)
    weight_decay: float = 0.01  # AdamW, on matrices only
    dropout: float = 0.0  # residual dropout (attention and MLP outputs), training only
    warmup_steps: int = 100
    decay_epochs: float = 8.0  # cosine from the peak to 0.1x over this many epochs, then constant
    val_users: int = 500  # validation sample (0: no validation)
    sid_share: float | None = None  # cot: share of each sample's loss on its SID (None: every label weighs the same;
    # small keeps None: its Scientific cot numbers were measured so, and no weighting has been measured there)


PRESETS: dict[str, Preset] = {
    # seconds on the synthetic test data
    "tiny": Preset(
        config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32,
        ),
        text_vocab=1024, lr=6e-3, batch_size=32, epochs=2, threads=1, val_users=100,  # tiny ops: one thread is fastest
        # cot on the demo's synthetic data (README "Demo"): the SID at 0.8 of each sample's loss, test Hit@10 0.35 /
        # 0.37 / 0.32 over 3 seeds (direct 0.29 / 0.43 / 0.39); every label weighing the same: 0.25 / 0.27 / 0.12
        sid_share=0.8,
    ),
    # Scientific (33.5k train samples): ~1.1-2 min per direct epoch on one shared CPU core. Under a
    # fixed CPU budget this small model beat a 192x3-layer one (more epochs beat more capacity).
    # Regularisation measured on Scientific (README "Training"): weight decay 0.1 + dropout 0.1 beat
    # 0.01 + none on a 13.5k-sample subset (test NDCG@10 0.0388 vs 0.0331) and for pause on the full data
    # (0.0475 vs 0.0440, paired interval below 0); epochs is a ceiling (runs stop early at 14-28).
    "small": Preset(
        config=dict(
            hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64,
        ),
        text_vocab=4096, lr=4e-3, batch_size=64, epochs=30, weight_decay=0.1, dropout=0.1, warmup_steps=100,
        decay_epochs=8.0, val_users=500,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def quiet_hf() -> None:
    """No download/shard progress bars from transformers (we print our own)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def build_model(preset: str, vocab_size: int, pad_id: int, eos_id: int, seed: int = 0, layers: int | None = None):
    """A freshly initialised Qwen3 causal LM of a preset's size (seeded); ``layers`` overrides its depth."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        use_cache=True,
        **{**get_preset(preset).config, **({"num_hidden_layers": layers} if layers else {})},
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    return model.float().eval()


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a local HF checkpoint directory")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found: {path} is not an HF model directory (save_pretrained output)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from e


def check_architecture(path: str | Path) -> str:
    """The checkpoint's model_type; CheckpointError unless Qwen3, Qwen2 or Llama."""
    model_type = str(_read_config(Path(path)).get("model_type", ""))
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type or '(none)'!r} is not supported; pauserec trains and exports "
            f"{', '.join(SUPPORTED_TYPES)} causal LMs. Convert the model or start from `--preset`"
        )
    return model_type


def load_model(path: str | Path):
    """A local HF causal LM (float32, eval mode) after the architecture check."""
    from transformers import AutoModelForCausalLM

    check_architecture(path)
    quiet_hf()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="float32")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {path} ({e}); is it a complete save_pretrained directory?") from e
    return model.eval()


def cache_kwargs(model, cache) -> dict[str, Any]:
    """``{"cache": c}`` (transformers >= 5.x) or ``{"past_key_values": c}`` (older), as the model takes it."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def output_cache(out):
    """The KV cache of a model output, whatever the transformers version calls it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Checkpoint:
    """Everything in a checkpoint directory, loaded and cross-checked."""

    path: Path
    model: Any  # transformers PreTrainedModel, eval mode, float32
    tokenizer: Any  # tokenizers.Tokenizer
    card: Any  # pauserec.prompt.spec.TrainingCard
    catalog: Any  # pauserec.data.Catalog

    @property
    def spec(self):
        return self.card.prompt


def load_checkpoint(path: str | Path, load_weights: bool = True) -> Checkpoint:
    """Open a pauserec checkpoint; CheckpointError when a part is missing or the parts disagree."""
    from pauserec.data import Catalog
    from pauserec.prompt.spec import TrainingCard

    path = Path(path)
    check_architecture(path)
    card = TrainingCard.load(path)
    tok = load_tokenizer(path)
    try:
        catalog = Catalog.load(path / CATALOG_FILE)
    except PauserecError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    if check_sid_tokens(tok, catalog) != card.prompt.sid_token_ids:
        raise CheckpointError(f"{path}: the card's SID token ids disagree with tokenizer.json; re-run `pauserec train`")
    model = load_model(path) if load_weights else None
    if model is not None and model.get_input_embeddings().weight.shape[0] < tok.get_vocab_size():
        raise CheckpointError(f"{path}: the model's vocabulary is smaller than tokenizer.json; re-run `pauserec train`")
    return Checkpoint(path=path, model=model, tokenizer=tok, card=card, catalog=catalog)


def save_checkpoint(out: str | Path, model, tok, card, catalog, pad: str, eos: str) -> Path:
    """Write the four parts of a checkpoint directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_hf()
    model.save_pretrained(str(out))
    save_hf_tokenizer(tok, out, pad, eos)
    card.save(out)
    catalog.save(out / CATALOG_FILE)
    return out
