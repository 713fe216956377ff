"""``pauserec train --init-from CKPT --prompt PRESET|FILE``: fine-tune a user's own SFT model in the prompt it was
trained in (MiniOneRec, LC-Rec, OneRec-Think or a JSON layout), as a direct, pause or cot model.

The prompt is not derived here: the checkpoint's tokenizers and the layout are resolved exactly as export resolves
them (``pauserec.prompt.source.checkpoint_tokenizers`` / ``checkpoint_prompt``), so the training ids are the ids the
engine will build for the same checkpoint and ``--prompt``:

* the SID tokens, in the layout's ``sid_token`` spelling, must be single tokens of the checkpoint (the user's SFT
  model knows its SIDs): nothing is added for them;
* pause models: the layout's ``pause_token`` (``<pause>`` when it names none) is added to the tokenizer as a
  special token when missing, the embeddings grown to match, and its row set to the mean of the rows of the
  tokens the checkpoint's tokenizer had (a token the checkpoint already has keeps its row). The pauses go where
  the layout's pause template puts them; a layout with only a direct template gets the one
  ``PromptLayout.with_pause_template`` derives: ``{pauses}`` at the very end of the direct template, right before
  the first SID token;
* the loss is on the target SID tokens only (``pauserec.train.samples``), with prompts from the layout's
  ``PromptEncoder`` (ids or text assembly; ``--items`` for layouts that render item fields);
* ``--lora R``: peft LoRA (rank R, alpha 2R) on every attention and MLP projection, the pause row trained as its
  own vector, everything else frozen; the adapters are merged into the weights before saving, so the checkpoint
  is a complete model (no ``--base`` at export). ``--gradient-checkpointing`` recomputes activations in backward.

The checkpoint written holds the model, the tokenizer with the pause token (``save_pretrained``: ``AutoTokenizer``
opens it), ``catalog.npz``, ``items.json`` (the item fields the prompt renders, if any) and ``pauserec_card.json``:
the resolved spec, and under ``train.prompt`` the layout as given (preset name or file, and its fields), kind and
pause count. ``pauserec-export OUT --prompt SAME`` then needs no other flag; before saving ends, the saved files are
resolved again the way export will and must give the card's spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pauserec.errors import CheckpointError, DataError, PauserecError, TrainError
from pauserec.prompt.layout import PromptLayout, load_layout
from pauserec.prompt.spec import ITEMS_FILE, KINDS

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DERIVED = "derived: {pauses} at the end of the direct template, right before the first SID token"


def check_config(cfg) -> PromptLayout | None:
    """The declared layout for ``cfg`` (None without ``--prompt``); PauserecError for options that do not go
    together, before anything is loaded."""
    if cfg.lora is not None and (cfg.prompt is None or cfg.lora < 1):
        raise PauserecError(f"--lora R (R >= 1, got {cfg.lora}) is for --init-from CKPT --prompt LAYOUT: its only new "
                            "token is the pause token, trained beside the adapters. pauserec's own prompt adds every "
                            "SID token, whose embeddings need full training")
    if cfg.prompt is None:
        return None
    if cfg.init_from is None:
        raise PauserecError(f"--prompt {cfg.prompt} fine-tunes a model trained elsewhere, in its own prompt: pass "
                            "--init-from CKPT (its local HF directory). A model trained from scratch uses pauserec's "
                            "own prompt: leave --prompt out")
    if cfg.grounding or cfg.pause_pretrain:
        raise PauserecError("--grounding and --pause-pretrain train on pauserec's own prompt tokens (<item_sep>, "
                            "<pause>); with --prompt leave them out")
    if cfg.kind not in KINDS:
        raise PauserecError(f"unknown kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    layout = load_layout(cfg.prompt)
    if cfg.kind == "pause":
        return layout.with_pause_template()
    if cfg.kind not in layout.kinds:
        raise DataError(f"prompt layout {layout.name!r} has no {cfg.kind} template (it has "
                        f"{', '.join(layout.kinds)}); a {cfg.kind} model needs one: write a JSON layout with it, or "
                        "train --kind pause (its pause template is derived from the direct one)")
    return layout


@dataclass
class Prompted:
    """The model to fine-tune and its prompt, resolved as export will resolve it."""

    model: Any  # transformers causal LM, float32
    tok: Any  # tokenizers.Tokenizer the ids come from (the one transformers builds)
    hf_tok: Any  # the transformers tokenizer, with the pause token; saved with save_pretrained
    spec: Any  # PromptSpec
    encoder: Any  # PromptEncoder
    item_fields: dict[str, list[str]] | None
    facts: dict[str, Any] = field(default_factory=dict)  # the card's train["prompt"]


def prepare(cfg, dataset) -> Prompted:
    """Load ``cfg.init_from``, add the pause token if needed, resolve ``cfg.prompt`` against the dataset's catalog."""
    from tokenizers import AddedToken

    from pauserec.prompt import hf
    from pauserec.prompt.resolve import sid_token_ids
    from pauserec.prompt.source import checkpoint_prompt, checkpoint_tokenizers
    from pauserec.train.model import check_architecture, load_model
    from pauserec.train.sft import fill_zero_rows, require_finite_weights

    layout = check_config(cfg)
    path, catalog = Path(cfg.init_from), dataset.catalog
    check_architecture(path)
    tok, hf_tok, warnings = checkpoint_tokenizers(path, None, card=False)
    try:
        sid_token_ids(layout, tok, catalog)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}. `pauserec train --prompt` fine-tunes a model that already knows its SID "
                              "tokens; it adds none (train on the index the model was trained with)") from e
    known_tokens, pause = len(hf_tok), None
    if cfg.kind == "pause":
        pause = {"token": layout.pause_token, "added": tok.token_to_id(layout.pause_token) is None}
        if pause["added"]:
            hf_tok.add_tokens([AddedToken(layout.pause_token, special=True, normalized=False)], special_tokens=True)
            tok, _ = hf.engine_tokenizer(hf_tok, tok)
    model = load_model(path)
    require_finite_weights(model, f"in the --init-from checkpoint {path}", "Re-create or re-download that checkpoint",
                           CheckpointError)
    fill_zero_rows(model)
    if model.get_input_embeddings().weight.shape[0] < len(hf_tok):
        model.resize_token_embeddings(len(hf_tok))
    vocab = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    p = checkpoint_prompt(path, catalog, tok, hf_tok, vocab=vocab, config_eos=model.config.eos_token_id,
                          prompt=cfg.prompt, kind=cfg.kind, pause_k=cfg.pause_k if cfg.kind == "pause" else None,
                          max_rationale=cfg.max_rationale, items=cfg.items, seed=0, card_defaults=False)
    if pause is not None:
        pause.update(id=p.spec.pause_id, init="mean of the checkpoint's token rows" if pause["added"] else "kept")
        if pause["added"]:
            init_mean_row(model, p.spec.pause_id, known_tokens)
    require_finite_weights(model, "after adding the pause token", "This is a bug in pauserec: please report it")
    declared = load_layout(cfg.prompt)
    facts = {"given": str(cfg.prompt), "layout": declared.to_dict(), "kind": cfg.kind,
             "pause_k": p.spec.pause_k, "pause_template": None, "pause_token": pause,
             "tokenizer_warnings": warnings + p.warnings, "items": str(cfg.items) if cfg.items else None}
    if cfg.kind == "pause":
        facts["pause_template"] = "the layout's own" if "pause" in declared.kinds else DERIVED
    return Prompted(model, tok, hf_tok, p.spec, p.encoder, p.item_fields, facts)


def init_mean_row(model, row: int, rows: int) -> None:
    """Input embedding ``row`` := the mean of the first ``rows`` rows (the tokens the checkpoint's tokenizer had;
    padded rows beyond it and the new row itself left out)."""
    import torch

    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[row] = w[:rows].mean(dim=0)


def add_lora(model, rank: int):
    """peft LoRA (rank, alpha 2 x rank, no dropout) on every attention/MLP projection the model has; the base frozen.
    Returns the PeftModel (the adapters live inside ``model``'s modules: training calls ``model`` as before)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise PauserecError("--lora needs peft: pip install 'pauserec[train]' (or pip install peft)") from e
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    if not targets:
        raise CheckpointError(f"the model has none of the projections LoRA adapts ({', '.join(LORA_TARGETS)})")
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                            bias="none"))


def merge_lora(peft_model):
    """The base model with the adapters merged into its weights (a plain transformers model again)."""
    model = peft_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def save(out: Path, model, pm: Prompted, card, catalog) -> Path:
    """Write the checkpoint (model, tokenizer, catalog, items, card), then resolve its prompt again from the saved
    files as ``pauserec-export OUT --prompt SAME`` will: TrainError unless it is the card's."""
    import json

    from pauserec.prompt.source import checkpoint_prompt, checkpoint_tokenizers
    from pauserec.train.model import CATALOG_FILE, quiet_hf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_hf()
    model.save_pretrained(str(out))
    pm.hf_tok.save_pretrained(str(out))
    catalog.save(out / CATALOG_FILE)
    if pm.spec.fields:
        ids = [str(i) for i in catalog.item_ids]
        table = {i: {f: pm.item_fields[f][n] for f in pm.spec.fields} for n, i in enumerate(ids)}
        (out / ITEMS_FILE).write_text(json.dumps(table, ensure_ascii=False) + "\n", encoding="utf-8")
    card.save(out)
    tok, hf_tok, _ = checkpoint_tokenizers(out, None, card=False)
    vocab = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    try:
        checkpoint_prompt(out, catalog, tok, hf_tok, vocab=vocab, config_eos=model.config.eos_token_id,
                          prompt=pm.facts["given"])
    except CheckpointError as e:
        raise TrainError(f"the saved checkpoint {out} does not resolve to the prompt it was trained with ({e}); this "
                         "is a bug in pauserec: please report it with the layout and the checkpoint's tokenizer") from e
    return out
