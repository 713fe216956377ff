"""The local batch recommend job: users in (JSONL or Parquet, streamed), recommendations out.

Input rows carry a user id and a history of external item ids (optionally ``exclude`` / ``allow``
lists of item ids)::

    {"user_id": "u1", "history": ["12", "7", "301"]}

Every input row ends up exactly once, in input order, in one of two files: the output (its
recommendations) or the errors file (row number, user id, reason). The per-row rules are in
:mod:`pauserec.frontends.rows`; a failure of the job itself (engine, memory, disk) stops the job
with :class:`JobError` instead of being written as per-row errors.

Files, for ``--output recs.jsonl``: ``recs.jsonl``, ``recs.errors.jsonl``, ``recs.summary.json``
(rows in/out, errors by reason, duplicates, truncated histories, users/s, engine, options), and
while the job runs ``recs.jsonl.parts/``: ``job.json`` (what this job is) and one part file per
chunk of consecutive input rows, ``part-<first row>-<end row>.jsonl``.

Crash safety and resume:

- A part is written to a temporary name, fsynced and renamed, so it is complete or absent.
- ``job.json`` records the input's content fingerprint, the engine's fingerprint and every option
  that changes results. ``--resume`` continues only the same job; anything else is refused with
  what changed. Parts always tile rows [0, n) with no gap, so the rows done are known from the
  part names alone (no state that grows with the input).
- At the end the parts are merged into the three files (temporary names, fsync, rename; the output
  is renamed last), then the parts folder is renamed away and deleted. A crash at any of these
  points is resumed by ``--resume``: the merge is redone from the parts, which are removed only
  after the output is in place.
- Nothing is created before the first chunk is written, so a job that fails before its first row
  leaves nothing behind.

Repeated user ids: a row whose user id appeared in an earlier row is a repeat (the first row of an id
is kept); repeats are counted, or with ``--unique`` written as error rows naming that first row. They
are found with an external sort, in the parts folder while the merge runs: (64-bit hash of the user
id, row) pairs sorted in runs of :data:`SORT_RUN` pairs (``.sort-*`` files), merged
:data:`MERGE_FAN_IN` runs at a time; one pass over that order finds the repeats, which are sorted back
into row order the same way and read alongside the parts as the output is written. A merge that is
killed leaves runs behind; the next merge removes them and starts again from the parts. Equal hashes
of different ids (odds ~n^2 / 2^65) would be reported as repeats.

Memory stays flat in the number of users: input is streamed, parts are merged one at a time
(Parquet in row groups of :data:`ROW_GROUP` rows), and the repeat check holds a bounded amount
whatever the number of rows: about 40 MB at 10^6 and at 10^7 rows (``benchmarks/dup_ids_memory.py``;
the in-memory check it replaces held 58-109 bytes per row, 0.55-1.0 GB at 10^7 rows with 10-50 %
repeats). On disk, beside the parts, it needs 16 bytes per row while the merge runs (up to twice that
while runs are merged).
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import json
import os
import shutil
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pauserec.errors import DataError, JobError, PauserecError
from pauserec.runtime.lock import hold
from pauserec.frontends.rows import (RecommenderLike, Row, RowOptions, default_sid_text, parse_line, parse_record,
                                   reason_kind, recommend_rows)

PARTS_SUFFIX = ".parts"
JOB_FILE = "job.json"
JOB_VERSION = 1
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
READ_BATCH = 4096  # Parquet rows decoded at a time
ROW_GROUP = 8192  # output rows per Parquet row group (buffered as Python records: keep it small)
SORT_RUN = 1 << 19  # (hash, row) pairs the duplicate check sorts in memory at a time (8 MiB of pairs)
MERGE_FAN_IN = 64  # sorted runs merged at once (more are first merged into longer runs)
RUN_READ = 1024  # pairs read at a time from each run while merging
SORT_PREFIX = ".sort-"  # the duplicate check's sorted runs, in the parts folder while the merge runs


@dataclass(frozen=True)
class BatchConfig:
    input: Path
    output: Path
    errors: Path | None = None  # default: <output without its suffix>.errors.jsonl
    k: int = 10
    beams: int = 20
    batch_size: int = 64
    resume: bool = False
    overwrite: bool = False
    unique: bool = False  # a repeated user id is an error row (default: kept and counted)
    user_field: str = "user_id"
    history_field: str = "history"
    exclude_history: bool = False
    exclude_file: Path | None = None  # item ids excluded for every user, one per line
    # memory a search call's KV may take (Recommender.kv_memory: "auto", None or a size); not part of the job's
    # identity: a user's results are the same in a call of any size
    kv_memory: int | str | None = "auto"

    @property
    def _stem(self) -> Path:
        return self.output.with_name(self.output.name[: -len(self.output.suffix)] if self.output.suffix else self.output.name)

    @property
    def errors_path(self) -> Path:
        return self.errors or self._stem.with_name(self._stem.name + ".errors.jsonl")

    @property
    def summary_path(self) -> Path:
        return self._stem.with_name(self._stem.name + ".summary.json")

    @property
    def parts_dir(self) -> Path:
        return self.output.with_name(self.output.name + PARTS_SUFFIX)

    @property
    def lock_path(self) -> Path:
        return self.output.with_name(f".{self.output.name}.lock")


@dataclass
class BatchReport:
    input_rows: int = 0
    ok: int = 0
    errors: int = 0
    skipped_done: int = 0  # rows found already done in parts on --resume
    duplicates: int = 0  # rows whose user id appeared in an earlier row
    truncated: int = 0  # histories longer than the engine keeps (most recent items used)
    seconds: float = 0.0
    output: str = ""
    errors_file: str = ""
    summary_file: str = ""
    reasons: dict[str, int] = field(default_factory=dict)
    already_complete: bool = False  # --resume found the job finished: nothing was run


class ChunkRunner:
    """What turns chunks of parsed rows into their records (``pauserec.frontends.rows.recommend_rows``).

    ``map`` yields one list of records per chunk, in the order of the chunks; it may work on several
    chunks at once (the Ray job's actor pool) but must never reorder, drop or repeat them. Everything
    else (numbering, parts, resume, merge, lock, summary) is the job's, the same for every runner.
    """

    def map(self, chunks: Iterable[list[Row]], opts: RowOptions) -> Iterator[list[dict]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the summary records of how the rows were run."""
        return {}


class LocalRunner(ChunkRunner):
    """One recommender in this process, one chunk at a time."""

    def __init__(self, recommender: RecommenderLike, sid_text: Callable[[np.ndarray], str] | None = None) -> None:
        self.recommender = recommender
        self.sid_text = sid_text or getattr(recommender, "sid_text", default_sid_text)

    def map(self, chunks: Iterable[list[Row]], opts: RowOptions) -> Iterator[list[dict]]:
        for rows in chunks:
            yield recommend_rows(self.recommender, rows, opts, self.sid_text)

    def describe(self) -> dict[str, Any]:
        engine = getattr(self.recommender, "engine", None)
        threads = getattr(engine, "threads", None)
        return {"kind": "local", **({"threads": threads} if threads else {})}


# -- input ----------------------------------------------------------------------------------------
def format_of(path: Path, what: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{what} {path} must end in .jsonl or .parquet")
    return fmt


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read {path} as Parquet ({e}); check the file") from e


def check_input(cfg: BatchConfig) -> None:
    """What can be known of the input before its first row: it exists, and a Parquet file has the columns."""
    if not cfg.input.is_file():
        raise DataError(f"input file {cfg.input} not found")
    if format_of(cfg.input, "input") == "parquet":
        names = _open_parquet(cfg.input).schema_arrow.names
        for col, flag in ((cfg.user_field, "--user-field"), (cfg.history_field, "--history-field")):
            if col not in names:
                raise DataError(f"{cfg.input} has no column {col!r} (columns: {', '.join(names)}); "
                                f"name the right one with {flag}")


def iter_rows(cfg: BatchConfig, opts: RowOptions) -> Iterator[Row]:
    """Input rows in order, streamed; malformed rows come out with a reason instead of raising."""
    if format_of(cfg.input, "input") == "jsonl":
        with cfg.input.open("r", encoding="utf-8", errors="replace") as f:
            for line in f:
                yield parse_line(line, opts)
        return
    pf = _open_parquet(cfg.input)
    wanted = [cfg.user_field, cfg.history_field, "exclude", "allow"]
    columns = [c for c in wanted if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=columns):
        for rec in batch.to_pylist():
            yield parse_record(rec, opts)


def count_rows(cfg: BatchConfig) -> int | None:
    """Number of input rows (for progress bars); None when it cannot be known cheaply."""
    try:
        if format_of(cfg.input, "input") == "parquet":
            return _open_parquet(cfg.input).metadata.num_rows
        n, last = 0, b"\n"
        with open(cfg.input, "rb") as f:
            while block := f.read(1 << 20):
                n, last = n + block.count(b"\n"), block[-1:]
        return n + (last != b"\n")
    except (OSError, PauserecError):
        return None


def fingerprint_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file's content, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def read_item_list(path: Path) -> frozenset[str]:
    """Item ids, one per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the item list {path} ({e.strerror}); check the path") from e
    return frozenset(s for line in lines if (s := line.strip()) and not s.startswith("#"))


# -- job identity ---------------------------------------------------------------------------------
def job_identity(cfg: BatchConfig, recommender: RecommenderLike) -> dict[str, Any]:
    """Everything that decides this job's results: a resume must match it exactly."""
    options = {"k": cfg.k, "beams": cfg.beams, "unique": cfg.unique, "user_field": cfg.user_field,
               "history_field": cfg.history_field, "exclude_history": cfg.exclude_history,
               "exclude_file": fingerprint_file(cfg.exclude_file)["sha256"] if cfg.exclude_file else None,
               "output": cfg.output.name, "errors": str(cfg.errors_path.name)}
    engine = getattr(recommender, "engine", None)
    if engine is not None and not engine.batch_invariant:  # scores depend on the batch's other users
        options["batch_size"] = cfg.batch_size
    fp = getattr(recommender, "fingerprint", None)
    return {"version": JOB_VERSION, "input": fingerprint_file(cfg.input),
            "engine": fp() if fp else {"recommender": type(recommender).__name__}, "options": options}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    if old.get("version") != new["version"]:
        return [f"job format {old.get('version')} -> {new['version']}"]
    if old["input"] != new["input"]:
        o, n = old["input"], new["input"]
        out.append(f"the input's content ({o['bytes']:,} bytes, sha256 {o['sha256'][:12]}… -> "
                   f"{n['bytes']:,} bytes, sha256 {n['sha256'][:12]}…)")
    if old["engine"] != new["engine"]:
        keys = sorted(k for k in {*old["engine"], *new["engine"]} if old["engine"].get(k) != new["engine"].get(k))
        out.append(f"the engine ({', '.join(keys)})")
    for key, value in new["options"].items():
        if old["options"].get(key) != value:
            out.append(f"{key}: {old['options'].get(key)!r} -> {value!r}")
    return out


# -- parts ----------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_lines(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _part_name(first: int, end: int) -> str:
    return f"part-{first:012d}-{end:012d}.jsonl"


def scan_parts(parts: Path) -> tuple[list[Path], int]:
    """Part files in row order and the number of rows they cover; JobError when they leave a gap."""
    for stale in parts.glob(".part-*.tmp-*"):  # a part whose write was interrupted
        stale.unlink(missing_ok=True)
    files, end = [], 0
    for p in sorted(parts.glob("part-*-*.jsonl")):
        first, stop = (int(x) for x in p.stem.split("-")[1:3])
        if first != end or stop <= first:
            raise JobError(f"{parts} is inconsistent (rows {end}..{first - 1} are missing before {p.name}); "
                           "pass --overwrite to discard it and start over")
        files.append(p)
        end = stop
    return files, end


def _trash_dirs(cfg: BatchConfig) -> list[Path]:
    return list(cfg.parts_dir.parent.glob(f".{cfg.parts_dir.name}.done-*"))


def _prepare(cfg: BatchConfig, identity: dict[str, Any]) -> int:
    """Check the output side against what is on disk; return the rows already done (resume)."""
    for trash in _trash_dirs(cfg):  # a crash while removing the parts of a finished job
        shutil.rmtree(trash, ignore_errors=True)
    parts = cfg.parts_dir
    if parts.exists():
        if cfg.overwrite:
            shutil.rmtree(parts)
        elif not cfg.resume:
            raise PauserecError(f"{parts} holds an interrupted run; pass --resume to continue it, "
                                "or --overwrite to discard it and start over")
        else:
            try:
                old = json.loads((parts / JOB_FILE).read_text())
            except (OSError, ValueError):
                raise PauserecError(f"{parts} has no readable {JOB_FILE}, so what it holds cannot be trusted; "
                                    "pass --overwrite to discard it and start over") from None
            diffs = _differences(old, identity)
            if diffs:
                raise PauserecError(f"{parts} holds an interrupted run of a different job; changed since: "
                                    f"{'; '.join(diffs)}. Rerun with the same input, engine and options to "
                                    "continue it, or pass --overwrite to discard it and start over")
            return scan_parts(parts)[1]
    if cfg.resume and cfg.output.exists():
        try:
            summary = json.loads(cfg.summary_path.read_text())
        except (OSError, ValueError):
            summary = {}
        diffs = _differences(summary["job"], identity) if "job" in summary else ["(no summary of that job)"]
        if diffs:
            raise PauserecError(f"output {cfg.output} exists from another job; changed since: {'; '.join(diffs)}. "
                                "Pass --overwrite to replace it, or choose another --output")
        raise _Complete(summary)
    for path, what in ((cfg.output, "output"), (cfg.errors_path, "errors file"), (cfg.summary_path, "summary")):
        if path.exists() and not cfg.overwrite:
            raise PauserecError(f"{what} {path} exists; pass --overwrite to replace it, or choose another --output")
    return 0


class _Complete(Exception):
    """--resume of a job that already finished (carries its summary)."""

    def __init__(self, summary: dict[str, Any]) -> None:
        self.summary = summary


# -- merge ----------------------------------------------------------------------------------------
def _iter_part_records(files: list[Path]) -> Iterator[list[dict]]:
    for p in files:
        with open(p, encoding="utf-8") as f:
            yield [json.loads(line) for line in f]


def _user_keys(files: list[Path]) -> Iterator[tuple[int, int]]:
    """(64-bit hash of the user id, row) of every row that has a user id, in row order."""
    for records in _iter_part_records(files):
        for r in records:
            if r["user_id"] is not None:
                yield hash(r["user_id"]), r["row"]


class _ExternalSort:
    """Pairs of int64 sorted by (first, second) in bounded memory, whatever their number.

    ``add`` keeps at most ``run_pairs`` pairs in memory; each full buffer is sorted and written to
    ``folder`` as a run (raw int64 pairs, named ``.sort-<name>-<n>``). Runs are merged
    (``heapq.merge``, reading each in blocks of ``read_pairs`` pairs) ``fan_in`` at a time as they come:
    ``fan_in`` runs of one level become one run of the next, so at most ``fan_in`` runs are open at once
    and fewer than ``fan_in`` runs per level are kept (a level per factor ``fan_in`` of pairs). ``close``
    removes the files."""

    def __init__(self, folder: Path, name: str, run_pairs: int, fan_in: int, read_pairs: int) -> None:
        if run_pairs < 1 or fan_in < 2 or read_pairs < 1:
            raise ValueError("run_pairs and read_pairs must be >= 1, fan_in >= 2")
        self.folder, self.name = folder, name
        self.run_pairs, self.fan_in, self.read_pairs = run_pairs, fan_in, read_pairs
        self.a, self.b = array("q"), array("q")
        self.levels: list[list[Path]] = []  # runs of run_pairs * fan_in ** level pairs (the last ones shorter)
        self.readers: list[Iterator[list[int]]] = []  # of the merge under way
        self.made = 0

    def add(self, a: int, b: int) -> None:
        self.a.append(a)
        self.b.append(b)
        if len(self.a) >= self.run_pairs:
            self._spill()

    def _path(self) -> Path:
        self.made += 1
        return self.folder / f"{SORT_PREFIX}{self.name}-{self.made:06d}"

    def _spill(self) -> None:
        if not self.a:
            return
        a, b = np.frombuffer(self.a, np.int64), np.frombuffer(self.b, np.int64)
        order = np.lexsort((b, a))
        pairs = np.empty((len(order), 2), np.int64)
        pairs[:, 0], pairs[:, 1] = a[order], b[order]
        path = self._path()
        try:
            pairs.tofile(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        del a, b  # the buffers are released before the arrays are replaced
        self.a, self.b = array("q"), array("q")
        self._add_run(path, 0)

    def _add_run(self, path: Path, level: int) -> None:
        if level == len(self.levels):
            self.levels.append([])
        self.levels[level].append(path)
        if len(self.levels[level]) == self.fan_in:
            group, self.levels[level] = self.levels[level], []
            self._add_run(self._merge_into_one(group), level + 1)

    def _read(self, path: Path) -> Iterator[list[int]]:
        with open(path, "rb") as f:
            while (block := np.fromfile(f, np.int64, count=2 * self.read_pairs)).size:
                yield from block.reshape(-1, 2).tolist()

    def _merged(self, runs: list[Path]) -> Iterator[list[int]]:
        self.readers = [self._read(p) for p in runs]  # closed (files and all) by close_readers()
        return heapq.merge(*self.readers)

    def close_readers(self) -> None:
        for r in self.readers:
            r.close()  # type: ignore[attr-defined]
        self.readers = []

    def _merge_into_one(self, runs: list[Path]) -> Path:
        path = self._path()
        try:
            with open(path, "wb") as f:
                block = array("q")
                for pair in self._merged(runs):
                    block.extend(pair)
                    if len(block) >= 2 * self.read_pairs:
                        block.tofile(f)
                        block = array("q")
                block.tofile(f)
        except BaseException:
            for p in (path, *runs):  # no longer in self.levels: close() would not remove them
                p.unlink(missing_ok=True)
            raise
        finally:
            self.close_readers()
        for p in runs:
            p.unlink()
        return path

    def sorted(self) -> Iterator[list[int]]:
        """Every pair added, as ``[first, second]``, in ascending order; call once, after the last ``add``."""
        self._spill()
        runs = [p for level in self.levels for p in level]
        while len(runs) > self.fan_in:
            runs = [self._merge_into_one(runs[: self.fan_in]), *runs[self.fan_in:]]
        self.levels = [runs]
        return self._merged(runs)

    def close(self) -> None:
        self.close_readers()
        for level in self.levels:
            for p in level:
                p.unlink(missing_ok=True)
        self.levels, self.a, self.b = [], array("q"), array("q")


@contextmanager
def _repeats(keys: Iterable[tuple[int, int]], folder: Path, run_pairs: int, fan_in: int,
             read_pairs: int) -> Iterator[tuple[int, Iterator[list[int]]]]:
    """(number of repeats, ``[row, first row with the same key]`` of each repeat in ascending row order).

    ``keys`` is (key, row) pairs with rows ascending; a repeat is a row whose key appeared in an earlier
    row, and the first row of a key is kept. Memory is bounded whatever the number of pairs: the pairs
    are sorted by (key, row) on disk in ``folder``, the repeats found in one pass over that order are
    sorted back into row order on disk (at most 2 x ``fan_in`` runs open at once: the second sort merges
    while the first one's last merge reads), and the files are removed on leaving the context."""
    by_key = _ExternalSort(folder, "keys", run_pairs, fan_in, read_pairs)
    by_row = _ExternalSort(folder, "repeats", run_pairs, fan_in, read_pairs)
    try:
        for key, row in keys:
            by_key.add(key, row)
        count, last, first = 0, None, 0
        for key, row in by_key.sorted():  # rows ascend inside a run of equal keys: the first is the earliest
            if key == last:
                by_row.add(row, first)
                count += 1
            else:
                last, first = key, row
        by_key.close()
        yield count, by_row.sorted()
    finally:
        by_key.close()
        by_row.close()


def _remove_sort_files(folder: Path) -> None:
    """The sorted runs left by a merge that was killed (they are redone from the parts)."""
    for stale in folder.glob(f"{SORT_PREFIX}*"):
        stale.unlink(missing_ok=True)


def output_schema():
    import pyarrow as pa

    return pa.schema([("row", pa.int64()), ("user_id", pa.string()), ("items", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float32())), ("sids", pa.list_(pa.string()))])


class _OutputWriter:
    """Recommendation rows -> JSONL lines or typed Parquet row groups."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.fmt, self.buffer = fmt, []
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self.schema = output_schema()
            self.writer = pq.ParquetWriter(path, self.schema)
        else:
            self.file = open(path, "w", encoding="utf-8")

    def write(self, rec: dict) -> None:
        if self.fmt == "jsonl":
            self.file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            return
        self.buffer.append(rec)
        if len(self.buffer) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def close(self) -> None:
        if self.fmt == "jsonl":
            self.file.close()
        else:
            self._flush()
            self.writer.close()

    def abort(self) -> None:
        """Close the file after a failure: buffered rows are dropped, and nothing raised hides the first error."""
        try:
            (self.file if self.fmt == "jsonl" else self.writer).close()
        except Exception:  # noqa: BLE001
            pass


def _write_merged(cfg: BatchConfig, files: list[Path], dups: Iterator[list[int]], report: BatchReport,
                  out: _OutputWriter, errors_tmp: Path) -> None:
    """The parts' records, in order: errors (and --unique repeats) to ``errors_tmp``, the rest to ``out``.

    ``dups`` is ``[row, first row with the same user id]`` of each repeated user id, in row order."""
    dup = next(dups, None)
    with open(errors_tmp, "w", encoding="utf-8") as ferr:
        for records in _iter_part_records(files):
            for r in records:
                if dup is not None and dup[0] == r["row"]:
                    if cfg.unique:
                        r = {"row": r["row"], "user_id": r["user_id"],
                             "reason": f"duplicate user id (first at row {dup[1]}); --unique is set"}
                    dup = next(dups, None)
                if "reason" in r:
                    ferr.write(json.dumps(r, ensure_ascii=False) + "\n")
                    kind = reason_kind(r["reason"])
                    report.reasons[kind] = report.reasons.get(kind, 0) + 1
                    report.errors += 1
                else:
                    report.truncated += r.pop("truncated", 0) > 0
                    out.write(r)
                    report.ok += 1


def _merge(cfg: BatchConfig, files: list[Path], report: BatchReport) -> None:
    """Parts -> output + errors (each in input order), counting into ``report``; nothing is renamed into
    place unless every input row is accounted for."""
    _remove_sort_files(cfg.parts_dir)
    tmp = {p: p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in (cfg.output, cfg.errors_path)}
    try:
        with _repeats(_user_keys(files), cfg.parts_dir, SORT_RUN, MERGE_FAN_IN, RUN_READ) as (repeats, dups):
            report.duplicates = repeats
            out = _OutputWriter(tmp[cfg.output], format_of(cfg.output, "output"))
            try:
                _write_merged(cfg, files, dups, report, out, tmp[cfg.errors_path])
            except BaseException:
                out.abort()  # closed before its file is removed below
                raise
            out.close()
        if report.ok + report.errors != report.input_rows:
            raise JobError(f"row accounting failed: {report.input_rows:,} rows in, {report.ok:,} out + "
                           f"{report.errors:,} errors; {cfg.parts_dir} is kept: pass --overwrite to start over")
        for t in tmp.values():
            with open(t, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp[cfg.errors_path], cfg.errors_path)
        os.replace(tmp[cfg.output], cfg.output)  # last: the output's presence means the job is done
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)


def _summary(cfg: BatchConfig, identity: dict[str, Any], report: BatchReport, processed: int,
             runner: dict[str, Any]) -> dict[str, Any]:
    return {
        "input": str(cfg.input), "input_bytes": identity["input"]["bytes"], "input_sha256": identity["input"]["sha256"],
        "output": str(cfg.output), "errors": str(cfg.errors_path), "engine": identity["engine"],
        "options": {**identity["options"], "batch_size": cfg.batch_size, "exclude_file": str(cfg.exclude_file or "")},
        "rows_in": report.input_rows, "rows_out": report.ok, "error_rows": report.errors,
        "errors_by_reason": dict(sorted(report.reasons.items(), key=lambda kv: -kv[1])),
        "duplicate_user_ids": report.duplicates, "truncated_histories": report.truncated,
        "rows_done_before_resume": report.skipped_done, "rows_this_run": processed,
        "seconds_this_run": round(report.seconds, 3),
        "users_per_second": round(processed / report.seconds, 2) if report.seconds > 0 else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "runner": runner, "job": identity,
    }


def _report_of(cfg: BatchConfig, summary: dict[str, Any]) -> BatchReport:
    return BatchReport(input_rows=summary["rows_in"], ok=summary["rows_out"], errors=summary["error_rows"],
                       skipped_done=summary["rows_in"], duplicates=summary["duplicate_user_ids"],
                       truncated=summary["truncated_histories"], output=str(cfg.output),
                       errors_file=str(cfg.errors_path), summary_file=str(cfg.summary_path),
                       reasons=summary["errors_by_reason"], already_complete=True)


# -- the job --------------------------------------------------------------------------------------
def _job_failure(e: BaseException, where: str, cfg: BatchConfig) -> JobError:
    if isinstance(e, MemoryError):
        why = "out of memory: lower --batch-size or --beams"
    elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
        why = f"the disk is full ({e.filename or cfg.parts_dir}): free space"
    elif isinstance(e, PauserecError):
        why = str(e)
    else:
        why = f"{type(e).__name__}: {e}"
    return JobError(f"the job stopped {where}: {why}. Rows finished before are kept in {cfg.parts_dir} "
                    "(when it exists); fix the cause and rerun with --resume")


def check_sizes(cfg: BatchConfig) -> None:
    """--k, --beams and --batch-size a job can run with."""
    if cfg.k < 1 or cfg.beams < 1 or cfg.batch_size < 1:
        raise PauserecError("--k, --beams and --batch-size must all be >= 1")
    if cfg.k > cfg.beams:
        raise PauserecError(f"--k {cfg.k} > --beams {cfg.beams}: a search with {cfg.beams} beams names at most "
                            f"{cfg.beams} SIDs, so rows would come out short; pass --beams >= --k")


def _preflight(cfg: BatchConfig, recommender: RecommenderLike, opts: RowOptions) -> None:
    check_sizes(cfg)
    format_of(cfg.output, "output")
    check_input(cfg)
    check = getattr(recommender, "check_request", None)
    if check is not None:
        check(cfg.k, cfg.beams)
    if opts.exclude:
        why = recommender.validate_filter(sorted(opts.exclude), "exclude")  # type: ignore[attr-defined]
        if why:
            raise DataError(f"--exclude-file {cfg.exclude_file}: {why}; remove them from the file")


def run_batch(cfg: BatchConfig, recommender: RecommenderLike, progress: Callable[[int], None] | None = None,
              sid_text: Callable[[np.ndarray], str] | None = None, runner: ChunkRunner | None = None) -> BatchReport:
    """Run (or resume) the whole job; ``progress(n)`` is called with the number of input rows just handled.

    ``recommender`` answers the checks made before the first row (k / beams, exclude ids) and
    identifies the engine for resume; ``runner`` recommends the chunks (default: ``recommender``
    itself, in this process; the Ray job passes its actor pool).
    """
    t0 = time.perf_counter()
    exclude = read_item_list(cfg.exclude_file) if cfg.exclude_file else frozenset()
    opts = RowOptions(k=cfg.k, beams=cfg.beams, user_field=cfg.user_field, history_field=cfg.history_field,
                      exclude_history=cfg.exclude_history, exclude=exclude)
    _preflight(cfg, recommender, opts)
    runner = runner or LocalRunner(recommender, sid_text)
    identity = job_identity(cfg, recommender)
    with hold(cfg.lock_path, f"output {cfg.output}"):
        try:
            done = _prepare(cfg, identity)
        except _Complete as c:  # nothing left to do: report the finished job
            return _report_of(cfg, c.summary)
        report = BatchReport(skipped_done=done)
        processed = _run_chunks(cfg, runner, opts, identity, report, done, progress)
        report.seconds = time.perf_counter() - t0
        summary = _summary(cfg, identity, report, processed, runner.describe())
        _atomic_write(cfg.summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
        trash = cfg.parts_dir.with_name(f".{cfg.parts_dir.name}.done-{os.getpid()}")
        os.replace(cfg.parts_dir, trash)  # atomic: a crash from here on leaves a finished job
        shutil.rmtree(trash, ignore_errors=True)
    report.output, report.errors_file, report.summary_file = str(cfg.output), str(cfg.errors_path), str(cfg.summary_path)
    return report


def _run_chunks(cfg: BatchConfig, runner: ChunkRunner, opts: RowOptions, identity: dict[str, Any],
                report: BatchReport, done: int, progress: Callable[[int], None] | None) -> int:
    """Rows [done, n) -> parts (in order, each written once), then the merge; returns the rows run now."""
    stat0 = _stat(cfg.input)
    if progress and done:
        progress(done)
    spans: deque[tuple[int, int]] = deque()  # (first row, rows) of the chunks handed to the runner, not yet written
    stage = "rows"

    def chunks() -> Iterator[list[Row]]:
        chunk: list[Row] = []
        for index, row in enumerate(iter_rows(cfg, opts)):
            report.input_rows += 1
            if index < done:
                continue
            chunk.append(row)
            if len(chunk) >= cfg.batch_size:
                spans.append((index + 1 - len(chunk), len(chunk)))
                yield chunk
                chunk = []
        if chunk:
            spans.append((report.input_rows - len(chunk), len(chunk)))
            yield chunk

    def start_parts() -> None:  # only when the first part is written is anything created
        cfg.parts_dir.mkdir(parents=True)
        _atomic_write(cfg.parts_dir / JOB_FILE, lambda tmp: tmp.write_text(json.dumps(identity, indent=1)))

    processed = 0
    try:
        for records in runner.map(chunks(), opts):
            first, n = spans[0]
            if len(records) != n:
                raise JobError(f"the runner returned {len(records)} records for the {n} rows from row {first}")
            for i, r in enumerate(records):
                r["row"] = first + i
            if not cfg.parts_dir.exists():
                start_parts()
            _atomic_write(cfg.parts_dir / _part_name(first, first + n), lambda tmp: _write_lines(tmp, records))
            spans.popleft()
            processed += n
            if progress:
                progress(n)
        stage = "end"
        if report.input_rows < done:
            raise JobError(f"{cfg.parts_dir} covers {done:,} rows but the input has only {report.input_rows:,}; "
                           "pass --overwrite to start over")
        if not cfg.parts_dir.exists():  # an empty input
            start_parts()
        if _stat(cfg.input) != stat0:
            raise JobError(f"{cfg.input} changed while the job ran; rerun with --overwrite on a file that stays put")
        stage = "merge"
        files, _ = scan_parts(cfg.parts_dir)
        _merge(cfg, files, report)
    except JobError:
        raise
    except Exception as e:  # EngineError, MemoryError, OSError, an engine's own exception types
        if stage == "merge":
            where = "while merging the parts into the output (every row was recommended)"
        elif stage == "end":
            where = "after its last row"
        else:
            where = f"at input rows from {spans[0][0] if spans else report.input_rows}"
        raise _job_failure(e, where, cfg) from e
    return processed


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns
