"""Scale-out on Ray Data: the batch job's rows, recommended by a pool of actors, one engine per actor.

As a library, in any Ray Data pipeline (``pip install "pauserec[ray]"`` on every node; the engine
directory on a path every node can read)::

    ds = ray.data.read_parquet("s3://bucket/users/")            # columns user_id, history
    recs = ds.map_batches(RecommendBatch, fn_constructor_kwargs={"engine": "/mnt/engines/pause", "k": 10},
                          batch_size=64, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=8),
                          num_cpus=4)
    recs.write_parquet("s3://bucket/recs/")

Every input row comes out as one row: ``user_id, items, scores, sids, history_truncated, error``
(``error`` is null for a recommended row and holds the reason otherwise), so bad rows never fail a
task. The rules are the local job's (:mod:`pauserec.runtime.rows`). A failure of the engine itself
fails the task, which Ray retries (on a restarted actor) and, if it keeps failing, fails the job.

:func:`run_ray` is ``pauserec recommend --ray``: the same job as :func:`pauserec.runtime.batch.run_batch`
over Ray Data (read -> ``map_batches`` -> ``write_parquet`` into a temporary directory renamed into
place), with the same row accounting (rows out + error rows = rows in, checked) and a summary JSON.
Ray numbers no rows, so rows are identified by ``user_id`` (and malformed lines by their text).

This module imports neither torch nor (until called) Ray; Ray sets ``OMP_NUM_THREADS=1`` in its
workers, so the actor sets ONNX Runtime's threads from the CPUs Ray assigned it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pauserec.errors import JobError, PauserecError
from pauserec.runtime.batch import (BatchConfig, BatchReport, check_input, check_sizes, count_rows, format_of,
                                    read_item_list)
from pauserec.runtime.rows import RowOptions, parse_line, parse_record, reason_kind, recommend_rows

TEXT_COLUMN = "text"  # what ray.data.read_text names a line
# Reading and writing reserve no CPU: the actors hold the CPUs (a pool that fills a node would otherwise
# leave no CPU for the read tasks, and the job would wait forever); lines are parsed in the actors.
IO_CPUS = 0


def result_schema():
    import pyarrow as pa

    return pa.schema([("user_id", pa.string()), ("items", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float32())), ("sids", pa.list_(pa.string())),
                      ("history_truncated", pa.int32()), ("error", pa.string())])


def actor_cpus() -> int:
    """CPUs Ray assigned to this actor (or this process's CPUs outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            n = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if n:
                return max(1, int(n))
    except ImportError:
        pass
    return len(os.sched_getaffinity(0))


class RecommendBatch:
    """A callable class for ``ray.data.Dataset.map_batches(..., batch_format="pyarrow")``.

    Takes batches with ``user_id`` and ``history`` columns (optionally ``exclude`` / ``allow``), or a
    ``text`` column of raw JSONL lines (``ray.data.read_text``), and returns the result columns.
    """

    def __init__(self, engine: str | Path, k: int = 10, beams: int = 20, threads: int | None = None,
                 provider: str = "cpu", user_field: str = "user_id", history_field: str = "history",
                 exclude_history: bool = False, exclude: Sequence[str] = ()) -> None:
        from pauserec.runtime import Engine, Recommender

        self.threads = int(threads or actor_cpus())
        self.rec = Recommender(Engine.load(engine, provider=provider, threads=self.threads))
        self.rec.check_request(k, beams)
        self.opts = RowOptions(k=k, beams=beams, user_field=user_field, history_field=history_field,
                               exclude_history=exclude_history, exclude=frozenset(map(str, exclude)))

    def __call__(self, batch):
        import pyarrow as pa

        if TEXT_COLUMN in batch.column_names and self.opts.history_field not in batch.column_names:
            rows = [parse_line(line, self.opts) for line in batch.column(TEXT_COLUMN).to_pylist()]
        else:
            rows = [parse_record(rec, self.opts) for rec in batch.to_pylist()]
        records = recommend_rows(self.rec, rows, self.opts, self.rec.sid_text)
        columns = {
            "user_id": [r["user_id"] for r in records],
            "items": [r.get("items") for r in records],
            "scores": [r.get("scores") for r in records],
            "sids": [r.get("sids") for r in records],
            "history_truncated": [r.get("truncated", 0) for r in records],
            "error": [r.get("reason") for r in records],
        }
        return pa.Table.from_pydict(columns, schema=result_schema())


def _check(cfg: BatchConfig) -> None:
    if cfg.output.suffix.lower() != ".parquet":
        raise PauserecError(f"--ray writes a Parquet dataset (a directory of files): name the output "
                            f"*.parquet, not {cfg.output.name}")
    if cfg.resume:
        raise PauserecError("--resume does not apply to --ray: Ray retries failed tasks itself, and a job whose "
                            "driver died is rerun from the start with --overwrite")
    if cfg.unique:
        raise PauserecError("--unique is not supported with --ray (duplicates are counted in the summary); "
                            "deduplicate the input first or run without --ray")
    check_sizes(cfg)
    if "://" not in str(cfg.input):
        check_input(cfg)
    for path, what in ((cfg.output, "output"), (cfg.summary_path, "summary")):
        if path.exists() and not cfg.overwrite:
            raise PauserecError(f"{what} {path} exists; pass --overwrite to replace it, or choose another --output")


def _read(cfg: BatchConfig):
    import ray.data

    path = str(cfg.input)
    if format_of(cfg.input, "input") == "jsonl":  # lines, parsed by the actors: a bad line is one error row
        return ray.data.read_text(path, drop_empty_lines=False, num_cpus=IO_CPUS)
    import pyarrow.parquet as pq

    names = pq.ParquetFile(path).schema_arrow.names if "://" not in path else None
    wanted = [cfg.user_field, cfg.history_field, "exclude", "allow"]
    return ray.data.read_parquet(path, columns=[c for c in wanted if names is None or c in names], num_cpus=IO_CPUS)


def _account(tmp: Path) -> tuple[int, dict[str, int], int, int]:
    """(rows, errors by reason, duplicate user ids, truncated histories) of a written result dataset."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(tmp, columns=["user_id", "history_truncated", "error"])
    reasons: dict[str, int] = {}
    for reason in table.column("error").drop_null().to_pylist():
        kind = reason_kind(reason)
        reasons[kind] = reasons.get(kind, 0) + 1
    ids = table.column("user_id").drop_null().to_numpy(zero_copy_only=False).astype(str)
    dups = len(ids) - len(np.unique(ids))
    truncated = int(np.count_nonzero(table.column("history_truncated").to_numpy() > 0))
    return table.num_rows, reasons, dups, truncated


def run_ray(cfg: BatchConfig, engine: str | Path, address: str | None = None, concurrency: int = 1,
            threads: int | None = None, provider: str = "cpu") -> BatchReport:
    """The batch job on Ray Data; ``address`` of a running cluster (None: start a local one)."""
    import ray

    t0 = time.perf_counter()
    _check(cfg)
    exclude = sorted(read_item_list(cfg.exclude_file)) if cfg.exclude_file else []
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    tmp = cfg.output.with_name(f".{cfg.output.name}.tmp-ray-{os.getpid()}")
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ds = _read(cfg)
        per_actor = int(threads or max(1, int(ray.cluster_resources().get("CPU", 1)) // concurrency))
        out = ds.map_batches(  # Ray Data restarts a dead actor and retries its task (max_restarts=-1 by default)
            RecommendBatch, batch_size=cfg.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=per_actor,
            fn_constructor_kwargs={"engine": str(Path(engine).resolve()), "k": cfg.k, "beams": cfg.beams,
                                   "threads": per_actor, "provider": provider, "user_field": cfg.user_field,
                                   "history_field": cfg.history_field, "exclude_history": cfg.exclude_history,
                                   "exclude": exclude})
        out.write_parquet(str(tmp), ray_remote_args={"num_cpus": IO_CPUS})
        rows, reasons, dups, truncated = _account(tmp)
        rows_in = count_rows(cfg) if "://" not in str(cfg.input) else ds.count()
        errors = sum(reasons.values())
        if rows != rows_in:
            raise JobError(f"row accounting failed: {rows_in:,} rows in, {rows - errors:,} out + {errors:,} errors; "
                           "nothing was written")
        if cfg.output.exists():  # --overwrite (checked before)
            shutil.rmtree(cfg.output) if cfg.output.is_dir() else cfg.output.unlink()
        os.replace(tmp, cfg.output)
    except PauserecError:
        raise
    except Exception as e:  # Ray's own error types: a task that kept failing, a lost cluster
        raise JobError(f"the Ray job failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       "nothing was written. Fix the cause and rerun") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    seconds = time.perf_counter() - t0
    report = BatchReport(input_rows=rows_in, ok=rows - errors, errors=errors, duplicates=dups, truncated=truncated,
                         seconds=seconds, output=str(cfg.output), errors_file=f"{cfg.output} (column error)",
                         summary_file=str(cfg.summary_path), reasons=reasons)
    summary = {
        "input": str(cfg.input), "output": str(cfg.output), "engine": str(engine), "runner": "ray",
        "ray": {"address": address or "local", "concurrency": concurrency, "cpus_per_actor": per_actor},
        "options": {"k": cfg.k, "beams": cfg.beams, "batch_size": cfg.batch_size,
                    "exclude_history": cfg.exclude_history, "exclude_file": str(cfg.exclude_file or "")},
        "rows_in": rows_in, "rows_out": report.ok, "error_rows": errors,
        "errors_by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "duplicate_user_ids": dups, "truncated_histories": truncated, "seconds": round(seconds, 3),
        "users_per_second": round(rows_in / seconds, 2) if seconds > 0 else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    cfg.summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return report
