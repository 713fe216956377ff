"""Trie-constrained beam search over an engine's graphs, one batch of users at a time.

    search = beam_search(engine, history_ids, history_mask, beams=K)
    while not search.done:
        search.step()
    nodes, scores = search.leaves()

Steps: prefill once (context KV shared by the user's beams); cot only: greedy rationale tokens, one
think step per call, ``</think>`` forced at ``max_rationale``, then the text the pipeline forces after it
(``PromptSpec.rationale_end``), one token per call; then one step per SID level: the
trie-masked top-k over the level's log-probs, then (below the last level) one decode call. Beam
reordering gathers the beams' own KV (a few SID positions) and never touches the context.

One loop, wherever the tensors live. The steps between graph calls (top-k against the trie, writing a
new KV slot, reordering the beams' KV, turning tokens into codes) are done by ``ops``:

* ``ArrayOps`` (host memory, NumPy arrays, the trie top-k of the native shim): the graphs return host
  arrays;
* :class:`pauserec.runtime.device.CudaOps` (GPU memory): the graphs keep their outputs on the device
  (ONNX Runtime IO binding, TensorRT buffers) and only the (B, K) leaves (and, for cot, the rationale's
  log-probs, decided on the host) cross to the host. :class:`~pauserec.runtime.device.HostOps` runs
  that path on the CPU for tests.

Item filters: ``node_mask`` (M, N) uint8 + ``mask_row`` (B,) int32 go to the trie-masked top-k at
every level, so a beam never enters a trie node without an allowed item below it (semantics in
:func:`pauserec.runtime.trie_topk.trie_topk_numpy`; masks from ``Trie.node_mask``).

Scores: the sum over levels of the chosen SID tokens' log-probs under the engine's scoring rule:
``full`` (log_softmax over the vocabulary, as HF ``generate``) or ``sid`` (over the level's codes).
Where the pipeline's own ``generate`` scores tokens after the SID (``PromptSpec.after_ids``: MiniOneRec's
``"\n"`` and EOS), the search takes one more level per such token, over a trie whose every node has one
child, itself (``after_trie``): each beam gains that token's log-prob, the beams are re-ranked with the
same top-k (ties: the lower beam first), and each still ends on its SID's leaf.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from pauserec.runtime.trie_topk import TopK, trie_topk


def beam_search(engine, history_ids: np.ndarray, history_mask: np.ndarray, beams: int, impl: str = "auto",
                node_mask: np.ndarray | None = None, mask_row: np.ndarray | None = None) -> BeamSearch:
    """The search for one batch: with the engine's device steps when its graphs run on a GPU that the CUDA
    top-k can use and ``impl`` is auto or cuda; else on host arrays with the ``impl`` top-k."""
    ops = engine.device_ops() if impl in ("auto", "cuda") else None
    return BeamSearch(engine, history_ids, history_mask, beams, impl, node_mask, mask_row, ops=ops)


def after_trie(n_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, tokens, children) of the levels after the SID: every node's only child is itself, code 0."""
    return (np.arange(n_nodes + 1, dtype=np.int32), np.zeros(n_nodes, np.int32), np.arange(n_nodes, dtype=np.int32))


def renormalize(logprobs: np.ndarray) -> np.ndarray:
    """Log-probs of a subset of tokens (..., n) renormalised over that subset: the ``sid`` rule, the same
    as a log-softmax over those tokens' logits only."""
    peak = logprobs.max(axis=-1, keepdims=True)
    return logprobs - (peak + np.log(np.exp(logprobs - peak).sum(axis=-1, keepdims=True)))


@dataclass
class Timings:
    """Seconds per phase (summed over batches)."""

    prefill: float = 0.0
    rationale: float = 0.0
    decode: float = 0.0
    topk: float = 0.0

    def add(self, other: Timings) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ArrayOps:
    """The steps between graph calls on host NumPy arrays; ``impl`` picks the trie top-k (see trie_topk)."""

    resident = False  # the graphs return host arrays
    slices = False  # think steps read the whole context buffer (a prefix slice is not contiguous: ORT would copy it)

    def __init__(self, impl: str = "auto", to_numpy=np.asarray) -> None:
        self.impl, self.to_numpy = impl, to_numpy

    def own(self, value) -> np.ndarray:
        """A graph output as a host array (a GPU backend keeps the context KV on the device)."""
        return value if isinstance(value, np.ndarray) else self.to_numpy(value)

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def upload(self, array) -> np.ndarray:
        return np.ascontiguousarray(array)

    def download(self, value) -> np.ndarray:
        return value

    def shape(self, value) -> tuple[int, ...]:
        return value.shape

    def trie(self, offsets, tokens, children):
        return offsets, tokens, children

    def topk(self, trie, scores, logprobs, nodes, k: int, node_mask=None, mask_row=None) -> TopK:
        lp = logprobs.reshape(*scores.shape, -1)  # (B, K_in, V)
        return trie_topk(scores, lp, nodes, *trie, k, impl=self.impl, node_mask=node_mask, mask_row=mask_row)

    def copy_slots(self, dst, src, dst_at: int, src_at: int, n: int) -> None:
        dst[..., dst_at: dst_at + n, :] = src[..., src_at: src_at + n, :]

    def prefix(self, src, n: int) -> np.ndarray:
        return np.ascontiguousarray(src[..., :n, :])

    def gather_beams(self, src, parent) -> np.ndarray:
        """(L, B, H, K, ...) beams reordered by parent (B, K) in place, one layer at a time: only one layer's
        copy exists at once (a whole second copy is 120 MB at batch 8 on a 32-head 7B model)."""
        p = np.maximum(parent, 0)[:, None, :]  # (B, 1, K)
        p = p.reshape(*p.shape, *([1] * (src.ndim - 4)))
        for layer in src:  # (B, H, K, ...) views
            layer[...] = np.take_along_axis(layer, p, axis=2)
        return src

    def codes(self, tokens) -> np.ndarray:
        return np.maximum(tokens, 0).astype(np.int64)  # dead beams feed code 0


class BeamSearch:
    """One batch: ``history_ids``/``history_mask`` (B,T) int64, right-padded; ``beams`` = K; optional
    item filter ``node_mask`` (M, N) uint8 with ``mask_row`` (B,) int32 (-1 = unfiltered row); ``ops``: where
    the steps between graph calls run (default: host arrays with the ``impl`` top-k)."""

    def __init__(self, engine, history_ids: np.ndarray, history_mask: np.ndarray, beams: int, impl: str = "auto",
                 node_mask: np.ndarray | None = None, mask_row: np.ndarray | None = None, ops=None):
        self.e, self.k, self.impl = engine, int(beams), impl
        self.ops = ops if ops is not None else ArrayOps(impl, engine.to_numpy)
        self.node_mask = None if node_mask is None else np.ascontiguousarray(node_mask, dtype=np.uint8)  # (M, N)
        self.mask_row = None if mask_row is None else np.ascontiguousarray(mask_row, dtype=np.int32)  # (B,)
        self.ids = np.ascontiguousarray(history_ids, dtype=np.int64)
        self.mask = np.ascontiguousarray(history_mask, dtype=np.int64)
        self.batch = self.ids.shape[0]
        self.trie = engine.catalog.trie
        t = self.trie
        self.dev_trie = self.ops.trie(t.offsets, t.tokens, t.children)  # resident for the whole search
        self.dev_after = self.ops.trie(*after_trie(len(t.offsets) - 1)) if engine.after else None
        self.dev_mask = None if self.node_mask is None else self.ops.upload(self.node_mask)  # (M, N)
        self.dev_rows = None if self.mask_row is None else self.ops.upload(self.mask_row)  # (B,)
        self.timings = Timings()
        self.phase = "prefill"
        self.level = 0  # SID levels selected so far
        self.done = False
        self.rationales: list[list[int]] = [[] for _ in range(self.batch)]

    # -- the loop body ------------------------------------------------------------------------------
    def step(self) -> None:
        if self.phase == "prefill":
            self._prefill()
            self.phase = "think" if self.e.kind == "cot" else "levels"
        elif self.phase == "think":
            self._think()
            if self.finished.all():
                self._close_context()
                self.phase = "levels"
        else:
            self._level()
            self.done = self.level == self.e.steps

    def leaves(self) -> tuple[np.ndarray, np.ndarray]:
        """(B,K) leaf trie nodes (-1 = no beam) and (B,K) float32 scores, best first (on the host)."""
        return self.ops.download(self.nodes), self.ops.download(self.scores)

    # -- phases -------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        t0 = time.perf_counter()
        e = self.e
        resident = self.ops.resident and e.kind != "cot"  # cot: the rationale's argmax is on the host
        lp, self.ctx_key, self.ctx_value = e.prefill(self.ids, self.mask, device=resident)  # (B, V1|vocab), KV
        self.ctx_mask = np.concatenate([self.mask, np.ones((self.batch, e.suffix_len), np.int64)], axis=1)
        if e.kind == "cot":
            self._open_context(lp)
        else:
            self.first = lp  # (B, V1)
        self.timings.prefill += time.perf_counter() - t0

    def _open_context(self, lp: np.ndarray) -> None:
        """cot: a context buffer with room for the rationale and ``</think>`` (masked until written)."""
        e, ops = self.e, self.ops
        key, value = ops.own(self.ctx_key), ops.own(self.ctx_value)
        shape = ops.shape(key)  # (layers, B, Hkv, C0, D)
        c0 = shape[3]
        self.cap = c0 + e.prompt.max_rationale + len(e.prompt.rationale_end)
        self.buf_key = ops.zeros((*shape[:3], self.cap, shape[4]), e.kv_dtype)
        self.buf_value = ops.zeros((*shape[:3], self.cap, shape[4]), e.kv_dtype)
        ops.copy_slots(self.buf_key, key, 0, 0, c0)
        ops.copy_slots(self.buf_value, value, 0, 0, c0)
        self.buf_mask = np.zeros((self.batch, self.cap), np.int64)
        self.buf_mask[:, :c0] = self.ctx_mask
        self.used = c0
        self.cur = np.asarray(lp)  # (B, vocab): distribution of the next rationale token
        self.first = np.full((self.batch, len(e.first_ids)), -np.inf, np.float32)
        self.finished = np.zeros(self.batch, bool)
        self.n_rationale = np.zeros(self.batch, np.int64)
        self.closed = np.zeros(self.batch, np.int64)  # rationale_end tokens fed so far (0: still reasoning)

    def _think(self) -> None:
        """One token per unfinished user: its greedy rationale token, or the next of ``rationale_end`` once its
        rationale has ended (``</think>``, the model's own or forced at ``max_rationale``)."""
        t0 = time.perf_counter()
        spec = self.e.prompt
        end = np.asarray(spec.rationale_end, np.int64)
        tok = np.argmax(self.cur, axis=1).astype(np.int64)  # (B,)
        tok[(self.n_rationale >= spec.max_rationale) & (self.closed == 0)] = spec.think_end_id
        closing = self.closed > 0
        tok[closing] = end[np.minimum(self.closed[closing], len(end) - 1)]
        tok[self.finished] = spec.pad_id
        lp = self._think_step(tok)  # (B, vocab)
        self._record_rationale(tok, lp)
        self.timings.rationale += time.perf_counter() - t0

    def _think_step(self, tok: np.ndarray) -> np.ndarray:
        """Runs the think graph on the context so far; writes its KV into slot ``used``; (B, vocab) log-probs.
        Unwritten slots are masked (exactly 0 weight) and the graph takes positions from the mask, so reading
        the whole buffer (host arrays) or only its written prefix (device views) gives the same result."""
        e, ops = self.e, self.ops
        upto = self.cap if e.static or not ops.slices else self.used
        key = self.buf_key if upto == self.cap else ops.prefix(self.buf_key, upto)  # (layers, B, Hkv, upto, D)
        value = self.buf_value if upto == self.cap else ops.prefix(self.buf_value, upto)
        lp, nk, nv = e.think(tok, key, value, self.buf_mask[:, :upto], device=ops.resident)  # (B, vocab) on the host
        ops.copy_slots(self.buf_key, nk, self.used, 0, 1)
        ops.copy_slots(self.buf_value, nv, self.used, 0, 1)
        return lp

    def _record_rationale(self, tok: np.ndarray, lp: np.ndarray) -> None:
        e, spec = self.e, self.e.prompt
        active = ~self.finished
        self.buf_mask[:, self.used] = active
        self.used += 1
        reasoning = active & (self.closed == 0)
        rationale = reasoning & (tok != spec.think_end_id)  # (B,) a rationale token was fed
        self.closed += active & ~rationale  # </think> or the forced text after it was fed
        ends = active & (self.closed == len(spec.rationale_end))
        first = lp[ends][:, e.first_ids]  # (n, V1) full-vocabulary log-probs of level 1's codes
        self.first[ends] = renormalize(first) if e.scoring == "sid" else first
        for b in np.flatnonzero(rationale):
            self.rationales[b].append(int(tok[b]))
        self.n_rationale += rationale
        self.finished |= ends
        self.cur = lp

    def _close_context(self) -> None:
        # host arrays: the SID levels read the whole buffer, as the think steps did, so a user's context has the
        # same width whatever the other users' rationale lengths (batch-invariant sums); device views: what was used
        end = self.cap if self.e.static or not self.ops.slices else self.used
        ops = self.ops
        self.ctx_key = self.buf_key if end == self.cap else ops.prefix(self.buf_key, end)
        self.ctx_value = self.buf_value if end == self.cap else ops.prefix(self.buf_value, end)
        self.ctx_mask = self.buf_mask[:, :end]

    def _level(self) -> None:
        e, ops = self.e, self.ops
        if self.level == 0:
            self.level_mask = ops.upload(np.ascontiguousarray(self.ctx_mask))  # (B, C) int64, once
            scores, nodes = ops.zeros((self.batch, 1), np.float32), ops.zeros((self.batch, 1), np.int32)
            lp = self.first if not isinstance(self.first, np.ndarray) else ops.upload(
                np.ascontiguousarray(self.first[:, None, :], dtype=np.float32))  # (B, 1, V1)
        else:
            t0 = time.perf_counter()
            codes = ops.codes(self.tokens)  # (B, K) int64
            lp, nk, nv = e.decode(codes, self.level - 1, self.ctx_key, self.ctx_value, self.level_mask,
                                  self.beam_key, self.beam_value, device=ops.resident)  # (B, K, V); new KV slot
            ops.copy_slots(self.beam_key, nk, self.level - 1, 0, 1)  # slot level-1 of (layers, B, Hkv, K, L-1, D)
            ops.copy_slots(self.beam_value, nv, self.level - 1, 0, 1)
            self.timings.decode += time.perf_counter() - t0
            scores, nodes = self.scores, self.nodes
        t0 = time.perf_counter()
        trie = self.dev_trie if self.level < e.levels else self.dev_after  # past the SID: each beam's one token
        top = ops.topk(trie, scores, lp, nodes, self.k, self.dev_mask, self.dev_rows)  # (B, K) each
        self.timings.topk += time.perf_counter() - t0
        if self.level == 0:
            shape = (e.layers, self.batch, e.kv_heads, self.k, e.steps - 1, e.kv_width)
            self.beam_key, self.beam_value = ops.zeros(shape, e.kv_dtype), ops.zeros(shape, e.kv_dtype)
        elif self.level + 1 < e.steps:  # another decode follows: reorder the beams' own KV
            t0 = time.perf_counter()
            self.beam_key = ops.gather_beams(self.beam_key, top.parent)  # only the beams' own KV moves
            self.beam_value = ops.gather_beams(self.beam_value, top.parent)
            self.timings.decode += time.perf_counter() - t0
        self.tokens, self.nodes, self.scores = top.token, top.node, top.score
        self.level += 1
