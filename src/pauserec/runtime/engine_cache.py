"""Engines where clusters keep them: ``s3://``, ``gs://``, ``hdfs://``, ``file://`` URIs, copied once per machine.

``local_engine(uri)`` returns a local engine directory for an engine URI that pyarrow's filesystems
read (a plain path is returned as it is). The engine is copied into this machine's cache the first
time (``$PAUSEREC_CACHE``, else ``$XDG_CACHE_HOME/pauserec``, else ``~/.cache/pauserec``), under
``engines/<name>-<key>``, where the key is the sha256 of the engine's ``manifest.json``: the manifest
lists every other file's sha256, so the key names the content, and a re-exported engine at the same
URI is a new entry.

- Every file is checked against the manifest's sha256 while it is copied; the entry appears (one
  atomic rename) only once all of them match, so a cache entry is always complete and verified, and
  ``Engine.load`` does not hash it again.
- Processes on one machine (the actors of a Ray node) copy it once: the first holds a lock
  (:mod:`pauserec.runtime.lock`, released even if it is killed) while the others wait, then reuse it.
- Nothing is ever evicted: remove old ``engines/*`` entries by hand (``pauserec``'s cache holds
  nothing else).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from pauserec.errors import EngineError
from pauserec.runtime.lock import hold
from pauserec.runtime.manifest import MANIFEST_FILE, Manifest

CACHE_ENV = "PAUSEREC_CACHE"
BLOCK = 8 << 20


def is_uri(engine: str | Path) -> bool:
    return "://" in str(engine)


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pauserec"


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes and bad URIs
        raise EngineError(f"cannot open the engine URI {uri} ({e}); pass a local directory or a URI pyarrow "
                          "reads (s3://, gs://, hdfs://, file://) with that filesystem's credentials set") from e


def _read(fs, path: str, uri: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as e:  # FileNotFoundError, OSError, pyarrow's own types
        raise EngineError(f"cannot read {uri}/{os.path.basename(path)} ({e}): is {uri} an engine directory made by "
                          "pauserec-export, and readable from this machine?") from e


def _copy(fs, src: str, dst: Path, digest: str, uri: str) -> None:
    """Copy one file, hashing it on the way; EngineError when its sha256 is not the manifest's."""
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(src) as fin, open(dst, "wb") as fout:
            while block := fin.read(BLOCK):
                h.update(block)
                fout.write(block)
    except OSError as e:
        raise EngineError(f"cannot copy {uri}/{dst.name} into the engine cache {dst.parent.parent} ({e}); free space "
                          f"there or point ${CACHE_ENV} at a disk with room") from e
    if h.hexdigest() != digest:
        raise EngineError(f"checksum mismatch for {uri}/{dst.name}: the file is corrupt or was changed after export; "
                          "re-export the engine to that URI")


def local_engine(engine: str | Path, cache: Path | None = None) -> tuple[Path, bool]:
    """(local directory of ``engine``, whether its files were verified on the way in).

    A local path comes back unchanged (``False``: not verified here); a URI is copied into the
    cache once and verified (``True``)."""
    if not is_uri(engine):
        return Path(engine), False
    uri = str(engine).rstrip("/")
    fs, base = _filesystem(uri)
    manifest_bytes = _read(fs, f"{base}/{MANIFEST_FILE}", uri)
    key = hashlib.sha256(manifest_bytes).hexdigest()[:16]
    root = (cache or cache_root()) / "engines"
    dest = root / f"{os.path.basename(base) or 'engine'}-{key}"
    if (dest / MANIFEST_FILE).is_file():
        return dest, True
    root.mkdir(parents=True, exist_ok=True)
    with hold(root / f".{dest.name}.lock", f"the engine cache entry {dest}", wait=True):
        if (dest / MANIFEST_FILE).is_file():  # another process copied it while this one waited
            return dest, True
        tmp = root / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
            manifest = Manifest.read(tmp)  # the format version, before copying gigabytes
            if not manifest.files:
                raise EngineError(f"{uri}/{MANIFEST_FILE} lists no file checksums; re-export the engine")
            for name, digest in manifest.files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                _copy(fs, f"{base}/{name}", tmp / name, digest, uri)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, True
