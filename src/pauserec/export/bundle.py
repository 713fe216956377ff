"""Checkpoint in, engine directory out: sources, manifest, checksums, atomic publication.

An engine directory::

    manifest.json   format_version, kind, pause_k, SID levels, PromptSpec, graph I/O, shapes,
                    scoring rule, precision, exporter + opset, source checkpoint sha256, sha256 of every file
    prefill.onnx    decode.onnx    think.onnx (cot)    [*.plan: TensorRT]   (graphs, no weights)
    [merged.onnx]   every graph in one model, for one CPU session (``pauserec.export.merge``; not static
                    engines, nor when this onnxruntime cannot run it)
    weights.bin     every distinct weight tensor once, referenced by all graphs
    catalog.npz     Catalog.save (SIDs, trie, collision groups)

Everything is written into a staging directory beside the target and renamed into place at the
end, so a failure (a full disk, say) never leaves a half-written engine that looks valid.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pauserec.errors import CheckpointError, ExportError
from pauserec.prompt.layout import PromptLayout
from pauserec.prompt.spec import CARD_FILE, ITEMS_FILE, TOKENIZER_FILE, PromptEncoder, PromptSpec, TrainingCard

# The engine-directory contract is owned by the runtime, which reads it; export writes to it.
from pauserec.runtime.engine import CATALOG_FILE, MANIFEST_FILE, sha256_file
from pauserec.runtime.manifest import Manifest, ModelInfo, Shapes, SidInfo


@dataclass
class Sources:
    """What an export reads: the model, the prompt (declared layout and its resolved ids), the catalog."""

    path: Path
    model: Any  # transformers causal LM, float32, eval
    spec: PromptSpec
    catalog: Any  # pauserec.data.Catalog
    card: TrainingCard | None
    encoder: PromptEncoder  # the engine's history assembly
    layout: PromptLayout | None = None  # as declared (chat layouts unrendered): the HF reference renders it
    hf_tok: Any = None  # the checkpoint's transformers tokenizer (None: a card checkpoint without tokenizer)
    tokenizer: Any = None  # the tokenizers.Tokenizer the prompt ids come from, shipped by text-assembled engines
    warnings: list[str] = field(default_factory=list)  # said at export and kept in its report
    item_fields: dict[str, list[str]] | None = None
    streamed: Any = None  # StreamedWeights (--stream): ``model`` is its weightless skeleton


def checkpoint_sha256(path: Path) -> str:
    """One digest over every file of a checkpoint directory (relative path + content hash)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# -- sources ----------------------------------------------------------------------------------------
def read_catalog_source(path: Path, index: Path | None, catalog: Path | None, has_card: bool):
    """The item -> SID catalog: an LC-Rec / MiniOneRec index file, a catalog .npz, or the card checkpoint's own."""
    from pauserec.data import Catalog
    from pauserec.data.datasets import catalog_from_index
    from pauserec.errors import PauserecError

    if index is not None and catalog is not None:
        raise CheckpointError("pass either --index INDEX.json or --catalog CATALOG.npz, not both")
    try:
        if index is not None:
            if not Path(index).is_file():
                raise CheckpointError(f"--index {index} not found; pass the item -> SID index file the model was "
                                      "trained with (LC-Rec / MiniOneRec *.index.json, OneRec-Think *.pretrain.json)")
            return catalog_from_index(Path(index), Path(index).name.split(".")[0])
        if catalog is not None or has_card:
            return Catalog.load(Path(catalog) if catalog else path / CATALOG_FILE)
    except PauserecError as e:
        raise CheckpointError(f"cannot read the catalog for {path}: {e}") from e
    raise CheckpointError(f"{path} has no pauserec training card: pass --index INDEX.json (the item -> SID index "
                          "the model was trained with) and --prompt PRESET|FILE (its prompt layout)")


def load_sources(cfg) -> Sources:
    """Model, prompt and catalog of the checkpoint ``cfg.checkpoint`` (an ``ExportConfig``), every input
    checked before any graph is built."""
    from pauserec.prompt.source import checkpoint_prompt, checkpoint_tokenizers, has_card

    path = Path(cfg.checkpoint)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is not an HF checkpoint directory (no config.json); pass a save_pretrained folder")
    check_architecture(path, cfg.base)
    card = has_card(path, cfg.prompt)
    # a card checkpoint keeps its catalog, with or without --prompt (`pauserec train --prompt` writes both)
    cat = read_catalog_source(path, cfg.index, cfg.catalog, card or (path / CARD_FILE).is_file())
    tok, hf_tok, warnings = checkpoint_tokenizers(path, cfg.base, card)
    streamed = None
    if cfg.stream:
        if (path / "adapter_config.json").is_file():
            raise CheckpointError(f"{path} is a PEFT adapter: --stream reads a complete checkpoint's safetensors; merge "
                                  "the adapter into its base first (peft merge_and_unload, save_pretrained), or export "
                                  "without --stream")
        from pauserec.export.stream import StreamedWeights

        streamed = StreamedWeights(path)
        model = streamed.model  # weightless: stand-ins whose values are read when written
    else:
        model = _load_model(path, cfg.base, tok)
    vocab = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    p = checkpoint_prompt(path, cat, tok, hf_tok, vocab=vocab, config_eos=model.config.eos_token_id, prompt=cfg.prompt,
                          kind=cfg.kind, pause_k=cfg.pause_k, max_history=cfg.max_history,
                          max_rationale=cfg.max_rationale, items=cfg.items, seed=cfg.seed)
    return Sources(path=path, model=model, spec=p.spec, catalog=cat, card=p.card, encoder=p.encoder, layout=p.layout,
                   hf_tok=hf_tok, tokenizer=tok, warnings=warnings + p.warnings, item_fields=p.item_fields,
                   streamed=streamed)


ENCODER_DECODER = ("t5", "mt5", "bart", "mbart", "pegasus", "marian", "umt5", "longt5", "switch_transformers")


def check_architecture(path: Path, base: Path | None = None) -> str:
    """The checkpoint's model_type when pauserec can export it; CheckpointError saying why not, before loading."""
    from pauserec.export.graphs import SUPPORTED_ARCHS

    cfg_dir = path if (path / "config.json").is_file() else Path(base) if base else None
    if cfg_dir is None:
        adapter = json.loads((path / "adapter_config.json").read_text())
        raise CheckpointError(f"{path} is a PEFT adapter of {adapter.get('base_model_name_or_path')!r}: pass --base "
                              "BASE_DIR, the local base checkpoint it was trained on (it is merged at export)")
    try:
        config = json.loads((cfg_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_dir / 'config.json'} is not readable JSON ({e})") from e
    model_type = config.get("model_type")
    if config.get("is_encoder_decoder") or model_type in ENCODER_DECODER:
        raise CheckpointError(f"{path} is an encoder-decoder model ({model_type}; TIGER / GRID style): pauserec "
                              "exports decoder-only causal LMs (Qwen2/2.5, Qwen3, Llama) whose SIDs follow the prompt")
    if model_type not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path}: unsupported architecture {model_type!r}; pauserec exports "
                              f"{', '.join(SUPPORTED_ARCHS)} causal LMs. Models whose thoughts are computed from "
                              "hidden states (LatentR3, Coconut) cannot be expressed as a prompt either")
    return model_type


def _load_model(path: Path, base: Path | None, tok):
    """The causal LM in float32; a PEFT adapter directory is loaded onto ``base`` and merged."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    adapter = (path / "adapter_config.json").is_file()
    source = Path(base) if adapter else path
    if adapter and base is None:
        check_architecture(path, None)  # raises: a base is needed
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True, dtype="float32")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {source} ({e}); is it a complete save_pretrained folder?") from e
    if adapter:
        try:
            from peft import PeftModel
        except ImportError as e:
            raise CheckpointError("merging a LoRA adapter needs peft: pip install peft") from e
        if tok is not None and tok.get_vocab_size() > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(tok.get_vocab_size())  # the adapter saved the grown embeddings
        try:
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot merge the adapter {path} into {base} ({e}); is --base the model it was "
                                  "trained on?") from e
    return model.float().eval()


def write_prompt_files(stage: Path, src: Sources) -> None:
    """What a text-assembled prompt needs at run time: the tokenizer its ids were checked with (the one transformers
    builds, see ``pauserec.prompt.hf.engine_tokenizer``) and the item fields it renders."""
    if src.spec.assembly != "text":
        return
    src.tokenizer.save(str(stage / TOKENIZER_FILE))
    if src.spec.fields:
        ids = [str(i) for i in src.catalog.item_ids]
        table = {i: {f: src.item_fields[f][n] for f in src.spec.fields} for n, i in enumerate(ids)}
        write_json(stage / ITEMS_FILE, table)


# -- output directory -----------------------------------------------------------------------------
def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; pass --force to replace it, or choose another --out")


def staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finish(stage: Path, manifest: Manifest) -> Manifest:
    """Checksums of every staged file go into the manifest, written last."""
    files = sorted(p for p in stage.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = manifest.replace(files={p.name: sha256_file(p) for p in files})
    manifest.write(stage)
    return manifest


def publish(stage: Path, out: Path) -> None:
    """Rename the staged engine into place (replacing an old one only now, at the very end)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_failure(out: Path, e: OSError) -> ExportError:
    why = "the disk is full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
    return ExportError(f"writing the engine failed ({why}); nothing was written to {out}. Free space or fix "
                       "the folder's permissions, then run pauserec-export again")


def build_manifest(*, spec: PromptSpec, catalog, dims, shape, graphs: dict, static_env: dict | None, precision: str,
                  backend: str, exporter: dict, source: Path, source_sha: str, validation: list, plans: dict,
                  prefix: str = "fused", merged: str | None = None, kv_dtype: str | None = None) -> Manifest:
    """The engine's manifest (without ``files``, which ``finish`` adds). ``prefix``: "fused" (the
    instruction prefix's KV is a graph constant) or "recomputed" (an ablation engine). ``kv_dtype``: how the
    graphs take and return the KV (default: float16 for fp16 engines, else float32)."""
    import pauserec

    static = static_env or {}
    return Manifest(
        kind=spec.kind, pause_k=spec.pause_k if spec.kind == "pause" else 0,
        sid=SidInfo(catalog.levels, tuple(catalog.codebook_sizes), tuple(catalog.token_prefixes)),
        prompt=spec,
        model=ModelInfo(arch=dims.arch, layers=dims.layers, q_heads=dims.q_heads, kv_heads=dims.kv_heads,
                        head_dim=dims.head_dim, hidden=dims.hidden, intermediate=dims.intermediate, vocab=dims.vocab,
                        tied_embeddings=dims.tied),
        scoring=shape.scoring, graphs=dict(graphs), plans=dict(plans),
        shapes=Shapes(static=static_env is not None, max_history=spec.max_history, prefix_len=shape.prefix_len,
                      prefix=prefix, suffix_len=shape.suffix_len, ctx_extra=shape.ctx_extra, beam_slots=shape.steps,
                      first_width=shape.first_width, next_width=shape.next_width, batch=static.get("batch"),
                      beams=static.get("beams"), hist=static.get("hist")),
        precision=precision, kv_dtype=kv_dtype or ("float16" if precision == "fp16" else "float32"), backend=backend,
        exporter=exporter["exporter"], opset=int(exporter["opset"]), torch=str(exporter["torch"]),
        source={"checkpoint": source.name, "sha256": source_sha}, validation=list(validation),
        pauserec_version=pauserec.__version__, merged=merged,
    )
