"""The batch job on a multi-node Ray cluster: the local job's files and guarantees, actors that fit the nodes,
a node removed mid-job, a driver killed and resumed, engines read from URIs into per-node caches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from pauserec.errors import DataError, PauserecError  # noqa: E402
from pauserec.runtime import Engine, Recommender  # noqa: E402
from pauserec.frontends.batch import BatchConfig, run_batch  # noqa: E402
from pauserec.runtime.engine_cache import CACHE_ENV  # noqa: E402
from pauserec.frontends.ray_job import RecommendBatch, plan_pool, run_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three Ray nodes on this machine (head 1 CPU, two workers of 2), each with its own engine cache."""
    caches = tmp_path_factory.mktemp("node-caches")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "env_vars": {CACHE_ENV: str(caches / "head")}})
    for name in ("w1", "w2"):
        c.add_node(num_cpus=2, env_vars={CACHE_ENV: str(caches / name)})
    ray.init(address=c.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    c.caches = caches
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def driver_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "driver-cache"))
    return tmp_path / "driver-cache"


def write_users(path: Path, ids: list[str], n: int) -> int:
    """n good rows (u3 twice), plus one of each kind of bad row; returns the number of lines."""
    lines = [json.dumps({"user_id": f"u{i}", "history": [ids[(i * 7 + j) % len(ids)] for j in range(1 + i % 5)]})
             for i in range(n)]
    lines.insert(n // 2, lines[3])
    lines += ['{"user_id": "broken", "history": [', json.dumps({"user_id": "x", "history": ["no-such-item"]}),
              json.dumps({"history": [ids[0]]}), json.dumps({"user_id": "e", "history": []}), ""]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_files(local: BatchConfig, other: BatchConfig) -> None:
    """The two jobs' outputs, errors files and summaries agree (scores to float32 noise)."""
    a, b = read_jsonl(local.output), read_jsonl(other.output)
    assert [(r["row"], r["user_id"], r["items"], r["sids"]) for r in a] == \
           [(r["row"], r["user_id"], r["items"], r["sids"]) for r in b]
    for x, y in zip(a, b):
        assert y["scores"] == pytest.approx(x["scores"], abs=1e-4)
    assert read_jsonl(local.errors_path) == read_jsonl(other.errors_path)
    sa, sb = json.loads(local.summary_path.read_text()), json.loads(other.summary_path.read_text())
    assert sa.keys() == sb.keys()
    for key in ("rows_in", "rows_out", "error_rows", "errors_by_reason", "duplicate_user_ids", "truncated_histories",
                "engine", "job"):
        assert sa[key] == sb[key], key


def test_the_pool_fits_the_nodes():
    assert plan_pool([1, 2, 2], concurrency=1).cpus == 2  # was: 5 CPUs for one actor, which no node has
    assert plan_pool([1, 2, 2], concurrency=2).cpus == 2
    assert plan_pool([1, 2, 2], concurrency=3).cpus == 1
    assert plan_pool([16] * 4, concurrency=2).cpus == 16  # was: 32
    assert plan_pool([16] * 4, concurrency=8).cpus == 8
    p = plan_pool([0, 1, 2, 2])  # default: fill the cluster with one-CPU actors (a 0-CPU head holds none)
    assert (p.actors, p.cpus, p.warning()) == (5, 1, None)
    assert plan_pool([2, 2], threads=2).actors == 2
    assert "hold 2" in plan_pool([2, 2], concurrency=3, threads=2).warning()
    with pytest.raises(PauserecError, match="no node has 3 CPUs"):
        plan_pool([2, 2], threads=3)
    with pytest.raises(PauserecError, match="no node with a CPU"):
        plan_pool([0])


def test_three_nodes_write_what_the_local_job_writes(trained_engines, tmp_path, cluster, driver_cache):
    engine = trained_engines["pause"]
    ids = list(Engine.load(engine).catalog.item_ids)
    write_users(tmp_path / "users.jsonl", ids, 300)
    opts = dict(input=tmp_path / "users.jsonl", k=5, beams=8, batch_size=8, unique=True)
    local = BatchConfig(output=tmp_path / "local" / "recs.jsonl", **opts)
    local.output.parent.mkdir()
    run_batch(local, Recommender(Engine.load(engine, threads=1)))

    cfg = BatchConfig(output=tmp_path / "ray" / "recs.jsonl", **opts)
    cfg.output.parent.mkdir()
    report = run_ray(cfg, engine.as_uri(), concurrency=2)
    assert_same_files(local, cfg)
    assert report.duplicates == 1 and any("duplicate user id" in r["reason"] for r in read_jsonl(cfg.errors_path))

    runner = json.loads(cfg.summary_path.read_text())["runner"]
    assert runner["kind"] == "ray" and runner["cpus_per_actor"] == 2 and runner["actors_lost"] == 0
    # Both actors fit only on the 2-CPU workers, one each; the second may still be starting when a short job
    # ends, so the figures cover the actors that ran.
    stats = runner["actor_stats"]
    assert runner["actors_started"] == 2 and 1 <= len(stats) == len({s["node"] for s in stats})
    assert all(s["cpus"] == 2 and s["ort_threads"] == [2] for s in stats)  # ONNX Runtime threads = Ray's CPUs
    assert sum(s["rows"] for s in stats) == report.input_rows  # every row went through an actor once
    for s in stats:  # each node runs the engine from its own cache, copied there once; so does the driver
        cache = Path(s["engine"]).parent
        assert cache.parent.name in ("w1", "w2") and len(list(cache.glob("pause-*/manifest.json"))) == 1
    assert len(list((driver_cache / "engines").glob("pause-*/weights.bin"))) == 1


def test_the_ray_job_checks_before_it_starts(trained_engines, tmp_path, cluster, driver_cache):
    engine = trained_engines["pause"]
    ids = list(Engine.load(engine).catalog.item_ids)
    write_users(tmp_path / "users.jsonl", ids, 5)
    (tmp_path / "exclude.txt").write_text(f"{ids[0]}\nno-such-item\n")
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", k=5, beams=8,
                      exclude_file=tmp_path / "exclude.txt")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="exclude-file .*no-such-item"):  # was: every row an error row
        run_ray(cfg, engine)
    with pytest.raises(PauserecError, match="--k 9 > --beams 8"):
        run_ray(BatchConfig(input=cfg.input, output=cfg.output, k=9, beams=8), engine)
    with pytest.raises(PauserecError, match="no node has 4 CPUs"):
        run_ray(BatchConfig(input=cfg.input, output=cfg.output), engine, threads=4)
    assert time.perf_counter() - t0 < 20 and not list(tmp_path.glob("recs*"))


def _wait_for_parts(out: Path, n: int, timeout: float = 120) -> None:
    parts = out.with_name(out.name + ".parts")
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(parts.glob("part-*.jsonl"))) < n:
        time.sleep(0.05)
    assert len(list(parts.glob("part-*.jsonl"))) >= n, "the job wrote no parts in time"


def _recommending_on(cache: Path, timeout: float = 120) -> None:
    """Wait until an actor of the node whose engine cache is ``cache`` is running a chunk (its process title
    names the method while it runs; its environment names the node's cache)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in Path("/proc").iterdir():
            try:
                if (d.name.isdigit() and b"PoolWorker.recommend" in (d / "cmdline").read_bytes()
                        and f"{CACHE_ENV}={cache}".encode() in (d / "environ").read_bytes()):
                    return
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError("no actor of the new node ran a chunk in time")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the node's actor through /proc")
def test_a_node_removed_mid_job_loses_and_duplicates_nothing(trained_engines, tmp_path, cluster, driver_cache):
    engine = trained_engines["direct"]
    ids = list(Engine.load(engine).catalog.item_ids)
    n_lines = write_users(tmp_path / "users.jsonl", ids, 1200)
    node = cluster.add_node(num_cpus=1, env_vars={CACHE_ENV: str(cluster.caches / "w3")})
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", k=5, beams=8, batch_size=4)
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("report", run_ray(cfg, engine.as_uri(), threads=1)))
    job.start()
    _recommending_on(cluster.caches / "w3")  # of the 6 actors, the one on the new node is running a chunk
    cluster.remove_node(node)
    job.join(timeout=300)
    report = result["report"]
    ok, bad = read_jsonl(cfg.output), read_jsonl(cfg.errors_path)
    assert sorted(r["row"] for r in ok + bad) == list(range(n_lines)) == list(range(report.input_rows))
    assert [r["row"] for r in ok] == sorted(r["row"] for r in ok)
    runner = json.loads(cfg.summary_path.read_text())["runner"]
    assert runner["actors"] == 6 and runner["actors_lost"] >= 1 and runner["chunks_retried"] >= 1


def test_a_killed_driver_is_resumed_and_a_second_run_is_refused(trained_engines, tmp_path, cluster, driver_cache):
    engine = trained_engines["direct"]
    ids = list(Engine.load(engine).catalog.item_ids)
    n_lines = write_users(tmp_path / "users.jsonl", ids, 1500)
    out = tmp_path / "recs.jsonl"
    script = textwrap.dedent(f"""
        import ray
        from pathlib import Path
        from pauserec.frontends.batch import BatchConfig
        from pauserec.frontends.ray_job import run_ray
        ray.init(address={cluster.address!r}, log_to_driver=False)
        cfg = BatchConfig(input=Path({str(tmp_path / 'users.jsonl')!r}), output=Path({str(out)!r}), k=5, beams=8,
                          batch_size=4)
        run_ray(cfg, {str(engine)!r}, threads=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    try:
        _wait_for_parts(out, 3)
        cfg = BatchConfig(input=tmp_path / "users.jsonl", output=out, k=5, beams=8, batch_size=4, resume=True)
        with pytest.raises(PauserecError, match=rf"being written by another run: pid {proc.pid} "):
            run_ray(cfg, engine)  # one writer per output
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    report = run_ray(cfg, engine, threads=1)  # the dead run's lock is gone with it
    assert report.skipped_done >= 12 and report.input_rows == n_lines
    ok, bad = read_jsonl(out), read_jsonl(cfg.errors_path)
    assert sorted(r["row"] for r in ok + bad) == list(range(n_lines))
    with pytest.raises(PauserecError, match="k: 5 -> 4"):  # a resume of another job is refused, as locally
        run_ray(BatchConfig(input=cfg.input, output=out, k=4, beams=8, batch_size=4, resume=True), engine)


def test_ray_data_pipelines_get_the_same_rows_and_never_import_torch(trained_engines, cluster, driver_cache):
    engine = str(trained_engines["pause"])
    ids = list(Engine.load(engine).catalog.item_ids)
    users = [{"user_id": "a", "history": ids[:2]}, {"user_id": "b", "history": ["no-such-item"]}]
    ds = ray.data.from_items(users).map_batches(
        RecommendBatch, fn_constructor_kwargs={"engine": engine, "k": 3, "beams": 4}, batch_size=8,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    rows = {r["user_id"]: r for r in ds.take_all()}
    want = Recommender(Engine.load(engine)).recommend([ids[:2]], k=3, beams=4)
    assert rows["a"]["items"] == list(want.items[0]) and rows["a"]["reason"] is None
    assert rows["b"]["reason"].startswith("unknown item ids") and rows["b"]["items"] is None

    @ray.remote(num_cpus=1)
    def in_a_worker() -> tuple[bool, int]:
        udf = RecommendBatch(engine, k=3, beams=4)
        udf(pa.table({"user_id": ["a"], "history": [ids[:2]]}))
        return "torch" in sys.modules, udf.threads

    assert ray.get(in_a_worker.remote()) == (False, 1)  # ONNX Runtime threads = the task's CPUs


def test_recommend_cli_with_ray(trained_engines, tmp_path, cluster, driver_cache):
    from typer.testing import CliRunner

    from pauserec.cli.main import app

    engine = trained_engines["cot"]
    ids = list(Engine.load(engine).catalog.item_ids)
    n_lines = write_users(tmp_path / "users.jsonl", ids, 6)
    args = ["recommend", engine.as_uri(), "-i", str(tmp_path / "users.jsonl"), "-o", str(tmp_path / "recs.parquet"),
            "--k", "3", "--beams", "4", "--ray", "--address", cluster.address, "--concurrency", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "7 users recommended, 5 rejected" in res.output and "1 repeated user ids" in res.output
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "recs.parquet").num_rows == 7 and len(read_jsonl(tmp_path / "recs.errors.jsonl")) == 5
    assert n_lines == 12
    res = CliRunner().invoke(app, args)  # never overwritten silently
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_an_actor_refuses_an_engine_other_than_the_jobs(trained_engines, tmp_path, cluster, driver_cache, monkeypatch):
    """The driver fingerprinted one engine (job.json names it); an actor that loads another from the same path (the
    engine was re-exported or re-synced while the job ran, simulated by the driver's fingerprint) stops the job."""
    from pauserec.errors import JobError
    from pauserec.frontends.ray_job import check_same_engine

    engine = trained_engines["pause"]
    ids = list(Engine.load(engine).catalog.item_ids)
    write_users(tmp_path / "users.jsonl", ids, 20)
    real = Recommender.fingerprint
    monkeypatch.setattr(Recommender, "fingerprint", lambda self: {**real(self), "manifest_sha256": "0" * 64})
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", k=5, beams=8)
    with pytest.raises(JobError, match="not the one this job started with .*manifest_sha256 000000000000"):
        run_ray(cfg, engine, concurrency=1)
    assert not cfg.output.exists() and not cfg.summary_path.exists()
    same = real(Recommender(Engine.load(engine, graphs=False)))
    check_same_engine({**same, "provider": "cuda"}, same, "e")  # the provider is not the engine's identity
    with pytest.raises(JobError, match="catalog_sha256"):
        check_same_engine({**same, "catalog_sha256": "x"}, same, "e")


def test_the_start_timeout_counts_placement_not_the_engine_load(trained_engines, tmp_path, cluster, driver_cache,
                                                                 monkeypatch):
    """An engine that takes longer to open than the start timeout (a big engine copied from slow storage into the
    node's cache) does not stop the job: the timeout measures how long no actor could be placed."""
    from pauserec.frontends import ray_job

    class SlowLoad(ray_job.PoolWorker):
        def load(self):
            time.sleep(15)  # the copy of a big engine
            return super().load()

    monkeypatch.setattr(ray_job, "START_TIMEOUT", 8.0)
    engine = trained_engines["pause"]
    ids = list(Engine.load(engine).catalog.item_ids)
    write_users(tmp_path / "users.jsonl", ids, 10)
    cfg = BatchConfig(input=tmp_path / "users.jsonl", output=tmp_path / "recs.jsonl", k=5, beams=8)
    checks = Recommender(Engine.load(engine, graphs=False, verify=False))
    runner = ray_job.RayRunner(engine, plan_pool(ray_job.cluster_node_cpus(), 1, None), expected=checks.fingerprint())
    runner.worker = SlowLoad
    t0 = time.perf_counter()
    try:
        report = run_batch(cfg, checks, runner=runner)
    finally:
        runner.close()
    assert time.perf_counter() - t0 > 15 and report.ok == 11 and report.errors == 5
