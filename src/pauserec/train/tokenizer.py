"""Tokenizers for pauserec models (HF ``tokenizers`` JSON; no torch).

Two ways to get one:

* ``train_tokenizer``: a byte-level BPE trained on the item texts (titles, brands, categories,
  descriptions), the instruction and the rationale template words. Special tokens come first, in
  this order: ``<pad>``, ``<eos>``, ``<think>``, ``</think>``, ``<pause>``, ``<item_sep>``, then
  every SID code of every level (``<a_0>`` .. ``<a_{V_1-1}>``, ``<b_0>`` ..), then the BPE pieces.
* ``extend_tokenizer``: an existing local HF checkpoint's tokenizer (Qwen2, Qwen3, Llama) with the
  missing special tokens appended; the caller resizes the model's embeddings to match.

``hf_tokenizer`` / ``save_hf_tokenizer`` read and write the HF (``AutoTokenizer``) form of a checkpoint's
tokenizer. This module knows nothing about models: ``pauserec.train.model`` imports it, never the
reverse (callers check a checkpoint's architecture with ``model.check_architecture``).

``build_prompt_spec`` turns a tokenizer + catalog into the ``PromptSpec`` every other module uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pauserec.prompt.layout import INSTRUCTION, ITEM_SEP, PAUSE, THINK, THINK_END, PromptLayout
from pauserec.prompt.spec import PromptSpec
from pauserec.errors import CheckpointError
from pauserec.train.rationale import TEMPLATE_TEXTS, category_path

PAD, EOS = "<pad>", "<eos>"
CONTROL_TOKENS = (PAD, EOS, THINK, THINK_END, PAUSE, ITEM_SEP)
TOKENIZER_FILE = "tokenizer.json"
MAX_DESCRIPTION_CHARS = 400  # descriptions are long; their head is enough to learn the merges


def sid_token_strings(catalog) -> list[list[str]]:
    """``[level][code]`` token strings for every code of every codebook (0..V_l-1)."""
    return [[f"<{p}_{c}>" for c in range(v)] for p, v in zip(catalog.token_prefixes, catalog.codebook_sizes, strict=True)]


def special_tokens(catalog) -> list[str]:
    """Control tokens followed by all SID tokens, level by level."""
    return [*CONTROL_TOKENS, *(t for level in sid_token_strings(catalog) for t in level)]


def corpus(items: Sequence, extra: Iterable[str] = ()) -> Iterator[str]:
    """Lines to train the BPE on: instruction, template words, then each item's text fields."""
    yield INSTRUCTION
    yield from TEMPLATE_TEXTS
    yield from extra
    for it in items:
        yield str(getattr(it, "title", "") or "")
        yield str(getattr(it, "brand", "") or "")
        yield " ".join(category_path(getattr(it, "categories", "")))
        yield str(getattr(it, "description", "") or "")[:MAX_DESCRIPTION_CHARS]


def train_tokenizer(items: Sequence, catalog, vocab_size: int = 2048, extra: Iterable[str] = ()):
    """Byte-level BPE with ``vocab_size`` text pieces (alphabet + merges) after the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = special_tokens(catalog)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + max(vocab_size, 257),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(items, extra), trainer=trainer)
    return tok


def load_tokenizer(ckpt_dir: str | Path):
    """The ``tokenizer.json`` of a checkpoint directory."""
    from tokenizers import Tokenizer

    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a pauserec checkpoint needs an HF tokenizer.json; re-run `pauserec train`")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise CheckpointError(f"{path} is not a readable HF tokenizer ({e}); re-run `pauserec train`") from e


def hf_tokenizer(path: str | Path):
    """The fast HF tokenizer of a local checkpoint directory (for ``--init-from``)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {path} ({e}); the directory needs a tokenizer.json") from e
    if not getattr(tok, "is_fast", False):
        raise CheckpointError(f"{path}: only fast (tokenizer.json) tokenizers are supported")
    return tok


def save_hf_tokenizer(tok, out: Path, pad: str, eos: str) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer`` opens the checkpoint too."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos).save_pretrained(str(out))
    tok.save(str(out / TOKENIZER_FILE))  # the exact tokenizer, whatever the wrapper normalised


def extend_tokenizer(hf_dir: str | Path, catalog) -> tuple[object, str, str]:
    """Tokenizer of a local HF checkpoint plus every pauserec special token -> (tokenizer, pad, eos).

    Keeps the checkpoint's own eos (and pad, when it has one); tokens it already knows (Qwen3's
    ``<think>``) keep their ids, the others are appended as special tokens.
    """
    from tokenizers import AddedToken

    hf_tok = hf_tokenizer(hf_dir)
    tok = hf_tok.backend_tokenizer
    eos = hf_tok.eos_token or EOS
    pad = hf_tok.pad_token or PAD
    wanted = [pad, eos, *CONTROL_TOKENS[2:], *special_tokens(catalog)[len(CONTROL_TOKENS) :]]
    missing = [t for t in dict.fromkeys(wanted) if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok, pad, eos


def token_id(tok, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise CheckpointError(f"the tokenizer has no token {token!r}; train the checkpoint with `pauserec train`")
    return int(i)


def check_sid_tokens(tok, catalog) -> tuple[tuple[int, ...], ...]:
    """Token ids ``[level][code]`` of the catalog's SID tokens; CheckpointError listing missing ones."""
    levels = sid_token_strings(catalog)
    missing = [t for level in levels for t in level if tok.token_to_id(t) is None]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(
            f"{len(missing)} SID tokens of index {getattr(catalog, 'name', '')!r} are not in the model's tokenizer "
            f"({shown}); use the SID index the checkpoint was trained on, or train a new checkpoint for this index"
        )
    return tuple(tuple(int(tok.token_to_id(t)) for t in level) for level in levels)


def build_prompt_spec(
    tok,
    catalog,
    kind: str,
    pause_k: int = 5,
    max_history: int = 20,
    max_rationale: int = 64,
    pad: str = PAD,
    eos: str = EOS,
) -> PromptSpec:
    """pauserec's own prompt layout (the ``pauserec`` preset), resolved with this tokenizer."""
    from pauserec.prompt.layout import preset
    from pauserec.prompt.resolve import resolve_layout

    layout = PromptLayout.from_dict({**preset("pauserec").to_dict(), "max_history": max_history})
    return resolve_layout(layout, tok, catalog, kind, eos_id=token_id(tok, eos), pad_id=token_id(tok, pad),
                          pause_k=pause_k if kind == "pause" else None, max_rationale=max_rationale)


def encode_text(tok, text: str) -> list[int]:
    """Plain text -> ids (no added specials)."""
    return list(tok.encode(text, add_special_tokens=False).ids)


def decode_ids(tok, ids: Sequence[int]) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)
