"""Device memory for the GPU paths: views of device buffers, and the steps of a device-resident search.

A *device value* is any buffer on a CUDA device that :func:`device_view` understands: an ONNX
Runtime ``OrtValue`` on "cuda" (IO-binding outputs), this package's ``DeviceArray``
(``pauserec._trie_topk_cuda``), a TensorRT output kept on the device, or any object with
``__cuda_array_interface__`` (CuPy, PyTorch, Numba). All must be C-contiguous.

:class:`CudaOps` is what :class:`pauserec.runtime.beam.BeamSearch` does between graph calls when the
graphs run on the GPU: the trie-masked top-k against a resident trie, writing a new KV slot,
reordering the beams' KV, turning tokens into the next codes (``ArrayOps`` in ``beam.py`` does them on
host arrays). :class:`HostOps` does the device steps on host memory with the NumPy reference: a
stand-in that lets CPU-only machines test the device path's control flow (which buffers stay where,
shapes, dtypes) against the host search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pauserec.runtime.trie_topk import TopK

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
             "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
CAI_TYPES = {"<f4": np.float32, "<f2": np.float16, "<i4": np.int32, "<i8": np.int64, "|u1": np.uint8, "|i1": np.int8}


@dataclass(frozen=True)
class DeviceView:
    """A C-contiguous device buffer: address, shape, dtype; ``owner`` keeps the memory alive."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


def device_view(x) -> DeviceView | None:
    """The device buffer behind ``x``, or None when ``x`` is not on a CUDA device.

    A non-contiguous ``__cuda_array_interface__`` raises ValueError (pass a contiguous copy).
    """
    if isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)) or x is None:
        return None
    if isinstance(x, DeviceView):
        return x
    if hasattr(x, "device_name") and hasattr(x, "data_ptr"):  # onnxruntime.OrtValue
        if x.device_name().lower() != "cuda":
            return None
        return DeviceView(int(x.data_ptr()), tuple(int(d) for d in x.shape()), np.dtype(ORT_TYPES[x.data_type()]), x)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is None:
        return None
    shape = tuple(int(d) for d in cai["shape"])
    dtype = np.dtype(CAI_TYPES.get(cai["typestr"], cai["typestr"]))
    strides = cai.get("strides")
    if strides is not None:  # C order: each stride is the item size times the dims after it
        want = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * dtype.itemsize for i in range(len(shape)))
        if tuple(int(s) for s in strides) != want and int(np.prod(shape, dtype=np.int64)) > 1:
            raise ValueError(f"device array of shape {shape} is not C-contiguous (strides {strides}); "
                             "pass a contiguous copy")
    return DeviceView(int(cai["data"][0]), shape, dtype, x)


def _require(x, name: str, dtype, ndim: int | None = None) -> DeviceView:
    v = device_view(x)
    if v is None:
        raise ValueError(f"{name} must be on the CUDA device (an OrtValue on 'cuda' or a CUDA array), got "
                         f"{type(x).__name__}")
    if v.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {v.dtype.name}")
    if ndim is not None and len(v.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {v.shape}")
    return v


def slot_layout(shape: tuple[int, ...], itemsize: int) -> tuple[int, int, int]:
    """(rows, slots, slot bytes) of a (..., S, D) tensor: the slot axis is the second to last."""
    rows = int(np.prod(shape[:-2], dtype=np.int64))
    return rows, int(shape[-2]), int(shape[-1]) * itemsize


class CudaOps:
    """Beam-search steps on CUDA device memory (``pauserec._trie_topk_cuda``); every call synchronises."""

    device = "cuda"
    resident = True  # the graphs keep their outputs on the device
    slices = True  # think steps read device views of the written context prefix (no copy)

    def __init__(self, mod) -> None:
        self.mod = mod
        self._tries: dict[tuple, tuple] = {}

    # -- memory (a failing device raises BackendUnavailable, like every step) --
    def zeros(self, shape, dtype):
        return self._call(self.mod.DeviceArray, list(shape), np.dtype(dtype).name, True)

    def empty(self, shape, dtype):
        return self._call(self.mod.DeviceArray, list(shape), np.dtype(dtype).name, False)

    def upload(self, array: np.ndarray):
        return self._call(self.mod.DeviceArray.from_numpy, np.ascontiguousarray(array))

    def download(self, value) -> np.ndarray:
        return download(value)

    def shape(self, value) -> tuple[int, ...]:
        return value_shape(value)

    def own(self, value):
        return value  # device values stay where they are

    # -- the trie --
    def trie(self, offsets, tokens, children):
        """The trie resident on the device (uploaded now, reused by every topk)."""
        return self._call(self.mod.DeviceTrie, offsets, tokens, children)

    def cached_trie(self, offsets, tokens, children):
        """One resident copy per trie (the same host arrays, not modified in place), for the shim's auto path."""
        key = (id(offsets), id(tokens), id(children))
        hit = self._tries.get(key)
        if hit is None or hit[0] is not offsets or hit[1] is not tokens or hit[2] is not children:
            if len(self._tries) > 8:
                self._tries.clear()
            hit = (offsets, tokens, children, self.trie(offsets, tokens, children))
            self._tries[key] = hit
        return hit[3]

    # -- steps --
    def topk(self, trie, scores, logprobs, nodes, k: int, node_mask=None, mask_row=None) -> TopK:
        """Device top-k against a resident trie; scores (B, K_in) / nodes (B, K_in) / filter may be on
        the host (uploaded). logprobs: (B, K_in, V), or (B, V) when K_in = 1. Returns device arrays."""
        scores = scores if device_view(scores) is not None else self.upload(np.asarray(scores, np.float32))
        nodes = nodes if device_view(nodes) is not None else self.upload(np.asarray(nodes, np.int32))
        s, n = _require(scores, "scores", np.float32, 2), _require(nodes, "nodes", np.int32, 2)
        lp = _require(logprobs, "logprobs", np.float32)
        B, K = s.shape
        if n.shape != s.shape or not lp.shape or lp.size != B * K * lp.shape[-1]:
            raise ValueError(f"scores {s.shape}, nodes {n.shape} and logprobs {lp.shape} do not describe one "
                             "(B, K_in) x V problem")
        k = int(k)
        out = TopK(self.empty((B, k), np.int32), self.empty((B, k), np.int32), self.empty((B, k), np.int32),
                   self.empty((B, k), np.float32))
        mask_ptr = rows_ptr = mask_rows = 0
        if node_mask is not None or mask_row is not None:
            if node_mask is None or mask_row is None:
                raise ValueError("pass node_mask and mask_row together, or neither")
            node_mask = node_mask if device_view(node_mask) is not None else self.upload(np.asarray(node_mask, np.uint8))
            mask_row = mask_row if device_view(mask_row) is not None else self.upload(np.asarray(mask_row, np.int32))
            m, r = _require(node_mask, "node_mask", np.uint8, 2), _require(mask_row, "mask_row", np.int32, 1)
            if m.shape[1] != trie.num_nodes or r.shape != (B,):
                raise ValueError(f"node_mask must be (M, {trie.num_nodes}) and mask_row ({B},), got {m.shape} and "
                                 f"{r.shape}")
            mask_ptr, rows_ptr, mask_rows = m.ptr, r.ptr, m.shape[0]
        try:
            trie.topk_device(s.ptr, lp.ptr, n.ptr, B, K, lp.shape[-1], k, *(a.ptr for a in out),
                             node_mask=mask_ptr, mask_row=rows_ptr, mask_rows=mask_rows)
        except RuntimeError as e:
            from pauserec.runtime.trie_topk import device_failure

            raise device_failure(e) from e
        return out

    def copy_slots(self, dst, src, dst_at: int, src_at: int, n: int) -> None:
        """dst[..., dst_at + s, :] = src[..., src_at + s, :] for s < n (tensors (..., S, D), same leading dims)."""
        d, s = device_view(dst), device_view(src)
        rows, dst_slots, width = slot_layout(d.shape, d.dtype.itemsize)
        rows_s, src_slots, width_s = slot_layout(s.shape, s.dtype.itemsize)
        if (rows, width) != (rows_s, width_s) or d.dtype != s.dtype:
            raise ValueError(f"copy_slots: {s.shape} {s.dtype} does not fit into {d.shape} {d.dtype}")
        self._call(self.mod.copy_slots, d.ptr, s.ptr, rows, dst_slots, dst_at, src_slots, src_at, n, width)

    def prefix(self, src, n: int):
        """A contiguous copy of the first n slots of src (..., S, D)."""
        s = device_view(src)
        out = self.empty((*s.shape[:-2], n, s.shape[-1]), s.dtype)
        self.copy_slots(out, src, 0, 0, n)
        return out

    def gather_beams(self, src, parent):
        """(L, B, H, K, ...) beams reordered by parent (B, K) int32 (padding -1 takes beam 0); a new array."""
        s, p = device_view(src), _require(parent, "parent", np.int32, 2)
        L, B, H, K = s.shape[:4]
        out = self.empty(s.shape, s.dtype)
        inner = int(np.prod(s.shape[4:], dtype=np.int64)) * s.dtype.itemsize
        self._call(self.mod.gather_beams, device_view(out).ptr, s.ptr, p.ptr, L, B, H, K, inner)
        return out

    def codes(self, tokens):
        """The next decode's codes: int64 max(tokens, 0) of int32 tokens (B, K)."""
        t = _require(tokens, "tokens", np.int32)
        out = self.empty(t.shape, np.int64)
        self._call(self.mod.tokens_to_codes, device_view(out).ptr, t.ptr, t.size)
        return out

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except RuntimeError as e:  # CudaError
            from pauserec.runtime.trie_topk import device_failure

            raise device_failure(e) from e


def download(value) -> np.ndarray:
    """A host copy of a device (or host) value."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "to_numpy"):  # DeviceArray, TensorRT tensors
        return value.to_numpy()
    if hasattr(value, "numpy"):  # OrtValue
        return value.numpy()
    return np.asarray(value)


class HostValue:
    """A host array standing in for a device buffer (HostOps only); sessions feed it as a numpy array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = np.ascontiguousarray(array)

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)

    def to_numpy(self) -> np.ndarray:
        return self.array.copy()


class HostOps:
    """CudaOps' steps on host memory with the NumPy reference: tests the device search without a GPU.

    Values are :class:`HostValue` or CPU OrtValues (what IO-bound CPU sessions return)."""

    device = "cpu"
    resident = True
    slices = True

    @staticmethod
    def _np(v) -> np.ndarray:
        return v.array if isinstance(v, HostValue) else download(v)

    def zeros(self, shape, dtype):
        return HostValue(np.zeros(shape, dtype))

    def empty(self, shape, dtype):
        return HostValue(np.empty(shape, dtype))

    def upload(self, array):
        return HostValue(np.array(array))

    def download(self, value) -> np.ndarray:
        return self._np(value).copy()

    def shape(self, value) -> tuple[int, ...]:
        return value_shape(value)

    def own(self, value):
        return value  # device values stay where they are

    def trie(self, offsets, tokens, children):
        return (offsets, tokens, children)

    def topk(self, trie, scores, logprobs, nodes, k: int, node_mask=None, mask_row=None) -> TopK:
        from pauserec.runtime.trie_topk import trie_topk_numpy

        s, n = self._np(scores).astype(np.float32), self._np(nodes).astype(np.int32)
        lp = self._np(logprobs).reshape(*s.shape, -1)
        m = None if node_mask is None else self._np(node_mask)
        r = None if mask_row is None else self._np(mask_row)
        return TopK(*map(HostValue, trie_topk_numpy(s, lp, n, *trie, k, m, r)))

    def copy_slots(self, dst, src, dst_at: int, src_at: int, n: int) -> None:
        dst.array[..., dst_at : dst_at + n, :] = self._np(src)[..., src_at : src_at + n, :]

    def prefix(self, src, n: int):
        return HostValue(self._np(src)[..., :n, :])

    def gather_beams(self, src, parent):
        p = np.maximum(self._np(parent), 0)[None, :, None, :]
        a = self._np(src)
        return HostValue(np.take_along_axis(a, p.reshape(*p.shape, *([1] * (a.ndim - 4))), axis=3))

    def codes(self, tokens):
        return HostValue(np.maximum(self._np(tokens), 0).astype(np.int64))


def value_shape(value) -> tuple[int, ...]:
    """Shape of a device value (or a host array)."""
    if isinstance(value, np.ndarray):
        return value.shape
    if isinstance(value, HostValue):
        return value.array.shape
    view = device_view(value)
    if view is not None:
        return view.shape
    return tuple(value.shape())  # a CPU OrtValue
