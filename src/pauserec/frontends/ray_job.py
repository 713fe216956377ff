"""Scale-out on a Ray cluster: the batch job's rows recommended by a pool of actors, one engine per actor.

``pauserec recommend --ray`` is :func:`pauserec.frontends.batch.run_batch` with a :class:`RayRunner`
in place of the local recommender: the driver reads and numbers the input rows, hands chunks of
``--batch-size`` rows to the actors and writes their records as the local job does (parts, resume,
merge, errors file, summary, ``--unique``, one writer per output). One job, two runners: the output
of a Ray run is the local run's, file for file.

The pool:

- **Actors fit the nodes.** Each actor asks for ``C`` CPUs and runs ONNX Runtime on exactly the
  CPUs Ray gave it. ``C`` is ``--threads``, or the largest size at which ``--concurrency`` actors fit
  the nodes alive at the start (one CPU each when neither is given; the pool then fills the
  cluster). An actor that fits no node is refused before anything starts.
- **Order and exactly once.** Each actor has at most two chunks in flight; results are written in
  input order. A chunk whose actor dies (a node removed, a worker killed, the OOM killer) goes to
  another actor and a replacement actor is started (it runs when a node has room). A chunk that
  kills :data:`MAX_ATTEMPTS` actors stops the job, as does any other error of an actor (an engine
  that cannot run, a bug): rows written before are kept for ``--resume``.
- **Engines where clusters keep them.** The engine may be a URI (``s3://``, ``gs://``, ``hdfs://``,
  ``file://``): each node copies it once into its cache (:mod:`pauserec.runtime.engine_cache`).

The input and the output are the driver's (a local or mounted path); the nodes need the engine.

:class:`RecommendBatch` serves Ray Data pipelines of your own (``map_batches``), with the same
per-row rules, a ``reason`` column instead of an errors file, and no row numbers (Ray Data numbers
none)::

    ds = ray.data.read_parquet("s3://bucket/users/")            # columns user_id, history
    recs = ds.map_batches(RecommendBatch, fn_constructor_kwargs={"engine": "s3://bucket/engines/pause", "k": 10},
                          batch_size=64, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=8),
                          num_cpus=2)

This module imports neither torch nor (until called) Ray.
"""

from __future__ import annotations

import os
import resource
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pauserec.errors import JobError, PauserecError
from pauserec.runtime.backends import available_cpus
from pauserec.frontends.batch import BatchConfig, BatchReport, ChunkRunner, run_batch
from pauserec.frontends.rows import Row, RowOptions, parse_line, parse_record, recommend_rows

IN_FLIGHT = 2  # chunks per actor: one running, one waiting, so no actor idles between chunks
MAX_ATTEMPTS = 3  # actors a chunk may lose (node removed, worker killed) before the job stops
# seconds with no actor placed on a node (an actor's engine copy and checks come after, and are not counted)
START_TIMEOUT = float(os.environ.get("PAUSEREC_RAY_START_TIMEOUT", 600))
TEXT_COLUMN = "text"  # what ray.data.read_text names a line


def actor_cpus() -> int:
    """CPUs Ray assigned to this actor or task (or this process's CPUs outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            n = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if n:
                return max(1, int(n))
    except ImportError:
        pass
    return available_cpus()


# -- sizing -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolPlan:
    actors: int
    cpus: int  # per actor = ONNX Runtime threads
    fits_now: int  # actors of that size the nodes alive at the start can hold
    node_cpus: tuple[int, ...]

    def warning(self) -> str | None:
        if self.actors <= self.fits_now:
            return None
        return (f"{self.actors} actors of {self.cpus} CPUs asked, but the nodes ({', '.join(map(str, self.node_cpus))} "
                f"CPUs) hold {self.fits_now}; the job runs on those and the others start if the cluster grows")


def plan_pool(node_cpus: Sequence[int], concurrency: int | None = None, threads: int | None = None) -> PoolPlan:
    """How many actors of how many CPUs: actors fit the nodes (see the module docstring)."""
    nodes = tuple(sorted((int(n) for n in node_cpus if n >= 1), reverse=True))
    if not nodes:
        raise PauserecError("the Ray cluster has no node with a CPU; add worker nodes with CPUs (ray start --num-cpus N)")
    if concurrency is not None and concurrency < 1 or threads is not None and threads < 1:
        raise PauserecError("--concurrency and --threads must be >= 1")
    fit = lambda c: sum(n // c for n in nodes)  # noqa: E731
    if threads:
        if threads > nodes[0]:
            raise PauserecError(f"no node has {threads} CPUs for an actor (the largest has {nodes[0]}); lower --threads")
        cpus = threads
    elif concurrency:
        cpus = max((c for c in range(1, nodes[0] + 1) if fit(c) >= concurrency), default=1)
    else:
        cpus = 1
    return PoolPlan(actors=concurrency or fit(cpus), cpus=cpus, fits_now=fit(cpus), node_cpus=nodes)


def cluster_node_cpus() -> list[int]:
    import ray

    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


# -- the actor --------------------------------------------------------------------------------------
# what makes two loads of an engine give the same results: model, items, and the onnxruntime that rounds them
IDENTITY = ("manifest_sha256", "catalog_sha256", "onnxruntime")


def check_same_engine(got: dict[str, str], expected: dict[str, str], engine: str) -> None:
    """JobError unless an actor's engine is the one the driver fingerprinted (and ``job.json`` names): an engine
    re-exported or re-synced to the same path during a job would give some chunks another model or catalog."""
    differ = [k for k in IDENTITY if got.get(k) != expected.get(k)]
    if differ:
        raise JobError(f"the engine {engine} loaded on this node is not the one this job started with ("
                       + ", ".join(f"{k} {str(expected.get(k))[:12]}… -> {str(got.get(k))[:12]}…" for k in differ)
                       + "): it was re-exported or re-synced while the job ran. Leave an engine unchanged while a "
                       "job reads it (export to a new path); then start the job again with --overwrite")


class PoolWorker:
    """One engine on one actor: recommends chunks of parsed rows (``ray.remote`` is applied by the pool).

    Constructing it does nothing heavy, so an actor is up as soon as Ray places it; :meth:`load` then opens the
    engine (copying it into the node's cache first when it is a URI, and checking every file): the pool's start
    timeout measures placement only, never the copy of a big engine."""

    def __init__(self, engine: str, provider: str, batch_size: int, opts: RowOptions,
                 expected: dict[str, str] | None = None, kv_memory: int | str | None = "auto") -> None:
        self.engine, self.provider, self.batch_size, self.expected = engine, provider, batch_size, expected
        self.kv_memory = kv_memory
        self.threads = actor_cpus()
        self.opts, self.rows, self.rec = opts, 0, None

    def ready(self) -> bool:
        return True

    def load(self) -> dict[str, Any]:
        from pauserec.runtime import Engine, Recommender

        self.rec = Recommender(Engine.load(self.engine, provider=self.provider, threads=self.threads),
                               batch_size=self.batch_size, kv_memory=self.kv_memory)
        if self.expected is not None:
            check_same_engine(self.rec.fingerprint(), self.expected, self.engine)
        self.rec.check_request(self.opts.k, self.opts.beams)
        return self.info()

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        sessions = self.rec.engine.sessions.values()
        ort_threads = sorted({s.sess.get_session_options().intra_op_num_threads for s in sessions if hasattr(s, "sess")})
        return {"node": ctx.get_node_id(), "pid": os.getpid(), "cpus": ctx.get_assigned_resources().get("CPU"),
                "ort_threads": ort_threads, "rows": self.rows, "engine": str(self.rec.engine.path),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def recommend(self, rows: list[Row]) -> list[dict]:
        out = recommend_rows(self.rec, rows, self.opts, self.rec.sid_text)
        self.rows += len(rows)
        return out


# -- the pool ---------------------------------------------------------------------------------------
class RayRunner(ChunkRunner):
    """Chunks -> records on a pool of actors, in order, each chunk's records returned once."""

    worker = PoolWorker  # the actor class (tests slow its engine load down)

    def __init__(self, engine: str | Path, plan: PoolPlan, provider: str = "cpu", batch_size: int = 64,
                 expected: dict[str, str] | None = None, kv_memory: int | str | None = "auto") -> None:
        """``expected``: the driver's fingerprint of the engine; every actor checks that it loaded that engine.
        ``kv_memory``: each actor's ``Recommender.kv_memory`` ("auto": half of what its node has left once loaded)."""
        self.engine, self.plan, self.provider, self.batch_size = str(engine), plan, provider, batch_size
        self.expected, self.kv_memory = expected, kv_memory
        self.started = self.lost = self.retried = 0
        self.actors: list = []  # every actor handle started (killed at the end)
        self.load: dict = {}  # actors that started and are alive -> chunks in flight

    def _start(self, opts: RowOptions, starting: dict) -> None:
        """Start one actor; ``starting`` maps its first call (``ready``, answered once it is placed) to it."""
        import ray

        gpus = 1 if self.provider in ("cuda", "tensorrt") else 0
        cls = ray.remote(self.worker).options(num_cpus=self.plan.cpus, num_gpus=gpus, max_restarts=0,
                                             max_task_retries=0, scheduling_strategy="SPREAD")
        actor = cls.remote(self.engine, self.provider, self.batch_size, opts, self.expected, self.kv_memory)
        self.actors.append(actor)
        self.started += 1
        starting[actor.ready.remote()] = actor

    def _replace(self, e: BaseException, opts: RowOptions, starting: dict) -> None:
        """An actor died before it served (its node went away): start another, up to a limit."""
        self.lost += 1
        if self.lost > self.plan.actors + 2 * MAX_ATTEMPTS:
            raise JobError(f"actors keep dying as they start ({_last_line(e)}); check the nodes") from e
        self._start(opts, starting)

    def map(self, chunks: Iterable[list[Row]], opts: RowOptions) -> Iterator[list[dict]]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        starting: dict = {}  # ready ref -> actor not placed yet
        loading: dict = {}  # load ref -> actor placed, opening its engine (copy and checks: no time limit)
        for _ in range(self.plan.actors):
            self._start(opts, starting)
        load = self.load  # ready actor -> chunks in flight
        running: dict = {}  # result ref -> (seq, rows, attempts, actor)
        retry: deque = deque()  # (seq, rows, attempts) whose actor died
        done: dict[int, list[dict]] = {}
        source, exhausted, seq, nxt = iter(chunks), False, 0, 0
        window = lambda: IN_FLIGHT * max(1, len(load))  # noqa: E731 - chunks running or written out of order
        waiting_since = time.monotonic()
        while True:
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
            while retry or not exhausted:
                free = [a for a in load if load[a] < IN_FLIGHT]
                if not free or not retry and len(running) + len(done) >= window():
                    break
                if retry:  # first, whatever the window: the rows written next may be among them
                    job = retry.popleft()
                else:
                    rows = next(source, None)
                    if rows is None:
                        exhausted = True
                        break
                    job, seq = (seq, rows, 0), seq + 1
                actor = min(free, key=load.get)
                running[actor.recommend.remote(job[1])] = (*job, actor)
                load[actor] += 1
            if exhausted and not running and not retry and not done:
                return
            if not load and not loading and time.monotonic() - waiting_since > START_TIMEOUT:
                raise JobError(f"no actor of {self.plan.cpus} CPUs could start in {START_TIMEOUT:.0f} s (nodes alive: "
                               f"{', '.join(map(str, cluster_node_cpus())) or 'none'} CPUs); add nodes or lower --threads")
            ready, _ = ray.wait([*running, *starting, *loading], num_returns=1, timeout=5.0)
            for ref in ready:
                if ref in loading:
                    actor = loading.pop(ref)
                    try:
                        ray.get(ref)
                        load[actor] = 0
                    except RayTaskError as e:  # the engine cannot load there: a failure of the job itself
                        raise JobError(f"an actor could not start: {_last_line(e)}") from e
                    except RayActorError as e:  # died while loading (its node went away): try another
                        self._replace(e, opts, starting)
                        waiting_since = time.monotonic()
                    continue
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                        loading[actor.load.remote()] = actor
                    except RayActorError as e:
                        if e.actor_init_failed:  # the engine cannot load there: a failure of the job itself
                            raise JobError(f"an actor could not start: {_last_line(e)}") from e
                        self._replace(e, opts, starting)  # died while starting (its node went away)
                    continue
                s, rows, attempts, actor = running.pop(ref)
                try:
                    done[s] = ray.get(ref)
                    load[actor] -= 1
                except RayTaskError as e:  # an error of the engine or the code: stop, as the local job does
                    raise _cause(e) from e
                except RayActorError as e:  # the actor died: its node, the OOM killer, a kill
                    if actor in load:
                        del load[actor]
                        self.lost += 1
                        self._start(opts, starting)
                        waiting_since = time.monotonic()
                    if attempts + 1 >= MAX_ATTEMPTS:
                        raise JobError(f"the chunk of {len(rows)} rows numbered {s} lost {MAX_ATTEMPTS} actors "
                                       f"({_last_line(e)}); see the Ray logs of those workers (out of memory?)") from e
                    self.retried += 1
                    retry.append((s, rows, attempts + 1))

    def close(self) -> None:
        """Stop every actor of the pool (started, starting or dead)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.load = [], {}

    def actor_stats(self) -> list[dict[str, Any]]:
        """Each live actor's node, CPUs, ONNX Runtime threads, rows and peak RSS."""
        import ray

        infos = []
        for actor in self.load:
            try:
                infos.append(ray.get(actor.info.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - an actor that died at the end has nothing to report
                pass
        return infos

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "actors": self.plan.actors, "cpus_per_actor": self.plan.cpus,
                "node_cpus_at_start": list(self.plan.node_cpus), "actors_started": self.started,
                "actors_lost": self.lost, "chunks_retried": self.retried, "actor_stats": self.actor_stats()}


def _last_line(e: BaseException) -> str:
    """The last line of an error's text: for an actor, the exception it raised (``pkg.Type: message``)."""
    return ([line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]


def _cause(e) -> BaseException:
    """The exception an actor raised (a PauserecError keeps its type and message), else a JobError."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, PauserecError):
        return cause
    if isinstance(cause, (MemoryError, OSError)):
        return cause
    return JobError(f"an actor failed: {_last_line(cause or e)}")


def run_ray(cfg: BatchConfig, engine: str | Path, address: str | None = None, concurrency: int | None = None,
            threads: int | None = None, provider: str = "cpu", progress: Callable[[int], None] | None = None,
            warn: Callable[[str], None] | None = None) -> BatchReport:
    """The batch job on a Ray cluster at ``address`` (None: the one Ray finds, else a local one).

    ``concurrency`` actors of ``threads`` CPUs each (see :func:`plan_pool`); ``progress`` as in
    ``run_batch``; ``warn`` gets a line when the pool asked for does not fit the cluster now."""
    import ray

    from pauserec.runtime import Engine, Recommender

    provider = "cpu" if provider == "auto" else provider  # every actor runs what the resume fingerprint says
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    runner = None
    try:
        # Manifest and catalog only, no file hashed here: every actor checks every file it loads, and its fingerprint
        # (the manifest's sha256, which holds every file's) against this one.
        checks = Recommender(Engine.load(engine, provider=provider, graphs=False, verify=False), kv_memory=cfg.kv_memory)
        plan = plan_pool(cluster_node_cpus(), concurrency, threads)
        if warn and plan.warning():
            warn(plan.warning())
        runner = RayRunner(engine, plan, provider=provider, batch_size=cfg.batch_size, expected=checks.fingerprint(),
                           kv_memory=cfg.kv_memory)
        return run_batch(cfg, checks, progress=progress, runner=runner)
    finally:
        if runner is not None:
            runner.close()
        if started:
            ray.shutdown()


# -- Ray Data pipelines -------------------------------------------------------------------------------
def result_schema():
    import pyarrow as pa

    return pa.schema([("user_id", pa.string()), ("items", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float32())), ("sids", pa.list_(pa.string())),
                      ("truncated", pa.int32()), ("reason", pa.string())])


class RecommendBatch:
    """A callable class for ``ray.data.Dataset.map_batches(..., batch_format="pyarrow")``.

    Takes batches with ``user_id`` and ``history`` columns (optionally ``exclude`` / ``allow``), or a
    ``text`` column of raw JSONL lines (``ray.data.read_text``), and returns one row per input row:
    ``user_id, items, scores, sids, truncated, reason`` (``reason`` is null for a recommended row).
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
        if self.opts.exclude:
            why = self.rec.validate_filter(sorted(self.opts.exclude), "exclude")
            if why:
                raise PauserecError(f"exclude: {why}; remove them")

    def __call__(self, batch):
        import pyarrow as pa

        if TEXT_COLUMN in batch.column_names and self.opts.history_field not in batch.column_names:
            rows = [parse_line(line, self.opts) for line in batch.column(TEXT_COLUMN).to_pylist()]
        else:
            rows = [parse_record(rec, self.opts) for rec in batch.to_pylist()]
        records = recommend_rows(self.rec, rows, self.opts, self.rec.sid_text)
        columns = {name: [r.get(name) for r in records] for name in result_schema().names}
        columns["truncated"] = [r.get("truncated", 0) for r in records]
        return pa.Table.from_pydict(columns, schema=result_schema())
