"""Histories of external item ids in, top-N items out: ``Recommender(engine).recommend(histories)``.

Each history is truncated to the engine's ``max_history`` most recent items and turned into prompt
ids by the engine's ``PromptEncoder`` (:mod:`pauserec.prompt.spec`): SID token ids through the catalog
(``ids`` assembly, no text tokenizer), or the layout's text tokenised with the checkpoint's tokenizer
(``text`` assembly), the oldest items dropped until the history fits its token budget
(``Recommendations.kept``: the items each user's prompt kept). Users are sorted by history length and run in
batches of similar length (less padding), each call's KV within ``kv_memory``; results come back in input order.
After the last SID level each leaf's SID expands to its items (collision groups in the trie's stable order).

Filters (``exclude``, ``allow``, ``exclude_history``; forms and semantics in
:mod:`pauserec.runtime.filters`) act inside the trie search: the results are the best k allowed
items, as if the trie had been built from each user's allowed items alone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pauserec.errors import DataError, EngineError
from pauserec.runtime import filters as item_filters
from pauserec.runtime.beam import Timings, beam_search
from pauserec.runtime.engine import MANIFEST_FILE, sha256_file
from pauserec.runtime.memory import available_bytes, parse_size

DEFAULT_BATCH = 32
# What one search call holds beyond the loaded engine, per user: its KV cache (``Engine.kv_bytes_per_user``) and the
# graphs' working copies of it. Measured 1.46x the KV (+ 40 MB) at the Llama-2-7B shape, int4, float32 KV, batches of
# 1 and 8; 2 leaves room. ``kv_memory="auto"`` lets a call take this share of the memory the machine has left once
# the engine is loaded.
KV_WORKING_COPIES = 2
AUTO_KV_SHARE = 0.5
# A user's scores must not depend on who shares its batch. The graphs compute each user's rows alone, but the
# length its history is padded to changes the order of the float sums over its context (masked slots shift the
# real ones into other SIMD lanes and tails): ~1e-7 in float32, which the rounding of quantised activations
# amplifies layer after layer (top-10s changed and scores moved by up to 1.0 at the Llama-2-7B shape in int8,
# 0.03 at the Qwen3-0.6B shape). So every history is padded to its own bucket, a multiple of PAD_QUANTUM tokens
# (at most the engine's budget), and a batch holds users of one bucket: alone or in any batch, the same arithmetic.
PAD_QUANTUM = 16


@dataclass
class Recommendations:
    """Top-k per user; padding: "" / -1 / -inf / -1."""

    items: np.ndarray  # (B, k) fixed-width unicode external item ids
    item_index: np.ndarray  # (B, k) int32 dense item indices
    scores: np.ndarray  # (B, k) float32 summed SID log-probs
    sids: np.ndarray  # (B, k, L) int32 SID codes
    # (B,) int32: the most recent history items the engine read for each user (its item and token budgets)
    kept: np.ndarray | None = None
    # seconds: prefill, rationale, decode, topk, total (+ filters: building node masks, when filtered)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)


class Recommender:
    """Batch recommendation over a loaded ``Engine``; ``impl`` picks the trie top-k implementation."""

    def __init__(self, engine, impl: str = "auto", batch_size: int | None = None,
                 kv_memory: int | str | None = "auto") -> None:
        """``batch_size``: users per search call at most. ``kv_memory``: bytes one call's KV cache and its working
        copies may take; a call runs fewer users where theirs would take more (at least one: the results are the
        same in any batch; ``check_request`` refuses a set limit that cannot hold one user). "auto": half the host
        memory available once the engine is loaded (cgroup limits included); None: no limit; a number or a size
        ("2GB"). It matters at 7-8B, whose float32 KV is ~0.05-0.15 GB a user (beam 20)."""
        self.engine, self.impl = engine, impl
        self.catalog = engine.catalog
        self.batch_size = int(engine.static_batch or batch_size or DEFAULT_BATCH)
        self.kv_memory_set = kv_memory not in ("auto", None)
        if kv_memory == "auto" and not getattr(engine, "batch_invariant", True):
            self.kv_memory = None  # its scores follow the call's users: calls sized by free memory would vary them
        elif kv_memory == "auto":
            free = available_bytes()
            self.kv_memory = int(free * AUTO_KV_SHARE) if free else None
        else:
            self.kv_memory = None if kv_memory is None else parse_size(kv_memory)
        self.encoder = engine.encoder  # histories -> the history ids of the engine's prompt
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

    def validate_filter(self, ids, what: str = "exclude") -> str | None:
        """Why ``ids`` cannot be one user's ``what`` ("exclude" / "allow") filter (None when it can)."""
        return item_filters.filter_reason(self.catalog, ids, what)

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
    def recommend(self, histories: Sequence, k: int = 10, beams: int = 20, exclude=None, allow=None,
                  exclude_history: bool = False) -> Recommendations:
        """Top-``k`` items for each history (a list of external item ids, str or int).

        ``exclude`` / ``allow``: item ids the users must not / may only get; one collection for every
        user, or a list with one entry (None or a collection) per user. ``exclude_history``: never
        return an item of the user's own history. A user left with fewer than k items gets padding.
        """
        t0 = time.perf_counter()
        k, beams = self._check_sizes(k, beams)
        dense = self.encode(histories)
        own = [self.catalog.indices_of(h)[0] for h in histories] if exclude_history else None
        filters = item_filters.resolve(self.catalog, len(dense), exclude, allow, own)
        n, levels = len(dense), self.engine.levels
        res = Recommendations(
            items=np.full((n, k), "", dtype=self.id_dtype),
            item_index=np.full((n, k), -1, np.int32),
            scores=np.full((n, k), -np.inf, np.float32),
            sids=np.full((n, k, levels), -1, np.int32),
            kept=np.zeros(n, np.int32),
        )
        timings, masking, calls = Timings(), 0.0, 0
        hist, res.kept[:] = self.encoder.many_kept(dense)  # each user's history ids, within the engine's budget
        for calls, (rows, width) in enumerate(self._batches(hist, beams), 1):
            t1 = time.perf_counter()
            node_mask, mask_row = filters.masks(self.catalog.trie, rows) if filters else (None, None)
            masking += time.perf_counter() - t1
            nodes, scores = self._search([hist[r] for r in rows], width, beams, timings, node_mask, mask_row)
            self._fill(res, rows, nodes, scores, k, filters)
        res.timings = {**timings.as_dict(), **({"filters": masking} if filters else {}),
                       "total": time.perf_counter() - t0, "users": float(n), "calls": float(calls)}
        return res

    def iter_recommend(self, histories: Iterable, k: int = 10, beams: int = 20, batch_size: int | None = None,
                       exclude=None, allow=None, exclude_history: bool = False) -> Iterator[Recommendations]:
        """Stream form: one ``Recommendations`` per ``batch_size`` consecutive histories, in input order.

        Filters as in :meth:`recommend`: one collection for every user, or a per-user list aligned
        with ``histories`` (one entry, None or a collection of item ids, per history).
        """
        size = int(batch_size or self.batch_size)
        specs = {"exclude": item_filters.streamable(exclude, "exclude"), "allow": item_filters.streamable(allow, "allow")}
        chunk: list = []
        seen = 0
        for seen, h in enumerate(histories, 1):
            chunk.append(h)
            if len(chunk) == size:
                yield self._recommend_chunk(chunk, seen - len(chunk), k, beams, specs, exclude_history)
                chunk = []
        if chunk:
            yield self._recommend_chunk(chunk, seen - len(chunk), k, beams, specs, exclude_history)
        for what, (per_user, spec) in specs.items():
            if per_user and len(spec) != seen:
                raise DataError(f"{what} has {len(spec)} per-user entries for {seen} histories; pass one per history")

    def _recommend_chunk(self, chunk: list, first: int, k: int, beams: int, specs: dict,
                         exclude_history: bool) -> Recommendations:
        """recommend() on histories first, first + 1, ... of a stream, with their per-user filter entries."""
        picked = {}
        for what, (per_user, spec) in specs.items():
            if per_user and len(spec) < first + len(chunk):
                raise DataError(f"{what} has {len(spec)} per-user entries, fewer than the histories; "
                                "pass one per history")
            picked[what] = list(spec[first : first + len(chunk)]) if per_user else spec
        return self.recommend(chunk, k=k, beams=beams, exclude_history=exclude_history, **picked)

    # -- what jobs ask of a recommender ---------------------------------------------------------
    @property
    def max_history(self) -> int:
        """Most recent history items the engine reads; longer histories are truncated to these."""
        return int(self.engine.max_history)

    def check_request(self, k: int, beams: int) -> None:
        """Raise before any work when ``k`` / ``beams`` cannot be served by this engine and catalog."""
        k, beams = self._check_sizes(k, beams)
        if k > self.catalog.n_items:
            raise DataError(f"k={k} is more than the {self.catalog.n_items:,} items of the catalog; lower k")
        if self.kv_memory_set and not getattr(self.engine, "batch_invariant", True):
            raise DataError("this engine's scores depend on the users of a call (an int8 engine with per-tensor "
                            "activation scales), so kv_memory would change them: leave it unset, or re-export the "
                            "engine with this pauserec")
        longest = self.padded_length(self.engine.prompt.max_history_tokens)
        need = self.call_bytes(longest, beams)
        if self.kv_memory_set and not self.engine.static and need > self.kv_memory:
            raise DataError(f"kv_memory is {_size(self.kv_memory)}, but one user with the longest history this "
                            f"engine takes ({longest} tokens) needs ~{_size(need)} at beams={beams}: raise it, "
                            "lower beams, or export with --kv-dtype int8 (a quarter of float32's KV)")

    def call_bytes(self, width: int, beams: int, users: int = 1) -> int:
        """Memory a search call of ``users`` users with ``width`` history slots takes beyond the loaded engine:
        their KV and the graphs' working copies of it (``KV_WORKING_COPIES``)."""
        return KV_WORKING_COPIES * users * self.engine.kv_bytes_per_user(beams, width)

    def users_per_call(self, width: int, beams: int) -> int:
        """Users one search call runs at ``width`` history slots: ``batch_size``, fewer where their
        ``call_bytes`` would pass ``kv_memory``, at least one. A static engine runs its own batch."""
        if self.engine.static or self.kv_memory is None:
            return self.batch_size
        return int(max(1, min(self.batch_size, self.kv_memory // max(self.call_bytes(width, beams), 1))))

    def fingerprint(self) -> dict[str, str]:
        """What identifies this engine's results: its manifest (which checksums every file), the catalog, the
        backend that runs it and the onnxruntime version (its fusions round floats differently between versions,
        which moves int8 scores by up to a few 1e-2)."""
        import onnxruntime

        h = hashlib.sha256("\n".join(map(str, self.catalog.item_ids)).encode())
        h.update(np.ascontiguousarray(self.catalog.sids, dtype=np.int32).tobytes())
        return {"manifest_sha256": sha256_file(self.engine.path / MANIFEST_FILE), "catalog_sha256": h.hexdigest(),
                "onnxruntime": onnxruntime.__version__,
                "provider": self.engine.provider}  # CPU and GPU numerics may order near-ties differently

    def sid_text(self, codes: np.ndarray) -> str:
        """SID codes (L,) -> ``<a_1><b_2>...`` in the catalog's token spelling."""
        return "".join(f"<{p}_{int(c)}>" for p, c in zip(self.catalog.token_prefixes, codes))

    # -- internals ------------------------------------------------------------------------------
    def _check_sizes(self, k: int, beams: int) -> tuple[int, int]:
        k, beams = int(k), int(beams)
        if k < 1 or beams < 1:
            raise DataError(f"k and beams must be >= 1 (got k={k}, beams={beams})")
        if k > beams:
            raise DataError(f"k={k} > beams={beams}: a search with {beams} beams names at most {beams} SIDs, so "
                            "users would get padding; pass beams >= k")
        e = self.engine
        if e.static and beams != e.static_beams:
            raise EngineError(f"{e.path} is a static engine exported with --beams {e.static_beams}: call with "
                              f"beams={e.static_beams}, or export a dynamic engine for other beam widths")
        return k, beams

    def padded_length(self, n_tokens: int) -> int:
        """The history slots a user with ``n_tokens`` history ids is computed with, alone or in any batch
        (``PAD_QUANTUM``); a static engine's fixed history length."""
        e = self.engine
        if e.static_hist:
            return int(e.static_hist)
        return int(min(-(-max(n_tokens, 1) // PAD_QUANTUM) * PAD_QUANTUM, max(e.prompt.max_history_tokens, n_tokens)))

    def _batches(self, hist: list[np.ndarray], beams: int):
        """(rows, padded length) of each search call: users of one padded length, ``users_per_call`` at most."""
        width = np.array([self.padded_length(len(h)) for h in hist], np.int64)
        order = np.argsort(width, kind="stable")
        for w in np.unique(width):
            rows = order[width[order] == w]
            size = self.users_per_call(int(w), beams)
            for start in range(0, len(rows), size):
                yield rows[start : start + size], int(w)

    def _search(self, hist: list[np.ndarray], width: int, beams: int, timings: Timings,
                node_mask: np.ndarray | None = None, mask_row: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Pad one batch's history ids to (B, width) ids + mask, run the beam search, return its rows' leaves and
        scores. ``node_mask`` (M, N) / ``mask_row`` (rows,): the batch's item filters."""
        e = self.engine
        rows = len(hist)
        batch = e.static_batch or rows
        ids = np.full((batch, width), e.prompt.pad_id, np.int64)
        mask = np.zeros((batch, width), np.int64)
        for b in range(batch):
            toks = hist[b % rows]  # padding rows repeat real ones
            ids[b, : len(toks)], mask[b, : len(toks)] = toks, 1
        if mask_row is not None and batch > rows:  # padding rows repeat real ones, filters included
            mask_row = mask_row[np.arange(batch) % rows]
        search = beam_search(e, ids, mask, beams=beams, impl=self.impl, node_mask=node_mask, mask_row=mask_row)
        while not search.done:
            search.step()
        timings.add(search.timings)
        nodes, scores = search.leaves()
        return nodes[:rows], scores[:rows]

    def _fill(self, res: Recommendations, rows: np.ndarray, nodes: np.ndarray, scores: np.ndarray, k: int,
              filters: item_filters.RequestFilters | None = None) -> None:
        """Leaves -> SIDs -> items (collision groups expanded, minus the items a user's filter drops),
        best beam first, first k kept."""
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
                group = items_of[offs[s] : offs[s + 1]]
                f = filters[r] if filters else None
                if f is not None:
                    group = group[f.admits(group)]  # never empty: the search only reaches allowed leaves
                group = group[: k - col]
                n = len(group)
                res.item_index[r, col : col + n] = group
                res.items[r, col : col + n] = [ids[i] for i in group]
                res.scores[r, col : col + n] = score
                res.sids[r, col : col + n] = trie.sid_codes[s]
                col += n


def _size(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10**6 else f"{n:,} bytes"
