"""``mesh bench``: what the reliability layer costs, measured side by side with raw dramatiq.

Everything runs against the configured Redis in a throw-away namespace that is deleted at the
end. Both sides get the same worker processes, threads and prefetch; throughput runs alternate
mesh / raw and report the median ratio of the pairs, at each prefetch of the sweep. Counts (Redis
commands per message) come from ``INFO commandstats`` deltas and Redis CPU from ``INFO cpu``
deltas, so other clients of the same Redis inflate both sides; worker CPU is each worker process's
own CPU time from ready to stop. The real step is a declared agent (``BENCH_APP``) run by the same
worker code as ``mesh worker``: each step a job with its record and trace, sent with MeshClient; the
pipeline step is one of a declared two-step pipeline (``bench_pair``: the first step releases the
second), and the sequential latency runs a 40-step linear pipeline (``bench_chain``) one job at a time.
What a finished job keeps in Redis is measured on a private redis-server (ops/bench_kept.py).

Counting: ``INFO commandstats`` is server-wide, so the bench counts its own commands between the two
snapshots (the first snapshot's ``INFO`` and every poll: one ``HLEN`` or ``MGET`` each) and takes them
out. Round trips are counted in each process that talks to Redis for the run (the workers and the
bench's sends, not its polls), as redis-py's ``send_packed_command`` calls: one per command sent alone,
one per pipeline or transaction, one per blocking read.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import multiprocessing as mp
import statistics
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from mesh.agents.app import App
from mesh.agents.context import Context
from mesh.agents.pipelines import Pipeline
from mesh.broker.connection import SETTINGS, connect, is_cluster
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.broker.shard_readers import every
from mesh.broker.shards import Shards
from mesh.contracts import ConfigError
from mesh.ops import bench_floor
from mesh.ops.bench_kept import compactor, kept
from mesh.ops.namespaces import check_scratch, delete_namespace, is_empty, raw_namespace

MESH_Q, RAW_Q, STEP_AGENT = "bench_mesh", "bench_raw", "bench_echo"
PAIR, CHAIN, CHAIN_STEPS = "bench_pair", "bench_chain", 40


@dataclass(frozen=True)
class BenchConfig:
    messages: int = 5_000
    processes: int = 2
    threads: int = 4
    prefetch: tuple[int, ...] = (0,)  # the sweep; 0: the mesh default (2 x threads)
    pairs: int = 2
    latency_samples: int = 30
    dlq_entries: int = 10_000
    enqueue_messages: int = 10_000  # send_many's; each send() loop sends min(this, 2,000)
    chain_jobs: int = 5  # 40-step pipelines run one after another for the sequential latency
    kept_jobs: int = 2_000  # finished jobs whose storage is measured, on a private Redis (ops/bench_kept.py)
    floor_jobs: int = 10_000  # jobs of each variant of the writes' floor (ops/bench_floor.py); 0: not run
    namespace: str | None = None  # run in this (empty) namespace; None: a fresh bench-<random> one

    @property
    def prefetches(self) -> list[int]:
        """The sweep's prefetches as run (0 resolved), each once, in the order given."""
        return list(dict.fromkeys(p or 2 * self.threads for p in self.prefetch))


# -- the real step: a declared agent, through the public App API ----------------------------------------


class Echo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str


BENCH_APP = App("bench")


@BENCH_APP.agent(name=STEP_AGENT, time_limit_s=60)
def bench_echo(ctx: Context, message: Echo) -> Echo:
    """Gives its input back: a step's whole cost (claim, job record, trace, settle) and no work of its own."""
    return message


BENCH_APP.pipeline(Pipeline(PAIR).step("first", agent=bench_echo).step("second", agent=bench_echo,
                                                                        depends_on=["first"]))


def _chain() -> Pipeline:
    chain = Pipeline(CHAIN).step("s1", agent=bench_echo)
    for i in range(2, CHAIN_STEPS + 1):
        chain.step(f"s{i}", agent=bench_echo, depends_on=[f"s{i - 1}"])
    return chain


BENCH_APP.pipeline(_chain())


# -- round trips: counted in every process of the run ----------------------------------------------------

_trips_lock = threading.Lock()
_trips = [0]


def _count_round_trips() -> None:
    """Count every request this process sends to Redis (a command alone, a pipeline, a transaction)."""
    from redis.connection import AbstractConnection

    send = AbstractConnection.send_packed_command
    if getattr(send, "bench_counted", False):
        return

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        with _trips_lock:
            _trips[0] += 1
        send(self, command, check_health)

    counted.bench_counted = True  # type: ignore[attr-defined]
    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def round_trips() -> int:
    """Requests this process has sent to Redis since :func:`_count_round_trips` (0 before)."""
    return _trips[0]


# -- worker processes (spawned: each builds its own broker) ------------------------------------------


def _noop(*_args: Any) -> None:
    return None


def _latency(sent_at: float, *_rest: Any) -> None:
    import dramatiq

    broker: Any = dramatiq.get_broker()
    broker.bench_client.rpush(broker.bench_latency_key, repr(time.time() - sent_at))


def _serve(side: str, base: MeshSettings, namespace: str, threads: int, prefetch: int, stop: Any, ready: Any,
           cpu: Any) -> None:
    """One worker process of ``side`` (mesh, raw or step); puts its CPU seconds and round trips from ready
    to stop on ``cpu``."""
    import dramatiq
    from dramatiq import Worker

    from mesh.ops.logs import setup_logging

    setup_logging("ERROR")
    _count_round_trips()
    if side == "step":  # what `mesh worker --app mesh.ops.bench:BENCH_APP` runs
        from mesh.ops.worker import start_worker

        gc.freeze()  # as `mesh worker` does (ops/cli.py main): its imports' objects out of the collector's sight
        step = start_worker(base.model_copy(update={"namespace": namespace, "prefetch": prefetch,
                                                    "worker_threads": threads}),
                            None, threads, "mesh.ops.bench:BENCH_APP")
        _measure(step, ready, stop, cpu)
        return
    if side == "mesh":
        from mesh.broker.mesh_broker import build_broker
        from mesh.contracts import MeshError

        broker: Any = build_broker(base.model_copy(update={"namespace": namespace, "prefetch": prefetch,
                                                           "worker_threads": threads,
                                                           "shard": Shards.of(base).start, "shards": 1}))
        options: dict[str, Any] = {"throws": (MeshError,)}
        queue = MESH_Q
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(client=connect(base, retries=False), namespace=raw_namespace(namespace))
        dramatiq.set_broker(broker)
        options = {}
        queue = RAW_Q
    broker.bench_client = connect(base)
    broker.bench_latency_key = Keys(namespace).bench_latency(side)

    def run(envelope: Any) -> None:
        if isinstance(envelope, dict) and "sent_at" in envelope.get("payload", envelope):
            _latency(envelope.get("payload", envelope)["sent_at"])

    run.__name__ = queue
    dramatiq.Actor(run, broker=broker, actor_name=queue, queue_name=queue, priority=0, options=options)
    worker = Worker(broker, queues={queue}, worker_threads=threads, worker_timeout=100)
    worker.queue_prefetch = prefetch
    broker.emit_after("process_boot")
    worker.start()
    _measure(worker, ready, stop, cpu)


def _measure(worker: Any, ready: Any, stop: Any, cpu: Any) -> None:
    started, trips = time.process_time(), round_trips()  # CPU: every thread of this process
    ready.set()
    stop.wait()
    cpu.put((time.process_time() - started, round_trips() - trips))
    worker.stop(timeout=10_000)


#: How long the bench holds its namespace's sweep locks (ms): longer than a bench runs; the locks go with
#: the namespace, deleted at its end.
SWEEP_HOLD_MS = 3_600_000


def _hold_sweeps(settings: MeshSettings) -> None:
    """Take the retention sweep's lock of each of the namespace's shards (``{ns}:sweep.lock``) before the
    step workers start, so that none of them sweeps: a worker's sweep at boot compacted the jobs earlier
    runs had ended inside a later run's timing window. The bench compacts each run's jobs itself,
    measured apart (:func:`_compacted`)."""
    client = connect(settings)
    try:
        for keys in Shards.of(settings).keys:
            client.set(keys.sweep_lock, "mesh bench", px=SWEEP_HOLD_MS)
    finally:
        client.close()


@contextmanager
def _workers(side: str, base: MeshSettings, namespace: str, cfg: BenchConfig, prefetch: int,
             processes: int | None = None, threads: int | None = None) -> Iterator[list[tuple[float, int]]]:
    """Worker processes of ``side`` while the block runs; the list yielded holds, once the block is
    left, each process's CPU seconds and round trips from its ready to the stop. Step workers run with
    their namespace's sweeps held (:func:`_hold_sweeps`)."""
    if side == "step":
        _hold_sweeps(base.model_copy(update={"namespace": namespace}))
    ctx = mp.get_context("spawn")
    stop, cpu_queue = ctx.Event(), ctx.Queue()
    readies, procs, cpu = [], [], []  # type: list[Any], list[Any], list[tuple[float, int]]
    for _ in range(processes or cfg.processes):
        ready = ctx.Event()
        p = ctx.Process(target=_serve, args=(side, base, namespace, threads or cfg.threads, prefetch, stop, ready,
                                             cpu_queue), daemon=True)
        p.start()
        readies.append(ready)
        procs.append(p)
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError(f"{side} bench worker did not start")
        yield cpu
    finally:
        stop.set()
        for _ in procs:
            try:
                cpu.append(cpu_queue.get(timeout=15))
            except Empty:
                break
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()


# -- messages -------------------------------------------------------------------------------------------


def _envelope(i: int, run: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"key": f"bench-{run}-{i}", "job_id": f"bench-{run}", "step_id": "s", "agent": MESH_Q,
            "trace_id": uuid.uuid4().hex, "deadline": time.time() + 3600, "hops": [], "attempt": 1,
            "schema_version": 1, "replay_of": None, "payload": payload or {}}


def _push(client: redis.Redis, namespace: str, queue: str, bodies: list[dict[str, Any]],
          placed: Shards | None = None) -> None:
    """Messages in dramatiq's own format, written in one pipeline (as its enqueue would, minus round trips).
    The mesh's no-op messages go to the shards of ``placed`` (the namespace's, MESH_SHARDS), each to the
    shard of its key (:func:`_shard_of`); without it, to the namespace's first."""
    from mesh.broker.outbox import wake
    from mesh.contracts import dumps

    pipe = client.pipeline(transaction=False)
    woken: Counter[Keys] = Counter()
    for args in bodies:
        rid = str(uuid.uuid4())
        message = {"queue_name": queue, "actor_name": queue, "args": [args], "kwargs": {},
                   "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()),
                   "message_timestamp": int(time.time() * 1000)}
        if queue == MESH_Q and placed is not None:
            keys = _shard_of(placed, args["key"])
            ready, msgs = keys.queue(queue), keys.messages(queue)
            woken[keys] += 1
        else:
            ready, msgs = _queue_keys(namespace, queue)
            if queue == MESH_Q:
                woken[Keys(namespace)] += 1
        pipe.hset(msgs, rid, dumps(message))
        pipe.rpush(ready, rid)
    for keys, n in woken.items():  # the mesh's enqueue also wakes idle consumers, once per batch (broker/outbox.py)
        wake(pipe, keys, queue, n)
    pipe.execute()


def _shard_of(placed: Shards, key: str) -> Keys:
    """The shard a no-op message of key ``key`` is pushed to, and its claim taken in."""
    return placed.of_key(key)


def _placed(base: MeshSettings, ns: str) -> Shards:
    """Where the no-op messages of the throw-away namespace ``ns`` go: the first shard holding jobs alone
    (its no-op workers serve one, as raw dramatiq's serve one queue); the real steps spread over every
    shard (MESH_SHARDS), their workers serving them all."""
    return Shards(ns, Shards.of(base).start, 1)


def _queue_keys(namespace: str, queue: str) -> tuple[str, str]:
    """A queue's ready list and message hash: raw dramatiq's in its own layout (``namespace:queue``, its
    namespace :func:`raw_namespace`), the mesh's in the mesh's (broker/keys.py)."""
    if queue == RAW_Q:
        raw = raw_namespace(namespace)
        return f"{raw}:{queue}", f"{raw}:{queue}.msgs"
    keys = Keys(namespace)
    return keys.queue(queue), keys.messages(queue)


def _drained(client: redis.Redis, namespace: str, queue: str, timeout_s: float = 300,
             watch: _Stopwatch | None = None, shards: Sequence[Keys] = ()) -> None:
    """Wait until ``queue`` holds no message; ``shards``: in each of these shards (a MeshClient's sends
    spread over the namespace's), else in the namespace's first."""
    deadline = time.monotonic() + timeout_s
    hashes = [k.messages(queue) for k in shards] or [_queue_keys(namespace, queue)[1]]
    while True:
        if watch is not None:
            watch.own["hlen"] += len(hashes)
        if not any(client.hlen(h) for h in hashes):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue} did not drain within {timeout_s}s")
        time.sleep(0.002)


def _snapshot(client: redis.Redis) -> dict[str, tuple[dict[str, int], float]]:
    """Per primary (``host:port``; one, named ``""``, on a single Redis): calls per command so far, those run
    inside Lua scripts included (as Redis counts them), and the CPU seconds the server has used (user +
    system), whoever it served: one ``INFO`` of each."""
    nodes: dict[str, tuple[dict[str, int], float]] = {}
    for name, node in _primaries(client):
        info: Any = node.execute_command("INFO", "commandstats", "cpu")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items() if k.startswith("cmdstat_")}
        nodes[name] = calls, float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return nodes


def _primaries(client: Any) -> list[tuple[str, redis.Redis]]:
    """Every primary's ``host:port`` and single-node client: ``[("", client)]`` on a single Redis."""
    if not is_cluster(client):
        return [("", client)]
    return [(node.name, client.get_redis_connection(node)) for node in client.get_primaries()]


def namespace_primary(client: Any, ns: str) -> str:
    """The ``host:port`` of the primary that holds namespace ``ns`` (its every key is ``{ns}:...``, one slot);
    ``""`` on a single Redis."""
    if not is_cluster(client):
        return ""
    return str(client.get_node_from_key(Keys(ns).probe).name)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}


# -- measurements ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One timed run: n messages (or steps), wall seconds, Redis commands by name (the bench's own taken
    out), worker and Redis CPU seconds, round trips (workers' and the sends'); on a cluster, ``primaries``:
    each primary's commands and CPU seconds (``host:port``: (commands, CPU s)), which the totals sum."""

    n: int
    seconds: float
    commands: dict[str, int]
    worker_cpu_s: float
    redis_cpu_s: float
    round_trips: int = 0
    primaries: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)
    #: A real-step run's: the compaction of the jobs it ended, per step of this run (:func:`_compacted`).
    compaction: Run | None = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def commands_per(self) -> float:
        return sum(self.commands.values()) / self.n

    @property
    def round_trips_per(self) -> float:
        return self.round_trips / self.n

    def by_command(self) -> dict[str, float]:
        return {k: round(c / self.n, 2) for k, c in sorted(self.commands.items(), key=lambda kv: -kv[1])}

    def cpu_us(self) -> dict[str, float]:
        return {"worker": 1e6 * self.worker_cpu_s / self.n, "redis": 1e6 * self.redis_cpu_s / self.n}

    def by_primary(self) -> list[dict[str, Any]]:
        """Each primary's share of the run (none on a single Redis): commands and Redis CPU, in all and per
        message, and its commands' distance from the primaries' mean (``spread``: 0.1 is 10 % above it)."""
        if not self.primaries:
            return []
        mean = sum(c for c, _ in self.primaries.values()) / len(self.primaries)
        return [{"node": name, "commands": c, "commands_per_step": c / self.n, "redis_cpu_s": cpu,
                 "redis_cpu_us_per_step": 1e6 * cpu / self.n, "spread": c / mean - 1 if mean else 0.0}
                for name, (c, cpu) in sorted(self.primaries.items())]

    def with_workers(self, workers: list[tuple[float, int]]) -> Run:
        """This run with the workers' CPU seconds and round trips added."""
        return dataclasses.replace(self, worker_cpu_s=sum(c for c, _ in workers),
                                   round_trips=self.round_trips + sum(t for _, t in workers))


class _Stopwatch:
    """Wall time, Redis commands and Redis CPU from its creation to :meth:`stop`, summed over the primaries
    on a cluster. ``own`` counts the bench's own commands in between (its polls, sent to ``ns``'s primary),
    which :meth:`stop` takes out, with the first snapshot's ``INFO`` of each primary (Redis counts a
    command once it has run, so a snapshot never counts itself); ``trips`` the round trips of the bench's
    sends, added by the caller."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.client = client
        self.home = namespace_primary(client, ns)
        self.before = _snapshot(client)
        self.own: Counter[str] = Counter()
        self.trips = 0
        self.started = time.perf_counter()

    @contextmanager
    def sending(self) -> Iterator[None]:
        """Count the round trips of the block (the bench's sends) in :attr:`trips`."""
        before = round_trips()
        try:
            yield
        finally:
            self.trips += round_trips() - before

    def stop(self, n: int) -> Run:
        elapsed = time.perf_counter() - self.started
        after = _snapshot(self.client)
        total: Counter[str] = Counter()
        cpu_total, nodes = 0.0, {}
        for name, (calls, cpu) in after.items():
            before_calls, before_cpu = self.before.get(name, ({}, cpu))
            used = Counter(_delta(before_calls, calls))
            used.subtract(self.own if name == self.home else {})
            used.subtract({"info": 1})
            used = Counter({k: c for k, c in used.items() if c > 0})
            total.update(used)
            cpu_total += cpu - before_cpu
            nodes[name] = (sum(used.values()), cpu - before_cpu)
        return Run(n, elapsed, dict(total), 0.0, cpu_total, self.trips,
                   nodes if is_cluster(self.client) else {})


def _throughput(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig, side: str, prefetch: int) -> Run:
    """No-op messages through ``side``'s workers: pushed in one pipeline, timed until drained."""
    queue_name = MESH_Q if side == "mesh" else RAW_Q
    run = uuid.uuid4().hex[:8]
    bodies = [_envelope(i, run) if side == "mesh" else {"n": i} for i in range(cfg.messages)]
    with _workers(side, base, ns, cfg, prefetch) as workers:
        watch = _Stopwatch(client, ns)
        with watch.sending():
            _push(client, ns, queue_name, bodies, _placed(base, ns))
        _drained(client, ns, queue_name, watch=watch, shards=_placed(base, ns).keys if side == "mesh" else ())
        measured = watch.stop(cfg.messages)
    return measured.with_workers(workers)


def _step(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig, prefetch: int) -> Run:
    """Steps through the declared echo agent: sent with MeshClient (a keyed job each), timed until every
    job is ``succeeded``."""
    from mesh.broker import MeshClient

    mesh = MeshClient(base.model_copy(update={"namespace": ns}), client=client, app=BENCH_APP)
    run = uuid.uuid4().hex[:8]
    items = [({"text": f"step {i}"}, f"bench-step-{run}-{i}") for i in range(cfg.messages)]
    with _workers("step", base, ns, cfg, prefetch) as workers:
        watch = _Stopwatch(client, ns)
        with watch.sending():
            refs = mesh.send_many(STEP_AGENT, items)
        _drained(client, ns, STEP_AGENT, watch=watch, shards=every(mesh.settings))
        _succeeded(client, job_keys(mesh, [r.id for r in refs]), watch=watch)
        measured = watch.stop(cfg.messages)
    return _compacted(client, base, ns, measured.with_workers(workers))


def _pair(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig, prefetch: int) -> Run:
    """Steps of the declared two-step pipeline ``bench_pair`` (the first releases the second): half as many
    jobs as ``messages``, each started with ``MeshClient.run``, timed until every job is ``succeeded``;
    n is the steps."""
    from mesh.broker import MeshClient

    mesh = MeshClient(base.model_copy(update={"namespace": ns}), client=client, app=BENCH_APP)
    run = uuid.uuid4().hex[:8]
    jobs = max(1, cfg.messages // 2)
    with _workers("step", base, ns, cfg, prefetch) as workers:
        watch = _Stopwatch(client, ns)
        with watch.sending():
            refs = [mesh.run(PAIR, {"text": f"pair {i}"}, key=f"bench-pair-{run}-{i}") for i in range(jobs)]
        _succeeded(client, job_keys(mesh, [r.id for r in refs]), watch=watch)
        measured = watch.stop(2 * jobs)
    return _compacted(client, base, ns, measured.with_workers(workers))


def _compacted(client: redis.Redis, base: MeshSettings, ns: str, run: Run) -> Run:
    """``run`` with the compaction of the jobs it ended (:attr:`Run.compaction`, per step of ``run``): the
    part of a job's life that comes after its end, run once the run's workers have stopped, by the bench
    process, as a worker's retention sweep runs it (broker/compact.py; the workers' own sweeps are held,
    :func:`_hold_sweeps`): its CPU (the ``worker_cpu_s``), Redis's and its commands."""
    compact = compactor(client, base.model_copy(update={"namespace": ns}))
    watch = _Stopwatch(client, ns)
    started = time.process_time()
    compact()
    cpu_s = time.process_time() - started
    return dataclasses.replace(run, compaction=dataclasses.replace(watch.stop(run.n), worker_cpu_s=cpu_s))


def job_keys(mesh: Any, job_ids: list[str]) -> list[str]:
    """The record keys of ``job_ids``, each in the shard its job lives in (``mesh``: their MeshClient)."""
    return [mesh.keys_of(j).job(j) for j in job_ids]


def _mget(client: redis.Redis, keys: list[str]) -> tuple[list[Any], int]:
    """The values of ``keys``, one ``MGET`` per shard (a cluster refuses one of keys in several slots);
    and how many ``MGET`` that took."""
    tags: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        tags.setdefault(key[:key.index("}") + 1] if key.startswith("{") else "", []).append(i)
    if len(tags) == 1:
        return client.mget(keys), 1
    out: list[Any] = [None] * len(keys)
    for positions in tags.values():
        for i, value in zip(positions, client.mget([keys[i] for i in positions]), strict=True):
            out[i] = value
    return out, len(tags)


def _succeeded(client: redis.Redis, keys: list[str], timeout_s: float = 120, watch: _Stopwatch | None = None,
               pause_s: float = 0.01) -> list[dict[str, Any]]:
    """Wait until every job of ``keys`` (their records', :func:`job_keys`) is ``succeeded`` (polls of
    1,000 at most, each one ``MGET`` a shard counted on ``watch``); their records."""
    from mesh.contracts import loads

    deadline = time.monotonic() + timeout_s
    done: list[dict[str, Any]] = []
    for start in range(0, len(keys), 1_000):
        part = keys[start:start + 1_000]
        while True:
            values, mgets = _mget(client, part)
            if watch is not None:
                watch.own["mget"] += mgets
            records = [loads(r) if r else None for r in values]
            states = {r["state"] if r else None for r in records}
            if states == {"succeeded"}:
                done.extend(r for r in records if r)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench jobs not all succeeded within {timeout_s}s: {sorted(map(str, states))}")
            time.sleep(pause_s)
    return done


def _chain_latency(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> dict[str, Any]:
    """Sequential latency: ``chain_jobs`` runs of the 40-step linear pipeline ``bench_chain`` of no-op
    steps, one after another on idle workers; per job, (finished - created) / 40 from its record."""
    from mesh.broker import MeshClient

    mesh = MeshClient(base.model_copy(update={"namespace": ns}), client=client, app=BENCH_APP)
    run = uuid.uuid4().hex[:8]
    per_step, gaps = [], []
    with _workers("step", base, ns, cfg, cfg.prefetches[0]):
        for i in range(cfg.chain_jobs):
            ref = mesh.run(CHAIN, {"text": "chain"}, key=f"bench-chain-{run}-{i}")
            record = _succeeded(client, job_keys(mesh, [ref.id]), pause_s=0.005)[0]
            per_step.append(1000 * (record["finished_at"] - record["created_at"]) / CHAIN_STEPS)
            steps = [record["steps"][f"s{n}"] for n in range(1, CHAIN_STEPS + 1)]
            gaps += [1000 * (b["started_at"] - a["finished_at"]) for a, b in itertools.pairwise(steps)]
    return {"steps": CHAIN_STEPS, "jobs": cfg.chain_jobs, "per_step_ms": statistics.median(per_step),
            "per_step_ms_by_job": per_step, "step_to_step_p50_ms": _pct(sorted(gaps), 50),
            "step_to_step_p99_ms": _pct(sorted(gaps), 99)}


def _enqueue(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> dict[str, float]:
    """``send_many`` of ``enqueue_messages`` jobs to the echo agent; then, of min(that, 2,000) each, a loop
    of the mesh's ``MeshClient.send()`` and one of raw dramatiq's ``actor.send()``, run in alternating
    blocks of 100 so that a busy machine slows both alike."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from mesh.broker import MeshClient

    n, loop_n = cfg.enqueue_messages, min(cfg.enqueue_messages, 2_000)
    mesh = MeshClient(base.model_copy(update={"namespace": ns}), client=client, app=BENCH_APP)
    run = uuid.uuid4().hex[:8]
    payloads = [({"text": f"e{i}"}, f"enq-{run}-{i}") for i in range(n)]
    started = time.perf_counter()
    mesh.send_many(STEP_AGENT, payloads)
    many = n / (time.perf_counter() - started)
    broker = RedisBroker(client=connect(base, retries=False), namespace=raw_namespace(ns))
    actor = dramatiq.Actor(_noop, broker=broker, actor_name="bench_enqueue", queue_name="bench_enqueue",
                           priority=0, options={})
    mesh.send(STEP_AGENT, {"text": "first"}, key=f"enq-loop-{run}")  # both sides' scripts loaded first
    actor.send(-1)
    spent = {"mesh": 0.0, "raw": 0.0}
    for block in range(0, loop_n, 100):
        started = time.perf_counter()
        for i in range(block, min(loop_n, block + 100)):
            mesh.send(STEP_AGENT, {"text": f"l{i}"}, key=f"enq-loop-{run}-{i}")
        spent["mesh"] += time.perf_counter() - started
        started = time.perf_counter()
        for i in range(block, min(loop_n, block + 100)):
            actor.send(i)
        spent["raw"] += time.perf_counter() - started
    broker.close()
    mesh_loop, loop = loop_n / spent["mesh"], loop_n / spent["raw"]
    return {"send_many_messages": n, "loop_messages": loop_n, "send_many_msg_s": many,
            "mesh_send_loop_msg_s": mesh_loop, "send_loop_msg_s": loop, "ratio": many / loop,
            "mesh_send_ratio": mesh_loop / loop}


def _pickup(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig, side: str) -> dict[str, float]:
    """send → handler start on an idle queue, one worker process with one thread."""
    import random

    queue_name = MESH_Q if side == "mesh" else RAW_Q
    key = Keys(ns).bench_latency(side)
    run = uuid.uuid4().hex[:8]
    with _workers(side, base, ns, cfg, cfg.prefetches[0], processes=1, threads=1):
        for i in range(cfg.latency_samples):
            time.sleep(random.uniform(0.05, 0.3))  # idle, so the consumer's polling backs off as it would
            payload = {"sent_at": time.time()}
            _push(client, ns, queue_name, [_envelope(i, run, payload) if side == "mesh" else payload],
                  _placed(base, ns))
            _drained(client, ns, queue_name, timeout_s=30, shards=_placed(base, ns).keys if side == "mesh" else ())
        samples = sorted(float(x) * 1000 for x in client.lrange(key, 0, -1))
    return {"p50_ms": _pct(samples, 50), "p99_ms": _pct(samples, 99), "samples": len(samples)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _dlq(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> dict[str, float]:
    from mesh.dlq import DeadLetterStore, Filter, Replayer, drain

    home = _placed(base, ns).home  # one shard, as the no-op runs': a replay's and a drain's cost per entry
    settings = base.model_copy(update={"namespace": ns, "shard": home.shard, "shards": 1})
    store = DeadLetterStore(client, home)
    _fill_dlq(store, cfg.dlq_entries)
    replayer = Replayer(store, settings)
    started = time.perf_counter()
    report = replayer.replay(replayer.entries(flt=Filter()))
    replay_rate = len(report.replayed) / (time.perf_counter() - started)
    _fill_dlq(store, cfg.dlq_entries)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        drained = drain(store, Path(tmp) / "rate.jsonl", Filter())
        drain_rate = drained / (time.perf_counter() - started)
        # Memory in a second drain: tracing allocations slows Python down several times.
        _fill_dlq(store, cfg.dlq_entries)
        tracemalloc.start()
        drain(store, Path(tmp) / "dlq.jsonl", Filter())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        size_mb = (Path(tmp) / "dlq.jsonl").stat().st_size / 2**20
    return {"entries": cfg.dlq_entries, "replay_entries_s": replay_rate, "drain_entries_s": drain_rate,
            "drain_peak_traced_mb": peak / 2**20, "drain_file_mb": size_mb}


def _fill_dlq(store: Any, n: int) -> None:
    from mesh.contracts import JobRecord, State, StepRecord, dumps, transition
    from mesh.dlq import DeadLetter

    run = uuid.uuid4().hex[:8]
    pipe = store.client.pipeline(transaction=False)
    for i in range(n):
        env = _envelope(i, run) | {"agent": "executor", "job_id": f"bench-dlq-{run}-{i}", "step_id": "executor"}
        # Each entry's job, dead-lettered, as a failed run leaves it: a replay requeues its step.
        step = transition(transition(StepRecord(step_id="executor", agent="executor", key=env["key"]),
                                     State.RUNNING), State.DEAD_LETTERED, error="bench", failure_class="permanent")
        job = JobRecord(job_id=env["job_id"], key=env["key"], trace_id=env["trace_id"], steps={"executor": step})
        pipe.set(store.keys.job(job.job_id), dumps(transition(transition(job, State.RUNNING), State.DEAD_LETTERED,
                                                              error="bench", failure_class="permanent")))
        entry = DeadLetter(entry_id=f"{run}-{i}", queue="executor", agent="executor", failure_class="permanent",
                           error="bench", envelope=env, key=env["key"], job_id=env["job_id"], worker="bench")
        raw = dumps({"queue_name": "executor", "actor_name": "executor", "args": [env], "kwargs": {},
                     "options": {}, "message_id": entry.entry_id, "message_timestamp": 0})
        k = store.keys
        store._put(keys=[k.dlq, k.dead_letter(entry.entry_id), k.dlq_by_agent("executor"),
                         k.dlq_by_class("permanent"), k.dlq_agents, k.dlq_by_job(job.job_id), k.dlq_jobs_since],
                   args=[entry.entry_id, int(time.time() * 1000), dumps(entry), raw, "executor", "permanent", "1"],
                   client=pipe)
        if i % 2_000 == 1_999:
            pipe.execute()
    pipe.execute()


def _duplicates(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> float:
    """msg/s of messages whose key is already done: the cost of a duplicate."""
    from mesh.broker.idempotency import Idempotency
    from mesh.contracts import dumps

    run = uuid.uuid4().hex[:8]
    placed = _placed(base, ns)
    settings = base.model_copy(update={"namespace": ns})
    mws = {keys.shard: Idempotency(settings.model_copy(update={"shard": keys.shard, "shards": 1}), client)
           for keys in placed.keys}
    pipe = client.pipeline(transaction=False)
    bodies = [_envelope(i, run) for i in range(cfg.messages)]
    for body in bodies:  # done in the shard each message is pushed to, whose worker claims it there
        keys = _shard_of(placed, body["key"])
        mw, claim = mws[keys.shard], keys.claim(body["key"])
        mw._call("claim", claim, "bench", client=pipe)
        mw._call("done", claim, "bench", dumps({}), client=pipe)
    pipe.execute()
    with _workers("mesh", base, ns, cfg, cfg.prefetches[0]):
        started = time.perf_counter()
        _push(client, ns, MESH_Q, bodies, placed)
        _drained(client, ns, MESH_Q, shards=placed.keys)
        return cfg.messages / (time.perf_counter() - started)


def run(settings: MeshSettings, cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every figure of ``mesh bench``, as a dict with stable keys."""
    _count_round_trips()
    ns = cfg.namespace or f"bench-{uuid.uuid4().hex[:10]}"
    # The configured Redis (and its TLS files) and shards (MESH_SHARD, MESH_SHARDS: the real steps spread
    # over them); every other setting at its default, as measured.
    settings = MeshSettings(**settings.model_dump(include=set(SETTINGS) | {"shard", "shards"}))
    client = connect(settings)
    try:
        check_scratch(client, ns, "mesh bench")
        if cfg.namespace and not is_empty(client, ns):
            raise ConfigError(f"namespace {ns!r} holds keys; mesh bench deletes its namespace at the end, "
                              "so give one that is empty")
    except ConfigError:
        client.close()
        raise
    # On a cluster: its primaries, and the one that holds the namespace (all of its keys share a slot).
    where = {"primaries": [name for name, _ in _primaries(client)] if is_cluster(client) else [],
             "namespace_primary": namespace_primary(client, ns)}
    try:
        sweep, steps = [], []
        for prefetch in cfg.prefetches:
            pairs = []
            for i in range(cfg.pairs):
                progress(f"prefetch {prefetch}: throughput pair {i + 1}/{cfg.pairs}")
                mesh = _throughput(client, settings, ns, cfg, "mesh", prefetch)
                raw = _throughput(client, settings, ns, cfg, "raw", prefetch)
                pairs.append((mesh, raw))
            sweep.append(_sweep_entry(prefetch, pairs))
            progress(f"prefetch {prefetch}: real steps, one-step jobs")
            single = _step(client, settings, ns, cfg, prefetch)
            progress(f"prefetch {prefetch}: real steps, two-step pipelines")
            steps.append(_step_entry(prefetch, single, _pair(client, settings, ns, cfg, prefetch), pairs))
        floor: dict[str, Any] = {}
        if cfg.floor_jobs:
            progress("the writes' floor: a one-step job's writes alone")
            floor = bench_floor.floor(client, ns, cfg.floor_jobs,
                                      raw_redis_cpu_us=steps[0]["raw"]["redis_cpu_us_per_message"])
            floor["real_step_redis_cpu_us"] = steps[0]["job"]["redis_cpu_us_per_step"]
        progress("sequential latency: 40-step pipelines")
        chain = _chain_latency(client, settings, ns, cfg)
        progress("enqueue")
        enqueue = _enqueue(client, settings, ns, cfg)
        progress("pickup latency")
        pickup = {side: _pickup(client, settings, ns, cfg, side) for side in ("mesh", "raw")}
        progress("dead-letter queue")
        dlq = _dlq(client, settings, ns, cfg)
        progress("duplicates")
        dup = _duplicates(client, settings, ns, cfg)
        storage = kept(cfg, progress)
    finally:
        delete_namespace(client, ns)
        client.close()
    return {
        "namespace": ns, **where,
        "config": {"messages": cfg.messages, "processes": cfg.processes, "threads": cfg.threads,
                   "prefetch": cfg.prefetches, "pairs": cfg.pairs, "enqueue_messages": cfg.enqueue_messages,
                   "chain_jobs": cfg.chain_jobs, "kept_jobs": cfg.kept_jobs, "floor_jobs": cfg.floor_jobs},
        "throughput": sweep,
        "step": steps,
        "floor": floor,
        "sequential": chain,
        "enqueue": enqueue,
        "pickup_latency": pickup,
        "dlq": dlq,
        "duplicates": {"msg_s": dup},
        "storage": storage,
    }


def _sweep_entry(prefetch: int, pairs: list[tuple[Run, Run]]) -> dict[str, Any]:
    """The throughput pairs at one prefetch: medians over the pairs, the last pair's commands by name."""
    def median(f: Callable[[Run], float], side: int) -> float:
        return statistics.median(f(pair[side]) for pair in pairs)

    def cpu(kind: str) -> dict[str, float]:
        mesh, raw = median(lambda r: r.cpu_us()[kind], 0), median(lambda r: r.cpu_us()[kind], 1)
        return {"mesh": mesh, "raw": raw, "ratio": statistics.median(m.cpu_us()[kind] / r.cpu_us()[kind]
                                                                       for m, r in pairs)}

    return {"prefetch": prefetch,
            "mesh_msg_s": median(lambda r: r.rate, 0), "raw_msg_s": median(lambda r: r.rate, 1),
            "ratio": statistics.median(m.rate / r.rate for m, r in pairs),
            "pairs": [{"mesh_msg_s": m.rate, "raw_msg_s": r.rate} for m, r in pairs],
            "round_trips_per_message": {"mesh": median(lambda r: r.round_trips_per, 0),
                                        "raw": median(lambda r: r.round_trips_per, 1)},
            "redis_commands_per_message": {"mesh": median(lambda r: r.commands_per, 0),
                                           "raw": median(lambda r: r.commands_per, 1),
                                           "mesh_by_command": pairs[-1][0].by_command(),
                                           "raw_by_command": pairs[-1][1].by_command()},
            "worker_cpu_us_per_message": cpu("worker"),
            "redis_cpu_us_per_message": cpu("redis")}


def _step_entry(prefetch: int, single: Run, pair: Run, pairs: list[tuple[Run, Run]]) -> dict[str, Any]:
    """The real steps at one prefetch: a one-step job's and a two-step pipeline's, each beside raw
    dramatiq's no-op per message at that prefetch (the median over the pairs)."""
    raw = {"msg_s": statistics.median(r.rate for _, r in pairs),
           "redis_commands_per_message": statistics.median(r.commands_per for _, r in pairs),
           "round_trips_per_message": statistics.median(r.round_trips_per for _, r in pairs),
           "worker_cpu_us_per_message": statistics.median(r.cpu_us()["worker"] for _, r in pairs),
           "redis_cpu_us_per_message": statistics.median(r.cpu_us()["redis"] for _, r in pairs)}
    return {"prefetch": prefetch, "job": _real(single, raw), "pipeline": _real(pair, raw), "raw": raw}


def _ratio(mesh: float, raw: float) -> float | None:
    """``mesh`` / ``raw``; None when ``raw`` is 0 (a run too short for the CPU it reads to move: INFO cpu
    moves in 10 ms steps)."""
    return mesh / raw if raw else None


def _real(step: Run, raw: dict[str, float]) -> dict[str, Any]:
    """A real step's figures; ``compaction``: its job's compaction, later, per step; ``life``: the two
    added up (a job's whole life in Redis, its compaction included)."""
    out: dict[str, Any] = {"steps": step.n, "steps_s": step.rate, "worker_cpu_us_per_step": step.cpu_us()["worker"],
                           "redis_cpu_us_per_step": step.cpu_us()["redis"],
                           "redis_commands_per_step": step.commands_per,
                           "round_trips_per_step": step.round_trips_per, "by_command": step.by_command(),
                           "primaries": step.by_primary(),
                           "vs_raw": {"steps_s": step.rate / raw["msg_s"],
                                      "worker_cpu": _ratio(step.cpu_us()["worker"], raw["worker_cpu_us_per_message"]),
                                      "redis_cpu": _ratio(step.cpu_us()["redis"], raw["redis_cpu_us_per_message"]),
                                      "redis_commands": step.commands_per - raw["redis_commands_per_message"]}}
    later = step.compaction
    if later is not None:
        compaction = {"worker_cpu_us_per_step": later.cpu_us()["worker"],
                      "redis_cpu_us_per_step": later.cpu_us()["redis"], "redis_commands_per_step": later.commands_per}
        out["compaction"] = {**compaction, "by_command": later.by_command()}
        out["life"] = {name: out[name] + value for name, value in compaction.items()}
    return out
