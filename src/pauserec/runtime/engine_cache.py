"""Engines where clusters keep them: ``s3://``, ``gs://``, ``hdfs://``, ``file://`` URIs, copied once per machine.

``local_engine(uri)`` returns a local engine directory for an engine URI that pyarrow's filesystems
read (a plain path is returned as it is). The engine is copied into this machine's cache the first
time (``$PAUSEREC_CACHE``, else ``$XDG_CACHE_HOME/pauserec``, else ``~/.cache/pauserec``), under
``engines/<name>-<key>``, where the key is the sha256 of the engine's ``manifest.json``: the manifest
lists every other file's sha256, so the key names the content, and a re-exported engine at the same
URI is a new entry.

- Every file is checked against the manifest's sha256 while it is copied; the entry appears (one
  atomic rename, after every file and the folder are fsync'ed) only once all of them match, so a cache entry
  is always complete and verified, and ``Engine.load`` does not hash it again.
- A hit is checked before it is used: its manifest must be the URI's, and every file it lists must be there
  with the size recorded when it was copied (a file deleted or truncated by hand or by a full disk). A damaged
  entry is removed and copied again.
- Processes on one machine (the actors of a Ray node) copy it once: the first holds a lock
  (:mod:`pauserec.runtime.lock`, released even if it is killed) while the others wait, then reuse it. A copy
  killed half-way leaves a temporary folder; the next process to take that entry's lock removes it.
- The cache is capped (``$PAUSEREC_CACHE_MAX_GB``, default 100): after an entry is added, the least recently
  used other entries are removed until the cache fits (an entry being copied is skipped; a process that has
  an evicted engine loaded keeps its mapped files). An entry larger than the cap is kept, alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from pauserec.errors import EngineError
from pauserec.runtime.lock import hold
from pauserec.runtime.manifest import MANIFEST_FILE, Manifest

CACHE_ENV = "PAUSEREC_CACHE"
CAP_ENV = "PAUSEREC_CACHE_MAX_GB"
DEFAULT_CAP_GB = 100.0
BLOCK = 8 << 20
ENTRY_FILE = ".pauserec-entry.json"  # {file: size} as copied; its mtime is the entry's last use


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
    """Copy one file, hashing it on the way, and fsync it; EngineError when its sha256 is not the manifest's."""
    h = hashlib.sha256()
    try:
        with fs.open_input_stream(src) as fin, open(dst, "wb") as fout:
            while block := fin.read(BLOCK):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        raise EngineError(f"cannot copy {uri}/{dst.name} into the engine cache {dst.parent.parent} ({e}); free space "
                          f"there or point ${CACHE_ENV} at a disk with room") from e
    if h.hexdigest() != digest:
        raise EngineError(f"checksum mismatch for {uri}/{dst.name}: the file is corrupt or was changed after export; "
                          "re-export the engine to that URI")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _intact(entry: Path, manifest_bytes: bytes) -> bool:
    """The entry holds this manifest and every file it was copied with, at the size it had."""
    try:
        sizes = json.loads((entry / ENTRY_FILE).read_text())
        if (entry / MANIFEST_FILE).read_bytes() != manifest_bytes:
            return False
        return all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def _used(entry: Path) -> None:
    """Stamp the entry's last use (eviction order) from the fine-grained clock: a file's own mtime comes from the
    kernel's coarse one, which can give two uses milliseconds apart the same time."""
    now = time.time_ns()
    os.utime(entry / ENTRY_FILE, ns=(now, now))


def _remove(entry: Path) -> None:
    """Remove a cache entry: renamed away first (one step), so no process finds it half-deleted."""
    gone = entry.parent / f".{entry.name}.gone-{os.getpid()}"
    try:
        os.replace(entry, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def cache_cap_bytes() -> int:
    raw = os.environ.get(CAP_ENV)
    try:
        gb = float(raw) if raw else DEFAULT_CAP_GB
    except ValueError:
        raise EngineError(f"${CAP_ENV}={raw!r} is not a number of GB; set it to the engine cache's size cap, "
                          "e.g. 100") from None
    if gb <= 0:
        raise EngineError(f"${CAP_ENV}={raw!r}: the cache cap must be a positive number of GB")
    return int(gb * 1e9)


def _entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def evict(root: Path, keep: Path, cap: int) -> list[Path]:
    """Remove the least recently used entries of ``root`` other than ``keep`` until the cache holds at most
    ``cap`` bytes; an entry whose lock another process holds (being copied) is skipped. Returns the removed."""
    from pauserec.runtime.lock import LockedError

    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    sizes = {p: _entry_bytes(p) for p in entries}
    total = sum(sizes.values())
    last_use = lambda p: (p / ENTRY_FILE).stat().st_mtime if (p / ENTRY_FILE).exists() else 0.0  # noqa: E731
    removed = []
    for entry in sorted((p for p in entries if p != keep), key=last_use):
        if total <= cap:
            break
        try:
            with hold(root / f".{entry.name}.lock", f"the engine cache entry {entry}", wait=False):
                _remove(entry)
        except LockedError:
            continue
        total -= sizes[entry]
        removed.append(entry)
    return removed


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
    if _intact(dest, manifest_bytes):
        _used(dest)
        return dest, True
    cap = cache_cap_bytes()  # (a bad setting is reported before gigabytes are copied)
    root.mkdir(parents=True, exist_ok=True)
    with hold(root / f".{dest.name}.lock", f"the engine cache entry {dest}", wait=True):
        if _intact(dest, manifest_bytes):  # another process copied it while this one waited
            _used(dest)
            return dest, True
        for stale in root.glob(f".{dest.name}.tmp-*"):  # a copy killed half-way (its lock died with it)
            shutil.rmtree(stale, ignore_errors=True)
        _remove(dest)  # damaged or incomplete: copied again
        tmp = root / f".{dest.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
            manifest = Manifest.read(tmp)  # the format version, before copying gigabytes
            if not manifest.files:
                raise EngineError(f"{uri}/{MANIFEST_FILE} lists no file checksums; re-export the engine")
            for name, digest in manifest.files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                _copy(fs, f"{base}/{name}", tmp / name, digest, uri)
            sizes = {name: (tmp / name).stat().st_size for name in [MANIFEST_FILE, *manifest.files]}
            (tmp / ENTRY_FILE).write_text(json.dumps(sizes))
            _used(tmp)
            _fsync_dir(tmp)
            os.replace(tmp, dest)
            _fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    evict(root, dest, cap)
    return dest, True
