"""The batch recommend job: users in (JSONL or Parquet), recommendations out, crash-safe and resumable.

Input rows carry a user id and a history of external item ids::

    {"user_id": "u1", "history": ["12", "7", "301"]}

Every input row ends up in exactly one of two places: the output (one row of recommendations) or
the errors file (the row number, the user id and the reason: malformed JSON, empty history, unknown
item ids, ...). Bad rows never stop the job.

Crash safety: rows are processed in chunks of ``batch_size`` input rows. Each chunk's results are
written to a part file in ``<output>.parts/`` (write to a temporary name, fsync, rename), so a part
is either complete or absent. At the end the parts are merged into the output and errors files,
each written to a temporary name and renamed into place, and the parts folder is removed. A run
killed at any point (even ``kill -9``) and started again with ``resume=True`` skips the rows already
in parts: no user is lost and none is duplicated, and the output never holds a truncated row.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pauserec.errors import DataError, PauserecError

PARTS_SUFFIX = ".parts"
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


class RecommenderLike(Protocol):
    def validate_history(self, history: list) -> str | None: ...
    def recommend(self, histories: list[list], k: int = 10, beams: int = 20) -> Any: ...


@dataclass(frozen=True)
class BatchConfig:
    input: Path
    output: Path
    errors: Path | None = None  # default: <output stem>.errors.jsonl beside the output
    k: int = 10
    beams: int = 20
    batch_size: int = 64
    resume: bool = False
    overwrite: bool = False
    user_field: str = "user_id"
    history_field: str = "history"

    @property
    def errors_path(self) -> Path:
        return self.errors or self.output.with_name(self.output.name.split(".")[0] + ".errors.jsonl")

    @property
    def parts_dir(self) -> Path:
        return self.output.with_name(self.output.name + PARTS_SUFFIX)


@dataclass
class BatchReport:
    input_rows: int = 0
    ok: int = 0
    errors: int = 0
    skipped_done: int = 0  # rows found already done in parts on --resume
    seconds: float = 0.0
    output: str = ""
    errors_file: str = ""
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class Row:
    index: int
    user_id: str
    history: list | None  # None when the row is malformed
    reason: str | None = None


# -- input ----------------------------------------------------------------------------------------
def _format_of(path: Path, what: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{what} {path} must end in .jsonl or .parquet")
    return fmt


def _row_from_record(index: int, rec: Any, cfg: BatchConfig) -> Row:
    if not isinstance(rec, dict):
        return Row(index, str(index), None, "row is not a JSON object")
    user = rec.get(cfg.user_field)
    user_id = str(index) if user is None else str(user)
    hist = rec.get(cfg.history_field)
    if hist is None:
        return Row(index, user_id, None, f"missing field {cfg.history_field!r}")
    if isinstance(hist, np.ndarray):
        hist = hist.tolist()
    if not isinstance(hist, list):
        return Row(index, user_id, None, f"{cfg.history_field!r} must be a list of item ids")
    return Row(index, user_id, hist)


def iter_rows(cfg: BatchConfig) -> Iterator[Row]:
    """Input rows in order; malformed rows come out with a reason instead of raising."""
    if not cfg.input.is_file():
        raise DataError(f"input file {cfg.input} not found")
    if _format_of(cfg.input, "input") == "jsonl":
        with cfg.input.open("r", encoding="utf-8", errors="replace") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    yield Row(index, str(index), None, "empty line")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield Row(index, str(index), None, f"malformed JSON: {e.msg} at column {e.colno}")
                    continue
                yield _row_from_record(index, rec, cfg)
        return
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(cfg.input)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read {cfg.input} as Parquet ({e}); check the file") from e
    if cfg.history_field not in pf.schema_arrow.names:
        raise DataError(f"{cfg.input} has no column {cfg.history_field!r} (columns: {pf.schema_arrow.names})")
    index = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield _row_from_record(index, rec, cfg)
            index += 1


def count_rows(cfg: BatchConfig) -> int | None:
    """Number of input rows (for progress bars); None when it cannot be known cheaply."""
    try:
        if _format_of(cfg.input, "input") == "jsonl":
            with open(cfg.input, "rb") as f:
                data = f.read()
            return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        import pyarrow.parquet as pq

        return pq.ParquetFile(cfg.input).metadata.num_rows
    except Exception:
        return None


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


def _read_parts(parts: Path) -> tuple[list[Path], set[int]]:
    files = sorted(parts.glob("part-*.jsonl"))
    done: set[int] = set()
    for p in files:
        with open(p, encoding="utf-8") as f:
            done.update(json.loads(line)["row"] for line in f)
    return files, done


def _prepare(cfg: BatchConfig) -> tuple[int, set[int]]:
    """Check the output side; return (next part number, rows already done)."""
    _format_of(cfg.output, "output")
    parts = cfg.parts_dir
    if parts.exists():
        if not cfg.resume:
            raise PauserecError(
                f"{parts} holds an interrupted run; pass --resume to continue it, or delete that folder to start over"
            )
        files, done = _read_parts(parts)
        return len(files) + 1, done
    if cfg.output.exists() and not cfg.overwrite:
        hint = "it is complete already" if cfg.resume else "pass --overwrite to replace it"
        raise PauserecError(f"output {cfg.output} exists; {hint}")
    parts.mkdir(parents=True)
    return 1, set()


def _iter_part_records(parts: Path) -> Iterator[list[dict]]:
    # Parts are written in input order (a crash only loses the chunk in flight), so streaming them
    # by part number keeps the output in input order without holding it all in memory.
    for p in sorted(parts.glob("part-*.jsonl")):
        with open(p, encoding="utf-8") as f:
            yield [json.loads(line) for line in f]


def _merge(cfg: BatchConfig, report: BatchReport) -> None:
    """Parts -> output + errors files (each written atomically), then remove the parts."""
    fmt = _format_of(cfg.output, "output")

    def write_outputs(out_tmp: Path, err_tmp: Path) -> None:
        writer = None
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema(
                [("row", pa.int64()), ("user_id", pa.string()), ("items", pa.list_(pa.string())),
                 ("scores", pa.list_(pa.float32())), ("sids", pa.list_(pa.string()))]
            )
            writer = pq.ParquetWriter(out_tmp, schema)
        with open(err_tmp, "w", encoding="utf-8") as ferr, open(
            out_tmp if fmt == "jsonl" else os.devnull, "w", encoding="utf-8"
        ) as fout:
            for records in _iter_part_records(cfg.parts_dir):
                ok = [r for r in records if "reason" not in r]
                for r in records:
                    if "reason" in r:
                        ferr.write(json.dumps(r, ensure_ascii=False) + "\n")
                        kind = r["reason"].split(":")[0]
                        report.reasons[kind] = report.reasons.get(kind, 0) + 1
                if writer is not None:
                    if ok:
                        writer.write_table(pa.Table.from_pylist(ok, schema=schema))
                else:
                    for r in ok:
                        fout.write(json.dumps(r, ensure_ascii=False) + "\n")
                report.ok += len(ok)
                report.errors += len(records) - len(ok)
        if writer is not None:
            writer.close()

    out_tmp = cfg.output.with_name(f".{cfg.output.name}.tmp-{os.getpid()}")
    err_tmp = cfg.errors_path.with_name(f".{cfg.errors_path.name}.tmp-{os.getpid()}")
    try:
        write_outputs(out_tmp, err_tmp)
        for tmp in (out_tmp, err_tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(err_tmp, cfg.errors_path)
        os.replace(out_tmp, cfg.output)
    finally:
        out_tmp.unlink(missing_ok=True)
        err_tmp.unlink(missing_ok=True)
    shutil.rmtree(cfg.parts_dir)


# -- the job --------------------------------------------------------------------------------------
def _recommend_chunk(rec: RecommenderLike, rows: list[Row], cfg: BatchConfig, sid_text) -> list[dict]:
    out: list[dict] = []
    good: list[Row] = []
    for row in rows:
        reason = row.reason or rec.validate_history(row.history)
        if reason:
            out.append({"row": row.index, "user_id": row.user_id, "reason": reason})
        else:
            good.append(row)
    # A batch-level failure is retried row by row, so one bad row cannot sink its neighbours.
    groups = [good] if good else []
    while groups:
        group = groups.pop()
        try:
            res = rec.recommend([r.history for r in group], k=cfg.k, beams=cfg.beams)
        except PauserecError as e:
            if len(group) == 1:
                out.append({"row": group[0].index, "user_id": group[0].user_id, "reason": str(e)})
            else:
                groups.extend([[r] for r in group])
            continue
        for i, row in enumerate(group):
            keep = res.item_index[i] >= 0
            out.append(
                {
                    "row": row.index,
                    "user_id": row.user_id,
                    "items": [str(x) for x in res.items[i][keep]],
                    "scores": [round(float(s), 6) for s in res.scores[i][keep]],
                    "sids": [sid_text(s) for s in res.sids[i][keep]],
                }
            )
    return out


def run_batch(
    cfg: BatchConfig,
    recommender: RecommenderLike,
    sid_text: Callable[[np.ndarray], str] = lambda codes: " ".join(map(str, codes)),
    progress: Callable[[int], None] | None = None,
) -> BatchReport:
    """Run the whole job; ``progress(n)`` is called with the number of input rows just handled."""
    import time

    t0 = time.perf_counter()
    if cfg.k < 1 or cfg.beams < 1 or cfg.batch_size < 1:
        raise PauserecError("--k, --beams and --batch-size must all be >= 1")
    part_no, done = _prepare(cfg)
    report = BatchReport(skipped_done=len(done))
    chunk: list[Row] = []

    def flush() -> None:
        nonlocal part_no, chunk
        records = _recommend_chunk(recommender, chunk, cfg, sid_text)
        _atomic_write(cfg.parts_dir / f"part-{part_no:06d}.jsonl", lambda tmp: _write_lines(tmp, records))
        part_no += 1
        if progress:
            progress(len(chunk))
        chunk = []

    for row in iter_rows(cfg):
        report.input_rows += 1
        if row.index in done:
            continue
        chunk.append(row)
        if len(chunk) >= cfg.batch_size:
            flush()
    if chunk:
        flush()
    _merge(cfg, report)
    report.output, report.errors_file = str(cfg.output), str(cfg.errors_path)
    report.seconds = time.perf_counter() - t0
    return report
