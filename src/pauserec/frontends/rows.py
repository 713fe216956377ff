"""One input row -> one output record: the per-row rules shared by the local job, the Ray job and the server.

A row carries a user id and a history of external item ids (and, optionally, per-row ``exclude`` /
``allow`` lists of item ids). :func:`parse_record` turns a decoded record into a :class:`Row` that
either can be recommended for or carries the reason it cannot; :func:`recommend_rows` turns a list
of rows into records, one per row, in the same order:

    {"user_id": "u1", "items": [...], "scores": [...], "sids": [...]}      # recommended
    {"user_id": "u1", "reason": "unknown item ids: 999"}                     # a per-row error

What is a per-row error and what stops the job:

- per row: malformed JSON, a missing user id or history, an empty history, unknown item ids (in the
  history or a filter), and any :class:`DataError` the recommender raises for that row alone;
- the job: anything else (an engine that cannot run, out of memory, a bug). It propagates, so a job
  never turns one systematic failure into thousands of error rows.

A history longer than the engine keeps is truncated to its most recent items (as the engine was
trained) and the record says so (``"truncated": n`` items dropped), so the job can count it: beyond
``max_history`` items, or beyond the token budget of a prompt assembled from text (the recommender
reports the items each user's prompt kept, ``Recommendations.kept``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pauserec.errors import DataError

FILTER_FIELDS = ("exclude", "allow")
LINE_EXCERPT = 200  # characters of a malformed line kept in its error record


class RecommenderLike(Protocol):
    max_history: int

    def validate_history(self, history: list) -> str | None: ...
    def recommend(self, histories: list[list], k: int = 10, beams: int = 20, **filters: Any) -> Any: ...


@dataclass(frozen=True)
class RowOptions:
    """What a job asks of every row (the same in the local and the Ray job)."""

    k: int = 10
    beams: int = 20
    user_field: str = "user_id"
    history_field: str = "history"
    exclude_history: bool = False
    exclude: frozenset[str] = field(default_factory=frozenset)  # items excluded for every user (--exclude-file)

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "beams": self.beams, "user_field": self.user_field, "history_field": self.history_field,
                "exclude_history": self.exclude_history, "exclude_items": len(self.exclude)}


@dataclass
class Row:
    user_id: str | None  # None when the row has none (never invented: a number could collide with a real id)
    history: list | None  # None when the row cannot be recommended for
    reason: str | None = None
    exclude: list | None = None
    allow: list | None = None
    line: str | None = None  # the raw text of a row that is not valid JSON


# -- parsing --------------------------------------------------------------------------------------
def _as_list(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def parse_record(rec: Any, opts: RowOptions) -> Row:
    """A decoded input record (dict) -> Row; every problem becomes the row's reason."""
    if not isinstance(rec, dict):
        return Row(None, None, "row is not a JSON object")
    user = rec.get(opts.user_field)
    user_id = None if user is None or (isinstance(user, str) and not user.strip()) else str(user)
    if user_id is None:
        return Row(None, None, f"missing user id (field {opts.user_field!r})")
    hist = _as_list(rec.get(opts.history_field))
    if hist is None:
        return Row(user_id, None, f"missing field {opts.history_field!r}")
    if not isinstance(hist, list):
        return Row(user_id, None, f"{opts.history_field!r} must be a list of item ids")
    row = Row(user_id, hist)
    for name in FILTER_FIELDS:
        value = _as_list(rec.get(name))
        if value is not None and not isinstance(value, list):
            return Row(user_id, None, f"{name!r} must be a list of item ids")
        setattr(row, name, value)
    return row


def parse_line(line: str, opts: RowOptions) -> Row:
    """One JSONL line -> Row (malformed JSON is the row's reason, with an excerpt of the line)."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return Row(None, None, "empty line")
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return Row(None, None, f"malformed JSON: {e.msg} at column {e.colno}", line=line[:LINE_EXCERPT])
    return parse_record(rec, opts)


# -- recommending ---------------------------------------------------------------------------------
def check_row(rec: RecommenderLike, row: Row) -> str | None:
    """Why ``row`` cannot be recommended for by ``rec`` (None when it can): its parse reason, its history, its filters."""
    if row.reason:
        return row.reason
    reason = rec.validate_history(row.history)
    if reason:
        return reason
    check = getattr(rec, "validate_filter", None)
    for name in FILTER_FIELDS:
        items = getattr(row, name)
        if items is not None and check is not None:
            why = check(items, name)
            if why:
                return why
    return None


def _filters(group: list[Row], opts: RowOptions) -> dict[str, Any]:
    """Keyword filters of one recommend call; {} when no row of the group and no option filters."""
    out: dict[str, Any] = {}
    if opts.exclude_history:
        out["exclude_history"] = True
    if any(r.exclude for r in group):
        out["exclude"] = [sorted(opts.exclude.union(map(str, r.exclude or ()))) for r in group]
    elif opts.exclude:
        out["exclude"] = opts.exclude  # one set for the whole batch
    if any(r.allow is not None for r in group):
        out["allow"] = [r.allow for r in group]
    return out


def error_record(row: Row, reason: str) -> dict[str, Any]:
    """The record of a row that cannot be recommended for (the errors file's line, the server's 4xx body)."""
    rec: dict[str, Any] = {"user_id": row.user_id, "reason": reason}
    if row.line is not None:
        rec["line"] = row.line
    return rec


def recommend_rows(rec: RecommenderLike, rows: Sequence[Row], opts: RowOptions,
                   sid_text: Callable[[np.ndarray], str]) -> list[dict[str, Any]]:
    """One record per row, in order (see the module docstring); job failures propagate."""
    out: list[dict[str, Any] | None] = [None] * len(rows)
    good: list[int] = []
    for i, row in enumerate(rows):
        reason = check_row(rec, row)
        if reason:
            out[i] = error_record(row, reason)
        else:
            good.append(i)
    # A DataError for a group is retried row by row, so one bad row cannot sink its neighbours.
    groups = [good] if good else []
    while groups:
        group = groups.pop()
        batch = [rows[i] for i in group]
        try:
            res = rec.recommend([r.history for r in batch], k=opts.k, beams=opts.beams, **_filters(batch, opts))
        except DataError as e:
            if len(group) == 1:
                out[group[0]] = error_record(batch[0], str(e))
            else:
                groups.extend([[i] for i in group])
            continue
        for j, i in enumerate(group):
            keep = res.item_index[j] >= 0
            record = {"user_id": batch[j].user_id, "items": [str(x) for x in res.items[j][keep]],
                      "scores": [round(float(s), 6) for s in res.scores[j][keep]],
                      "sids": [sid_text(s) for s in res.sids[j][keep]]}
            dropped = len(batch[j].history) - (int(res.kept[j]) if getattr(res, "kept", None) is not None
                                               else rec.max_history)  # (item and token budgets)
            if dropped > 0:
                record["truncated"] = dropped
            out[i] = record
    return out  # type: ignore[return-value]


def reason_kind(reason: str) -> str:
    """The kind of an error reason, for counts: the text before its first ':' or ' ('
    (``unknown item ids in exclude: 7`` -> ``unknown item ids in exclude``)."""
    return reason.partition(":")[0].split(" (")[0].strip()


def default_sid_text(codes: np.ndarray) -> str:
    return " ".join(map(str, codes))
