"""Handing freed heap memory back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


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


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"))
