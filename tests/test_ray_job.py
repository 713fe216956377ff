"""The batch job on Ray Data: same recommendations as the local job, every row accounted for, retries."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from pauserec.runtime import Engine, Recommender  # noqa: E402
from pauserec.runtime.batch import BatchConfig, run_batch  # noqa: E402
from pauserec.runtime.ray_job import RecommendBatch, run_ray  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs, started by the test itself."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def write_users(path: Path, ids: list[str], n: int) -> int:
    """n good rows plus one of each kind of bad row; returns the number of lines."""
    lines = [json.dumps({"user_id": f"u{i}", "history": [ids[(i * 7 + j) % len(ids)] for j in range(1 + i % 5)]})
             for i in range(n)]
    lines += ['{"user_id": "broken", "history": [', json.dumps({"user_id": "x", "history": ["no-such-item"]}),
              json.dumps({"history": [ids[0]]}), json.dumps({"user_id": "e", "history": []}), ""]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def read_result(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_ray_job_matches_the_local_job_row_for_row(trained_engines, tmp_path, ray_cluster):
    engine = trained_engines["pause"]
    ids = list(Engine.load(engine).catalog.item_ids)
    n_lines = write_users(tmp_path / "users.jsonl", ids, 40)
    local = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "local.jsonl", k=5, beams=8, batch_size=8)
    run_batch(local, Recommender(Engine.load(engine, threads=1)))
    want = {r["user_id"]: r for r in map(json.loads, local.output.read_text().splitlines())}
    want_errors = sorted(json.loads(line)["reason"] for line in local.errors_path.read_text().splitlines())

    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "ray.parquet", k=5, beams=8, batch_size=8)
    report = run_ray(cfg, engine, concurrency=2, threads=1)
    rows = read_result(cfg.output)
    assert len(rows) == n_lines and report.input_rows == n_lines  # rows out + error rows = rows in
    got = {r["user_id"]: r for r in rows if r["error"] is None}
    assert got.keys() == want.keys()
    for user, r in want.items():
        assert got[user]["items"] == r["items"] and got[user]["sids"] == r["sids"]
        assert got[user]["scores"] == pytest.approx(r["scores"], abs=1e-4)
    assert sorted(r["error"] for r in rows if r["error"] is not None) == want_errors
    summary = json.loads(cfg.summary_path.read_text())
    assert summary["rows_in"] == n_lines and summary["rows_out"] == len(want)
    assert summary["errors_by_reason"] == json.loads(local.summary_path.read_text())["errors_by_reason"]

    # Parquet in, one actor: the same recommendations again
    table = pa.table({"user_id": list(want), "history": [None] * len(want)})
    histories = {json.loads(line).get("user_id"): json.loads(line)["history"]
                 for line in (tmp_path / "users.jsonl").read_text().splitlines()[:40]}
    table = pa.table({"user_id": list(histories), "history": list(histories.values())})
    pq.write_table(table, tmp_path / "users.parquet")
    cfg = BatchConfig(input=tmp_path / "users.parquet", output=tmp_path / "ray2.parquet", k=5, beams=8)
    run_ray(cfg, engine, concurrency=1, threads=1)
    assert {r["user_id"]: r["items"] for r in read_result(cfg.output)} == {u: r["items"] for u, r in want.items()}


def _map_workers() -> list[int]:
    """PIDs of Ray Data's map actors (their process title names the UDF)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in cmd and "RecommendBatch" in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_worker_killed_mid_job_is_retried_and_nothing_is_lost_or_duplicated(trained_engines, tmp_path,
                                                                               ray_cluster):
    engine = trained_engines["direct"]
    ids = list(Engine.load(engine).catalog.item_ids)
    n_lines = write_users(tmp_path / "users.jsonl", ids, 1500)
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.parquet", k=5, beams=8, batch_size=4)
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("report", run_ray(cfg, engine, concurrency=1, threads=1)))
    job.start()
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and killed is None and job.is_alive():
        pids = _map_workers()
        if pids:
            time.sleep(1.0)  # let it recommend a few batches first
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
            except ProcessLookupError:  # that actor was just retired; look again
                pass
        time.sleep(0.1)
    job.join(timeout=300)
    assert killed is not None, "the job ended before a worker could be killed; make it longer"
    rows = read_result(cfg.output)
    users = [r["user_id"] for r in rows if r["user_id"] is not None]
    assert len(rows) == n_lines == result["report"].input_rows
    assert len(users) == len(set(users)) == n_lines - 3  # all but the malformed, the id-less and the empty line


def test_a_ray_worker_never_imports_torch(trained_engines, ray_cluster):
    @ray.remote(num_cpus=1)
    def recommend_in_a_worker(engine: str) -> tuple[bool, int, list]:
        udf = RecommendBatch(engine, k=3, beams=4)
        ids = list(udf.rec.catalog.item_ids[:2])
        out = udf(pa.table({"user_id": ["a"], "history": [ids]}))
        return "torch" in sys.modules, udf.threads, out.column("items").to_pylist()

    torch_loaded, threads, items = ray.get(recommend_in_a_worker.remote(str(trained_engines["pause"])))
    assert not torch_loaded and threads == 1 and len(items[0]) == 3  # ONNX Runtime threads = the task's CPUs


def test_recommend_cli_with_ray(trained_engines, tmp_path, ray_cluster):
    from typer.testing import CliRunner

    from pauserec.cli.main import app

    engine = trained_engines["cot"]
    ids = list(Engine.load(engine).catalog.item_ids)
    n_lines = write_users(tmp_path / "users.jsonl", ids, 6)
    args = ["recommend", str(engine), "-i", str(tmp_path / "users.jsonl"), "-o", str(tmp_path / "recs.parquet"),
            "--k", "3", "--beams", "4", "--ray", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "6 users recommended, 5 rejected" in res.output and len(read_result(tmp_path / "recs.parquet")) == n_lines
    res = CliRunner().invoke(app, args)  # never overwritten silently
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(app, [*args[:5], str(tmp_path / "recs.jsonl"), "--ray"])
    assert res.exit_code == 2 and "Parquet dataset" in res.output
