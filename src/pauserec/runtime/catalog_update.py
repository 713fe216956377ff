"""Swap an engine's catalog without re-exporting: items come and go, the SID codebooks stay.

    update_catalog("engine/", "new.index.json")        # writes a new checksummed catalog.npz
    Engine.load("engine/", catalog="new.index.json")     # or use one in memory, leaving the dir alone

The graphs score and embed SID codes, never items: every code of every level's codebook is in the
graphs (the restricted embedding of direct/pause engines keeps all ``sid_token_ids`` rows, not only
the codes the export-time catalog used), so any catalog whose SIDs use the same levels, token
prefixes and codebooks works, and its new SIDs are recommendable at once. A catalog with other
levels, prefixes, or codes beyond the exported codebooks is refused (DataError naming what differs).
A catalog whose codebook sizes were inferred from its codes (``max code + 1``, smaller than the
engine's) is widened to the engine's sizes.

The update is atomic: the new engine directory is staged beside the old one (hard links to the
unchanged graphs and weights, so no copy of GB-sized files), with the new catalog.npz and a
manifest carrying its sha256, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pauserec.data import Catalog
from pauserec.errors import DataError, EngineError
from pauserec.prompt.layout import read_item_fields
from pauserec.runtime.engine import CATALOG_FILE, ITEMS_FILE, MANIFEST_FILE, read_manifest, sha256_file, verify_files
from pauserec.runtime.manifest import Manifest

REEXPORT_HINT = "export a new engine for this SID index (pauserec-export CHECKPOINT --index NEW.index.json --out DIR)"


@dataclass(frozen=True)
class CatalogUpdate:
    """What an update changed."""

    engine: str
    items_before: int
    items_after: int
    added: int  # item ids new to the engine
    removed: int  # item ids no longer in the catalog
    unique_sids: int
    catalog_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_catalog(source: Catalog | str | Path) -> Catalog:
    """A ``Catalog`` as is, or read from a SID index file (``*.index.json``) or a ``Catalog.save`` .npz."""
    if isinstance(source, Catalog):
        return source
    path = Path(source)
    if not path.is_file():
        raise DataError(f"catalog source {path} not found: pass a SID index file (NAME.index.json) or a "
                        "catalog .npz written by Catalog.save")
    if path.suffix == ".npz":
        return Catalog.load(path)
    from pauserec.data.datasets import catalog_from_index

    name = path.name[: -len(".index.json")] if path.name.endswith(".index.json") else path.stem
    return catalog_from_index(path, name)


def fit_catalog(catalog: Catalog, manifest: Manifest, engine: str | Path) -> Catalog:
    """``catalog`` checked against what the engine's graphs were exported for (levels, token prefixes,
    codebook sizes), with the engine's codebook sizes; DataError saying what differs."""
    sizes, prefixes = manifest.sid.codebook_sizes, manifest.sid.token_prefixes
    what = f"catalog {catalog.name!r}" if catalog.name else "the new catalog"
    if catalog.levels != len(sizes):
        raise DataError(f"{what} has {catalog.levels} SID levels but engine {engine} was exported for {len(sizes)}; "
                        f"a catalog update keeps the SID codebooks: {REEXPORT_HINT}")
    if catalog.token_prefixes != prefixes:
        raise DataError(f"{what} uses SID token prefixes {list(catalog.token_prefixes)} but engine {engine} uses "
                        f"{list(prefixes)}: it is another SID index; {REEXPORT_HINT}")
    used = catalog.sids.max(axis=0).astype(np.int64) + 1  # (L,)
    for level, (need, declared, have) in enumerate(zip(used, catalog.codebook_sizes, sizes, strict=True), 1):
        if need > have or declared > have:
            item = catalog.item_ids[int(np.argmax(catalog.sids[:, level - 1]))]
            detail = (f"uses code {need - 1} at level {level} (item {item!r})" if need > have
                      else f"declares {declared} codes at level {level}")
            raise DataError(f"{what} {detail} but engine {engine} was exported for codebook sizes {list(sizes)}: "
                            f"its graphs cannot embed or score more codes; {REEXPORT_HINT}")
    if catalog.codebook_sizes == sizes:
        return catalog
    return Catalog(catalog.item_ids, catalog.sids, catalog.token_prefixes, codebook_sizes=sizes, name=catalog.name)


def update_catalog(engine: str | Path, source: Catalog | str | Path, out: str | Path | None = None,
                   verify: bool = True, items: str | Path | None = None) -> CatalogUpdate:
    """Write ``source`` (a Catalog, SID index file or catalog .npz) as the catalog of the engine
    directory ``engine`` (in place, or into a new directory ``out``), its checksum in the manifest.

    Engines whose prompt renders item fields (titles: ``items.json``) need them for every new item:
    ``items`` (an LC-Rec ``.item.json`` or MiniOneRec info .txt) adds them; items the engine already
    knows keep theirs.

    ``verify`` first checks every file of the engine against its recorded sha256 (seconds for GB-sized
    weights), so a damaged engine is not given a fresh manifest.
    """
    path = Path(engine)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    new = fit_catalog(read_catalog(source), manifest, path)
    fields = _item_fields(path, manifest, new, items)
    target = Path(out) if out is not None else path
    if target.resolve() != path.resolve() and target.exists():
        raise EngineError(f"{target} already exists: pass a new directory for the updated engine (or update in place)")
    old_ids = set(Catalog.load(path / CATALOG_FILE).item_ids)
    stage = target.parent / f".{target.name}.catalog-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        digest = _stage(path, stage, new, manifest, source, fields)
        _publish(stage, target, in_place=target.resolve() == path.resolve())
    except OSError as e:
        raise EngineError(f"writing the updated engine failed ({e.strerror or e}); {path} is unchanged. Free space "
                          "or fix the folder's permissions, then run the update again") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    new_ids = set(new.item_ids)
    return CatalogUpdate(engine=str(target), items_before=len(old_ids), items_after=new.n_items,
                         added=len(new_ids - old_ids), removed=len(old_ids - new_ids),
                         unique_sids=new.trie.num_sids, catalog_sha256=digest)


def _item_fields(path: Path, manifest: Manifest, catalog: Catalog, items) -> dict[str, list[str]] | None:
    """The item fields the engine's prompt renders, for every item of the new catalog (None: it renders none)."""
    fields = manifest.prompt.fields
    if not fields:
        if items is not None:
            raise DataError(f"engine {path}'s prompt renders no item fields; drop --items")
        return None
    try:
        known = json.loads((path / ITEMS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path / ITEMS_FILE} cannot be read ({e}); re-export the engine") from e
    return read_item_fields(Path(items) if items is not None else None, catalog, fields, known=known)


def _stage(path: Path, stage: Path, catalog: Catalog, manifest: Manifest, source,
           fields: dict[str, list[str]] | None = None) -> str:
    """The updated engine in ``stage``: links to every other file, the new catalog (and item fields), then the
    manifest."""
    stage.mkdir(parents=True)
    replaced = {CATALOG_FILE, MANIFEST_FILE} | ({ITEMS_FILE} if fields else set())
    for f in sorted(path.iterdir()):
        if f.name in replaced:
            continue
        if f.is_dir():
            shutil.copytree(f, stage / f.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(f, stage / f.name)
    catalog.save(stage / CATALOG_FILE)
    Catalog.load(stage / CATALOG_FILE)  # reads back before anything is published
    digest = sha256_file(stage / CATALOG_FILE)
    extra = {}
    if fields:
        table = {str(i): {f: v[n] for f, v in fields.items()} for n, i in enumerate(catalog.item_ids)}
        (stage / ITEMS_FILE).write_text(json.dumps(table, indent=1) + "\n")
        extra[ITEMS_FILE] = sha256_file(stage / ITEMS_FILE)
    origin = Path(source).name if isinstance(source, str | Path) else (catalog.name or "Catalog object")
    manifest.replace(files={**manifest.files, CATALOG_FILE: digest, **extra},
                     catalog={"items": catalog.n_items, "unique_sids": catalog.trie.num_sids, "source": origin}
                     ).write(stage)
    return digest


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)  # same inode: no copy of the weights
    except OSError:
        shutil.copy2(src, dst)


def _publish(stage: Path, target: Path, in_place: bool) -> None:
    """Rename the staged engine into place; the old directory goes only after the new one is there."""
    if not in_place:
        os.replace(stage, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)
    try:
        os.replace(stage, target)
    except OSError:
        os.replace(old, target)  # put the old engine back
        raise
    shutil.rmtree(old, ignore_errors=True)
