"""`pauserec serve`: the batch job's answers over HTTP, batched, bounded, reloadable, stopped without loss."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from pauserec.frontends.server import ServeConfig, create_app  # noqa: E402


def _recommender(engine: Path):
    from pauserec.runtime import Engine, Recommender

    return Recommender(Engine.load(engine, threads=1), batch_size=16)


class Slow:
    """A recommender that takes ``delay`` seconds per batch and can fail its next ``fail`` batches."""

    def __init__(self, inner, delay: float = 0.0, fail: int = 0) -> None:
        self.inner, self.delay, self.fail, self.calls = inner, delay, fail, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def recommend(self, histories, **kw):
        self.calls.append(len(histories))
        time.sleep(self.delay)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("injected engine failure")
        return self.inner.recommend(histories, **kw)


class Running:
    """The app on a real uvicorn server in a thread of this process (port chosen by the OS)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def engine(trained_engines) -> Path:
    return trained_engines["pause"]


@pytest.fixture(scope="module")
def rec(engine):
    return _recommender(engine)


def _rows(rec) -> list[dict]:
    ids = rec.catalog.item_ids
    return [
        {"user_id": "a", "history": [ids[1], ids[2], ids[3]]},
        {"user_id": "b", "history": [ids[5]], "exclude": [ids[7]]},
        {"user_id": "c", "history": [ids[3]] * 30},  # truncated
        {"user_id": "d", "history": [ids[4], ids[9]], "allow": list(ids[:40])},
        {"user_id": "e", "history": ["no-such-item"]},
        {"user_id": "f", "history": []},
        {"user_id": "g", "history": [ids[1]], "exclude": ["nope"]},
        {"history": [ids[1]]},
        {"user_id": "h", "history": "12"},
    ]


def test_a_request_gets_what_the_batch_job_writes_for_its_row(engine, rec, tmp_path):
    """Parity with `pauserec recommend` row by row: items, SIDs, scores, truncation and the error reasons."""
    from typer.testing import CliRunner

    from pauserec.cli.main import app as cli

    rows = _rows(rec)
    inp = tmp_path / "users.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "recs.jsonl"
    res = CliRunner().invoke(cli, ["recommend", str(engine), "-i", str(inp), "-o", str(out), "--k", "5",
                                   "--beams", "8", "--threads", "1"])
    assert res.exit_code == 0, res.output
    batch = {r["user_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    errors = [json.loads(x) for x in (tmp_path / "recs.errors.jsonl").read_text().splitlines()]
    assert len(batch) == 4 and len(errors) == 5

    from starlette.testclient import TestClient

    with TestClient(create_app(ServeConfig(engine=str(engine), k=5, beams=8), recommender=rec)) as client:
        answers = [client.post("/recommend", json=r) for r in rows]
    for r, a in zip(rows, answers):
        uid = r.get("user_id")
        if uid in batch:
            assert a.status_code == 200, a.text
            got, want = a.json(), batch[uid]
            assert got["items"] == want["items"] and got["sids"] == want["sids"]
            np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
            assert (got.get("truncated", 0) > 0) == (uid == "c")  # the job counts it in its summary instead
            assert a.headers["X-Pauserec-Batch"] == "1"
        else:
            assert a.status_code == 422, a.text
            err = next(e for e in errors if e["user_id"] == uid)
            assert a.json()["reason"] == err["reason"] and a.json()["user_id"] == uid
        assert a.headers["X-Pauserec-Engine"] == rec.fingerprint()["manifest_sha256"]
    assert json.loads((tmp_path / "recs.summary.json").read_text())["truncated_histories"] == 1


def test_bad_bodies_and_k(engine, rec):
    from starlette.testclient import TestClient

    ids = rec.catalog.item_ids
    with TestClient(create_app(ServeConfig(engine=str(engine), k=5, beams=8), recommender=rec)) as client:
        r = client.post("/recommend", content=b"{broken")
        assert r.status_code == 400 and r.json()["reason"].startswith("malformed JSON")
        r = client.post("/recommend", json=[1, 2])
        assert r.status_code == 400 and r.json()["reason"] == "row is not a JSON object"
        r = client.post("/recommend", json={"user_id": "u", "history": [ids[1]], "k": 9})
        assert r.status_code == 422 and "k=9 > beams=8" in r.json()["reason"]
        r = client.post("/recommend", json={"user_id": "u", "history": [ids[1]], "k": "3"})
        assert r.status_code == 422 and "'k' must be an integer" in r.json()["reason"]
        r = client.post("/recommend", content=b"x" * (2 << 20))
        assert r.status_code == 400 and "limit" in r.json()["reason"]
        r5 = client.post("/recommend", json={"user_id": "u", "history": [ids[1], ids[2]]}).json()
        r3 = client.post("/recommend", json={"user_id": "u", "history": [ids[1], ids[2]], "k": 3}).json()
        assert r3["items"] == r5["items"][:3] and len(r5["items"]) == 5
        assert client.post("/admin/catalog", json={"catalog": "x"}).status_code == 404  # off without a token
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["items"] == rec.catalog.n_items and health["beams"] == 8


def test_concurrent_requests_share_batches_and_get_their_own_answers(engine, rec):
    ids = rec.catalog.item_ids
    rng = np.random.default_rng(0)
    rows = [{"user_id": f"u{i}", "history": [ids[j] for j in rng.choice(len(ids), size=1 + i % 6, replace=False)],
             "k": 3 + i % 3} for i in range(24)]
    solo = {r["user_id"]: rec.recommend([r["history"]], k=r["k"], beams=8) for r in rows}
    app = create_app(ServeConfig(engine=str(engine), k=5, beams=8, max_batch=8, max_wait_ms=300), recommender=rec)
    with Running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda r: client.post("/recommend", json=r), rows))
        metrics = client.get("/metrics").text
    sizes = [int(a.headers["X-Pauserec-Batch"]) for a in answers]
    assert all(a.status_code == 200 for a in answers)
    assert max(sizes) > 1 and max(sizes) <= 8
    for r, a in zip(rows, answers):
        want = solo[r["user_id"]]
        assert a.json()["user_id"] == r["user_id"] and len(a.json()["items"]) == r["k"]
        assert a.json()["items"] == list(want.items[0])
        np.testing.assert_allclose(a.json()["scores"], want.scores[0], atol=1e-4)
    assert 'pauserec_requests_total{code="200"} 24.0' in metrics
    count = re.search(r"pauserec_batch_requests_count (\S+)", metrics)
    total = re.search(r"pauserec_batch_requests_sum (\S+)", metrics)
    assert float(total.group(1)) == 24 and float(count.group(1)) < 24


def test_a_full_queue_answers_503_and_an_engine_failure_500_then_serving_goes_on(engine, rec):
    ids = rec.catalog.item_ids
    slow = Slow(rec, delay=0.4, fail=1)
    app = create_app(ServeConfig(engine=str(engine), k=5, beams=8, max_batch=1, max_wait_ms=0, max_queue=2),
                     recommender=slow)
    body = {"user_id": "u", "history": [ids[1]]}
    with Running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post("/recommend", json=body), range(8)))
        codes = sorted(a.status_code for a in answers)
        assert codes.count(503) >= 3 and codes.count(500) == 1 and set(codes) <= {200, 500, 503}
        full = next(a for a in answers if a.status_code == 503)
        assert full.headers["Retry-After"] == "1" and "queue is full" in full.json()["reason"]
        failed = next(a for a in answers if a.status_code == 500)
        assert "injected engine failure" in failed.json()["reason"]
        assert client.post("/recommend", json=body).status_code == 200  # the server goes on
        assert "injected engine failure" in client.get("/health").json()["last_failure"]
        metrics = client.get("/metrics").text
    assert 'pauserec_requests_total{code="503"}' in metrics and 'pauserec_requests_total{code="500"} 1.0' in metrics


def test_catalog_reload_is_checked_first_and_can_be_rolled_back(engine, rec, tmp_path):
    from starlette.testclient import TestClient

    from pauserec.data import Catalog

    cat = rec.catalog
    smaller = tmp_path / "smaller.npz"
    Catalog(cat.item_ids[:-10], cat.sids[:-10], cat.token_prefixes, cat.codebook_sizes).save(smaller)
    other_levels = tmp_path / "levels.npz"
    Catalog(cat.item_ids, cat.sids[:, :-1], cat.token_prefixes[:-1]).save(other_levels)
    gone = cat.item_ids[-1]
    token = {"Authorization": "Bearer s3cret"}
    app = create_app(ServeConfig(engine=str(engine), k=5, beams=8, admin_token="s3cret"), recommender=rec)
    with TestClient(app) as client:
        before = client.get("/health").headers["X-Pauserec-Catalog"]
        assert client.post("/recommend", json={"user_id": "u", "history": [gone]}).status_code == 200
        assert client.post("/admin/catalog", json={"catalog": str(smaller)}).status_code == 401
        assert client.post("/admin/catalog", json={"catalog": str(smaller)},
                           headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/admin/catalog/rollback", headers=token).status_code == 409
        bad = client.post("/admin/catalog", json={"catalog": str(other_levels)}, headers=token)
        assert bad.status_code == 422 and "old one keeps serving" in bad.json()["reason"]
        missing = client.post("/admin/catalog", json={"catalog": str(tmp_path / "nope.index.json")}, headers=token)
        assert missing.status_code == 422 and "not found" in missing.json()["reason"]
        assert client.get("/health").headers["X-Pauserec-Catalog"] == before
        ok = client.post("/admin/catalog", json={"catalog": str(smaller)}, headers=token)
        assert ok.status_code == 200 and ok.json()["removed"] == 10 and ok.json()["added"] == 0
        after = ok.headers["X-Pauserec-Catalog"]
        assert after != before and client.get("/health").json()["items"] == cat.n_items - 10
        r = client.post("/recommend", json={"user_id": "u", "history": [gone]})
        assert r.status_code == 422 and r.json()["reason"].startswith("unknown item ids") and \
            r.headers["X-Pauserec-Catalog"] == after
        r = client.post("/recommend", json={"user_id": "u", "history": [cat.item_ids[1]]})
        assert r.status_code == 200 and not set(r.json()["items"]) & set(cat.item_ids[-10:])
        back = client.post("/admin/catalog/rollback", headers=token)
        assert back.status_code == 200 and back.headers["X-Pauserec-Catalog"] == before
        assert client.post("/recommend", json={"user_id": "u", "history": [gone]}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'pauserec_catalog_reloads_total{result="refused"} 2.0' in metrics
    assert 'pauserec_catalog_reloads_total{result="loaded"} 1.0' in metrics


@pytest.mark.slow
def test_sigterm_under_load_loses_nothing_and_answers_nothing_twice(engine, rec, tmp_path):
    """A real `pauserec serve` process, requests arriving all the time, SIGTERM: every request the server took
    is answered (its count of answers equals what the clients received, so none was answered twice or lost on the
    way), the rest are refused at connect (or reset, unread, when they reached the socket as it closed)."""
    from pauserec.bench.serve_load import start_server

    log = tmp_path / "serve.log"
    proc, url = start_server(engine, ["--k", "5", "--beams", "8", "--threads", "1", "--max-wait-ms", "20"], log)
    try:
        ids = rec.catalog.item_ids
        outcomes: list[str] = []
        stop = threading.Event()

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            no_reuse = httpx.Limits(max_keepalive_connections=0)  # a new connection for every request
            with httpx.Client(base_url=url, timeout=60, limits=no_reuse) as http:
                while not stop.is_set():
                    body = {"user_id": str(seed), "history": [ids[j] for j in rng.choice(len(ids), size=3)]}
                    try:
                        r = http.post("/recommend", json=body)
                    except httpx.ConnectError:
                        outcomes.append("refused")
                        time.sleep(0.01)
                        continue
                    except (httpx.ReadError, httpx.RemoteProtocolError):
                        # accepted by the kernel but not yet by the server when it closed its socket: never read
                        outcomes.append("reset")
                        continue
                    ok = r.status_code == 200 and len(r.json()["items"]) == 5 and r.json()["user_id"] == str(seed)
                    outcomes.append("answered" if ok else f"status {r.status_code}")

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]
        try:
            for t in threads:
                t.start()
            deadline = time.time() + 120
            while outcomes.count("answered") < 20 and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal so a supervisor sees why it ended
            assert proc.wait(60) in (0, -signal.SIGTERM)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    served = int(re.search(r"stopped: (\d+) recommendations answered", text).group(1))
    assert set(outcomes) <= {"answered", "refused", "reset"}, sorted(set(outcomes))
    assert served == outcomes.count("answered") and "refused" in outcomes


def test_the_load_benchmark_measures_a_server_it_starts(engine, tmp_path):
    """`pauserec-bench serve` end to end on a tiny engine (short: what it reports, not how fast)."""
    from pauserec.bench.serve_load import LoadConfig, run_load, serve_markdown

    cfg = LoadConfig(engine=engine, rates=(2.0, 40.0), duration=2.0, warmup=1, history_len=5, users=16, k=5, beams=8,
                     max_batch=8, max_wait_ms=50, threads=1)
    result = run_load(cfg, tmp_path, progress=lambda m: None)
    single, levels = result["one_at_a_time"], result["levels"]
    assert single["answered"] >= 1 and single["batch_max"] == 1 and single["failed"] == 0
    assert [lv["offered_rps"] for lv in levels] == [2.0, 40.0]
    assert all(lv["answered"] + lv["refused_503"] == lv["sent"] and lv["failed"] == 0 for lv in levels)
    assert levels[1]["batch_max"] > 1  # 40 req/s on a tiny engine: requests share batches
    assert result["server_batches"]["+Inf"] >= 1 and result["server"]["beams"] == 8
    assert "one request at a time" in serve_markdown(result)
    assert "stopped:" in (tmp_path / "server.log").read_text()  # the server it started was stopped gracefully
