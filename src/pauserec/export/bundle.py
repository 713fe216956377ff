"""Checkpoint in, engine directory out: sources, manifest, checksums, atomic publication.

An engine directory::

    manifest.json   format_version, kind, pause_k, SID levels, PromptSpec, graph I/O, shapes,
                    scoring rule, precision, exporter + opset, source checkpoint sha256, sha256 of every file
    prefill.onnx    decode.onnx    think.onnx (cot)    [*.plan: TensorRT]   (graphs, no weights)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pauserec.data.prompts import CARD_FILE, INSTRUCTION, ITEM_SEP, PAUSE, THINK, THINK_END, PromptSpec, TrainingCard
from pauserec.errors import CheckpointError, ExportError

# The engine-directory contract is owned by the runtime, which reads it; export writes to it.
from pauserec.runtime.engine import CATALOG_FILE, FORMAT_VERSION, MANIFEST_FILE, sha256_file  # noqa: F401

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Sources:
    """What an export reads from a checkpoint (after overrides)."""

    path: Path
    model: Any  # transformers causal LM, float32, eval
    spec: PromptSpec
    catalog: Any  # pauserec.data.Catalog
    card: TrainingCard | None


def checkpoint_sha256(path: Path) -> str:
    """One digest over every file of a checkpoint directory (relative path + content hash)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


# -- sources ----------------------------------------------------------------------------------------
def _tokenizer(path: Path):
    f = path / TOKENIZER_FILE
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise CheckpointError(f"{f} is not a readable HF tokenizer ({e})") from e


def _token_id(tok, token: str, what: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise CheckpointError(f"the tokenizer has no {what} token {token!r}; add it (and train) before exporting")
    return int(i)


def _spec_without_card(path: Path, tok, catalog, model, kind: str, pause_k: int, max_history: int) -> PromptSpec:
    """A PromptSpec from the tokenizer + catalog for a checkpoint that has no training card."""
    if tok is None:
        raise CheckpointError(f"{path} has neither {CARD_FILE} nor {TOKENIZER_FILE}: token ids cannot be known")
    levels = [[f"<{p}_{c}>" for c in range(v)] for p, v in zip(catalog.token_prefixes, catalog.codebook_sizes)]
    sid_ids = tuple(tuple(tok.token_to_id(t) if tok.token_to_id(t) is not None else -1 for t in lv) for lv in levels)
    eos = model.config.eos_token_id
    eos = int(eos[0] if isinstance(eos, list | tuple) else (eos if eos is not None else 0))
    pad = model.config.pad_token_id
    return PromptSpec(
        kind=kind, pause_k=pause_k if kind == "pause" else 0, max_history=max_history,
        instruction_ids=tuple(tok.encode(INSTRUCTION, add_special_tokens=False).ids),
        item_sep_id=_token_id(tok, ITEM_SEP, "item separator"), think_id=_token_id(tok, THINK, "think"),
        think_end_id=_token_id(tok, THINK_END, "think end"), pause_id=_token_id(tok, PAUSE, "pause"),
        eos_id=eos, pad_id=int(pad) if pad is not None else eos, sid_token_ids=sid_ids,
    )


def check_sid_tokens(spec: PromptSpec, catalog, vocab: int, tok) -> None:
    """Every SID code of the catalog needs a token id inside the model's vocabulary (and tokenizer)."""
    if spec.levels != catalog.levels:
        raise CheckpointError(f"the prompt spec has {spec.levels} SID levels, the catalog {catalog.levels}; "
                              "export with the catalog the checkpoint was trained on (--catalog)")
    missing: list[str] = []
    for lv, (prefix, size) in enumerate(zip(catalog.token_prefixes, catalog.codebook_sizes)):
        ids = spec.sid_token_ids[lv]
        for c in range(size):
            want = f"<{prefix}_{c}>"
            i = ids[c] if c < len(ids) else -1
            if not 0 <= i < vocab or (tok is not None and tok.id_to_token(i) != want):
                missing.append(want)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(f"{len(missing)} SID tokens are missing from the model's vocabulary/tokenizer ({shown}); "
                              "use the SID index the checkpoint was trained on, or train a checkpoint for this index")
    others = {"item_sep": spec.item_sep_id, "<think>": spec.think_id, "</think>": spec.think_end_id,
              "<pause>": spec.pause_id, "pad": spec.pad_id, "eos": spec.eos_id}
    bad = [f"{k}={v}" for k, v in others.items() if not 0 <= v < vocab]
    bad += [f"instruction id {i}" for i in spec.instruction_ids if not 0 <= i < vocab]
    if bad:
        raise CheckpointError(f"token ids outside the model's vocabulary of {vocab}: {', '.join(bad[:6])}")


def load_sources(path: Path, kind: str | None = None, pause_k: int | None = None, catalog: Path | None = None,
                 max_history: int | None = None, max_rationale: int | None = None) -> Sources:
    """Model, PromptSpec and catalog of a checkpoint, with command-line overrides applied."""
    from pauserec.data import Catalog
    from pauserec.errors import PauserecError

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not an HF checkpoint directory (no config.json); pass a save_pretrained folder")
    has_card = (path / CARD_FILE).is_file()
    cat_path = Path(catalog) if catalog else path / CATALOG_FILE
    if not has_card and (kind is None or not cat_path.is_file()):
        raise CheckpointError(
            f"{path} has no {CARD_FILE} (pauserec training card): pass --kind direct|pause|cot, --catalog CATALOG.npz"
            " (and --pause-k K for pause models), or train the checkpoint with `pauserec train`"
        )
    try:
        cat = Catalog.load(cat_path)
    except PauserecError as e:
        raise CheckpointError(f"cannot read the catalog of {path}: {e}; pass --catalog CATALOG.npz") from e
    model = _load_model(path)
    tok = _tokenizer(path)
    card = TrainingCard.load(path) if has_card else None
    if card is not None:
        spec = card.prompt
    else:
        spec = _spec_without_card(path, tok, cat, model, kind, pause_k or 5, max_history or 20)
    spec = _override(spec, kind, pause_k, max_history, max_rationale)
    vocab = min(model.get_input_embeddings().weight.shape[0], model.get_output_embeddings().weight.shape[0])
    check_sid_tokens(spec, cat, vocab, tok)
    return Sources(path=path, model=model, spec=spec, catalog=cat, card=card)


def _override(spec: PromptSpec, kind, pause_k, max_history, max_rationale) -> PromptSpec:
    d = spec.to_dict()
    if kind is not None:
        d["kind"] = kind
    if pause_k is not None:
        d["pause_k"] = pause_k
    if d["kind"] == "pause" and d["pause_k"] < 1:
        d["pause_k"] = 5
    if max_history is not None:
        d["max_history"] = max_history
    if max_rationale is not None:
        d["max_rationale"] = max_rationale
    return PromptSpec.from_dict(d)


def _load_model(path: Path):
    from pauserec.export.graphs import SUPPORTED_ARCHS

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON ({e})") from e
    if model_type not in SUPPORTED_ARCHS:
        raise CheckpointError(f"{path}: unsupported architecture {model_type!r}; pauserec exports "
                              f"{', '.join(SUPPORTED_ARCHS)} causal LMs")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype="float32")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the model in {path} ({e}); is it a complete save_pretrained folder?") from e
    return model.eval()


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


def finish(stage: Path, manifest: dict) -> dict:
    """Checksums of every staged file go into the manifest, written last."""
    files = sorted(p for p in stage.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {**manifest, "files": {p.name: sha256_file(p) for p in files}}
    write_json(stage / MANIFEST_FILE, manifest)
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


def manifest_dict(*, spec: PromptSpec, catalog, dims, shape, graphs: dict, static_env: dict | None, precision: str,
                  backend: str, exporter: dict, source: Path, source_sha: str, validation: list, plans: dict,
                  prefix: str = "fused") -> dict:
    """The engine's manifest (without ``files``, which ``finish`` adds). ``prefix``: "fused" (the
    instruction prefix's KV is a graph constant) or "recomputed" (an ablation engine)."""
    import pauserec

    kv = "float16" if precision == "fp16" else "float32"
    return {
        "format_version": FORMAT_VERSION,
        "kind": spec.kind,
        "pause_k": spec.pause_k if spec.kind == "pause" else 0,
        "sid": {"levels": catalog.levels, "codebook_sizes": list(catalog.codebook_sizes),
                "token_prefixes": list(catalog.token_prefixes)},
        "prompt": spec.to_dict(),
        "model": {"arch": dims.arch, "layers": dims.layers, "q_heads": dims.q_heads, "kv_heads": dims.kv_heads,
                  "head_dim": dims.head_dim, "hidden": dims.hidden, "intermediate": dims.intermediate,
                  "vocab": dims.vocab, "tied_embeddings": dims.tied},
        "scoring": shape.scoring,
        "graphs": {name: g.to_dict(kv) for name, g in graphs.items()},
        "plans": plans,
        "shapes": {
            "static": static_env is not None, "max_history": spec.max_history,
            "prefix_len": shape.prefix_len, "prefix": prefix, "suffix_len": shape.suffix_len,
            "ctx_extra": shape.ctx_extra,
            "beam_slots": shape.levels - 1, "first_width": shape.first_width, "next_width": shape.next_width,
            **({"batch": static_env["batch"], "beams": static_env["beams"], "hist": static_env["hist"]}
               if static_env else {}),
        },
        "precision": precision,
        "kv_dtype": kv,
        "backend": backend,
        **exporter,
        "source": {"checkpoint": source.name, "sha256": source_sha},
        "validation": validation,
        "pauserec_version": pauserec.__version__,
    }
