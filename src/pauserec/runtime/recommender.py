"""Histories of external item ids in, top-N items out: ``Recommender(engine).recommend(histories)``.

Each history is truncated to the engine's ``max_history`` most recent items and turned into SID
token ids through the catalog (no text tokenizer). Users are sorted by history length and run in
batches of similar length (less padding); results come back in input order. After the last SID
level each leaf's SID expands to its items (collision groups in the trie's stable order).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pauserec.errors import DataError, EngineError
from pauserec.runtime.beam import BeamSearch, Timings

DEFAULT_BATCH = 32


@dataclass
class Recommendations:
    """Top-k per user; padding: "" / -1 / -inf / -1."""

    items: np.ndarray  # (B, k) fixed-width unicode external item ids
    item_index: np.ndarray  # (B, k) int32 dense item indices
    scores: np.ndarray  # (B, k) float32 summed SID log-probs
    sids: np.ndarray  # (B, k, L) int32 SID codes
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill, rationale, decode, topk, total

    def __len__(self) -> int:
        return len(self.items)


class Recommender:
    """Batch recommendation over a loaded ``Engine``; ``impl`` picks the trie top-k implementation."""

    def __init__(self, engine, impl: str = "auto", batch_size: int | None = None) -> None:
        self.engine, self.impl = engine, impl
        self.catalog = engine.catalog
        self.batch_size = int(engine.static_batch or batch_size or DEFAULT_BATCH)
        spec = engine.prompt
        table = spec.sid_table()  # (L, maxV)
        codes = self.catalog.sids.astype(np.int64)  # (n_items, L)
        tokens = table[np.arange(spec.levels)[None, :], codes]  # (n_items, L)
        sep = np.full((len(codes), 1), spec.item_sep_id, np.int64)
        self.item_tokens = np.concatenate([tokens, sep], axis=1)  # (n_items, L + 1)
        self.id_dtype = np.array(self.catalog.item_ids).dtype  # fixed-width unicode of the longest id

    # -- input checks ---------------------------------------------------------------------------
    def validate_history(self, history) -> str | None:
        """Why ``history`` cannot be recommended for (None when it can)."""
        if isinstance(history, str | bytes) or not isinstance(history, Sequence | np.ndarray):
            return "history must be a list of item ids"
        if len(history) == 0:
            return "empty history"
        index = self.catalog
        unknown = []
        for x in history:
            try:
                index.index_of(x)
            except DataError:
                unknown.append(str(x))
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            return f"unknown item ids: {shown}"
        return None

    def encode(self, histories: Sequence) -> list[np.ndarray]:
        """Dense item indices of each history (last max_history items); DataError naming user and item."""
        out = []
        for i, h in enumerate(histories):
            reason = self.validate_history(h)
            if reason:
                raise DataError(f"user {i}: {reason}")
            out.append(np.fromiter((self.catalog.index_of(x) for x in h[-self.engine.max_history:]), np.int64))
        return out

    # -- recommending ---------------------------------------------------------------------------
    def recommend(self, histories: Sequence, k: int = 10, beams: int = 20) -> Recommendations:
        """Top-``k`` items for each history (a list of external item ids, str or int)."""
        t0 = time.perf_counter()
        k, beams = self._check_sizes(k, beams)
        dense = self.encode(histories)
        n, levels = len(dense), self.engine.levels
        res = Recommendations(
            items=np.full((n, k), "", dtype=self.id_dtype),
            item_index=np.full((n, k), -1, np.int32),
            scores=np.full((n, k), -np.inf, np.float32),
            sids=np.full((n, k, levels), -1, np.int32),
        )
        timings = Timings()
        order = np.argsort([len(d) for d in dense], kind="stable")  # bucket by history length
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            nodes, scores = self._search([dense[r] for r in rows], beams, timings)
            self._fill(res, rows, nodes, scores, k)
        res.timings = {**timings.as_dict(), "total": time.perf_counter() - t0, "users": float(n)}
        return res

    def iter_recommend(self, histories: Iterable, k: int = 10, beams: int = 20,
                       batch_size: int | None = None) -> Iterator[Recommendations]:
        """Stream form: one ``Recommendations`` per ``batch_size`` consecutive histories, in input order."""
        size = int(batch_size or self.batch_size)
        chunk: list = []
        for h in histories:
            chunk.append(h)
            if len(chunk) == size:
                yield self.recommend(chunk, k=k, beams=beams)
                chunk = []
        if chunk:
            yield self.recommend(chunk, k=k, beams=beams)

    # -- internals ------------------------------------------------------------------------------
    def _check_sizes(self, k: int, beams: int) -> tuple[int, int]:
        k, beams = int(k), int(beams)
        if k < 1 or beams < 1:
            raise DataError(f"k and beams must be >= 1 (got k={k}, beams={beams})")
        e = self.engine
        if e.static and beams != e.static_beams:
            raise EngineError(f"{e.path} is a static engine exported with --beams {e.static_beams}: call with "
                              f"beams={e.static_beams}, or export a dynamic engine for other beam widths")
        return k, beams

    def _search(self, dense: list[np.ndarray], beams: int, timings: Timings) -> tuple[np.ndarray, np.ndarray]:
        """Pad one bucket to (B,T) ids + mask, run the beam search, return leaves + scores of its rows."""
        e = self.engine
        rows = len(dense)
        batch = e.static_batch or rows
        width = self.item_tokens.shape[1]
        t = e.static_hist or width * max(len(d) for d in dense)
        ids = np.full((batch, t), e.prompt.pad_id, np.int64)
        mask = np.zeros((batch, t), np.int64)
        for b in range(batch):
            toks = self.item_tokens[dense[b % rows]].reshape(-1)  # padding rows repeat real ones
            ids[b, : len(toks)], mask[b, : len(toks)] = toks, 1
        search = BeamSearch(e, ids, mask, beams=beams, impl=self.impl)
        while not search.done:
            search.step()
        timings.add(search.timings)
        nodes, scores = search.leaves()
        return nodes[:rows], scores[:rows]

    def _fill(self, res: Recommendations, rows: np.ndarray, nodes: np.ndarray, scores: np.ndarray, k: int) -> None:
        """Leaves -> SIDs -> items (collision groups expanded), best beam first, first k kept."""
        trie = self.catalog.trie
        leaf0 = int(trie.level_starts[trie.levels])
        offs, items_of = trie.sid_item_offsets, trie.sid_items
        ids = self.catalog.item_ids
        for r, row_nodes, row_scores in zip(rows, nodes, scores):
            col = 0
            for node, score in zip(row_nodes, row_scores):
                if node < 0 or col >= k:
                    break
                s = int(node) - leaf0
                group = items_of[offs[s] : offs[s + 1]][: k - col]
                n = len(group)
                res.item_index[r, col : col + n] = group
                res.items[r, col : col + n] = [ids[i] for i in group]
                res.scores[r, col : col + n] = score
                res.sids[r, col : col + n] = trie.sid_codes[s]
                col += n
