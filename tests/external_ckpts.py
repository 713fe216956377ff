"""Tiny, seeded, offline stand-ins for checkpoints of generative-recommendation pipelines trained elsewhere.

Not a test module: tests import it (``from external_ckpts import make_checkpoint``; pytest puts ``tests/`` on
``sys.path``). Nothing is downloaded: configs are built with transformers, weights are random (seeded), and the
byte-level BPE tokenizer is trained here with the ``tokenizers`` library on a fixed English corpus made of the prompt
templates real pipelines use (LC-Rec, MiniOneRec, OneRec-Think style), so merges learned on those prompts exist
(e.g. ``"?\n\n"``, ``":\n"``, ``" \n\n"``: punctuation or a space merged with the newlines after it).

The pre-tokenizer is the one real Qwen2/Qwen3 (resp. Llama 3) checkpoints ship: a regex ``Split`` followed by
``ByteLevel(add_prefix_space=False, use_regex=False)``, not ``ByteLevel(use_regex=True)`` (the GPT-2 regex), because
(1) the GPT-2 regex never lets punctuation and newlines share a pre-token, so no such merge could exist, and
(2) transformers 5's ``AutoTokenizer`` loads any ``model_type == "qwen2"`` checkpoint as ``Qwen2Tokenizer``, which
rebuilds its pre-tokenizer from the Qwen regex whatever ``tokenizer.json`` says: with another regex the HF tokenizer
and ``tokenizer.json`` read on its own disagree (``pre_tokenizer="gpt2"`` builds that case on purpose; the export then
ships the tokenizer transformers builds). Otherwise :func:`make_checkpoint` asserts they agree.

* :func:`make_checkpoint` - a Qwen2 / Qwen3 / Llama(3) causal LM + tokenizer with SID tokens added after training,
  as plain (``add_tokens``) or special tokens, optionally padded vocabulary, untied head, bf16, sharded safetensors;
  ``pre_tokenizer="gpt2"`` trains a custom byte-level BPE instead (``ByteLevel(use_regex=True)``, what
  ``ByteLevelBPETokenizer`` trains), which ``Qwen2Tokenizer`` replaces on load: file and HF tokenizer then disagree.
* :func:`sid_vocab`, :func:`write_index`, :func:`write_items` - LC-Rec / MiniOneRec style ``.index.json`` and
  ``.item.json`` files.
* :data:`QWEN3_CHAT_TEMPLATE` - a small Qwen3-like chat template honouring ``enable_thinking=False``.

Building is fast: the BPE is trained once per process and per arch (cached as JSON in :data:`_BASE_TOKENIZERS`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ARCHS",
    "CORPUS_PROMPTS",
    "PRODUCT_TITLES",
    "QWEN3_CHAT_TEMPLATE",
    "base_tokenizer_json",
    "make_checkpoint",
    "raw_tokenizer",
    "sid_vocab",
    "write_index",
    "write_items",
]

ARCHS = ("qwen2", "qwen3", "llama")

# Prompts of real pipelines (LC-Rec / MiniOneRec alpaca style, OneRec-style purchase prompt, a short one).
CORPUS_PROMPTS: tuple[str, ...] = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\nCan you predict the next possible item that the user may expect?\n\n"
    "### User Input: \nCan you predict the next possible item the user may expect, given the following "
    "chronological interaction history: \n\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nThe user has interacted with items , in chronological order. Can you predict the next "
    "possible item that the user may expect?\n\n### Response:",
    "You are a professional recommendation expert who needs to recommend the next possible purchase for users "
    "based on their purchase history. Please predict the most likely next product that the user will purchase "
    "based on the user's historical purchase information. The user has purchased the following items: ; ;",
    "Given the items this user interacted with, in order, recommend the next item.",
)

PRODUCT_TITLES: tuple[str, ...] = (
    "Digital Caliper 6 inch",
    "Nitrile Gloves, Large (100)",
    'Lab Beaker Set "Pyrex"',
    "Safety Goggles - Anti-Fog",
    "Stainless Steel Tweezers (5-pack)",
    "pH Test Strips 0-14, 200 ct",
    "Magnetic Stirrer with Hot Plate",
    "Micro Pipette 10-100 uL",
    "Thermometer, Digital; Waterproof",
    "Borosilicate Test Tubes 16 x 150 mm",
    "Anti-Static Wrist Strap",
    "Café Mug 12 oz",
)

# Extra sentences so the corpus is not only templates (gives ordinary English merges too).
_FILLER: tuple[str, ...] = (
    "The user bought a new item last week, and the next purchase was a related product.",
    "Items are listed in chronological order; each one has a title, a description and a price.",
    "What is the next item? The answer is a short list of semantic identifiers.",
    "Customers who bought this item also bought: gloves, goggles, beakers, and test tubes.",
    "Recommendation systems predict what a user may want, given the history of interactions.",
)

QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_THINK = ("<think>", "</think>")
_LLAMA_BOS, _LLAMA_EOS = "<|begin_of_text|>", "<|end_of_text|>"

# (arch, pre_tokenizer) -> serialized trained base tokenizer (tokenizers JSON); filled lazily, copied before adding
# tokens.
_BASE_TOKENIZERS: dict[tuple[str, str], str] = {}
PRE_TOKENIZERS = ("checkpoint", "gpt2")
_BPE_VOCAB_SIZE = 700


def _corpus() -> list[str]:
    """Fixed training corpus: every prompt many times, titles between them, paragraph breaks ("\\n\\n\\n")."""
    docs: list[str] = []
    rng = random.Random(1234)
    for rep in range(40):
        for p in CORPUS_PROMPTS:
            titles = rng.sample(PRODUCT_TITLES, 3)
            docs.append(p)
            # The prompt with items inline, the way pipelines fill it in.
            filled = p.replace("items ,", "items " + ", ".join(titles) + ",")
            docs.append(filled.replace(": ; ;", ": " + "; ".join(titles) + ";"))
        docs.append("\n\n".join(PRODUCT_TITLES) + "\n\n")
        docs.append(_FILLER[rep % len(_FILLER)] + "\n\n\n" + _FILLER[(rep + 1) % len(_FILLER)] + "\n\n")
    return docs


# The pre-tokenizer regexes real checkpoints ship in tokenizer.json (a Split, then ByteLevel without its own regex).
# Unlike ByteLevel(use_regex=True) (the GPT-2 regex), they let punctuation take trailing newlines ("?\n\n", ":\n"),
# so BPE merges across a punctuation/newline boundary exist and prompt pieces tokenize differently apart and joined.
# Qwen2Tokenizer (which AutoTokenizer forces for model_type "qwen2" in transformers 5) rebuilds its pre-tokenizer
# from QWEN_PRETOKENIZE_REGEX whatever tokenizer.json says: using the same regex keeps the two in agreement.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# tokenizer_class written to tokenizer_config.json, as in the real base checkpoints' own files.
_TOKENIZER_CLASS = {"qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer", "llama": "PreTrainedTokenizerFast"}


def base_tokenizer_json(arch: str, pre_tokenizer: str = "checkpoint") -> str:
    """The trained (cached) base tokenizer of ``arch`` as tokenizers JSON, before SID / extra tokens are added;
    ``pre_tokenizer`` "checkpoint": the regex real checkpoints of ``arch`` ship, "gpt2": ByteLevel's own regex."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if pre_tokenizer not in PRE_TOKENIZERS:
        raise ValueError(f"pre_tokenizer must be one of {PRE_TOKENIZERS}, got {pre_tokenizer!r}")
    if (arch, pre_tokenizer) not in _BASE_TOKENIZERS:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
        from tokenizers import processors, trainers

        is_llama = arch == "llama"
        special = (_LLAMA_BOS, _LLAMA_EOS) if is_llama else _QWEN_SPECIAL
        regex = LLAMA3_PRETOKENIZE_REGEX if is_llama else QWEN_PRETOKENIZE_REGEX
        tk = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, no unk token
        if not is_llama:
            tk.normalizer = normalizers.NFC()  # as Qwen's tokenizer.json (and Qwen2Tokenizer)
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ) if pre_tokenizer == "checkpoint" else pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_BPE_VOCAB_SIZE,
            min_frequency=2,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in special],  # ids 0, 1, ...
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(_corpus(), trainer=trainer)
        if is_llama:
            bos = tk.token_to_id(_LLAMA_BOS)
            tk.post_processor = processors.TemplateProcessing(
                single=f"{_LLAMA_BOS} $A",
                pair=f"{_LLAMA_BOS} $A:0 {_LLAMA_BOS}:1 $B:1",
                special_tokens=[(_LLAMA_BOS, bos)],
            )
        else:
            # Qwen3 style: <think> / </think> are added but not special (they survive skip_special_tokens).
            tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN_THINK])
        _BASE_TOKENIZERS[arch, pre_tokenizer] = tk.to_str()
    return _BASE_TOKENIZERS[arch, pre_tokenizer]


def _make_tokenizer(arch: str, extra_tokens: Sequence[str], sid_tokens: Sequence[str], special: bool, chat_template,
                    pre_tokenizer: str = "checkpoint"):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(base_tokenizer_json(arch, pre_tokenizer))  # a fresh copy of the cached trained base
    if arch == "llama":
        kw = {"bos_token": _LLAMA_BOS, "eos_token": _LLAMA_EOS}
    else:
        kw = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    new = [*extra_tokens, *sid_tokens]
    if len(set(new)) != len(new):
        raise ValueError("extra_tokens and sid_tokens must be distinct")
    clash = [t for t in new if t in tok.get_vocab()]
    if clash:
        raise ValueError(f"tokens already in the base vocabulary: {clash}")
    if new:
        if special:  # OneRec-Think style: tokenizer.add_special_tokens(...)
            tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in new], special_tokens=True)
        else:  # LC-Rec / MiniOneRec style: tokenizer.add_tokens(new_tokens)
            tok.add_tokens(list(new))
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _build_config(arch: str, *, vocab_size: int, hidden: int, layers: int, tied: bool):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)  # head_dim = hidden / heads; q/k/v biases are built in
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=16, **common)
    from transformers import LlamaConfig

    return LlamaConfig(
        head_dim=16,
        # transformers 5: `rope_parameters` (rope_scaling is an alias of it); rope_theta lives inside.
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **common,
    )


def _reinit_(model, seed: int) -> None:
    """std-0.5 normals for Linear / Embedding weights (and biases), norms at 1: clearly separated log-probs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head shares the embedding and is listed once
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.5)


def make_checkpoint(
    out: Path,
    *,
    arch: str = "qwen3",
    sid_tokens: Sequence[str],
    extra_tokens: Sequence[str] = (),
    sid_as_special: bool = False,
    tied: bool = True,
    pad_vocab_multiple: int | None = None,
    chat_template: str | None = None,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    pre_tokenizer: str = "checkpoint",
) -> Path:
    """Write a tiny random causal-LM checkpoint (config, safetensors, tokenizer) of ``arch`` to ``out``; return it.

    The tokenizer is the cached trained BPE of ``arch`` plus ``extra_tokens`` then ``sid_tokens`` (in that order),
    added as special tokens when ``sid_as_special`` else as plain added tokens. ``vocab_size`` is ``len(tokenizer)``
    rounded up to ``pad_vocab_multiple``. ``dtype`` is "float32" or "bfloat16"; ``max_shard_size`` (e.g. "200KB")
    shards the safetensors. ``pre_tokenizer="gpt2"``: a custom byte-level BPE (see :func:`base_tokenizer_json`); for
    qwen2/qwen3 transformers 5 then loads a tokenizer other than ``tokenizer.json`` (not asserted equal here).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tok = _make_tokenizer(arch, extra_tokens, sid_tokens, sid_as_special, chat_template, pre_tokenizer)
    vocab = len(tok)
    if pad_vocab_multiple:
        vocab = -(-vocab // pad_vocab_multiple) * pad_vocab_multiple

    cfg = _build_config(arch, vocab_size=vocab, hidden=hidden, layers=layers, tied=tied)
    cfg.bos_token_id = tok.bos_token_id  # None for qwen
    cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _reinit_(model, seed)
    model.generation_config.bos_token_id = cfg.bos_token_id
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    if torch_dtype is not torch.float32:
        model = model.to(torch_dtype)
    model.config.dtype = torch_dtype
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kw)
    tok.save_pretrained(out)
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = _TOKENIZER_CLASS[arch]
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")

    reloaded = AutoTokenizer.from_pretrained(out)
    for t in (*extra_tokens, *sid_tokens):
        ids = reloaded(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{t!r} does not encode to one id after reload: {ids}"
    # What AutoTokenizer gives must agree with tokenizer.json read on its own (what a runtime would read).
    raw = raw_tokenizer(out)
    probe = CORPUS_PROMPTS[0] + "".join((*extra_tokens, *sid_tokens)[:8]) + " Café 2024, ok?\n\n"
    if pre_tokenizer == "checkpoint":
        assert reloaded(probe)["input_ids"] == raw.encode(probe).ids, "AutoTokenizer disagrees with tokenizer.json"
    return out


def raw_tokenizer(out: Path):
    """``out/tokenizer.json`` read by the ``tokenizers`` library alone (as a runtime would), not via transformers."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(out) / "tokenizer.json"))


def sid_vocab(prefixes: Sequence[str], size: int) -> list[str]:
    """``["<a_0>", ..., "<a_{size-1}>", "<b_0>", ...]`` for ``prefixes`` like ("a", "b", "c") or ("s_a", "s_b")."""
    return [f"<{p}_{i}>" for p in prefixes for i in range(size)]


def write_index(
    path: Path, n_items: int, prefixes: Sequence[str], size: int, seed: int = 0, collisions: int = 2
) -> dict[str, list[str]]:
    """Write an LC-Rec / MiniOneRec ``.index.json``: ``{"0": ["<a_3>", "<b_7>", "<c_1>"], ...}``; return it.

    Codes are seeded-random below ``size`` per level; exactly ``collisions`` pairs of items share a whole SID
    (MiniOneRec keeps collisions); all other SIDs are distinct.
    """
    if n_items < 2 * collisions:
        raise ValueError("need n_items >= 2 * collisions")
    n_unique = n_items - collisions
    if size ** len(prefixes) < n_unique:
        raise ValueError("SID space too small for distinct codes")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    codes: list[tuple[int, ...]] = []
    while len(codes) < n_unique:
        c = tuple(rng.randrange(size) for _ in prefixes)
        if c not in seen:
            seen.add(c)
            codes.append(c)
    # `collisions` distinct codes are given to a second item each, then everything is shuffled over item ids.
    codes += rng.sample(codes, collisions)
    rng.shuffle(codes)
    index = {str(i): [f"<{p}_{v}>" for p, v in zip(prefixes, c)] for i, c in enumerate(codes)}
    Path(path).write_text(json.dumps(index, indent=1))
    return index


_TITLE_PARTS = (
    ("Digital", "Caliper", "6 inch"),
    ("Nitrile", "Gloves, Large", "(100)"),
    ("Lab", 'Beaker Set "Pyrex"', "250 ml"),
    ("Café", "Mug", "12 oz"),
    ("Safety", "Goggles", "Anti-Fog"),
    ("pH", "Test Strips", "0-14"),
    ("Crème", "Brûlée Torch", ""),
    ("Über", "Scale, 0.01 g", "x 500 g"),
    ("Stainless", "Tweezers", "5-pack"),
    ("", "Micro Pipette", "10–100 µL"),
    ("Borosilicate", "Test Tubes", "16 x 150 mm"),
    ("", "Wrist Strap", ""),
)


def write_items(path: Path, index: dict) -> dict:
    """Write an LC-Rec ``.item.json`` ``{"<item_id>": {"title": ..., "description": ...}}`` for ``index``'s items.

    Titles are short and varied (quotes, commas, digits, non-ASCII) so per-item token lengths differ.
    """
    items = {}
    for n, item_id in enumerate(index):
        a, b, c = _TITLE_PARTS[n % len(_TITLE_PARTS)]
        title = " ".join(s for s in (a, b, c) if s)
        if n >= len(_TITLE_PARTS):
            title += f" #{n}" if n % 3 else f", v{n // len(_TITLE_PARTS)}"
        items[str(item_id)] = {
            "title": title,
            "description": f"{b.split(',')[0]} for the lab; item {n}." + (" Ships in 2 days." if n % 2 else ""),
        }
    Path(path).write_text(json.dumps(items, indent=1, ensure_ascii=False))
    return items
