"""``pauserec-bench serve``: ``pauserec serve`` under load: one request at a time, then open-loop Poisson
arrivals at rising rates; throughput, p50/p99 latency, batch sizes reached, 503s, and the knee.

The server runs in its own process (started here on a free port, or ``--url`` for one already running),
the load from this process's event loop (httpx, one connection per request in flight). On a small
machine the two share the cores: the client is light (a few requests per second), but say so when
quoting the numbers.

- *one at a time*: a closed loop with one request outstanding, ``duration`` seconds: the latency and
  throughput of a server that never batches (every batch is one request);
- *rate r*: requests sent at exponentially distributed gaps of mean 1/r for ``duration`` seconds
  (arrivals do not wait for answers, as users' do not), then every answer awaited;
- *library*: the one-at-a-time requests through ``Recommender.recommend`` in this process, after the
  server has stopped: what HTTP, JSON and the queue add to one request;
- *knee*: the highest offered rate the server kept up with (answered >= 95 % of the offered rate,
  nothing refused or failed), its latency, and its throughput against one-at-a-time's;
- *peak*: the most answered per second at any rate (the server saturated), against one-at-a-time's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pauserec.errors import BackendUnavailable, PauserecError


@dataclass(frozen=True)
class LoadConfig:
    engine: Path | None = None  # started here unless url is given
    url: str | None = None
    rates: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    duration: float = 30.0  # seconds of arrivals per rate
    warmup: int = 3  # one-at-a-time requests before measuring
    history_len: int = 20
    users: int = 512  # distinct random histories, cycled
    k: int = 10
    beams: int = 20
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    threads: int | None = None
    seed: int = 0
    server_args: tuple[str, ...] = field(default_factory=tuple)  # more `pauserec serve` options


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(engine: Path | str, args: list[str], log: Path, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """Start ``pauserec serve ENGINE ARGS`` on a free port, output to ``log``; return it and its URL once /health
    answers (PauserecError with the log's end if it exits or stays silent)."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-c", "from pauserec.cli.main import app; app()", "serve", str(engine),
           "--port", str(port), *args]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise PauserecError(f"pauserec serve exited ({proc.returncode}) before it served: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise PauserecError(f"pauserec serve did not answer /health within {timeout:.0f} s; its log: {log}")


@contextmanager
def running_server(cfg: LoadConfig, log: Path):
    """Yield the URL of a `pauserec serve` started for ``cfg`` (stopped with SIGTERM at the end)."""
    if cfg.url:
        yield cfg.url.rstrip("/")
        return
    args = ["--k", str(cfg.k), "--beams", str(cfg.beams), "--max-batch", str(cfg.max_batch),
            "--max-wait-ms", str(cfg.max_wait_ms), "--max-queue", str(cfg.max_queue), *cfg.server_args]
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    proc, url = start_server(cfg.engine, args, log)
    try:
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()


def _histories(cfg: LoadConfig, url: str) -> list[list[str]]:
    from pauserec.runtime import Engine

    if cfg.engine is None:
        raise PauserecError("pass the engine directory too (its catalog gives the histories), with --url or without")
    ids = Engine.load(cfg.engine, graphs=False, verify=False).catalog.item_ids
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.history_len, len(ids))
    return [[ids[j] for j in rng.choice(len(ids), size=n, replace=False)] for _ in range(cfg.users)]


@dataclass
class _Answer:
    sent: float
    seconds: float
    status: int  # 0: no HTTP answer (connection failed)
    batch: int


async def _one(client, i: int, hist: list[str], k: int, t0: float) -> _Answer:
    sent = time.perf_counter()
    try:
        r = await client.post("/recommend", json={"user_id": f"u{i}", "history": hist, "k": k})
        status, batch = r.status_code, int(r.headers.get("x-pauserec-batch", 0))
    except Exception:  # noqa: BLE001 - counted as a failed request
        status, batch = 0, 0
    return _Answer(sent - t0, time.perf_counter() - sent, status, batch)


def _summary(answers: list[_Answer], wall: float, offered: float | None) -> dict[str, Any]:
    ok = [a for a in answers if a.status == 200]
    lat = np.array([a.seconds for a in ok]) if ok else np.array([np.nan])
    batches = np.array([a.batch for a in ok]) if ok else np.array([0])
    return {"offered_rps": offered, "sent": len(answers), "answered": len(ok),
            "refused_503": sum(a.status == 503 for a in answers),
            "failed": sum(a.status not in (200, 503) for a in answers),
            "throughput_rps": len(ok) / wall if wall > 0 else 0.0, "wall_s": wall,
            "p50_ms": float(np.nanpercentile(lat, 50) * 1000), "p99_ms": float(np.nanpercentile(lat, 99) * 1000),
            "mean_ms": float(np.nanmean(lat) * 1000),
            "batch_mean": float(batches.mean()), "batch_max": int(batches.max())}


async def _one_at_a_time(url: str, hists: list[list[str]], cfg: LoadConfig) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(cfg.warmup):
            await _one(client, i, hists[i % len(hists)], cfg.k, 0.0)
        answers, t0, i = [], time.perf_counter(), 0
        while time.perf_counter() - t0 < cfg.duration or not answers:
            answers.append(await _one(client, i, hists[i % len(hists)], cfg.k, t0))
            i += 1
        return _summary(answers, time.perf_counter() - t0, None)


async def _open_loop(url: str, hists: list[list[str]], cfg: LoadConfig, rate: float) -> dict[str, Any]:
    import httpx

    rng = np.random.default_rng(cfg.seed + int(rate * 1000))
    limits = httpx.Limits(max_connections=cfg.max_queue + cfg.max_batch + 64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        tasks, t0, due, i = [], time.perf_counter(), 0.0, 0
        while True:
            due += float(rng.exponential(1.0 / rate))
            if due >= cfg.duration:
                break
            await asyncio.sleep(max(0.0, due - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(_one(client, i, hists[i % len(hists)], cfg.k, t0)))
            i += 1
        answers = list(await asyncio.gather(*tasks))
    wall = max((a.sent + a.seconds for a in answers), default=cfg.duration)
    return _summary(answers, max(wall, cfg.duration), rate)


def _library_one_at_a_time(hists: list[list[str]], cfg: LoadConfig) -> dict[str, Any] | None:
    """The same requests as one-at-a-time, through ``Recommender.recommend`` in this process (no HTTP, no queue):
    what the server adds to one request. None with --url (the engine may not be on this machine)."""
    if cfg.url or cfg.engine is None:
        return None
    from pauserec.runtime import Engine, Recommender

    rec = Recommender(Engine.load(cfg.engine, threads=cfg.threads), batch_size=cfg.max_batch)
    for i in range(cfg.warmup):
        rec.recommend([hists[i % len(hists)]], k=cfg.k, beams=cfg.beams)
    times, t0, i = [], time.perf_counter(), 0
    while time.perf_counter() - t0 < cfg.duration or not times:
        t1 = time.perf_counter()
        rec.recommend([hists[i % len(hists)]], k=cfg.k, beams=cfg.beams)
        times.append(time.perf_counter() - t1)
        i += 1
    lat = np.array(times)
    return {"answered": len(times), "p50_ms": float(np.percentile(lat, 50) * 1000),
            "p99_ms": float(np.percentile(lat, 99) * 1000), "throughput_rps": len(times) / (time.perf_counter() - t0)}


def knee(single: dict[str, Any], levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest offered rate the server kept up with (answered >= 95 % of it, nothing refused or failed), or
    None; with its throughput against one request at a time."""
    kept = [lv for lv in levels if lv["throughput_rps"] >= 0.95 * lv["offered_rps"] and not lv["refused_503"]
            and not lv["failed"]]
    if not kept:
        return None
    best = max(kept, key=lambda lv: lv["offered_rps"])
    return {**best, "vs_one_at_a_time": best["throughput_rps"] / single["throughput_rps"]}


def peak(single: dict[str, Any], levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most requests per second answered at any offered rate (the server saturated: its capacity)."""
    if not levels:
        return None
    best = max(levels, key=lambda lv: lv["throughput_rps"])
    return {**best, "vs_one_at_a_time": best["throughput_rps"] / single["throughput_rps"]}


def run_load(cfg: LoadConfig, out: Path, progress=print) -> dict[str, Any]:
    """Measure one server (see the module docstring); the result dict of ``pauserec-bench serve``."""
    try:
        import httpx
    except ImportError:
        raise BackendUnavailable("pauserec-bench serve needs httpx: pip install 'pauserec[serve]'") from None
    out.mkdir(parents=True, exist_ok=True)
    with running_server(cfg, out / "server.log") as url:
        health = httpx.get(f"{url}/health", timeout=10).json()
        hists = _histories(cfg, url)
        progress(f"one request at a time for {cfg.duration:.0f} s")
        single = asyncio.run(_one_at_a_time(url, hists, cfg))
        progress(f"  {single['throughput_rps']:.2f} req/s, p50 {single['p50_ms']:.0f} ms")
        levels = []
        for rate in cfg.rates:
            progress(f"{rate:g} req/s offered for {cfg.duration:.0f} s")
            levels.append(asyncio.run(_open_loop(url, hists, cfg, rate)))
            lv = levels[-1]
            progress(f"  {lv['throughput_rps']:.2f} req/s answered, p50 {lv['p50_ms']:.0f} ms, p99 {lv['p99_ms']:.0f} ms,"
                     f" batch mean {lv['batch_mean']:.1f} max {lv['batch_max']}, 503: {lv['refused_503']}")
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    progress("the same requests one at a time through the library (no server)")
    library = _library_one_at_a_time(hists, cfg)
    cfg_d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {"config": cfg_d, "server": health, "one_at_a_time": single, "library_one_at_a_time": library, "levels": levels,
            "knee": knee(single, levels), "peak": peak(single, levels), "server_batches": _batch_histogram(metrics)}


def _batch_histogram(metrics: str) -> dict[str, float]:
    """{le: cumulative count} of the server's pauserec_batch_requests histogram."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("pauserec_batch_requests_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def serve_markdown(result: dict[str, Any]) -> str:
    s, kn, pk, cfg = result["one_at_a_time"], result.get("knee"), result.get("peak"), result["config"]
    lib = result.get("library_one_at_a_time")
    head = (f"- one request at a time: **{s['throughput_rps']:.2f} req/s**, p50 {s['p50_ms']:,.0f} ms"
            + (f" (the same requests through the library alone, no server: p50 {lib['p50_ms']:,.0f} ms)"
               if lib else "") + "\n"
            + (f"- knee: **{kn['throughput_rps']:.2f} req/s** answered at {kn['offered_rps']:g} req/s offered (the "
               f"highest rate kept up with), p50 {kn['p50_ms']:,.0f} ms, p99 {kn['p99_ms']:,.0f} ms, mean batch "
               f"{kn['batch_mean']:.1f}: **{kn['vs_one_at_a_time']:.2f}x** one at a time\n" if kn else
               "- knee: none of the rates was kept up with\n")
            + (f"- peak: **{pk['throughput_rps']:.2f} req/s** (at {pk['offered_rps']:g} offered, mean batch "
               f"{pk['batch_mean']:.1f}): **{pk['vs_one_at_a_time']:.2f}x** one at a time\n" if pk else "")
            + f"- server: --max-batch {cfg['max_batch']} --max-wait-ms {cfg['max_wait_ms']:g} --beams {cfg['beams']} "
              f"--k {cfg['k']}, {cfg['history_len']}-item histories, {cfg['duration']:g} s per rate\n\n")
    rows = ["| offered req/s | answered req/s | p50 ms | p99 ms | mean batch | max batch | 503 | failed |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| one at a time | {s['throughput_rps']:.2f} | {s['p50_ms']:,.0f} | {s['p99_ms']:,.0f} | "
            f"{s['batch_mean']:.1f} | {s['batch_max']} | {s['refused_503']} | {s['failed']} |"]
    for lv in result["levels"]:
        rows.append(f"| {lv['offered_rps']:g} | {lv['throughput_rps']:.2f} | {lv['p50_ms']:,.0f} | {lv['p99_ms']:,.0f} | "
                    f"{lv['batch_mean']:.1f} | {lv['batch_max']} | {lv['refused_503']} | {lv['failed']} |")
    return head + "\n".join(rows) + "\n"


def write(result: dict[str, Any], out: Path) -> dict[str, str]:
    from pauserec.bench.env import environment_line

    files = {"json": out / "serve.json", "md": out / "serve.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["md"].write_text("# pauserec serve under load\n\n" + serve_markdown(result) + environment_line(result))
    return {k: str(v) for k, v in files.items()}
