"""Peak memory of the batch job's duplicate user-id check against the number of rows: old vs new.

    python benchmarks/dup_ids_memory.py --rows 1000000 10000000 --out results/batch-job/dup-ids-memory.json
    python benchmarks/dup_ids_memory.py --rows 10000000 --repeat-share 0.5

For each row count, part files like the job's (``part-<first>-<end>.jsonl``, 4,096 rows each; records
``{"user_id", "items", "scores", "row"}``, the last ``--repeat-share`` of the rows (default 10%) repeating
the user ids of the first rows) are written to a scratch folder, then each check runs over them in a fresh
process:

- ``old``: the check as it was before the external sort (copied here, labelled ``old``): every row's
  64-bit hash and row number in two arrays, one ``np.argsort``, and a dict {row: first row} of the
  repeats, held while the output is written.
- ``new``: ``pauserec.frontends.batch._repeats`` over ``_user_keys``: (hash, row) pairs sorted on disk
  in runs of ``SORT_RUN`` pairs, merged ``MERGE_FAN_IN`` at a time; the repeats come back in row
  order from a second sort on disk and are consumed one by one (as the merge writing the output does).

Peak RSS is the process's VmHWM; "above start" subtracts VmRSS once the imports are done (Python, NumPy,
pauserec). Both checks must report the same repeats (count and a digest of every (row, first row) pair).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

PART_ROWS = 4096


def _status(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def write_parts(folder: Path, n: int, repeat_share: float) -> None:
    """n rows of job output in parts of PART_ROWS rows; the last ``repeat_share`` of them repeat earlier user ids."""
    folder.mkdir(parents=True)
    distinct = max(1, round(n * (1 - repeat_share)))
    for first in range(0, n, PART_ROWS):
        end = min(n, first + PART_ROWS)
        with open(folder / f"part-{first:012d}-{end:012d}.jsonl", "w") as f:
            for row in range(first, end):
                rec = {"user_id": f"u{row % distinct}", "items": ["12", "7", "301"], "scores": [-0.5, -1.25, -2.0],
                       "row": row}
                f.write(json.dumps(rec) + "\n")


# -- old: the check before the external sort, copied from pauserec/frontends/batch.py (labelled old) ----
def old_duplicates(files: list[Path]) -> dict[int, int]:
    """old: {row: first row with the same user id}; every row's hash and row number in memory."""
    from pauserec.frontends.batch import _iter_part_records

    hashes, rows = array("q"), array("q")
    for records in _iter_part_records(files):
        for r in records:
            if r["user_id"] is not None:
                hashes.append(hash(r["user_id"]))
                rows.append(r["row"])
    if not hashes:
        return {}
    h, row = np.frombuffer(hashes, np.int64), np.frombuffer(rows, np.int64)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    start = np.r_[True, hs[1:] != hs[:-1]]
    first = row[order][np.maximum.accumulate(np.where(start, np.arange(len(hs)), 0))]
    dup = ~start
    return dict(zip(row[order][dup].tolist(), first[dup].tolist()))


def run_case(kind: str, folder: Path) -> dict:
    """One check over the parts in ``folder``, in this (fresh) process."""
    from pauserec.frontends import batch

    files, n = batch.scan_parts(folder)
    start_rss = _status("VmRSS")
    t0 = time.perf_counter()
    digest, count = hashlib.sha256(), 0
    if kind == "old":
        dups = old_duplicates(files)
        for row in range(n):  # the write pass looks every row up in the dict, in row order
            if (first := dups.get(row)) is not None:
                digest.update(b"%d,%d;" % (row, first))
                count += 1
    else:
        keys = batch._user_keys(files)
        with batch._repeats(keys, folder, batch.SORT_RUN, batch.MERGE_FAN_IN, batch.RUN_READ) as (_, repeats):
            for row, first in repeats:  # consumed in row order as the write pass does
                digest.update(b"%d,%d;" % (row, first))
                count += 1
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"check": kind, "rows": n, "repeats": count, "digest": digest.hexdigest(), "seconds": round(seconds, 2),
            "start_rss_bytes": start_rss, "peak_rss_bytes": peak, "above_start_bytes": peak - start_rss,
            "bytes_per_row": round((peak - start_rss) / n, 1)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--checks", nargs="+", default=["old", "new"], choices=["old", "new"])
    ap.add_argument("--repeat-share", type=float, default=0.1, help="share of rows that repeat an earlier user id")
    ap.add_argument("--scratch", type=Path, default=None, help="where the parts are written (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--case", nargs=2, metavar=("CHECK", "PARTS"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], Path(args.case[1]))))
        return

    scratch = Path(tempfile.mkdtemp(prefix="dup-ids-", dir=args.scratch))
    results = []
    try:
        for n in args.rows:
            parts = scratch / f"rows-{n}.parts"
            t0 = time.perf_counter()
            write_parts(parts, n, args.repeat_share)
            print(f"{n:,} rows: parts written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for kind in args.checks:
                proc = subprocess.run([sys.executable, __file__, "--case", kind, str(parts)], check=True,
                                      capture_output=True, text=True)
                res = {**json.loads(proc.stdout.strip().splitlines()[-1]), "repeat_share": args.repeat_share}
                results.append(res)
                print(f"  {kind}: peak {res['peak_rss_bytes'] / 2**20:,.0f} MiB, {res['seconds']} s", file=sys.stderr)
            if len({(r["repeats"], r["digest"]) for r in results if r["rows"] == n}) != 1:
                raise SystemExit(f"the checks disagree at {n:,} rows: {results}")
            shutil.rmtree(parts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\nduplicate user-id check, peak RSS (VmHWM of a fresh process), {cpu_model()}, {os.cpu_count()} CPUs")
    print("| rows | check | repeats | seconds | peak RSS | above start | above start / row |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['rows']:,} | {r['check']} | {r['repeats']:,} | {r['seconds']} | "
              f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['above_start_bytes'] / 2**20:,.1f} MiB | {r['bytes_per_row']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_model(), "cpus": os.cpu_count(), "part_rows": PART_ROWS,
                                        "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
