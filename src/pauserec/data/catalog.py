"""The SID catalog: external item id <-> dense index <-> Semantic-ID codes (torch-free).

A SID is a tuple of L level-local codes; its tokens are ``<PREFIX_CODE>`` with one prefix per
level (``<a_70><b_138><c_190><d_249>``). Per-level prefixes and codebook sizes come from the data:
``V_l = max code seen at level l + 1``. Several items may share one SID (a collision group); the
trie maps each SID to its items in ascending dense order.

``Catalog.save`` writes one ``.npz`` (catalog + trie arrays) readable with ``allow_pickle=False``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pauserec.data.trie import Trie
from pauserec.errors import DataError

TOKEN_RE = re.compile(r"<([^<>\s]+)_(\d+)>")
CATALOG_VERSION = 1


def sid_token(prefix: str, code: int) -> str:
    return f"<{prefix}_{int(code)}>"


def parse_sid_tokens(
    entries: Sequence[tuple[str, Sequence[str]]], source: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Parse ``(item_id, [token, ...])`` pairs into (n, L) int32 codes and the per-level prefixes.

    Raises DataError naming ``source`` and the offending item for malformed tokens, a level count
    that differs from the first item's, or a prefix that differs within a level.
    """
    if not entries:
        raise DataError(f"{source}: no items with a SID; the index is empty")
    fullmatch = TOKEN_RE.fullmatch
    first_id, first_tokens = entries[0]
    L = len(first_tokens) if isinstance(first_tokens, list | tuple) else 0
    if L < 1:
        raise DataError(
            f"{source}: item {first_id!r} has SID {first_tokens!r}; expected a list of tokens like '<a_12>'"
        )
    prefixes: list[str] = []
    codes = np.empty((len(entries), L), dtype=np.int64)
    for row, (item_id, tokens) in enumerate(entries):
        if not isinstance(tokens, list | tuple) or len(tokens) != L:
            n = len(tokens) if isinstance(tokens, list | tuple) else "no list of"
            raise DataError(
                f"{source}: item {item_id!r} has {n} SID tokens ({tokens!r}) but item {first_id!r} has {L}; "
                "every SID of one index needs the same number of levels"
            )
        for level, tok in enumerate(tokens):
            m = fullmatch(tok) if isinstance(tok, str) else None
            if m is None:
                raise DataError(
                    f"{source}: item {item_id!r} has malformed SID token {tok!r} at level {level + 1}; "
                    "expected '<PREFIX_CODE>' such as '<a_12>'"
                )
            if row == 0:
                prefixes.append(m.group(1))
            elif m.group(1) != prefixes[level]:
                raise DataError(
                    f"{source}: item {item_id!r} uses prefix {m.group(1)!r} at level {level + 1} where item "
                    f"{first_id!r} uses {prefixes[level]!r}; one level must use one token prefix"
                )
            codes[row, level] = int(m.group(2))
    if codes.max() > np.iinfo(np.int32).max:
        raise DataError(f"{source}: a SID code exceeds int32 range")
    return codes.astype(np.int32), tuple(prefixes)


def split_sid_string(sid: str) -> list[str]:
    """``'<a_1><b_2><c_3>'`` -> ``['<a_1>', '<b_2>', '<c_3>']`` (empty list when malformed)."""
    tokens = re.findall(r"<[^<>]*>", sid) if isinstance(sid, str) else []
    return tokens if tokens and "".join(tokens) == sid.strip() else []


class Catalog:
    """External item ids, their (n_items, L) SID codes, token prefixes and the SID trie."""

    def __init__(
        self,
        item_ids: Sequence[str],
        sids: np.ndarray,
        token_prefixes: Sequence[str],
        codebook_sizes: Sequence[int] | None = None,
        name: str = "",
    ) -> None:
        self.item_ids: list[str] = [str(i) for i in item_ids]
        self.sids = np.ascontiguousarray(sids, dtype=np.int32)  # (n_items, L)
        self.token_prefixes: tuple[str, ...] = tuple(str(p) for p in token_prefixes)
        self.name = name
        n = len(self.item_ids)
        if n < 1:
            raise DataError(f"catalog {name!r} has no items; the dataset is empty")
        if self.sids.ndim != 2 or self.sids.shape[0] != n or self.sids.shape[1] < 1:
            raise DataError(f"catalog {name!r}: SID codes of shape {self.sids.shape} do not match {n} items")
        if len(self.token_prefixes) != self.levels:
            raise DataError(f"catalog {name!r}: {len(self.token_prefixes)} token prefixes for {self.levels} levels")
        if self.sids.min() < 0:
            raise DataError(f"catalog {name!r}: negative SID code")
        seen = self.sids.max(axis=0).astype(np.int64) + 1
        sizes = tuple(int(v) for v in seen) if codebook_sizes is None else tuple(int(v) for v in codebook_sizes)
        if len(sizes) != self.levels or any(v < s for v, s in zip(sizes, seen, strict=True)):
            raise DataError(f"catalog {name!r}: codebook sizes {sizes} smaller than the codes seen ({tuple(seen)})")
        self.codebook_sizes: tuple[int, ...] = sizes
        self._index: dict[str, int] | None = None
        self._trie: Trie | None = None

    @classmethod
    def from_tokens(cls, entries: Sequence[tuple[str, Sequence[str]]], source: str, name: str = "") -> Catalog:
        """Build from ``(item_id, [token, ...])`` pairs; duplicate ids -> DataError naming ``source``."""
        codes, prefixes = parse_sid_tokens(entries, source)
        ids = [str(i) for i, _ in entries]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise DataError(f"{source}: item id {dup!r} appears more than once; every item needs exactly one SID")
        return cls(ids, codes, prefixes, name=name)

    # -- basics ---------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return int(self.sids.shape[1])

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id) -> int:
        """Dense index of an external item id (str or int); DataError naming the id when unknown."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.item_ids)}
        try:
            return self._index[str(item_id)]
        except KeyError:
            raise DataError(
                f"unknown item id {item_id!r}: not in catalog {self.name!r} ({self.n_items} items); "
                "check that the item belongs to this dataset/index"
            ) from None

    def indices_of(self, item_ids) -> tuple[np.ndarray, list[str]]:
        """(dense indices (n,) int64 of the known ids, in order; the unknown ids as strings)."""
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self.item_ids)}
        keys = [x if type(x) is str else str(x) for x in item_ids]
        found = list(map(self._index.get, keys))
        unknown: list[str] = []
        if None in found:
            unknown = [k for k, i in zip(keys, found, strict=True) if i is None]
            found = [i for i in found if i is not None]
        return np.fromiter(found, dtype=np.int64, count=len(found)), unknown

    @property
    def trie(self) -> Trie:
        if self._trie is None:
            self._trie = Trie.build(self.sids)
        return self._trie

    # -- tokens ---------------------------------------------------------------------------------
    def sid_tokens(self, item: int) -> list[str]:
        """``['<a_70>', '<b_138>', ...]`` of a dense item index."""
        return [sid_token(p, c) for p, c in zip(self.token_prefixes, self.sids[item], strict=True)]

    def sid_string(self, item: int) -> str:
        return "".join(self.sid_tokens(item))

    def level_tokens(self) -> list[list[str]]:
        """Every SID token per level, code 0..V_l-1 (what a tokenizer must know): ``[level][code]``."""
        pairs = zip(self.token_prefixes, self.codebook_sizes, strict=True)
        return [[sid_token(p, c) for c in range(v)] for p, v in pairs]

    def codes_of_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        """Parse one SID's tokens (list or concatenated string) into (L,) int32 codes of this catalog."""
        toks = split_sid_string(tokens) if isinstance(tokens, str) else list(tokens)
        if len(toks) != self.levels:
            raise DataError(f"SID {tokens!r} has {len(toks)} tokens; catalog {self.name!r} has {self.levels} levels")
        out = np.empty(self.levels, dtype=np.int32)
        for level, tok in enumerate(toks):
            m = TOKEN_RE.fullmatch(tok) if isinstance(tok, str) else None
            if m is None or m.group(1) != self.token_prefixes[level]:
                raise DataError(
                    f"SID token {tok!r} at level {level + 1} is not '<{self.token_prefixes[level]}_CODE>' "
                    f"(catalog {self.name!r})"
                )
            out[level] = int(m.group(2))
        return out

    # -- collisions -----------------------------------------------------------------------------
    def items_with_sid(self, codes) -> np.ndarray:
        """Dense items (ascending) whose SID equals ``codes``; empty when none."""
        s = self.trie.sid_id(codes)
        return self.trie.items_of_sid(s) if s >= 0 else np.empty(0, dtype=np.int32)

    def collision_groups(self) -> list[np.ndarray]:
        """Groups (size >= 2, items ascending) of items sharing one SID, in lexicographic SID order."""
        t = self.trie
        sizes = np.diff(t.sid_item_offsets)
        return [t.sid_items[t.sid_item_offsets[s] : t.sid_item_offsets[s + 1]] for s in np.flatnonzero(sizes >= 2)]

    def stats(self) -> dict:
        """Levels, codebook sizes, used codes per level, unique SIDs and collision counts."""
        sizes = np.diff(self.trie.sid_item_offsets)
        colliding = sizes[sizes >= 2]
        return {
            "levels": self.levels,
            "token_prefixes": list(self.token_prefixes),
            "codebook_sizes": list(self.codebook_sizes),
            "used_codes_per_level": [int(len(np.unique(self.sids[:, lv]))) for lv in range(self.levels)],
            "unique_sids": int(self.trie.num_sids),
            "collision_items": int(colliding.sum()),
            "collision_groups": int(len(colliding)),
            "largest_group": int(sizes.max()),
        }

    # -- (de)serialisation ----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write catalog + trie arrays to one ``.npz`` (strings as fixed-width unicode, no pickle)."""
        path = Path(path)
        arrays = {
            "catalog_version": np.array([CATALOG_VERSION], dtype=np.int32),
            "item_ids": np.array(self.item_ids, dtype=str),
            "sids": self.sids,
            "token_prefixes": np.array(self.token_prefixes, dtype=str),
            "codebook_sizes": np.array(self.codebook_sizes, dtype=np.int32),
            "name": np.array(self.name, dtype=str),
            **self.trie.to_arrays(),
        }
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} not found; write it with Catalog.save (or re-export the engine)")
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path} is not a readable catalog .npz ({e}); write it with Catalog.save") from e
        needed = ("catalog_version", "item_ids", "sids", "token_prefixes", "codebook_sizes")
        missing = [k for k in needed if k not in d]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: not a pauserec catalog; write it with Catalog.save")
        version = int(d["catalog_version"].reshape(-1)[0])
        if version != CATALOG_VERSION:
            raise DataError(f"{path} has catalog version {version}; this pauserec reads {CATALOG_VERSION}")
        cat = cls(
            d["item_ids"].tolist(),
            d["sids"],
            d["token_prefixes"].tolist(),
            codebook_sizes=d["codebook_sizes"].tolist(),
            name=str(d["name"]) if "name" in d else "",
        )
        trie = Trie.from_arrays(d, source=str(path))
        if trie.levels != cat.levels or trie.num_items != cat.n_items:
            raise DataError(f"{path}: trie ({trie!r}) does not match the catalog; write it again with Catalog.save")
        cat._trie = trie
        return cat

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalog):
            return NotImplemented
        return (
            self.item_ids == other.item_ids
            and np.array_equal(self.sids, other.sids)
            and self.token_prefixes == other.token_prefixes
            and self.codebook_sizes == other.codebook_sizes
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        sizes = self.codebook_sizes
        return f"Catalog({self.name!r}, items={self.n_items}, levels={self.levels}, codebook_sizes={sizes})"
