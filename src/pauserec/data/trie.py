"""Prefix trie over the catalog's Semantic IDs as flat int32 CSR arrays (torch-free).

Layout (the contract the trie-masked top-k kernels read)::

    node 0 = root; nodes are numbered level by level (BFS), children sorted by code
    offsets      (N+1,) int32   edges of node n are e in [offsets[n], offsets[n+1])
    tokens       (E,)   int32   level-local code of edge e (0..V_l-1 for a node at depth l)
    children     (E,)   int32   child node id of edge e
    level_starts (L+2,) int32   depth-d nodes are [level_starts[d], level_starts[d+1]); depth L = leaves
    sid_codes        (S, L)   int32  code tuple of SID id s (leaf node - level_starts[L]), lexicographic
    sid_item_offsets (S+1,)   int32  items of SID s = sid_items[sid_item_offsets[s]:sid_item_offsets[s+1]]
    sid_items        (n,)     int32  dense item indices, ascending inside a group (the stable order)

Because nodes are numbered breadth-first in lexicographic order, every non-root node has exactly
one incoming edge and edge e always leads to node e + 1 (``children == arange(1, N)``); the arrays
still spell it out so kernels never depend on that.

Construction is vectorised: one stable lexicographic sort of the items' code tuples, then per depth
the positions where the code prefix changes (``np.logical_or.accumulate`` over the row differences).

Node masks (serve-time filters, read by the trie-masked top-k) come from :meth:`Trie.node_mask`:
``mask[n] = 1`` when node n still has at least one allowed item below it. Allowing a set A costs
O(N + |A| L) to count the nodes on the paths of A's SIDs; excluding a set X from the whole catalog
costs O(N) to copy the all-items mask plus O(|X| L log) to find the nodes whose every item is in X
(per-node item counts, ``item_counts``, minus the counts of X). A mask is N bytes per filter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pauserec.errors import DataError

TRIE_KEYS = ("offsets", "tokens", "children", "level_starts", "sid_codes", "sid_item_offsets", "sid_items")


def sorted_unique(values, return_counts: bool = False):
    """Sorted distinct values of an int array (and how often each occurs): sort + run boundaries, which
    is several times faster than ``np.unique`` on NumPy 2.4 for the small sets filters hold."""
    s = np.sort(np.asarray(values).reshape(-1))
    first = np.ones(len(s), dtype=bool)
    np.not_equal(s[1:], s[:-1], out=first[1:])
    if not return_counts:
        return s[first]
    starts = np.flatnonzero(first)
    return s[first], np.diff(np.append(starts, len(s)))


class Trie:
    """Flat CSR prefix trie of SIDs; leaf -> SID id -> items (collision groups)."""

    def __init__(
        self,
        offsets: np.ndarray,
        tokens: np.ndarray,
        children: np.ndarray,
        level_starts: np.ndarray,
        sid_codes: np.ndarray,
        sid_item_offsets: np.ndarray,
        sid_items: np.ndarray,
    ) -> None:
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int32)
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        self.children = np.ascontiguousarray(children, dtype=np.int32)
        self.level_starts = np.ascontiguousarray(level_starts, dtype=np.int32)
        self.sid_codes = np.ascontiguousarray(sid_codes, dtype=np.int32)
        self.sid_item_offsets = np.ascontiguousarray(sid_item_offsets, dtype=np.int32)
        self.sid_items = np.ascontiguousarray(sid_items, dtype=np.int32)
        self._item_sid: np.ndarray | None = None
        self._sid_paths: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        self._full_mask: np.ndarray | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, sids: np.ndarray) -> Trie:
        """Build the trie of an (n_items, L) array of level-local codes (n_items >= 1, L >= 1)."""
        sids = np.asarray(sids)
        if sids.ndim != 2 or sids.shape[0] < 1 or sids.shape[1] < 1:
            raise DataError(f"cannot build a trie from SID codes of shape {sids.shape}; need (n_items >= 1, L >= 1)")
        if sids.min() < 0:
            raise DataError("SID codes must be >= 0 to build a trie")
        sids = sids.astype(np.int32, copy=False)
        n, L = sids.shape
        order = np.lexsort(sids.T[::-1]).astype(np.int32)  # stable: equal SIDs keep ascending item order
        s = sids[order]  # (n, L) sorted lexicographically
        # changed[i, d] = the depth-(d+1) prefix of row i differs from that of row i-1
        changed = np.ones((n, L), dtype=bool)
        if n > 1:
            changed[1:] = np.logical_or.accumulate(s[1:] != s[:-1], axis=1)
        counts = changed.sum(axis=0)  # (L,) nodes per depth 1..L
        level_starts = np.zeros(L + 2, dtype=np.int64)
        level_starts[1] = 1
        level_starts[2:] = 1 + np.cumsum(counts)
        num_nodes = int(level_starts[-1])

        # number of children of every node: depth-d node p gets one child per new depth-(d+1) prefix
        n_children = np.zeros(num_nodes, dtype=np.int64)
        n_children[0] = counts[0]
        for d in range(1, L):  # parents at depth d, children at depth d + 1
            parent = level_starts[d] + np.cumsum(changed[:, d - 1]) - 1  # (n,) depth-d node of each row
            n_children[level_starts[d] : level_starts[d + 1]] = np.bincount(
                parent[changed[:, d]] - level_starts[d], minlength=counts[d - 1]
            )
        offsets = np.zeros(num_nodes + 1, dtype=np.int64)
        np.cumsum(n_children, out=offsets[1:])
        # edge e leads to node e + 1; its token is the code of that node at its depth
        tokens = np.concatenate([s[changed[:, d], d] for d in range(L)])
        children = np.arange(1, num_nodes, dtype=np.int64)

        leaf_rows = np.flatnonzero(changed[:, L - 1])
        sid_codes = s[leaf_rows]
        sid_item_offsets = np.append(leaf_rows, n)
        return cls(offsets, tokens, children, level_starts, sid_codes, sid_item_offsets, order)

    # -- queries --------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.level_starts) - 2

    @property
    def num_nodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_sids(self) -> int:
        return len(self.sid_codes)

    @property
    def num_items(self) -> int:
        return len(self.sid_items)

    @property
    def item_sid(self) -> np.ndarray:
        """(n_items,) int32 SID id of every dense item index."""
        if self._item_sid is None:
            sizes = np.diff(self.sid_item_offsets)
            out = np.empty(self.num_items, dtype=np.int32)
            out[self.sid_items] = np.repeat(np.arange(self.num_sids, dtype=np.int32), sizes)
            self._item_sid = out
        return self._item_sid

    @property
    def sid_paths(self) -> np.ndarray:
        """(S, L) int32: the depth-1..L nodes on the path of every SID id (column L - 1 is its leaf)."""
        if self._sid_paths is None:
            parent = np.zeros(self.num_nodes, dtype=np.int32)  # (N,) parent of every node; root: 0
            parent[self.children] = np.repeat(np.arange(self.num_nodes, dtype=np.int32), np.diff(self.offsets))
            L = self.levels
            paths = np.empty((self.num_sids, L), dtype=np.int32)
            paths[:, L - 1] = self.level_starts[L] + np.arange(self.num_sids, dtype=np.int32)
            for d in range(L - 1, 0, -1):
                paths[:, d - 1] = parent[paths[:, d]]
            self._sid_paths = paths
        return self._sid_paths

    def item_counts(self, items: np.ndarray | None = None) -> np.ndarray:
        """(N,) int32 number of ``items`` (dense indices, duplicates count once; None = every item) below
        each node."""
        if items is None:
            if self._counts is None:
                sizes = np.diff(self.sid_item_offsets)  # (S,) items per SID
                counts = np.bincount(self.sid_paths.ravel(), weights=np.repeat(sizes, self.levels),
                                     minlength=self.num_nodes)
                counts[0] = self.num_items
                self._counts = counts.astype(np.int32)
            return self._counts
        items = self._dense_items(items, "items")
        counts = np.bincount(self._path_nodes(items), minlength=self.num_nodes)
        counts[0] = len(items)
        return counts.astype(np.int32)

    def node_mask(self, allow: np.ndarray | None = None, exclude: np.ndarray | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """(N,) uint8: 1 where a node has at least one item of ``allow`` (None = every item) that is not
        in ``exclude`` below it. Items are dense indices (duplicates are fine). ``out``: an (N,) uint8
        array to write into (a row of a batch's (M, N) mask, say)."""
        N = self.num_nodes
        if out is None:
            out = np.empty(N, dtype=np.uint8)
        elif out.shape != (N,) or out.dtype != np.uint8:
            raise ValueError(f"out must be a ({N},) uint8 array, got {out.shape} {out.dtype}")
        exclude = None if exclude is None else self._dense_items(exclude, "exclude")
        if allow is not None:  # O(N + |A| L): count the allowed items' paths
            items = self._dense_items(allow, "allow")
            if exclude is not None and len(exclude):  # both sorted: drop the excluded ones
                at = np.minimum(np.searchsorted(exclude, items), len(exclude) - 1)
                items = items[exclude[at] != items]
            np.greater(np.bincount(self._path_nodes(items), minlength=N), 0, out=out)
            out[0] = len(items) > 0
            return out
        total = self.item_counts()
        if self._full_mask is None:  # every node has an item, unless the trie was made by hand
            self._full_mask = (total > 0).astype(np.uint8)
        if exclude is None or len(exclude) == 0:
            np.copyto(out, self._full_mask)  # O(N) bytes
            return out
        hit = self._path_nodes(exclude)  # (|X| L,) nodes above excluded items
        if len(hit) * 16 < N:  # few: the nodes whose every item is excluded, O(N) copy + O(|X| L log)
            np.copyto(out, self._full_mask)
            nodes, n = sorted_unique(hit, return_counts=True)
            out[nodes[n == total[nodes]]] = 0
        else:  # many: subtract their counts everywhere, O(N + |X| L)
            np.greater(total - np.bincount(hit, minlength=N), 0, out=out)
        out[0] = len(exclude) < self.num_items
        return out

    def _path_nodes(self, items: np.ndarray) -> np.ndarray:
        """(len(items) * L,) the depth-1..L nodes above each dense item."""
        return self.sid_paths.take(self.item_sid.take(items), axis=0).ravel()

    def _dense_items(self, items, what: str) -> np.ndarray:
        """Unique sorted int64 dense item indices; ValueError when one is out of range."""
        items = sorted_unique(np.asarray(items, dtype=np.int64))
        if len(items) and (items[0] < 0 or items[-1] >= self.num_items):
            bad = items[0] if items[0] < 0 else items[-1]
            raise ValueError(f"{what}: dense item index {bad} is outside [0, {self.num_items})")
        return items

    def sid_of_leaf(self, node: int) -> int:
        """SID id of a leaf node (depth L)."""
        first, end = int(self.level_starts[self.levels]), int(self.level_starts[self.levels + 1])
        if not first <= int(node) < end:
            raise ValueError(f"node {node} is not a leaf; leaves are nodes [{first}, {end})")
        return int(node) - first

    def items_of_sid(self, s: int) -> np.ndarray:
        """Dense item indices (ascending) sharing SID id ``s``."""
        if not 0 <= int(s) < self.num_sids:
            raise ValueError(f"SID id {s} out of range [0, {self.num_sids})")
        return self.sid_items[self.sid_item_offsets[s] : self.sid_item_offsets[s + 1]]

    def items_of_leaf(self, node: int) -> np.ndarray:
        return self.items_of_sid(self.sid_of_leaf(node))

    def edges(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, children) of a node's outgoing edges, sorted by token."""
        a, b = self.offsets[node], self.offsets[node + 1]
        return self.tokens[a:b], self.children[a:b]

    def child(self, node: int, code: int) -> int:
        """Child of ``node`` along ``code``, or -1 when there is no such edge."""
        toks, kids = self.edges(node)
        j = int(np.searchsorted(toks, code))
        return int(kids[j]) if j < len(toks) and toks[j] == code else -1

    def walk(self, codes) -> int:
        """Node reached from the root along ``codes`` (a prefix of a SID), or -1 when it leaves the trie."""
        node = 0
        for code in codes:
            node = self.child(node, int(code))
            if node < 0:
                return -1
        return node

    def sid_id(self, codes) -> int:
        """SID id of a full code tuple, or -1 when no item has it."""
        node = self.walk(codes)
        if node < 0 or len(codes) != self.levels:
            return -1
        return self.sid_of_leaf(node)

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_arrays(self, prefix: str = "trie_") -> dict[str, np.ndarray]:
        return {prefix + k: getattr(self, k) for k in TRIE_KEYS}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "trie_", source: str = "trie arrays") -> Trie:
        missing = [prefix + k for k in TRIE_KEYS if prefix + k not in arrays]
        if missing:
            raise DataError(f"{source} lacks {', '.join(missing)}; re-create it with Catalog.save / Trie.save")
        trie = cls(*(np.asarray(arrays[prefix + k]) for k in TRIE_KEYS))
        trie.check(source)
        return trie

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, **self.to_arrays())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trie:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls.from_arrays({k: z[k] for k in z.files}, source=str(path))
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable trie .npz ({e}); re-create it with Trie.save") from e

    def check(self, source: str = "trie") -> None:
        """Cheap structural checks (shapes and ranges), raising DataError naming ``source``."""
        N, E, L = self.num_nodes, len(self.tokens), self.levels
        problems = []
        if self.offsets.ndim != 1 or N < 1 or self.offsets[0] != 0 or self.offsets[-1] != E:
            problems.append("offsets must run from 0 to the number of edges")
        elif np.any(np.diff(self.offsets) < 0):
            problems.append("offsets must be non-decreasing")
        if len(self.children) != E or (E and (self.children.min() < 1 or self.children.max() >= N)):
            problems.append("children must hold one node id in [1, N) per edge")
        if L < 1 or self.level_starts[0] != 0 or self.level_starts[1] != 1 or self.level_starts[-1] != N:
            problems.append("level_starts must start at 0, 1 and end at the node count")
        S = self.num_sids
        if S != int(self.level_starts[-1] - self.level_starts[-2]) or self.sid_codes.shape != (S, L):
            problems.append("sid_codes must hold one row of L codes per leaf")
        if len(self.sid_item_offsets) != S + 1 or (S and self.sid_item_offsets[-1] != len(self.sid_items)):
            problems.append("sid_item_offsets must have S+1 entries ending at the item count")
        if problems:
            raise DataError(f"{source}: malformed trie ({'; '.join(problems)}); re-create it with Catalog.save")

    def __repr__(self) -> str:
        return f"Trie(levels={self.levels}, nodes={self.num_nodes}, sids={self.num_sids}, items={self.num_items})"
