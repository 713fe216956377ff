"""The engine directory's manifest: the one contract between export and runtime, typed, read and written here.

``Manifest.read(path)`` checks the format version (an older engine gets the re-export command) and
every field's presence and type; export builds a ``Manifest`` and writes it with ``Manifest.write``
(after the checksums of every other file are in ``files``). Nothing else parses ``manifest.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pauserec.prompt.spec import PromptSpec
from pauserec.errors import EngineError, PauserecError
from pauserec.runtime.spec import KV_STORAGE, GraphSpec

# 2: one weights.bin shared by the graphs, scoring rule; 3: decode returns the new beam-KV slot;
# 4: the prompt as data (fused prefix/suffix ids, ids or text history assembly, token budget), typed manifest;
# 5: merged.onnx runs one graph per call (an If branch per graph, selected by its "<graph>/run" flag)
FORMAT_VERSION = 5
MANIFEST_FILE = "manifest.json"
REEXPORT = "pauserec-export CHECKPOINT --out {path} --force"
SCORING = ("full", "sid")


@dataclass(frozen=True)
class SidInfo:
    levels: int
    codebook_sizes: tuple[int, ...]
    token_prefixes: tuple[str, ...]


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tied_embeddings: bool


@dataclass(frozen=True)
class Shapes:
    static: bool
    max_history: int
    prefix_len: int
    suffix_len: int
    ctx_extra: int
    beam_slots: int
    first_width: int
    next_width: int
    prefix: str = "fused"  # "recomputed": an ablation engine whose prefill recomputes the prefix
    batch: int | None = None  # static engines
    beams: int | None = None
    hist: int | None = None


@dataclass(frozen=True)
class Manifest:
    kind: str
    pause_k: int
    sid: SidInfo
    prompt: PromptSpec
    model: ModelInfo
    scoring: str
    graphs: dict[str, GraphSpec]
    shapes: Shapes
    precision: str
    kv_dtype: str
    backend: str
    exporter: str
    opset: int
    torch: str
    source: dict[str, str]
    pauserec_version: str
    plans: dict[str, str] = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256, every file but the manifest
    catalog: dict[str, Any] | None = None  # set by catalog updates
    merged: str | None = None  # every graph in one CPU model (pauserec.export.merge), e.g. "merged.onnx"
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d.update(sid=asdict(self.sid), model=asdict(self.model), shapes=asdict(self.shapes),
                 prompt=self.prompt.to_dict(), graphs={n: g.to_dict(self.kv_dtype) for n, g in self.graphs.items()})
        d["sid"]["codebook_sizes"] = list(self.sid.codebook_sizes)
        d["sid"]["token_prefixes"] = list(self.sid.token_prefixes)
        for optional in ("catalog", "merged"):
            if d[optional] is None:
                del d[optional]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | str = "the engine") -> Manifest:
        redo = REEXPORT.format(path=path)
        version = d.get("format_version") if isinstance(d, dict) else None
        if version != FORMAT_VERSION:
            raise EngineError(f"{path} has engine format version {version!r}; this pauserec reads version "
                              f"{FORMAT_VERSION}. Re-export it with `{redo}`")
        try:
            sid = SidInfo(int(d["sid"]["levels"]), tuple(int(v) for v in d["sid"]["codebook_sizes"]),
                          tuple(str(p) for p in d["sid"]["token_prefixes"]))
            m = cls(
                kind=str(d["kind"]), pause_k=int(d["pause_k"]), sid=sid, prompt=PromptSpec.from_dict(d["prompt"]),
                model=ModelInfo(**d["model"]), scoring=str(d["scoring"]),
                graphs={n: GraphSpec.from_manifest(n, g) for n, g in d["graphs"].items()},
                shapes=Shapes(**d["shapes"]), precision=str(d["precision"]), kv_dtype=str(d["kv_dtype"]),
                backend=str(d["backend"]), exporter=str(d["exporter"]), opset=int(d["opset"]), torch=str(d["torch"]),
                source=dict(d["source"]), pauserec_version=str(d["pauserec_version"]), plans=dict(d.get("plans") or {}),
                validation=list(d.get("validation") or []), files=dict(d.get("files") or {}), catalog=d.get("catalog"),
                merged=None if d.get("merged") is None else str(d["merged"]),
            )
        except (KeyError, TypeError, ValueError, PauserecError) as e:
            raise EngineError(f"{path}/{MANIFEST_FILE} is incomplete or malformed ({e!r}); re-export with `{redo}`") from e
        if m.scoring not in SCORING:
            raise EngineError(f"{path}: unknown scoring rule {m.scoring!r}; re-export with `{redo}`")
        if m.kv_dtype not in KV_STORAGE:
            raise EngineError(f"{path}: unknown KV dtype {m.kv_dtype!r}; re-export with `{redo}`")
        if "prefill" not in m.graphs:
            raise EngineError(f"{path}/{MANIFEST_FILE} declares no prefill graph; re-export with `{redo}`")
        if m.sid.levels != m.prompt.levels:
            raise EngineError(f"{path}: the manifest's SID levels and prompt disagree; re-export with `{redo}`")
        return m

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest of engine directory ``path``; EngineError naming the fix."""
        redo = REEXPORT.format(path=path)
        f = path / MANIFEST_FILE
        if not path.is_dir():
            raise EngineError(f"engine directory {path} not found; create it with `{redo}`")
        if not f.is_file():
            raise EngineError(f"{path} has no {MANIFEST_FILE}: not an engine directory (or an interrupted export); "
                              f"create it with `{redo}`")
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EngineError(f"{f} is not valid JSON ({e}); re-export the engine with `{redo}`") from e
        return cls.from_dict(d, path)

    def write(self, folder: Path) -> None:
        """``manifest.json`` in ``folder``, flushed to disk."""
        with open(folder / MANIFEST_FILE, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replace(self, **changes: Any) -> Manifest:
        return replace(self, **changes)
