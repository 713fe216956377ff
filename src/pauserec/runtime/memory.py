"""Handing memory the process no longer uses back to the operating system, and what memory it may still take."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path

from pauserec.errors import DataError

MADV_DONTNEED = 4  # Linux


def release_memory(collect: bool = True) -> None:
    """Collect garbage (``collect``: a full collection, tenths of a second in a process holding a torch model) and
    hand freed heap pages back to the OS.

    glibc keeps freed blocks below its mmap threshold in its heap, and raises that threshold (up to 32 MB)
    each time a larger mapped block is freed, so tensors of tens of MB end up there and stay resident after
    they are freed. Opening an ONNX Runtime session leaves such garbage behind: its constant folding
    evaluates thousands of small nodes, and at the Llama-2-7B shape 170 MB of freed heap stayed resident
    after a merged session was opened. ``malloc_trim`` returns it. Not glibc: nothing to trim.
    """
    if collect:
        gc.collect()
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def drop_mapped_pages(path: str | Path) -> int:
    """Drop the resident pages of this process's mappings of the file ``path`` that hold nothing but the file's
    own bytes; returns the bytes of address space dropped. Nothing is lost: a page touched again is read back
    from the file. A private mapping with a page written to (copy-on-write: ``Anonymous`` in its smaps) is left
    alone, since dropping would revert that page to the file's bytes.

    Prepacking reads every weight of an engine once, at load, into ONNX Runtime's own packed copy. Where ONNX
    Runtime keeps the original tensor mapped too (the scales of an int4 ``MatMulNBits``: it packs them but
    still holds them), the pages read at load stay resident though no kernel reads them again: 6 % of an int4
    engine at block 128. Not Linux (no ``/proc/self/smaps``): nothing is dropped.
    """
    target = os.path.realpath(path)
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return 0
    libc, dropped = _libc(), 0
    for start, end, anonymous in _file_mappings(text, target):
        if anonymous == 0 and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


@contextmanager
def dropping_mapped_pages(path: str | Path, every: float = 0.02):
    """``drop_mapped_pages(path)`` every ``every`` seconds while the block runs, and once after it.

    For opening sessions that prepack: ONNX Runtime creates a session without holding the GIL, reading each
    weight once into its packed copy, and it keeps the weights the merged model's branches share mapped (an
    initializer of the outer graph is not released once a branch's kernel has packed it). Dropped only after
    the session was open, those pages made the load's peak the packed copies *plus* the whole file: an int4
    Llama-2-7B engine (4.15 GB) peaked at 9.41 GB while loading to hold 5.11 GB; dropped while the session is
    created, the peak is 5.31 GB. ONNX Runtime never writes to a weight, so a dropped page is one it reads back
    from the file if it needs it again.
    """
    stop = threading.Event()

    def drop_until_stopped() -> None:
        while not stop.wait(every):
            drop_mapped_pages(path)

    thread = threading.Thread(target=drop_until_stopped, name="pauserec-drop-mapped-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drop_mapped_pages(path)


def available_bytes(root: str | Path = "/") -> int | None:
    """Memory this process could still take: ``MemAvailable`` of ``/proc/meminfo``, lowered to what its cgroup's
    limit leaves (a container's ``--memory``; cgroup v2 or v1, its reclaimable page cache counted as free). None
    where neither can be read (not Linux). ``root``: where ``/proc`` and ``/sys`` are (tests)."""
    root = Path(root)
    meminfo = _read(root / "proc/meminfo")
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo or "", re.M)
    free = [int(found.group(1)) * 1024] if found else []
    cgroup = _cgroup_free(root)
    if cgroup is not None:
        free.append(cgroup)
    return min(free) if free else None


# cgroup v2 and v1 memory controllers: (limit file, usage file, the stat line of reclaimable page cache)
_CGROUP_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
                 "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def _cgroup_free(root: Path) -> int | None:
    """Bytes the cgroup memory limits leave this process: the least over its own group and every group above it
    (a limit binds its whole subtree) of limit - usage + inactive page cache; None: no limit. v2 where its memory
    files are found, else v1's memory controller."""
    fs = root / "sys/fs/cgroup"
    groups = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            groups["v2"] = path
        elif "memory" in controllers.split(","):
            groups["v1"] = path
    for version, mount in (("v2", fs), ("v1", fs / "memory")):
        if version not in groups:
            continue
        limit_file, usage_file, cache_key = _CGROUP_FILES[version]
        folders = _own_and_above(mount, groups[version])
        limits = [(folder, _read(folder / limit_file)) for folder in folders]
        if all(limit is None for _, limit in limits):
            continue  # (v2 without its memory controller here: v1's)
        left = [_left(int(limit), _read(folder / usage_file), _read(folder / "memory.stat"), cache_key)
                for folder, limit in limits
                if limit is not None and limit.strip() != "max" and int(limit) < 1 << 60]  # v1: no limit ~ 2**63
        return min(left) if left else None
    return None


def _own_and_above(mount: Path, path: str) -> list[Path]:
    """The process's group folder under ``mount`` and each folder above it up to ``mount``. ``path`` (from
    /proc/self/cgroup) may name groups above the mount's root (a container sees its own group as the root): the
    group is the longest tail of ``path`` found under ``mount``."""
    parts = [p for p in path.split("/") if p]
    own = next((mount.joinpath(*parts[i:]) for i in range(len(parts)) if mount.joinpath(*parts[i:]).is_dir()), mount)
    return [own, *[p for p in own.parents if p == mount or mount in p.parents]]


def _left(limit: int, usage: str | None, stat: str | None, cache_key: str) -> int:
    cache = re.search(rf"^{cache_key} (\d+)", stat or "", re.M)
    return max(0, limit - int(usage or 0) + (int(cache.group(1)) if cache else 0))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes of ``text``: an integer, or a number with a unit (``512MB``, ``1.5GB``, ``2GiB``; kB/MB/GB are
    powers of 10, KiB/MiB/GiB of 2)."""
    if isinstance(text, int):
        value = text
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = found and _UNITS.get(found.group(2).lower())
        if not unit:
            raise DataError(f"{text!r} is not a size: write bytes, or a number with a unit (e.g. 512MB, 2GB, 1.5GiB)")
        value = int(float(found.group(1)) * unit)
    if value <= 0:
        raise DataError(f"size {text!r} must be above zero")
    return value


def _file_mappings(smaps: str, target: str):
    """(start, end, anonymous kB) of each mapping of file ``target`` in the text of ``/proc/self/smaps``."""
    current = None
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header: "start-end perms offset dev inode path"
            if current:
                yield current
            current = None
            if len(head) == 6 and head[5] == target:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = (start, end, 0)
        elif current and line.startswith("Anonymous:"):
            current = (current[0], current[1], int(line.split()[1]))
    if current:
        yield current


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
