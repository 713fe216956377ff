"""``pauserec serve ENGINE``: online recommendations over HTTP, concurrent requests batched together.

Routes (JSON in and out)::

    POST /recommend        {"user_id": "u1", "history": ["12", "7"], "k": 10, "exclude": [...], "allow": [...]}
        200  {"user_id": "u1", "items": [...], "scores": [...], "sids": [...]}   (+ "truncated": n)
        400  the body is not a JSON object;  422  a row the batch job would reject (unknown items, empty
             history, k out of range...): {"user_id", "reason"}, the batch job's error record, same words
        503  the queue is full (Retry-After);  500  the engine failed (logged; the server keeps serving)
    GET  /health           engine, catalog, queue, served counts
    GET  /metrics          Prometheus text: requests by code, latency, batch sizes, row errors by reason
    POST /admin/catalog    {"catalog": "new.index.json"}: a new catalog, checked and tried on one user before
                           it replaces the one serving; the old one stays if anything is wrong
    POST /admin/catalog/rollback   the catalog before the last reload
    (admin routes exist only when an admin token is set; they want ``Authorization: Bearer TOKEN``)

Every response carries ``X-Pauserec-Engine`` (the manifest's sha256) and ``X-Pauserec-Catalog`` (the
catalog's), a recommendation also ``X-Pauserec-Batch`` (how many requests shared its batch).

Batching: requests wait in one bounded queue; a batch starts when ``max_batch`` requests are waiting or
the oldest has waited ``max_wait_ms``, and runs as one ``Recommender.recommend`` call in a worker thread
(ONNX Runtime releases the GIL), so the event loop keeps taking requests meanwhile. A batch runs at the
largest ``k`` of its requests and each gets its first ``k`` (the beam search's order does not depend on
k). Rows follow :mod:`pauserec.frontends.rows`, the batch job's contract: a request gets exactly the
record ``pauserec recommend`` writes for the same row.

Shutdown (SIGTERM / SIGINT): uvicorn stops accepting, the requests already in flight are answered,
then the worker stops. A catalog swap happens between batches, never inside one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pauserec.errors import BackendUnavailable, PauserecError
from pauserec.frontends.rows import (Row, RowOptions, check_row, error_record, parse_record, reason_kind,
                                     recommend_rows)

log = logging.getLogger("pauserec.serve")

MAX_BODY = 1 << 20  # bytes of one request body
ADMIN_TOKEN_ENV = "PAUSEREC_ADMIN_TOKEN"
INSTALL_HINT = "pauserec serve needs the serve extra: pip install 'pauserec[serve]'"


@dataclass(frozen=True)
class ServeConfig:
    """What ``pauserec serve`` is asked for (one engine, one process)."""

    engine: str
    host: str = "127.0.0.1"
    port: int = 8000
    k: int = 10  # items per request unless the request says "k"
    beams: int = 20
    max_batch: int = 16  # requests in one batch
    kv_memory: int | str | None = "auto"  # Recommender.kv_memory: a batch's KV beyond it runs in smaller calls
    max_wait_ms: float = 5.0  # how long the oldest waiting request may wait for others
    max_queue: int = 256  # requests waiting beyond this get 503
    threads: int | None = None
    spin: bool = False  # intra-op threads busy-wait between operators (Engine.load)
    provider: str = "auto"
    admin_token: str | None = None
    exclude_history: bool = False
    exclude: frozenset[str] = field(default_factory=frozenset)  # items never recommended (--exclude-file)
    drain_s: float = 30.0  # at shutdown, how long requests in flight may take

    def row_options(self) -> RowOptions:
        return RowOptions(k=self.k, beams=self.beams, exclude_history=self.exclude_history, exclude=self.exclude)


def _require_serve_extra():
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"{INSTALL_HINT} ({e.name} is missing)") from None


# -- what is serving ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Serving:
    """One recommender and its identity; replaced whole by a catalog reload."""

    recommender: Any
    engine_sha: str
    catalog_sha: str
    catalog_source: str

    @classmethod
    def of(cls, recommender, catalog_source: str) -> Serving:
        fp = recommender.fingerprint()
        return cls(recommender, fp["manifest_sha256"], fp["catalog_sha256"], catalog_source)

    def headers(self) -> dict[str, str]:
        return {"X-Pauserec-Engine": self.engine_sha, "X-Pauserec-Catalog": self.catalog_sha}


@dataclass
class _Pending:
    row: Row
    k: int
    future: asyncio.Future
    arrived: float


class QueueFull(Exception):
    pass


# -- metrics --------------------------------------------------------------------------------------
class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("pauserec_requests", "Recommend requests answered, by HTTP status", ["code"], registry=r)
        self.latency = Histogram("pauserec_request_seconds", "Recommend request latency (arrival to answer)",
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch = Histogram("pauserec_batch_requests", "Requests per batch",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("pauserec_batch_seconds", "Time of one batch in the engine",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.row_errors = Counter("pauserec_row_errors", "Requests rejected for their row, by reason", ["reason"],
                                  registry=r)
        self.truncated = Counter("pauserec_truncated_histories", "Histories longer than the engine reads", registry=r)
        self.queue = Gauge("pauserec_queue_requests", "Requests waiting for a batch", registry=r)
        self.catalog_items = Gauge("pauserec_catalog_items", "Items of the catalog serving", registry=r)
        self.reloads = Counter("pauserec_catalog_reloads", "Catalog reloads and rollbacks, by result", ["result"],
                               registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# -- batching -------------------------------------------------------------------------------------
class Batcher:
    """One bounded queue of requests, drained in batches by one worker thread."""

    def __init__(self, server: Server) -> None:
        self.server, cfg = server, server.cfg
        self.max_batch, self.max_wait = cfg.max_batch, cfg.max_wait_ms / 1000.0
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=cfg.max_queue)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pauserec-batch")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """After uvicorn has answered every request in flight: nothing is waiting any more."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        while not self.queue.empty():  # never silently: answer what is left (none when shutdown drained)
            p = self.queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))
        self.pool.shutdown(wait=True)

    def submit(self, row: Row, k: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(row, k, fut, time.perf_counter()))
        except asyncio.QueueFull:
            raise QueueFull from None
        self.server.metrics.queue.set(self.queue.qsize())
        return fut

    async def _collect(self) -> list[_Pending]:
        batch = [await self.queue.get()]
        deadline = batch[0].arrived + self.max_wait  # time spent waiting for the previous batch counts
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.server.metrics.queue.set(self.queue.qsize())
            live = [p for p in batch if not p.future.done()]  # a client that went away is not computed for
            if not live:
                continue
            serving = self.server.serving  # a reload takes effect between batches, never inside one
            t0 = time.perf_counter()
            try:
                records = await loop.run_in_executor(self.pool, self._run, serving, live)
            except Exception as e:  # noqa: BLE001 - the engine failed: these requests get 500, the server goes on
                log.exception("a batch of %d requests failed", len(live))
                self.server.last_failure = f"{type(e).__name__}: {e}"
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.server.metrics.batch.observe(len(live))
            self.server.metrics.batch_seconds.observe(time.perf_counter() - t0)
            for p, rec in zip(live, records, strict=True):
                if not p.future.done():
                    p.future.set_result((rec, len(live), serving))

    def _run(self, serving: Serving, batch: list[_Pending]) -> list[dict]:
        rec = serving.recommender
        k = max(p.k for p in batch)
        records = recommend_rows(rec, [p.row for p in batch], replace(self.server.opts, k=k), rec.sid_text)
        out = []
        for p, r in zip(batch, records, strict=True):
            if "items" in r and p.k < k:
                r = {**r, "items": r["items"][: p.k], "scores": r["scores"][: p.k], "sids": r["sids"][: p.k]}
            out.append(r)
        return out


# -- the server -----------------------------------------------------------------------------------
class Server:
    """The state behind the routes: what is serving, the batcher, the metrics."""

    def __init__(self, cfg: ServeConfig, recommender=None) -> None:
        from pauserec.runtime import Engine, Recommender

        self.cfg, self.opts = cfg, cfg.row_options()
        if recommender is None:
            engine = Engine.load(cfg.engine, provider=cfg.provider, threads=cfg.threads, spin=cfg.spin)
            recommender = Recommender(engine, batch_size=cfg.max_batch, kv_memory=cfg.kv_memory)
        recommender.check_request(cfg.k, cfg.beams)
        self.metrics = Metrics()
        self.serving = Serving.of(recommender, "engine")
        self.previous: Serving | None = None
        self.metrics.catalog_items.set(recommender.catalog.n_items)
        self.batcher: Batcher | None = None
        self.reload_lock = asyncio.Lock()
        self.last_failure: str | None = None
        self.answered = 0  # recommend requests answered 200
        self.started = time.time()

    # -- requests ---------------------------------------------------------------------------------
    def parse(self, body: Any) -> tuple[Row, int, str | None]:
        """A request body -> (row, k, reason it is refused or None), by the batch job's row rules."""
        row = parse_record(body, self.opts)
        k = body.get("k", self.cfg.k) if isinstance(body, dict) else self.cfg.k
        if row.reason is None:
            if isinstance(k, bool) or not isinstance(k, int):
                return row, self.cfg.k, f"'k' must be an integer (got {k!r})"
            try:
                self.serving.recommender.check_request(k, self.cfg.beams)
            except PauserecError as e:
                return row, k, str(e)
        reason = check_row(self.serving.recommender, row)
        return row, k, reason

    def status(self) -> dict[str, Any]:
        s, rec = self.serving, self.serving.recommender
        return {"status": "ok", "engine": str(rec.engine.path), "engine_sha256": s.engine_sha,
                "catalog": s.catalog_source, "catalog_sha256": s.catalog_sha, "items": rec.catalog.n_items,
                "precision": rec.engine.manifest.precision, "provider": rec.engine.provider,
                "k": self.cfg.k, "beams": self.cfg.beams, "max_batch": self.cfg.max_batch,
                "max_wait_ms": self.cfg.max_wait_ms,
                "queue": self.batcher.queue.qsize() if self.batcher else 0, "max_queue": self.cfg.max_queue,
                "answered": self.answered, "uptime_s": round(time.time() - self.started, 1),
                "last_failure": self.last_failure, "rollback_available": self.previous is not None}

    # -- catalog ----------------------------------------------------------------------------------
    def load_catalog(self, source: str) -> Serving:
        """A new Serving for ``source``, checked against the engine and tried on one user; raises if not fit."""
        from pauserec.runtime import Recommender

        old = self.serving.recommender
        engine = old.engine.with_catalog(source)
        rec = Recommender(engine, impl=old.impl, batch_size=old.batch_size, kv_memory=self.cfg.kv_memory)
        rec.check_request(self.cfg.k, self.cfg.beams)
        probe = [engine.catalog.item_ids[0]]
        rec.recommend([probe], k=min(self.cfg.k, engine.catalog.n_items), beams=self.cfg.beams)
        return Serving.of(rec, source)

    def swap(self, new: Serving) -> None:
        self.previous, self.serving = self.serving, new
        self.metrics.catalog_items.set(new.recommender.catalog.n_items)


def create_app(cfg: ServeConfig, recommender=None):
    """The Starlette app of ``pauserec serve`` (``recommender``: serve this one instead of loading
    ``cfg.engine``; tests and embedding)."""
    _require_serve_extra()
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    server = Server(cfg, recommender)
    token = cfg.admin_token

    def answer(status: int, body: Any, serving: Serving | None = None, **headers: str) -> JSONResponse:
        return JSONResponse(body, status_code=status, headers={**(serving or server.serving).headers(), **headers})

    async def read_json(request: Request) -> tuple[Any, str | None]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return None, f"request body of {int(size):,} bytes is over the {MAX_BODY:,}-byte limit"
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return None, f"request body is over the {MAX_BODY:,}-byte limit"
        try:
            return json.loads(raw), None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"malformed JSON: {getattr(e, 'msg', e)}"

    async def recommend(request: Request) -> Response:
        t0 = time.perf_counter()
        m = server.metrics
        body, bad = await read_json(request)
        if bad is None and not isinstance(body, dict):
            bad = "row is not a JSON object"
        if bad is not None:
            m.requests.labels("400").inc()
            m.row_errors.labels(reason_kind(bad)).inc()
            return answer(400, {"user_id": None, "reason": bad})
        row, k, reason = server.parse(body)
        if reason:
            m.requests.labels("422").inc()
            m.row_errors.labels(reason_kind(reason)).inc()
            return answer(422, error_record(row, reason))
        try:
            fut = server.batcher.submit(row, k)
        except QueueFull:
            m.requests.labels("503").inc()
            return answer(503, {"user_id": row.user_id, "reason": f"the server's queue is full ({cfg.max_queue} "
                                "requests waiting): retry after a moment, or run more servers"}, **{"Retry-After": "1"})
        try:
            record, batch_size, serving = await fut
        except Exception as e:  # noqa: BLE001 - the engine's failure for this batch; logged by the batcher
            m.requests.labels("500").inc()
            return answer(500, {"user_id": row.user_id, "reason": f"the engine failed on this request's batch "
                                f"({type(e).__name__}: {e}); the server's log has the traceback"})
        m.latency.observe(time.perf_counter() - t0)
        if "reason" in record:  # a row the engine itself rejected (a DataError for this row alone)
            m.requests.labels("422").inc()
            m.row_errors.labels(reason_kind(record["reason"])).inc()
            return answer(422, record, serving)
        m.requests.labels("200").inc()
        if record.get("truncated"):
            m.truncated.inc()
        server.answered += 1
        return answer(200, record, serving, **{"X-Pauserec-Batch": str(batch_size)})

    async def health(request: Request) -> Response:
        return answer(200, server.status())

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        server.metrics.queue.set(server.batcher.queue.qsize() if server.batcher else 0)
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST, headers=server.serving.headers())

    def authorized(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        return bool(token) and hmac.compare_digest(got.encode(), f"Bearer {token}".encode())

    async def reload_catalog(request: Request) -> Response:
        if not authorized(request):
            return answer(401, {"reason": "admin route: send the server's admin token as 'Authorization: Bearer TOKEN'"})
        body, bad = await read_json(request)
        source = body.get("catalog") if isinstance(body, dict) else None
        if bad or not isinstance(source, str) or not source:
            return answer(400, {"reason": bad or 'send {"catalog": PATH}: a SID index file (NAME.index.json) or a '
                                'catalog .npz on the server\'s filesystem'})
        async with server.reload_lock:
            before = server.serving
            try:
                new = await asyncio.to_thread(server.load_catalog, source)
            except PauserecError as e:
                server.metrics.reloads.labels("refused").inc()
                return answer(422, {"reason": f"catalog not loaded, the old one keeps serving: {e}"})
            server.swap(new)
        server.metrics.reloads.labels("loaded").inc()
        old_ids = set(before.recommender.catalog.item_ids)
        new_ids = set(new.recommender.catalog.item_ids)
        log.info("catalog %s loaded (%d items, was %d)", source, len(new_ids), len(old_ids))
        return answer(200, {"catalog": source, "catalog_sha256": new.catalog_sha, "items_before": len(old_ids),
                            "items_after": len(new_ids), "added": len(new_ids - old_ids),
                            "removed": len(old_ids - new_ids)})

    async def rollback(request: Request) -> Response:
        if not authorized(request):
            return answer(401, {"reason": "admin route: send the server's admin token as 'Authorization: Bearer TOKEN'"})
        async with server.reload_lock:
            if server.previous is None:
                return answer(409, {"reason": "no earlier catalog to roll back to: none was reloaded since the start"})
            server.swap(server.previous)
        server.metrics.reloads.labels("rolled back").inc()
        return answer(200, {"catalog": server.serving.catalog_source, "catalog_sha256": server.serving.catalog_sha,
                            "items": server.serving.recommender.catalog.n_items})

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        server.batcher = Batcher(server)
        server.batcher.start()
        log.info("serving %s (%s items) on the %s provider", cfg.engine,
                 f"{server.serving.recommender.catalog.n_items:,}", server.serving.recommender.engine.provider)
        try:
            yield
        finally:
            await server.batcher.stop()
            log.info("stopped: %d recommendations answered", server.answered)

    routes = [Route("/recommend", recommend, methods=["POST"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    if token:
        routes += [Route("/admin/catalog", reload_catalog, methods=["POST"]),
                   Route("/admin/catalog/rollback", rollback, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def serve(cfg: ServeConfig) -> None:
    """Load the engine and serve until SIGTERM / SIGINT (requests in flight are answered first)."""
    _require_serve_extra()
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = replace(cfg, admin_token=cfg.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None)
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.drain_s, log_level="info",
                access_log=False)


def read_exclude_file(path: str | Path | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    from pauserec.frontends.batch import read_item_list

    return read_item_list(Path(path))

