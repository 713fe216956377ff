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

from pauserec.errors import PauserecError
from pauserec.runtime.batch import BatchConfig, run_batch

KNOWN = {str(i) for i in range(50)}


@dataclass
class FakeRecs:
    items: np.ndarray
    item_index: np.ndarray
    scores: np.ndarray
    sids: np.ndarray


class FakeRecommender:
    """Recommends the history's items reversed (deterministic), sleeping a little per batch."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None):
        self.delay, self.fail_on, self.calls = delay, fail_on, 0

    def validate_history(self, history):
        if not history:
            return "empty history"
        unknown = [str(x) for x in history if str(x) not in KNOWN]
        return f"unknown item ids: {', '.join(unknown)}" if unknown else None

    def recommend(self, histories, k=10, beams=20):
        self.calls += 1
        time.sleep(self.delay)
        if self.fail_on is not None and any(self.fail_on in map(str, h) for h in histories):
            raise PauserecError("engine rejected this history")
        b = len(histories)
        idx = np.full((b, k), -1, np.int32)
        for i, h in enumerate(histories):
            rev = [int(x) for x in h][::-1][:k]
            idx[i, : len(rev)] = rev
        items = np.where(idx >= 0, idx.astype(str), "")
        scores = np.where(idx >= 0, -np.arange(k, dtype=np.float32), -np.inf).astype(np.float32)
        sids = np.repeat(idx[:, :, None], 2, axis=2)
        return FakeRecs(items, idx, scores, sids)


def write_users(path: Path, n: int = 40) -> list[str]:
    lines = []
    for i in range(n):
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


def test_every_row_lands_once(tmp_path):
    write_users(tmp_path / "users.jsonl")
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", k=3, batch_size=8)
    report = run_batch(cfg, FakeRecommender())
    ok, bad = read_jsonl(cfg.output), read_jsonl(cfg.errors_path)
    assert report.input_rows == 40 and report.ok == len(ok) and report.errors == len(bad)
    assert sorted(r["row"] for r in ok + bad) == list(range(40))
    assert [r["row"] for r in ok] == sorted(r["row"] for r in ok)  # input order kept
    reasons = {r["row"]: r["reason"] for r in bad}
    assert reasons[5].startswith("malformed JSON") and reasons[3] == "empty history"
    assert reasons[7] == "unknown item ids: 999"
    first = next(r for r in ok if r["row"] == 0)
    assert first["user_id"] == "u0" and first["items"] == ["0", "0"]  # padding dropped
    assert not cfg.parts_dir.exists()


def test_batch_failure_isolated_to_its_row(tmp_path):
    write_users(tmp_path / "users.jsonl", n=12)
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", batch_size=12)
    report = run_batch(cfg, FakeRecommender(fail_on="8"))  # user 8 has history ["8", "6"]
    bad = {r["row"]: r["reason"] for r in read_jsonl(cfg.errors_path)}
    assert bad[8] == "engine rejected this history"
    assert report.ok + report.errors == 12 and report.ok == 12 - len(bad)


def test_parquet_in_and_out(tmp_path):
    users = pa.table({"user_id": ["a", "b", "c"], "history": [["1", "2"], [], ["3", "4", "5"]]})
    pq.write_table(users, tmp_path / "users.parquet")
    cfg = BatchConfig(input=tmp_path / "users.parquet", output=tmp_path / "recs.parquet", k=2)
    report = run_batch(cfg, FakeRecommender())
    out = pq.read_table(cfg.output).to_pylist()
    assert report.ok == 2 and report.errors == 1
    assert [r["user_id"] for r in out] == ["a", "c"] and out[1]["items"] == ["5", "4"]


def test_refuses_to_clobber_or_mix_runs(tmp_path):
    write_users(tmp_path / "users.jsonl", n=5)
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl")
    run_batch(cfg, FakeRecommender())
    with pytest.raises(PauserecError, match="--overwrite"):
        run_batch(cfg, FakeRecommender())
    cfg.parts_dir.mkdir()
    with pytest.raises(PauserecError, match="--resume"):
        run_batch(BatchConfig(input=cfg.input, output=cfg.output, overwrite=True), FakeRecommender())
    with pytest.raises(PauserecError, match=r"\.jsonl or \.parquet"):
        run_batch(BatchConfig(input=cfg.input, output=tmp_path / "recs.csv"), FakeRecommender())


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    write_users(tmp_path / "users.jsonl", n=60)
    out = tmp_path / "recs.jsonl"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_batch import FakeRecommender
        from pauserec.runtime.batch import BatchConfig, run_batch
        cfg = BatchConfig(input=Path({str(tmp_path / 'users.jsonl')!r}), output=Path({str(out)!r}), batch_size=4)
        run_batch(cfg, FakeRecommender(delay=0.2))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + 60
    while time.time() < deadline and len(list(parts.glob("part-*.jsonl"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(parts.glob("part-*.jsonl"))) >= 3
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=out, batch_size=4, resume=True)
    report = run_batch(cfg, FakeRecommender())
    rows = [r["row"] for r in read_jsonl(out) + read_jsonl(cfg.errors_path)]
    assert sorted(rows) == list(range(60))  # none lost, none duplicated
    assert report.skipped_done >= 12


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
    res = CliRunner().invoke(app, ["recommend", str(tmp_path / "nope"), "-i", str(inp), "-o", str(out)])
    assert res.exit_code == 2 and "error" in res.output
