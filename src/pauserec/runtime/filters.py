"""Serve-time item filters: which items one recommend call may return, per user (torch-free).

``Recommender.recommend(histories, exclude=..., allow=..., exclude_history=...)`` takes each filter
in one of three forms:

- ``None``: no filter;
- one collection of external item ids (str or int): the same set for every user of the call;
- a list or tuple with one entry per user, each ``None`` or a collection of item ids.

A list or tuple whose entries are all ``None`` or collections (lists, tuples, sets, arrays) is the
per-user form; a collection of item ids is one shared set; a mix of the two is an error. A user may receive item i
when i is in ``allow`` (if given), not in ``exclude``, and, with ``exclude_history``, not in the
user's own history. The beam search never enters a trie node without such an item below it (a
node mask per filter, :meth:`pauserec.data.trie.Trie.node_mask`), so it returns exactly what a
search over a trie rebuilt from the user's allowed items would. A user whose filters leave fewer
than k items gets padding rows ("" / -1 / -inf) for the rest.

Cost: one (N,) uint8 mask per distinct filter of a batch (N = trie nodes), built per batch of users;
a shared filter (and no ``exclude_history``) is one mask for the whole call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pauserec.data.trie import sorted_unique
from pauserec.errors import DataError

_EMPTY = np.zeros(0, dtype=np.int64)


def _sorted_unique(items) -> np.ndarray:
    return sorted_unique(np.asarray(items, dtype=np.int64))


def _member(items: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """(n,) bool: which ``items`` are in ``sorted_set`` (sorted unique int64)."""
    if len(sorted_set) == 0:
        return np.zeros(len(items), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, items), len(sorted_set) - 1)
    return sorted_set[at] == items


@dataclass(frozen=True)
class ItemFilter:
    """One user's filter over dense item indices."""

    allow: np.ndarray | None  # sorted unique int64; None = every item
    exclude: np.ndarray  # sorted unique int64, possibly empty

    @classmethod
    def of(cls, allow=None, exclude=None) -> ItemFilter:
        return cls(None if allow is None else _sorted_unique(allow),
                   _EMPTY if exclude is None else _sorted_unique(exclude))

    def admits(self, items: np.ndarray) -> np.ndarray:
        """(n,) bool: which dense ``items`` this filter lets through."""
        items = np.asarray(items, dtype=np.int64)
        ok = ~_member(items, self.exclude)
        if self.allow is not None:
            ok &= _member(items, self.allow)
        return ok

    def node_mask(self, trie, out: np.ndarray | None = None) -> np.ndarray:
        """(N,) uint8 node mask of this filter over ``trie`` (see ``Trie.node_mask``)."""
        return trie.node_mask(allow=self.allow, exclude=self.exclude, out=out)


class RequestFilters:
    """The filters of one recommend call: one ``ItemFilter`` (or None = unfiltered) per user."""

    def __init__(self, per_user: list[ItemFilter | None], shared: bool) -> None:
        self.per_user = per_user
        self.shared = shared  # every user has the same filter object: one mask for the whole call
        self._shared_mask: np.ndarray | None = None

    def __getitem__(self, user: int) -> ItemFilter | None:
        return self.per_user[user]

    def masks(self, trie, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(node_mask (M, N) uint8, mask_row (len(rows),) int32) for the users ``rows`` of one batch."""
        if self.shared:
            if self._shared_mask is None:
                self._shared_mask = self.per_user[0].node_mask(trie)[None, :]  # (1, N)
            return self._shared_mask, np.zeros(len(rows), dtype=np.int32)
        mask_row = np.full(len(rows), -1, dtype=np.int32)
        distinct: dict[int, int] = {}  # id(filter) -> mask row
        for b, r in enumerate(rows):
            f = self.per_user[r]
            if f is not None:
                mask_row[b] = distinct.setdefault(id(f), len(distinct))
        node_mask = np.empty((len(distinct), trie.num_nodes), dtype=np.uint8)  # (M, N)
        filters = {id(self.per_user[r]): self.per_user[r] for r in rows if self.per_user[r] is not None}
        for key, m in distinct.items():
            filters[key].node_mask(trie, out=node_mask[m])
        return node_mask, mask_row


# -- parsing the request's forms ---------------------------------------------------------------------------
def _is_collection(x) -> bool:
    return isinstance(x, Iterable) and not isinstance(x, str | bytes)


def per_user_form(spec) -> bool:
    """Whether a filter argument is the per-user form: a non-empty list or tuple of None / collections."""
    return isinstance(spec, list | tuple) and len(spec) > 0 and all(x is None or _is_collection(x) for x in spec)


def streamable(spec, what: str) -> tuple[bool, object]:
    """(per_user, spec) for a stream of calls: a shared collection is read once (generators too)."""
    if spec is None or per_user_form(spec):
        return spec is not None, spec
    _, value = split_form(spec, 0, what)
    return False, value


def split_form(spec, n_users: int, what: str) -> tuple[str, object]:
    """("none", None) | ("shared", [ids]) | ("per_user", [entry per user]) for a filter argument."""
    if spec is None:
        return "none", None
    if not _is_collection(spec):
        raise DataError(f"{what} must be a collection of item ids, or a list with one (None or collection of "
                        f"item ids) per user; got {type(spec).__name__}")
    if isinstance(spec, np.ndarray) and spec.ndim <= 1:
        return "shared", spec.reshape(-1).tolist()
    if per_user_form(spec):
        if len(spec) != n_users:
            raise DataError(f"{what} has {len(spec)} per-user entries for {n_users} users: pass one entry "
                            "(None or a collection of item ids) per user, or one collection of item ids for all")
        return "per_user", list(spec)
    entries = list(spec)
    if any(x is None or _is_collection(x) for x in entries):
        raise DataError(f"{what} mixes item ids with lists (or None), or holds lists without being a list itself: "
                        "pass one collection of item ids for every user, or a list (or tuple) with one entry "
                        "(None or a collection of item ids) per user")
    return "shared", entries


def _lookup(catalog, ids, what: str) -> tuple[np.ndarray | None, str | None]:
    """(dense indices, None) of one filter's item ids, or (None, why they cannot be used)."""
    if not _is_collection(ids):
        return None, f"{what} must be a collection of item ids, got {type(ids).__name__}"
    dense, unknown = catalog.indices_of(ids)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        return None, f"unknown item ids in {what}: {shown}"
    return dense, None


def filter_reason(catalog, ids, what: str) -> str | None:
    """Why ``ids`` cannot be used as the ``what`` filter of one user (None when it can)."""
    return None if ids is None else _lookup(catalog, ids, what)[1]


def _dense(catalog, ids, what: str, where: str) -> np.ndarray:
    dense, reason = _lookup(catalog, ids, what)
    if reason:
        raise DataError(f"{where}: {reason}")
    return dense


def resolve(catalog, n_users: int, exclude=None, allow=None, history: list[np.ndarray] | None = None
            ) -> RequestFilters | None:
    """Per-user ``ItemFilter``s of one call (None when nothing is filtered); DataError naming the user
    and the unknown ids. ``history``: every user's dense history items, to exclude (exclude_history)."""
    forms = {"exclude": split_form(exclude, n_users, "exclude"), "allow": split_form(allow, n_users, "allow")}
    if all(kind == "none" for kind, _ in forms.values()) and history is None:
        return None
    shared = {}  # what -> dense ids of a shared set, resolved once
    for what, (kind, value) in forms.items():
        if kind == "shared":
            shared[what] = _dense(catalog, value, what, f"{what} (one set for every user)")
    if history is None and all(kind != "per_user" for kind, _ in forms.values()):
        one = ItemFilter.of(allow=shared.get("allow"), exclude=shared.get("exclude"))
        return RequestFilters([one] * n_users, shared=True)
    per_user: list[ItemFilter | None] = []
    for u in range(n_users):
        ids = {}
        for what, (kind, value) in forms.items():
            if kind == "shared":
                ids[what] = shared[what]
            elif kind == "per_user" and value[u] is not None:
                ids[what] = _dense(catalog, value[u], what, f"user {u}")
        if history is not None:
            ids["exclude"] = history[u] if "exclude" not in ids else np.concatenate([ids["exclude"], history[u]])
        per_user.append(ItemFilter.of(**ids) if ids else None)
    return RequestFilters(per_user, shared=False)
