"""The beam search with its state on the GPU: no host round trip of KV or log-probs between decode steps.

Same phases and results as :class:`pauserec.runtime.beam.BeamSearch`; what differs is where the
tensors live. The graphs run with their outputs kept on the device (ONNX Runtime IO binding, or
TensorRT device buffers), and the steps between graph calls run there too (``ops``:
:class:`pauserec.runtime.device.CudaOps`):

- prefill: log-probs and context KV stay on the device; the context mask is uploaded once;
- cot rationale: the context buffer (with room for the rationale) is on the device and each think
  step writes its KV slot there; only the (B, vocab) log-probs come to the host, for the greedy
  argmax and the early stop at ``</think>``;
- each SID level: the trie-masked top-k on the device against the trie uploaded once per search;
  the decode's new KV slot is written into the beams' KV, which is reordered by parent there; the
  chosen tokens become the next codes there;
- the end: only the (B, K) leaf nodes and scores are copied to the host.

Every device step synchronises its stream before the next graph call (the graphs run on their own
streams); the copies avoided are what matters: the context KV (layers x B x heads x C x D) and the
beams' KV never cross PCIe.
"""

from __future__ import annotations

import time

import numpy as np

from pauserec.runtime.beam import BeamSearch


class DeviceBeamSearch(BeamSearch):
    """One batch on the device; ``ops`` does the steps between graph calls (CudaOps, or HostOps in tests)."""

    def __init__(self, engine, history_ids: np.ndarray, history_mask: np.ndarray, beams: int, ops,
                 node_mask: np.ndarray | None = None, mask_row: np.ndarray | None = None):
        super().__init__(engine, history_ids, history_mask, beams, "cuda", node_mask, mask_row)
        self.ops = ops
        t = self.trie
        self.dev_trie = ops.trie(t.offsets, t.tokens, t.children)  # resident for the whole search
        self.dev_mask = None if self.node_mask is None else ops.upload(self.node_mask)  # (M, N)
        self.dev_rows = None if self.mask_row is None else ops.upload(self.mask_row)  # (B,)

    # -- phases ---------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        t0 = time.perf_counter()
        e = self.e
        lp, self.ctx_key, self.ctx_value = e.prefill(self.ids, self.mask, device=e.kind != "cot")
        self.ctx_mask = np.concatenate([self.mask, np.ones((self.batch, e.suffix_len), np.int64)], axis=1)
        if e.kind == "cot":
            self._open_context(lp)  # (B, vocab) on the host: the rationale's greedy argmax
        else:
            self.first = lp  # (B, V1) on the device
        self.timings.prefill += time.perf_counter() - t0

    def _open_context(self, lp: np.ndarray) -> None:
        """cot: a device context buffer with room for the rationale and ``</think>`` (masked until written)."""
        e, ops = self.e, self.ops
        shape = ops_shape(self.ctx_key)  # (layers, B, Hkv, C0, D)
        c0 = shape[3]
        cap = c0 + e.prompt.max_rationale + 1
        self.buf_key = ops.zeros((*shape[:3], cap, shape[4]), e.kv_dtype)
        self.buf_value = ops.zeros((*shape[:3], cap, shape[4]), e.kv_dtype)
        ops.copy_slots(self.buf_key, self.ctx_key, 0, 0, c0)
        ops.copy_slots(self.buf_value, self.ctx_value, 0, 0, c0)
        self.cap = cap
        self.buf_mask = np.zeros((self.batch, cap), np.int64)
        self.buf_mask[:, :c0] = self.ctx_mask
        self.used = c0
        self.cur = np.asarray(lp)  # (B, vocab)
        self.first = np.full((self.batch, len(e.first_ids)), -np.inf, np.float32)
        self.finished = np.zeros(self.batch, bool)
        self.n_rationale = np.zeros(self.batch, np.int64)

    def _think_step(self, tok: np.ndarray) -> np.ndarray:
        e, ops = self.e, self.ops
        upto = self.cap if e.static else self.used
        key = self.buf_key if upto == self.cap else ops.prefix(self.buf_key, upto)  # (layers, B, Hkv, upto, D)
        value = self.buf_value if upto == self.cap else ops.prefix(self.buf_value, upto)
        lp, nk, nv = e.think(tok, key, value, self.buf_mask[:, :upto], device=True)  # (B, vocab) host; KV device
        ops.copy_slots(self.buf_key, nk, self.used, 0, 1)
        ops.copy_slots(self.buf_value, nv, self.used, 0, 1)
        return lp

    def _close_context(self) -> None:
        end = self.cap if self.e.static else self.used
        ops = self.ops
        self.ctx_key = self.buf_key if end == self.cap else ops.prefix(self.buf_key, end)
        self.ctx_value = self.buf_value if end == self.cap else ops.prefix(self.buf_value, end)
        self.ctx_mask = self.buf_mask[:, :end]

    def _level(self) -> None:
        e, ops = self.e, self.ops
        if self.level == 0:
            self.dev_ctx_mask = ops.upload(np.ascontiguousarray(self.ctx_mask))  # (B, C) int64, once
            scores = ops.zeros((self.batch, 1), np.float32)
            nodes = ops.zeros((self.batch, 1), np.int32)
            lp = self.first if not isinstance(self.first, np.ndarray) else ops.upload(
                np.ascontiguousarray(self.first[:, None, :], dtype=np.float32))  # (B, 1, V1)
        else:
            t0 = time.perf_counter()
            codes = ops.codes(self.tokens)  # (B, K) int64
            lp, nk, nv = e.decode(codes, self.level - 1, self.ctx_key, self.ctx_value, self.dev_ctx_mask,
                                  self.beam_key, self.beam_value, device=True)  # (B, K, V); (layers, B, Hkv, K, 1, D)
            ops.copy_slots(self.beam_key, nk, self.level - 1, 0, 1)
            ops.copy_slots(self.beam_value, nv, self.level - 1, 0, 1)
            self.timings.decode += time.perf_counter() - t0
            scores, nodes = self.scores, self.nodes
        t0 = time.perf_counter()
        top = ops.topk(self.dev_trie, scores, lp, nodes, self.k, self.dev_mask, self.dev_rows)  # (B, K) each
        self.timings.topk += time.perf_counter() - t0
        if self.level == 0:
            shape = (e.layers, self.batch, e.kv_heads, self.k, e.levels - 1, e.head_dim)
            self.beam_key, self.beam_value = ops.zeros(shape, e.kv_dtype), ops.zeros(shape, e.kv_dtype)
        elif self.level + 1 < e.levels:  # another decode follows: reorder the beams' own KV
            t0 = time.perf_counter()
            self.beam_key = ops.gather_beams(self.beam_key, top.parent)
            self.beam_value = ops.gather_beams(self.beam_value, top.parent)
            self.timings.decode += time.perf_counter() - t0
        self.tokens, self.nodes, self.scores = top.token, top.node, top.score
        self.level += 1

    def leaves(self) -> tuple[np.ndarray, np.ndarray]:
        """(B,K) leaf trie nodes (-1 = no beam) and (B,K) float32 scores, best first (copied to the host)."""
        return self.ops.download(self.nodes), self.ops.download(self.scores)


def ops_shape(value) -> tuple[int, ...]:
    """Shape of a device value (or a host array)."""
    from pauserec.runtime.device import HostValue, device_view

    if isinstance(value, np.ndarray):
        return value.shape
    if isinstance(value, HostValue):
        return value.array.shape
    view = device_view(value)
    if view is not None:
        return view.shape
    return tuple(value.shape())  # a CPU OrtValue

