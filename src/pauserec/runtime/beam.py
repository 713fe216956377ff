"""Trie-constrained beam search over an engine's graphs, one batch of users at a time.

    search = beam_search(engine, history_ids, history_mask, beams=K)  # host loop, or DeviceBeamSearch
    while not search.done:
        search.step()
    nodes, scores = search.leaves()

Steps: prefill once (context KV shared by the user's beams); cot only: greedy rationale tokens, one
think step per call, ``</think>`` forced at ``max_rationale``; then one step per SID level: the
trie-masked top-k over the level's log-probs, then (below the last level) one decode call. Beam
reordering gathers the beams' own KV (a few SID positions) and never touches the context.

Item filters: ``node_mask`` (M, N) uint8 + ``mask_row`` (B,) int32 go to the trie-masked top-k at
every level, so a beam never enters a trie node without an allowed item below it (semantics in
:func:`pauserec.runtime.trie_topk.trie_topk_numpy`; masks from ``Trie.node_mask``).

Scores: the sum over levels of the chosen SID tokens' log-probs under the engine's scoring rule:
``full`` (log_softmax over the vocabulary, as HF ``generate``) or ``sid`` (over the level's codes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np

from pauserec.runtime.trie_topk import trie_topk


def beam_search(engine, history_ids: np.ndarray, history_mask: np.ndarray, beams: int, impl: str = "auto",
                node_mask: np.ndarray | None = None, mask_row: np.ndarray | None = None) -> BeamSearch:
    """The search for one batch: device-resident (``DeviceBeamSearch``) when the engine's graphs run on a
    GPU that the CUDA top-k can use and ``impl`` is auto or cuda; else the host loop below."""
    ops = engine.device_ops() if impl in ("auto", "cuda") else None
    if ops is None:
        return BeamSearch(engine, history_ids, history_mask, beams, impl, node_mask, mask_row)
    from pauserec.runtime.device_search import DeviceBeamSearch

    return DeviceBeamSearch(engine, history_ids, history_mask, beams, ops, node_mask, mask_row)


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


class BeamSearch:
    """One batch: ``history_ids``/``history_mask`` (B,T) int64, right-padded; ``beams`` = K; optional
    item filter ``node_mask`` (M, N) uint8 with ``mask_row`` (B,) int32 (-1 = unfiltered row)."""

    def __init__(self, engine, history_ids: np.ndarray, history_mask: np.ndarray, beams: int, impl: str = "auto",
                 node_mask: np.ndarray | None = None, mask_row: np.ndarray | None = None):
        self.e, self.k, self.impl = engine, int(beams), impl
        self.node_mask = None if node_mask is None else np.ascontiguousarray(node_mask, dtype=np.uint8)  # (M, N)
        self.mask_row = None if mask_row is None else np.ascontiguousarray(mask_row, dtype=np.int32)  # (B,)
        self.ids = np.ascontiguousarray(history_ids, dtype=np.int64)
        self.mask = np.ascontiguousarray(history_mask, dtype=np.int64)
        self.batch = self.ids.shape[0]
        self.trie = engine.catalog.trie
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
            self.done = self.level == self.e.levels

    def leaves(self) -> tuple[np.ndarray, np.ndarray]:
        """(B,K) leaf trie nodes (-1 = no beam) and (B,K) float32 scores, best first."""
        return self.nodes, self.scores

    # -- phases -------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        t0 = time.perf_counter()
        lp, self.ctx_key, self.ctx_value = self.e.prefill(self.ids, self.mask)  # (B, V1|vocab), (layers,B,Hkv,C,D)
        self.ctx_mask = np.concatenate([self.mask, np.ones((self.batch, self.e.suffix_len), np.int64)], axis=1)
        if self.e.kind == "cot":
            self._open_context(lp)
        else:
            self.first = lp  # (B, V1)
        self.timings.prefill += time.perf_counter() - t0

    def _open_context(self, lp: np.ndarray) -> None:
        """cot: a context buffer with room for the rationale and ``</think>`` (masked until written)."""
        e = self.e
        key, value = e.to_numpy(self.ctx_key), e.to_numpy(self.ctx_value)
        c0 = key.shape[3]
        cap = c0 + e.prompt.max_rationale + 1
        shape = (*key.shape[:3], cap, key.shape[4])
        self.buf_key, self.buf_value = np.zeros(shape, key.dtype), np.zeros(shape, value.dtype)
        self.buf_key[:, :, :, :c0], self.buf_value[:, :, :, :c0] = key, value
        self.buf_mask = np.zeros((self.batch, cap), np.int64)
        self.buf_mask[:, :c0] = self.ctx_mask
        self.used = c0
        self.cur = lp  # (B, vocab): distribution of the next rationale token
        self.first = np.full((self.batch, len(e.first_ids)), -np.inf, np.float32)
        self.finished = np.zeros(self.batch, bool)
        self.n_rationale = np.zeros(self.batch, np.int64)

    def _think(self) -> None:
        """One greedy rationale token per unfinished user; ``</think>`` ends a user's rationale."""
        t0 = time.perf_counter()
        spec = self.e.prompt
        tok = np.argmax(self.cur, axis=1).astype(np.int64)  # (B,)
        tok[self.n_rationale >= spec.max_rationale] = spec.think_end_id
        tok[self.finished] = spec.pad_id
        lp = self._think_step(tok)  # (B, vocab)
        self._record_rationale(tok, lp)
        self.timings.rationale += time.perf_counter() - t0

    def _think_step(self, tok: np.ndarray) -> np.ndarray:
        """Runs the think graph on the context so far; writes its KV into slot ``used``; (B, vocab) log-probs."""
        e = self.e
        # The whole preallocated buffer, always: a prefix slice of it is not contiguous, and ONNX Runtime
        # would copy the whole context per rationale token. Unwritten slots are masked (exactly 0 weight),
        # and the graph takes positions from the mask, so the result is the same.
        lp, nk, nv = e.think(tok, self.buf_key, self.buf_value, self.buf_mask)
        self.buf_key[:, :, :, self.used], self.buf_value[:, :, :, self.used] = nk[:, :, :, 0], nv[:, :, :, 0]
        return lp

    def _record_rationale(self, tok: np.ndarray, lp: np.ndarray) -> None:
        e, spec = self.e, self.e.prompt
        active = ~self.finished
        self.buf_mask[:, self.used] = active
        self.used += 1
        ends = active & (tok == spec.think_end_id)
        first = lp[ends][:, e.first_ids]  # (n, V1) full-vocabulary log-probs of level 1's codes
        self.first[ends] = renormalize(first) if e.scoring == "sid" else first
        for b in np.flatnonzero(active & ~ends):
            self.rationales[b].append(int(tok[b]))
        self.n_rationale += active & ~ends
        self.finished |= ends
        self.cur = lp

    def _close_context(self) -> None:
        end = self.buf_key.shape[3] if self.e.static else self.used
        self.ctx_key, self.ctx_value = self.buf_key[:, :, :, :end], self.buf_value[:, :, :, :end]
        self.ctx_mask = self.buf_mask[:, :end]
        if not self.e.static:
            self.ctx_key, self.ctx_value = np.ascontiguousarray(self.ctx_key), np.ascontiguousarray(self.ctx_value)

    def _level(self) -> None:
        e, t = self.e, self.trie
        if self.level == 0:
            scores = np.zeros((self.batch, 1), np.float32)
            nodes = np.zeros((self.batch, 1), np.int32)
            lp = np.ascontiguousarray(self.first[:, None, :], dtype=np.float32)  # (B, 1, V1)
        else:
            t0 = time.perf_counter()
            codes = np.maximum(self.tokens, 0).astype(np.int64)  # (B, K); dead beams feed code 0
            lp, nk, nv = e.decode(codes, self.level - 1, self.ctx_key, self.ctx_value, self.ctx_mask,
                                  self.beam_key, self.beam_value)  # (B, K, V), slot level-1 of the beam KV
            self.beam_key[:, :, :, :, self.level - 1] = nk[:, :, :, :, 0]
            self.beam_value[:, :, :, :, self.level - 1] = nv[:, :, :, :, 0]
            self.timings.decode += time.perf_counter() - t0
            scores, nodes = self.scores, self.nodes
        t0 = time.perf_counter()
        top = trie_topk(scores, lp, nodes, t.offsets, t.tokens, t.children, self.k, impl=self.impl,
                        node_mask=self.node_mask, mask_row=self.mask_row)
        self.timings.topk += time.perf_counter() - t0
        if self.level == 0:
            shape = (e.layers, self.batch, e.kv_heads, self.k, e.levels - 1, e.head_dim)
            self.beam_key, self.beam_value = np.zeros(shape, e.kv_dtype), np.zeros(shape, e.kv_dtype)
        elif self.level + 1 < e.levels:  # another decode follows: reorder the beams' own KV
            t0 = time.perf_counter()
            parent = np.maximum(top.parent, 0)[None, :, None, :, None, None]  # (1, B, 1, K, 1, 1)
            self.beam_key = np.take_along_axis(self.beam_key, parent, axis=3)  # only the beams' own KV moves
            self.beam_value = np.take_along_axis(self.beam_value, parent, axis=3)
            self.timings.decode += time.perf_counter() - t0
        self.tokens, self.nodes, self.scores = top.token, top.node, top.score
        self.level += 1
