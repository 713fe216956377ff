"""The batch recommend job: every input row lands once, in the output or the errors file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pauserec.errors import DataError, EngineError, JobError, PauserecError
from pauserec.frontends.batch import BatchConfig, run_batch

KNOWN = {str(i) for i in range(50)}


@dataclass
class FakeRecs:
    items: np.ndarray
    item_index: np.ndarray
    scores: np.ndarray
    sids: np.ndarray


class FakeRecommender:
    """Recommends the history's items reversed (deterministic), sleeping a little per batch."""

    max_history = 4

    def __init__(self, delay: float = 0.0, fail_on: str | None = None, error: type = DataError, tag: str = "a"):
        self.delay, self.fail_on, self.error, self.tag, self.calls = delay, fail_on, error, tag, 0

    def fingerprint(self):
        return {"model": self.tag}

    def validate_history(self, history):
        if not history:
            return "empty history"
        unknown = [str(x) for x in history if str(x) not in KNOWN]
        return f"unknown item ids: {', '.join(unknown)}" if unknown else None

    def recommend(self, histories, k=10, beams=20, **filters):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail_on is not None and any(self.fail_on in map(str, h) for h in histories):
            raise self.error("engine rejected this history")
        b = len(histories)
        idx = np.full((b, k), -1, np.int32)
        for i, h in enumerate(histories):
            rev = [int(x) for x in h][::-1][:k]
            idx[i, : len(rev)] = rev
        items = np.where(idx >= 0, idx.astype(str), "")
        scores = np.where(idx >= 0, -np.arange(k, dtype=np.float32), -np.inf).astype(np.float32)
        sids = np.repeat(idx[:, :, None], 2, axis=2)
        return FakeRecs(items, idx, scores, sids)


def write_users(path: Path, n: int = 40, order=None) -> list[str]:
    lines = []
    for i in order if order is not None else range(n):
        if i % 13 == 5:
            lines.append('{"user_id": "u%d", "history": [1, 2' % i)  # malformed JSON
        elif i % 11 == 3:
            lines.append(json.dumps({"user_id": f"u{i}", "history": []}))
        elif i % 17 == 7:
            lines.append(json.dumps({"user_id": f"u{i}", "history": ["1", "999"]}))
        else:
            lines.append(json.dumps({"user_id": f"u{i}", "history": [str(i % 50), str((i * 7) % 50)]}))
    path.write_text("\n".join(lines) + "\n")
    return lines


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cfg_for(tmp_path, **kw) -> BatchConfig:
    return BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", **kw)


def assert_exactly_once_in_order(cfg: BatchConfig, n: int) -> tuple[list[dict], list[dict]]:
    ok, bad = read_jsonl(cfg.output), read_jsonl(cfg.errors_path)
    assert sorted(r["row"] for r in ok + bad) == list(range(n))  # none lost, none duplicated
    assert [r["row"] for r in ok] == sorted(r["row"] for r in ok)  # input order kept
    assert [r["row"] for r in bad] == sorted(r["row"] for r in bad)
    assert not cfg.parts_dir.exists() and not list(cfg.output.parent.glob(".*.parts.done-*"))
    return ok, bad


def test_every_row_lands_once(tmp_path):
    write_users(tmp_path / "users.jsonl")
    cfg = cfg_for(tmp_path, k=3, beams=3, batch_size=8)
    report = run_batch(cfg, FakeRecommender())
    ok, bad = assert_exactly_once_in_order(cfg, 40)
    assert report.input_rows == 40 and report.ok == len(ok) and report.errors == len(bad)
    reasons = {r["row"]: r["reason"] for r in bad}
    assert reasons[5].startswith("malformed JSON") and reasons[3] == "empty history"
    assert reasons[7] == "unknown item ids: 999"
    assert next(r for r in bad if r["row"] == 5)["line"].startswith('{"user_id": "u5"')  # the raw line is kept
    first = next(r for r in ok if r["row"] == 0)
    assert first["user_id"] == "u0" and first["items"] == ["0", "0"]  # padding dropped
    summary = json.loads(cfg.summary_path.read_text())
    assert summary["rows_in"] == 40 and summary["rows_out"] + summary["error_rows"] == 40
    assert summary["errors_by_reason"]["malformed JSON"] == 3 and summary["options"]["k"] == 3
    assert summary["engine"] == {"model": "a"} and summary["users_per_second"] > 0


def test_output_side_files_are_named_from_the_whole_output_name(tmp_path):
    write_users(tmp_path / "users.jsonl", n=3)
    for name in ("recs.v1.jsonl", "recs.v2.jsonl"):
        cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / name)
        run_batch(cfg, FakeRecommender())
    assert sorted(p.name for p in tmp_path.glob("recs.*")) == [
        "recs.v1.errors.jsonl", "recs.v1.jsonl", "recs.v1.summary.json",
        "recs.v2.errors.jsonl", "recs.v2.jsonl", "recs.v2.summary.json"]


def test_missing_user_ids_are_errors_and_duplicates_are_counted_or_refused(tmp_path):
    rows = [{"user_id": "a", "history": ["1"]}, {"history": ["2"]}, {"user_id": "", "history": ["3"]},
            {"user_id": "a", "history": ["4"]}, {"user_id": 7, "history": ["5"]}, {"user_id": "7", "history": ["6"]},
            {"user_id": "b", "history": ["1", "2", "3", "4", "5", "6"]}]  # longer than max_history = 4
    (tmp_path / "users.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = cfg_for(tmp_path)
    report = run_batch(cfg, FakeRecommender())
    ok, bad = assert_exactly_once_in_order(cfg, 7)
    assert [r["row"] for r in bad] == [1, 2] and all(r["user_id"] is None for r in bad)
    assert all(r["reason"].startswith("missing user id") for r in bad)
    assert report.duplicates == 2 and [r["user_id"] for r in ok] == ["a", "a", "7", "7", "b"]  # kept by default
    assert report.truncated == 1
    summary = json.loads(cfg.summary_path.read_text())
    assert summary["duplicate_user_ids"] == 2 and summary["truncated_histories"] == 1

    cfg = cfg_for(tmp_path, unique=True, overwrite=True)
    report = run_batch(cfg, FakeRecommender())
    ok, bad = assert_exactly_once_in_order(cfg, 7)
    assert [r["user_id"] for r in ok] == ["a", "7", "b"]
    dup = {r["row"]: r["reason"] for r in bad if r["user_id"] is not None}
    assert dup == {3: "duplicate user id (first at row 0); --unique is set",
                   5: "duplicate user id (first at row 4); --unique is set"}
    assert report.reasons["duplicate user id"] == 2


def test_data_errors_stay_per_row_but_engine_failures_stop_the_job(tmp_path):
    write_users(tmp_path / "users.jsonl", n=12)
    cfg = cfg_for(tmp_path, batch_size=12)
    report = run_batch(cfg, FakeRecommender(fail_on="8"))  # user 8 has history ["8", "6"]
    bad = {r["row"]: r["reason"] for r in read_jsonl(cfg.errors_path)}
    assert bad[8] == "engine rejected this history"
    assert report.ok + report.errors == 12 and report.ok == 12 - len(bad)

    for error in (EngineError, RuntimeError, MemoryError):
        cfg = cfg_for(tmp_path, batch_size=4, overwrite=True)
        with pytest.raises(JobError, match="--resume") as e:
            run_batch(cfg, FakeRecommender(fail_on="8", error=error))  # the third batch fails
        if error is MemoryError:
            assert "lower --batch-size" in str(e.value)
        assert len(list(cfg.parts_dir.glob("part-*"))) == 2  # the two batches before are kept
        report = run_batch(cfg_for(tmp_path, batch_size=4, resume=True), FakeRecommender())
        assert report.skipped_done == 8
        assert_exactly_once_in_order(cfg, 12)


def test_a_full_disk_stops_the_job(tmp_path, monkeypatch):
    import errno

    from pauserec.frontends import batch

    write_users(tmp_path / "users.jsonl", n=12)

    def full(path, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(batch, "_write_lines", full)
    with pytest.raises(JobError, match="stopped at input rows from 0: the disk is full"):
        run_batch(cfg_for(tmp_path, batch_size=4), FakeRecommender())


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_full_disk_while_merging_says_so_and_closes_the_output(tmp_path, monkeypatch, fmt):
    import errno

    from pauserec.frontends import batch

    write_users(tmp_path / "users.jsonl", n=20)
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / f"recs.{fmt}", batch_size=4)
    real = batch.reason_kind

    def full(reason):  # the merge counts error rows as it writes them: the disk fills up there
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "reason_kind", full)
    with pytest.raises(JobError, match=r"while merging the parts into the output .*disk is full") as e:
        run_batch(cfg, FakeRecommender())
    assert "first row" not in str(e.value)  # was: "stopped before its first row" after 20 rows
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if ".recs." in f]  # the merge's writers were closed
    assert not list(tmp_path.glob(".recs.*.tmp-*"))
    monkeypatch.setattr(batch, "reason_kind", real)
    assert run_batch(BatchConfig(input=cfg.input, output=cfg.output, batch_size=4, resume=True),
                     FakeRecommender()).skipped_done == 20


def test_one_writer_per_output(tmp_path):
    import threading

    write_users(tmp_path / "users.jsonl", n=60)
    cfg = cfg_for(tmp_path, batch_size=4)
    first = threading.Thread(target=run_batch, args=(cfg, FakeRecommender(delay=0.1)))
    first.start()
    while not cfg.parts_dir.exists():
        time.sleep(0.01)
    for second in (cfg, cfg_for(tmp_path, batch_size=4, resume=True), cfg_for(tmp_path, batch_size=4, overwrite=True)):
        with pytest.raises(PauserecError, match=rf"output .*recs.jsonl is being written by another run: pid {os.getpid()} "):
            run_batch(second, FakeRecommender())
    first.join()
    assert_exactly_once_in_order(cfg, 60)
    assert not cfg.lock_path.exists()  # removed by its holder


def test_two_runs_started_together_one_runs_one_is_refused(tmp_path):
    write_users(tmp_path / "users.jsonl", n=60)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_batch import FakeRecommender
        from pauserec.frontends.batch import BatchConfig, run_batch
        from pauserec.errors import PauserecError
        cfg = BatchConfig(input=Path({str(tmp_path / 'users.jsonl')!r}), output=Path({str(tmp_path / 'recs.jsonl')!r}),
                          batch_size=4, resume=True)
        try:
            run_batch(cfg, FakeRecommender(delay=0.2))
        except PauserecError as e:
            print(e)
            sys.exit(2)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    winner = procs[[p.returncode for p in procs].index(0)]
    assert f"being written by another run: pid {winner.pid} " in loser
    assert_exactly_once_in_order(cfg_for(tmp_path), 60)


def test_a_job_that_fails_before_its_first_row_leaves_nothing(tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(DataError, match="not found"):
        run_batch(cfg, FakeRecommender())
    write_users(tmp_path / "users.jsonl", n=5)
    with pytest.raises(JobError):
        run_batch(cfg, FakeRecommender(fail_on="1", error=RuntimeError))  # the first batch fails
    with pytest.raises(PauserecError, match="--beams >= --k"):
        run_batch(cfg_for(tmp_path, k=30, beams=20), FakeRecommender())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.jsonl"]
    run_batch(cfg, FakeRecommender())  # the corrected run starts without complaint


def test_parquet_in_and_out(tmp_path):
    users = pa.table({"user_id": ["a", "b", "c"], "history": [["1", "2"], [], ["3", "4", "5"]]})
    pq.write_table(users, tmp_path / "users.parquet")
    cfg = BatchConfig(input=tmp_path / "users.parquet", output=tmp_path / "recs.parquet", k=2)
    report = run_batch(cfg, FakeRecommender())
    table = pq.read_table(cfg.output)
    assert table.schema.field("items").type == pa.list_(pa.string())
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    out = table.to_pylist()
    assert report.ok == 2 and report.errors == 1
    assert [r["user_id"] for r in out] == ["a", "c"] and out[1]["items"] == ["5", "4"]
    with pytest.raises(DataError, match="--user-field"):
        run_batch(BatchConfig(input=tmp_path / "users.parquet", output=tmp_path / "o.parquet", user_field="uid"),
                  FakeRecommender())


def test_refuses_to_clobber(tmp_path):
    write_users(tmp_path / "users.jsonl", n=5)
    cfg = cfg_for(tmp_path)
    run_batch(cfg, FakeRecommender())
    with pytest.raises(PauserecError, match="--overwrite"):
        run_batch(cfg, FakeRecommender())
    cfg.output.unlink()  # the errors file and summary are protected too
    with pytest.raises(PauserecError, match="errors file .* exists"):
        run_batch(cfg, FakeRecommender())
    cfg.parts_dir.mkdir()
    with pytest.raises(PauserecError, match="--resume"):
        run_batch(cfg, FakeRecommender())
    with pytest.raises(PauserecError, match="no readable job.json"):
        run_batch(cfg_for(tmp_path, resume=True), FakeRecommender())
    with pytest.raises(PauserecError, match=r"\.jsonl or \.parquet"):
        run_batch(BatchConfig(input=cfg.input, output=tmp_path / "recs.csv"), FakeRecommender())
    run_batch(cfg_for(tmp_path, overwrite=True), FakeRecommender())  # --overwrite discards the stale parts
    assert_exactly_once_in_order(cfg, 5)


def _start_and_kill(tmp_path: Path, out: Path, patch: str = "", wait_parts: int = 0, batch_size: int = 4,
                    delay: float = 0.0, options: str = "") -> None:
    """Run the job in a subprocess; SIGKILL it when ``patch`` says so, or once ``wait_parts`` parts exist."""
    script = textwrap.dedent(
        f"""
        import os, shutil, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_batch import FakeRecommender
        from pauserec.frontends.batch import BatchConfig, run_batch
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace, real_rmtree = os.replace, shutil.rmtree
        """
    ) + textwrap.dedent(patch) + textwrap.dedent(
        f"""
        cfg = BatchConfig(input=Path({str(tmp_path / 'users.jsonl')!r}), output=Path({str(out)!r}),
                          batch_size={batch_size}{options})
        run_batch(cfg, FakeRecommender(delay={delay}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    if wait_parts:
        parts = out.with_name(out.name + ".parts")
        deadline = time.time() + 60
        while time.time() < deadline and len(list(parts.glob("part-*.jsonl"))) < wait_parts:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


CRASH_POINTS = {
    # while writing a part: its temporary file is complete, the rename has not happened
    "part": """
        def replace(src, dst):
            if "part-000000000008" in str(dst): die()
            real_replace(src, dst)
        os.replace = replace
    """,
    # while merging: the errors file is in place, the output not yet
    "merge": """
        def replace(src, dst):
            if str(dst).endswith("recs.jsonl"): die()
            real_replace(src, dst)
        os.replace = replace
    """,
    # after the merge, before the summary
    "summary": """
        def replace(src, dst):
            if str(dst).endswith("summary.json"): die()
            real_replace(src, dst)
        os.replace = replace
    """,
    # while cleaning up: half of the finished parts are deleted
    "cleanup": """
        def rmtree(path, ignore_errors=False):
            files = sorted(Path(path).iterdir())
            for f in files[: len(files) // 2]: f.unlink()
            die()
        shutil.rmtree = rmtree
    """,
}


@pytest.mark.parametrize("point", [*CRASH_POINTS, "mid-run"])
def test_kill_9_at_any_point_then_resume_loses_and_duplicates_nothing(tmp_path, point):
    write_users(tmp_path / "users.jsonl", n=60)
    out = tmp_path / "recs.jsonl"
    if point == "mid-run":
        _start_and_kill(tmp_path, out, wait_parts=3, delay=0.2)
    else:
        _start_and_kill(tmp_path, out, patch=CRASH_POINTS[point])
    cfg = cfg_for(tmp_path, batch_size=4, resume=True)
    assert cfg.lock_path.exists()  # the killed run's lock file is left behind, but the lock died with it
    report = run_batch(cfg, FakeRecommender())
    assert_exactly_once_in_order(cfg, 60)
    assert report.input_rows == 60 and report.ok + report.errors == 60
    assert json.loads(cfg.summary_path.read_text())["rows_in"] == 60
    if point == "part":
        assert report.skipped_done == 8  # parts 0-4 and 4-8 survived, 8-12 was redone
    if point == "cleanup":
        assert report.already_complete
    again = run_batch(cfg, FakeRecommender())  # resuming a finished job is a no-op, not an error
    assert again.already_complete and again.ok == report.ok


def test_resume_continues_only_the_same_job(tmp_path):
    """The reported failure: kill -9, replace the input by a shuffled subset, resume with another k."""
    write_users(tmp_path / "users.jsonl", n=60)
    out = tmp_path / "recs.jsonl"
    _start_and_kill(tmp_path, out, wait_parts=3, delay=0.2)
    original = (tmp_path / "users.jsonl").read_bytes()
    write_users(tmp_path / "users.jsonl", order=np.random.default_rng(0).permutation(60)[:50])
    with pytest.raises(PauserecError, match=r"the input's content .*k: 10 -> 5.*--overwrite") as e:
        run_batch(cfg_for(tmp_path, k=5, beams=5, resume=True), FakeRecommender())
    assert "different job" in str(e.value)
    (tmp_path / "users.jsonl").write_bytes(original)
    with pytest.raises(PauserecError, match=r"the engine \(model\)"):
        run_batch(cfg_for(tmp_path, resume=True), FakeRecommender(tag="b"))
    with pytest.raises(PauserecError, match="exclude_history: False -> True"):
        run_batch(cfg_for(tmp_path, resume=True, exclude_history=True), FakeRecommender())
    report = run_batch(cfg_for(tmp_path, resume=True), FakeRecommender())  # the same job: continues
    assert report.skipped_done >= 12
    assert_exactly_once_in_order(cfg_for(tmp_path), 60)
    with pytest.raises(PauserecError, match="from another job"):
        run_batch(cfg_for(tmp_path, k=5, beams=5, resume=True), FakeRecommender())

# -- the duplicate user-id check: bounded memory ---------------------------------------------------
def _reference_repeats(keys) -> list[list[int]]:
    """[row, first row with the same key] of every repeated key, in row order: a dict of first rows."""
    first, out = {}, []
    for key, row in keys:
        if key in first:
            out.append([row, first[key]])
        else:
            first[key] = row
    return out


@pytest.mark.parametrize("run_pairs,fan_in", [(1, 2), (3, 2), (7, 3), (64, 64), (10_000, 64)])
def test_repeats_are_the_dict_based_answer(tmp_path, run_pairs, fan_in):
    from pauserec.frontends.batch import SORT_PREFIX, _repeats

    rng = np.random.default_rng(run_pairs)
    edges = [np.iinfo(np.int64).min, -1, 0, 1, np.iinfo(np.int64).max]
    for n, distinct in ((0, 1), (1, 1), (200, 1), (500, 40), (500, 2000)):
        keys = rng.integers(0, distinct, n).tolist()
        keys = [edges[k] if k < len(edges) else k * 7_919 - 10**15 for k in keys]  # extremes and negatives
        rows = np.cumsum(rng.integers(1, 4, n)).tolist()  # rows ascend, with gaps (rows without a user id)
        pairs = list(zip(keys, rows))
        with _repeats(iter(pairs), tmp_path, run_pairs, fan_in, max(1, run_pairs // 2)) as (count, repeats):
            got = list(repeats)
            if run_pairs < n:
                assert list(tmp_path.glob(f"{SORT_PREFIX}*"))  # sorted on disk
        assert count == len(got) and got == _reference_repeats(pairs), (n, distinct)
        assert not list(tmp_path.iterdir())  # its runs are removed


def _synthetic_keys(n: int):
    """(key, row) for n rows: about a third of them repeat an earlier key, keys spread over int64."""
    for row in range(n):
        key = (row % (2 * n // 3) * 0x9E3779B97F4A7C15) % 2**64
        yield key - 2**63, row


def _repeats_peak(tmp_path: Path, n: int) -> tuple[int, int, str]:
    import hashlib
    import tracemalloc

    from pauserec.frontends.batch import _repeats

    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        with _repeats(_synthetic_keys(n), tmp_path, 100, 8, 64) as (count, repeats):
            for row, first in repeats:  # consumed as the merge writes the output: nothing kept
                digest.update(b"%d,%d;" % (row, first))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, count, digest.hexdigest()


def test_the_duplicate_check_keeps_memory_flat_in_the_number_of_rows(tmp_path):
    """The reported failure: ~116 bytes per row (11 GB at 10^8 rows). Ten times the rows must not take more
    memory, and the answer must stay the dict-based one."""
    import hashlib

    peaks = {}
    for n in (10_000, 100_000):
        folder = tmp_path / str(n)
        folder.mkdir()
        peak, count, digest = _repeats_peak(folder, n)
        ref = _reference_repeats(_synthetic_keys(n))
        assert count == len(ref) and count > n // 4
        assert digest == hashlib.sha256(b"".join(b"%d,%d;" % (r, f) for r, f in ref)).hexdigest()
        assert not list(folder.iterdir())
        peaks[n] = peak
    # At most 2 x 8 runs are read at once, 64 pairs at a time, and 100 pairs sorted in memory: ~0.3 MB whatever
    # the number of rows (the old check held ~1 MB at 10^4 rows and ~10 MB at 10^5).
    assert max(peaks.values()) < 512_000, peaks
    assert peaks[100_000] < 2 * peaks[10_000], peaks  # ten times the rows, not ten times the memory


def _unique_users(path: Path, n: int) -> None:
    """n rows over 37 user ids: most rows repeat an earlier user."""
    path.write_text("".join(json.dumps({"user_id": f"u{i * 11 % 37}", "history": [str(i % 50)]}) + "\n"
                            for i in range(n)))


def test_duplicates_sorted_on_disk_match_the_rows_and_survive_a_kill_mid_sort(tmp_path, monkeypatch):
    """With runs of 8 pairs merged 2 at a time, the job still names the first row of each repeated id; a job
    killed while its sorted runs are on disk resumes to the same files, and the runs are gone."""
    from pauserec.frontends import batch

    monkeypatch.setattr(batch, "SORT_RUN", 8)
    monkeypatch.setattr(batch, "MERGE_FAN_IN", 2)
    _unique_users(tmp_path / "users.jsonl", 120)
    cfg = cfg_for(tmp_path, batch_size=16, unique=True)
    report = run_batch(cfg, FakeRecommender())
    ok, bad = assert_exactly_once_in_order(cfg, 120)
    users = [f"u{i * 11 % 37}" for i in range(120)]
    expected = {row: f"duplicate user id (first at row {users.index(u)}); --unique is set"
                for row, u in enumerate(users) if users.index(u) < row}
    assert {r["row"]: r["reason"] for r in bad} == expected and report.duplicates == 120 - 37
    assert [r["row"] for r in ok] == [users.index(u) for u in sorted(set(users), key=users.index)]
    want = {p: p.read_bytes() for p in (cfg.output, cfg.errors_path)}

    out = tmp_path / "killed" / "recs.jsonl"
    out.parent.mkdir()
    (out.parent / "users.jsonl").write_bytes((tmp_path / "users.jsonl").read_bytes())
    _start_and_kill(out.parent, out, batch_size=16, options=", unique=True", patch="""
        import pauserec.frontends.batch as b
        b.SORT_RUN, b.MERGE_FAN_IN, real_spill, spills = 8, 2, b._ExternalSort._spill, []
        def spill(self):
            real_spill(self)
            spills.append(1)
            if len(spills) == 5: die()
        b._ExternalSort._spill = spill
    """)
    parts = out.with_name(out.name + ".parts")
    assert len(list(parts.glob(".sort-keys-*"))) >= 2 and not out.exists()  # runs, some already merged
    killed = BatchConfig(input=out.parent / "users.jsonl", output=out, batch_size=16, unique=True, resume=True)
    report = run_batch(killed, FakeRecommender())
    assert report.skipped_done == 120 and report.duplicates == 120 - 37
    assert_exactly_once_in_order(killed, 120)
    assert {p.name: p.read_bytes() for p in (killed.output, killed.errors_path)} == {p.name: b for p, b in want.items()}


def test_a_full_disk_while_sorting_user_ids_stops_the_job_and_leaves_no_runs(tmp_path, monkeypatch):
    import errno
    from array import array

    from pauserec.frontends import batch

    monkeypatch.setattr(batch, "SORT_RUN", 8)
    monkeypatch.setattr(batch, "MERGE_FAN_IN", 2)
    _unique_users(tmp_path / "users.jsonl", 120)
    cfg = cfg_for(tmp_path, batch_size=16, unique=True)
    writes = []

    class FillingDisk(array):  # the merge of sorted runs writes its blocks with array.tofile
        def tofile(self, f):
            writes.append(f.name)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", f.name)
            super().tofile(f)

    monkeypatch.setattr(batch, "array", FillingDisk)
    with pytest.raises(JobError, match=r"while merging the parts into the output .*disk is full.*--resume"):
        run_batch(cfg, FakeRecommender())
    assert len(writes) == 3 and not list(cfg.parts_dir.glob(".sort-*"))  # written, merged or not: all removed
    assert not cfg.output.exists() and not list(tmp_path.glob(".recs.*.tmp-*"))
    monkeypatch.setattr(batch, "array", array)
    report = run_batch(cfg_for(tmp_path, batch_size=16, unique=True, resume=True), FakeRecommender())
    assert report.skipped_done == 120 and report.duplicates == 120 - 37
    assert_exactly_once_in_order(cfg, 120)


def test_recommend_cli_on_a_real_engine(trained_engines, tmp_path):
    from typer.testing import CliRunner

    from pauserec.cli.main import app
    from pauserec.runtime import Engine

    ids = Engine.load(trained_engines["pause"]).catalog.item_ids
    rows = [{"user_id": "a", "history": [ids[1], ids[2]]}, {"user_id": "b", "history": ["no-such-item"]},
            {"user_id": "c", "history": [ids[3]] * 30}]
    inp = tmp_path / "users.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    out = tmp_path / "recs.parquet"
    res = CliRunner().invoke(app, ["recommend", str(trained_engines["pause"]), "-i", str(inp), "-o", str(out),
                                   "--k", "5", "--beams", "8", "--threads", "1"])
    assert res.exit_code == 0, res.output
    recs = pq.read_table(out).to_pylist()
    errors = read_jsonl(tmp_path / "recs.errors.jsonl")
    assert [r["user_id"] for r in recs] == ["a", "c"] and [e["row"] for e in errors] == [1, 3]
    assert all(len(r["items"]) == 5 and r["scores"] == sorted(r["scores"], reverse=True) for r in recs)
    assert all(r["sids"][0].startswith("<") for r in recs)
    assert "2 users recommended, 2 rejected" in res.output
    summary = json.loads((tmp_path / "recs.summary.json").read_text())
    assert summary["runner"] == {"kind": "local", "threads": 1} and summary["engine"]["provider"] == "cpu"
    res = CliRunner().invoke(app, ["recommend", str(tmp_path / "nope"), "-i", str(inp), "-o", str(out)])
    assert res.exit_code == 2 and "error" in res.output


def test_batch_size_reaches_the_engine(trained_engines, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pauserec.cli.main import app
    from pauserec.runtime import Engine

    ids = Engine.load(trained_engines["direct"]).catalog.item_ids
    (tmp_path / "users.jsonl").write_text("".join(json.dumps({"user_id": str(i), "history": [ids[i]]}) + "\n"
                                                  for i in range(45)))
    batches = []
    real = Engine.prefill

    def prefill(self, ids, mask, device=False):
        batches.append(len(ids))
        return real(self, ids, mask, device)

    monkeypatch.setattr(Engine, "prefill", prefill)
    res = CliRunner().invoke(app, ["recommend", str(trained_engines["direct"]), "-i", str(tmp_path / "users.jsonl"),
                                   "-o", str(tmp_path / "recs.jsonl"), "--k", "5", "--beams", "8", "--threads", "1",
                                   "--batch-size", "40"])
    assert res.exit_code == 0, res.output
    assert batches == [40, 5]  # was [32, 8, 5]: the Recommender kept its default batch


def test_kv_memory_splits_a_batch_into_calls_with_the_same_results(trained_engines, tmp_path, monkeypatch):
    """--kv-memory: a batch whose KV would pass it runs in calls of fewer users (the most that fit), and every
    user gets the same items and scores as in one call; a limit that cannot hold one user stops the job before
    any row, saying what one user needs."""
    from typer.testing import CliRunner

    from pauserec.cli.main import app
    from pauserec.runtime import Engine, Recommender

    engine = trained_engines["direct"]
    ids = Engine.load(engine).catalog.item_ids
    (tmp_path / "users.jsonl").write_text("".join(json.dumps({"user_id": str(i), "history": [ids[i], ids[i + 1]]})
                                                  + "\n" for i in range(9)))
    rec = Recommender(Engine.load(engine, graphs=False, verify=False))
    width = rec.padded_length(len(rec.encoder.many_kept([np.array([1, 2])])[0][0]))
    one_user = rec.call_bytes(width, 8)
    batches = []
    real = Engine.prefill
    monkeypatch.setattr(Engine, "prefill", lambda self, ids, mask, device=False:
                        batches.append(len(ids)) or real(self, ids, mask, device))

    def run(name, limit):
        res = CliRunner().invoke(app, ["recommend", str(engine), "-i", str(tmp_path / "users.jsonl"), "-o",
                                       str(tmp_path / name), "--k", "5", "--beams", "8", "--threads", "1",
                                       "--kv-memory", limit])
        return res, (read_jsonl(tmp_path / name) if res.exit_code == 0 else None)

    res, whole = run("whole.jsonl", "none")
    assert res.exit_code == 0, res.output
    assert batches == [9]
    batches.clear()
    res, parts = run("parts.jsonl", str(int(one_user * 4.5)))
    assert res.exit_code == 0, res.output
    assert batches == [4, 4, 1]
    assert [r["items"] for r in parts] == [r["items"] for r in whole]
    assert [r["scores"] for r in parts] == [r["scores"] for r in whole]
    batches.clear()
    res, _ = run("refused.jsonl", "1kB")
    assert res.exit_code == 2 and "kv_memory is 1,000 bytes" in res.output and "needs ~" in res.output, res.output
    assert batches == [] and not (tmp_path / "refused.jsonl").exists()
    res, _ = run("refused.jsonl", "lots")
    assert res.exit_code == 2 and "'lots' is not a size" in res.output, res.output


def test_kv_memory_auto_is_half_of_what_is_left(trained_engines, monkeypatch):
    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime import recommender as recommender_module

    engine = Engine.load(trained_engines["direct"], graphs=False, verify=False)
    monkeypatch.setattr(recommender_module, "available_bytes", lambda: 10_000_000)
    assert Recommender(engine).kv_memory == 5_000_000
    monkeypatch.setattr(recommender_module, "available_bytes", lambda: None)  # unknown: no limit
    assert Recommender(engine).kv_memory is None and Recommender(engine).users_per_call(16, 20) == 32
    assert Recommender(engine, kv_memory="2GB").kv_memory == 2_000_000_000


def test_filters_in_the_batch_job_match_the_library(trained_engines, tmp_path):
    from typer.testing import CliRunner

    from pauserec.cli.main import app
    from pauserec.runtime import Engine, Recommender

    rec = Recommender(Engine.load(trained_engines["direct"], threads=1))
    ids = list(rec.catalog.item_ids)
    banned = ids[10:30]
    (tmp_path / "banned.txt").write_text("# out of stock\n" + "\n".join(banned) + "\n\n")
    rows = [{"user_id": "a", "history": ids[1:4]},
            {"user_id": "b", "history": ids[4:6], "exclude": ids[40:60]},
            {"user_id": "c", "history": ids[6:8], "allow": ids[:100]},
            {"user_id": "d", "history": ids[8:9], "exclude": ["no-such-item"]}]
    (tmp_path / "users.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "recs.jsonl"
    res = CliRunner().invoke(app, ["recommend", str(trained_engines["direct"]), "-i", str(tmp_path / "users.jsonl"),
                                   "-o", str(out), "--k", "5", "--beams", "8", "--threads", "1",
                                   "--exclude-history", "--exclude-file", str(tmp_path / "banned.txt")])
    assert res.exit_code == 0, res.output
    got = {r["user_id"]: r["items"] for r in read_jsonl(out)}
    errors = read_jsonl(tmp_path / "recs.errors.jsonl")
    assert [e["user_id"] for e in errors] == ["d"] and errors[0]["reason"].startswith("unknown item ids in exclude")
    for r in rows[:3]:
        want = rec.recommend([r["history"]], k=5, beams=8, exclude=[set(banned) | set(r.get("exclude", ()))],
                             allow=[r.get("allow")], exclude_history=True)
        assert got[r["user_id"]] == [x for x in want.items[0] if x]
        assert not set(got[r["user_id"]]) & (set(banned) | set(r["history"]) | set(r.get("exclude", ())))
    assert set(got["c"]) <= set(ids[:100])
    res = CliRunner().invoke(app, ["recommend", str(trained_engines["direct"]), "-i", str(tmp_path / "users.jsonl"),
                                   "-o", str(tmp_path / "x.jsonl"), "--exclude-file", str(tmp_path / "users.jsonl")])
    assert res.exit_code == 2 and "--exclude-file" in res.output  # unknown ids in the file: refused up front


def test_batch_size_enters_the_job_only_where_scores_depend_on_it(tmp_path):
    """Engines whose scores depend on the batch's other users (int8 exported before per-row activation scales)
    make the batch size part of the job: a resume with another batch size is another job."""
    from types import SimpleNamespace

    from pauserec.frontends.batch import _differences, job_identity

    write_users(tmp_path / "users.jsonl", n=8)

    def identity(invariant: bool, batch_size: int) -> dict:
        rec = FakeRecommender()
        rec.engine = SimpleNamespace(batch_invariant=invariant)
        return job_identity(cfg_for(tmp_path, batch_size=batch_size), rec)

    assert identity(True, 4) == identity(True, 8)
    assert _differences(identity(False, 4), identity(False, 8)) == ["batch_size: 4 -> 8"]


def test_per_tensor_int8_engines_are_found_batch_dependent(trained_engines, tmp_path):
    """An int8 engine whose graphs quantise activations per tensor (DynamicQuantizeLinear) is not batch-invariant;
    fp32 engines and per-row int8 are."""
    import shutil

    import onnx
    from onnx import helper

    from pauserec.runtime import Engine

    assert Engine.load(trained_engines["pause"], graphs=False).batch_invariant
    old = tmp_path / "old-int8"
    shutil.copytree(trained_engines["pause"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["precision"] = "int8"
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert Engine.load(old, graphs=False, verify=False).batch_invariant  # int8 without per-tensor scales
    model = onnx.load(str(old / "prefill.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["history_mask"], ["q", "s", "z"]))
    onnx.save(model, str(old / "prefill.onnx"))
    assert not Engine.load(old, graphs=False, verify=False).batch_invariant
    from pauserec.runtime import Recommender

    legacy = Engine.load(old, graphs=False, verify=False)
    assert Recommender(legacy).kv_memory is None  # auto: calls never sized by free memory
    with pytest.raises(DataError, match="kv_memory would change them"):
        Recommender(legacy, kv_memory="1GB").check_request(5, 8)


MOUNTINFO = """22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:41 / /mnt/bucket rw,nosuid,nodev,relatime shared:20 - fuse.gcsfuse gcs rw,user_id=0
41 22 0:42 / /mnt/nfs rw,relatime shared:21 - nfs4 server:/export rw,vers=4.2
42 22 0:43 / /mnt/with\\040space rw shared:22 - fuse.sshfs host: rw
"""


def test_locks_are_refused_where_they_cannot_work(tmp_path, monkeypatch):
    """FUSE mounts (gcsfuse, sshfs, ...): a lock taken here does not stop another machine's run."""
    from pathlib import Path

    from pauserec.runtime import lock

    assert lock.mount_type(Path("/mnt/bucket/out/recs.jsonl"), MOUNTINFO) == "fuse.gcsfuse"
    assert lock.mount_type(Path("/mnt/nfs/recs.jsonl"), MOUNTINFO) == "nfs4"
    assert lock.mount_type(Path("/mnt/with space/x"), MOUNTINFO) == "fuse.sshfs"
    assert lock.mount_type(Path("/mnt/bucketful/x"), MOUNTINFO) == "ext4"  # a prefix of a name is not its mount
    write_users(tmp_path / "users.jsonl", n=4)
    monkeypatch.setattr(lock, "mount_type", lambda path, mountinfo=None: "fuse.gcsfuse")
    with pytest.raises(lock.LockedError, match="fuse.gcsfuse filesystem.*PAUSEREC_LOCAL_LOCK=1"):
        run_batch(cfg_for(tmp_path), FakeRecommender())
    assert not (tmp_path / "recs.jsonl").exists()
    monkeypatch.setenv("PAUSEREC_LOCAL_LOCK", "1")
    assert run_batch(cfg_for(tmp_path), FakeRecommender()).input_rows == 4


def test_a_lock_file_left_by_another_user(tmp_path, monkeypatch):
    """Another user's stale lock file cannot be opened for writing: it is locked read-only (flock accepts that);
    one that cannot be opened at all names its owner and what to do, never a bare PermissionError."""
    from pauserec.runtime import lock

    path = tmp_path / ".recs.lock"
    path.write_text('{"pid": 1, "host": "elsewhere", "started": "yesterday"}')
    real_open = os.open

    def other_users_file(p, flags, *mode):
        if str(p) == str(path) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied")
        return real_open(p, flags, *mode)

    monkeypatch.setattr(os, "open", other_users_file)
    with lock.hold(path, "output recs.jsonl"):
        with pytest.raises(lock.LockedError, match="pid 1 on elsewhere"):  # held: a second run is refused
            with lock.hold(path, "output recs.jsonl"):
                pass

    def unreadable(p, flags, *mode):
        if str(p) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(p, flags, *mode)

    path.write_text("{}")
    monkeypatch.setattr(os, "open", unreadable)
    with pytest.raises(lock.LockedError, match=r"belongs to .* cannot be opened.*rm "):
        with lock.hold(path, "output recs.jsonl"):
            pass


def test_an_onnxruntime_upgrade_makes_another_job(trained_engines, tmp_path, monkeypatch):
    """Fusions of another onnxruntime round floats differently (int8 scores moved by up to 0.043 at the 0.6B
    shape between 1.24 and 1.32): the version is part of the engine's identity, so a resume across it is refused."""
    import onnxruntime

    from pauserec.runtime import Engine, Recommender
    from pauserec.frontends.batch import _differences, job_identity

    write_users(tmp_path / "users.jsonl", n=4)
    rec = Recommender(Engine.load(trained_engines["pause"], graphs=False))
    before = job_identity(cfg_for(tmp_path), rec)
    monkeypatch.setattr(onnxruntime, "__version__", "9.99.0")
    assert _differences(before, job_identity(cfg_for(tmp_path), rec)) == ["the engine (onnxruntime)"]
