"""``mesh bench``: what the reliability layer costs, measured side by side with raw dramatiq.

Everything runs against the configured Redis in a throw-away namespace that is deleted at the
end. Both sides get the same worker processes, threads and prefetch; throughput runs alternate
mesh / raw and report the median ratio of the pairs. Counts (Redis commands per message) come
from ``INFO commandstats`` deltas, so other clients of the same Redis inflate both sides.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from mesh.broker.connection import SETTINGS, connect
from mesh.broker.settings import MeshSettings

MESH_Q, RAW_Q = "bench_mesh", "bench_raw"


@dataclass(frozen=True)
class BenchConfig:
    messages: int = 5_000
    processes: int = 2
    threads: int = 4
    prefetch: int = 0  # 0: the mesh default (2 x threads)
    pairs: int = 2
    latency_samples: int = 30
    dlq_entries: int = 10_000

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch or 2 * self.threads


# -- worker processes (spawned: each builds its own broker) ------------------------------------------


def _noop(*_args: Any) -> None:
    return None


def _latency(sent_at: float, *_rest: Any) -> None:
    import dramatiq

    broker: Any = dramatiq.get_broker()
    broker.bench_client.rpush(broker.bench_latency_key, repr(time.time() - sent_at))


def _serve(side: str, base: MeshSettings, namespace: str, threads: int, prefetch: int, stop: Any, ready: Any) -> None:
    import dramatiq
    from dramatiq import Worker

    from mesh.ops.logs import setup_logging

    setup_logging("ERROR")
    if side == "mesh":
        from mesh.broker.mesh_broker import build_broker
        from mesh.contracts import MeshError

        broker: Any = build_broker(base.model_copy(update={"namespace": namespace, "prefetch": prefetch,
                                                           "worker_threads": threads}))
        options: dict[str, Any] = {"throws": (MeshError,)}
        queue = MESH_Q
    else:
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(client=connect(base, retries=False), namespace=namespace)
        dramatiq.set_broker(broker)
        options = {}
        queue = RAW_Q
    broker.bench_client = connect(base)
    broker.bench_latency_key = f"{namespace}:latency:{side}"

    def run(envelope: Any) -> None:
        if isinstance(envelope, dict) and "sent_at" in envelope.get("payload", envelope):
            _latency(envelope.get("payload", envelope)["sent_at"])

    run.__name__ = queue
    dramatiq.Actor(run, broker=broker, actor_name=queue, queue_name=queue, priority=0, options=options)
    worker = Worker(broker, queues={queue}, worker_threads=threads, worker_timeout=100)
    worker.queue_prefetch = prefetch
    broker.emit_after("process_boot")
    worker.start()
    ready.set()
    stop.wait()
    worker.stop(timeout=10_000)


@contextmanager
def _workers(side: str, base: MeshSettings, namespace: str, cfg: BenchConfig, processes: int | None = None,
             threads: int | None = None) -> Iterator[None]:
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    readies, procs = [], []
    for _ in range(processes or cfg.processes):
        ready = ctx.Event()
        p = ctx.Process(target=_serve, args=(side, base, namespace, threads or cfg.threads, cfg.effective_prefetch,
                                             stop, ready), daemon=True)
        p.start()
        readies.append(ready)
        procs.append(p)
    try:
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError(f"{side} bench worker did not start")
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()


# -- messages -------------------------------------------------------------------------------------------


def _envelope(i: int, run: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"key": f"bench-{run}-{i}", "job_id": f"bench-{run}", "step_id": "s", "agent": MESH_Q,
            "trace_id": uuid.uuid4().hex, "deadline": time.time() + 3600, "hops": [], "attempt": 1,
            "schema_version": 1, "replay_of": None, "payload": payload or {}}


def _push(client: redis.Redis, namespace: str, queue: str, bodies: list[dict[str, Any]]) -> None:
    """Messages in dramatiq's own format, written in one pipeline (as its enqueue would, minus round trips)."""
    from mesh.broker.keys import Keys
    from mesh.broker.outbox import wake
    from mesh.contracts import dumps

    pipe = client.pipeline(transaction=False)
    for args in bodies:
        rid = str(uuid.uuid4())
        message = {"queue_name": queue, "actor_name": queue, "args": [args], "kwargs": {},
                   "options": {"redis_message_id": rid}, "message_id": str(uuid.uuid4()),
                   "message_timestamp": int(time.time() * 1000)}
        pipe.hset(f"{namespace}:{queue}.msgs", rid, dumps(message))
        pipe.rpush(f"{namespace}:{queue}", rid)
    if queue == MESH_Q:  # the mesh's enqueue also wakes idle consumers, once per batch (broker/outbox.py)
        wake(pipe, Keys(namespace), queue, len(bodies))
    pipe.execute()


def _drained(client: redis.Redis, namespace: str, queue: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while client.hlen(f"{namespace}:{queue}.msgs"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{queue} did not drain within {timeout_s}s")
        time.sleep(0.002)


def _commands(client: redis.Redis) -> dict[str, int]:
    """Calls per command so far, those run inside Lua scripts included (as Redis counts them)."""
    stats: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}


# -- measurements ---------------------------------------------------------------------------------------


def _throughput(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig,
                side: str) -> tuple[float, float, dict[str, float]]:
    """msg/s, Redis commands per message, and per message by command, for one side."""
    queue = MESH_Q if side == "mesh" else RAW_Q
    run = uuid.uuid4().hex[:8]
    bodies = [_envelope(i, run) if side == "mesh" else {"n": i} for i in range(cfg.messages)]
    with _workers(side, base, ns, cfg):
        before = _commands(client)
        started = time.perf_counter()
        _push(client, ns, queue, bodies)
        _drained(client, ns, queue)
        elapsed = time.perf_counter() - started
        used = _delta(before, _commands(client))
    per = {k: round(n / cfg.messages, 2) for k, n in sorted(used.items(), key=lambda kv: -kv[1])}
    return cfg.messages / elapsed, sum(used.values()) / cfg.messages, per


def _enqueue(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> dict[str, float]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from mesh.broker import MeshClient

    n = min(cfg.messages, 2_000)
    mesh = MeshClient(base.model_copy(update={"namespace": ns}), client=client)
    payloads = [({"tool": "note", "args": {"title": f"n{i}"}}, f"enq-{uuid.uuid4().hex}") for i in range(n)]
    started = time.perf_counter()
    mesh.send_many("executor", payloads)
    many = n / (time.perf_counter() - started)
    broker = RedisBroker(client=connect(base, retries=False), namespace=ns)
    actor = dramatiq.Actor(_noop, broker=broker, actor_name="bench_enqueue", queue_name="bench_enqueue",
                           priority=0, options={})
    started = time.perf_counter()
    for i in range(n):
        actor.send(i)
    loop = n / (time.perf_counter() - started)
    broker.close()
    return {"send_many_msg_s": many, "send_loop_msg_s": loop, "ratio": many / loop}


def _pickup(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig, side: str) -> dict[str, float]:
    """send → handler start on an idle queue, one worker process with one thread."""
    import random

    queue = MESH_Q if side == "mesh" else RAW_Q
    key = f"{ns}:latency:{side}"
    run = uuid.uuid4().hex[:8]
    with _workers(side, base, ns, cfg, processes=1, threads=1):
        for i in range(cfg.latency_samples):
            time.sleep(random.uniform(0.05, 0.3))  # idle, so the consumer's polling backs off as it would
            payload = {"sent_at": time.time()}
            _push(client, ns, queue, [_envelope(i, run, payload) if side == "mesh" else payload])
            _drained(client, ns, queue, timeout_s=30)
        samples = sorted(float(x) * 1000 for x in client.lrange(key, 0, -1))
    return {"p50_ms": _pct(samples, 50), "p99_ms": _pct(samples, 99), "samples": len(samples)}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def _dlq(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> dict[str, float]:
    from mesh.broker.keys import Keys
    from mesh.dlq import DeadLetterStore, Filter, Replayer, drain

    settings = base.model_copy(update={"namespace": ns})
    store = DeadLetterStore(client, Keys(ns))
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
                         k.dlq_by_class("permanent"), k.dlq_agents],
                   args=[entry.entry_id, int(time.time() * 1000), dumps(entry), raw, "executor", "permanent"],
                   client=pipe)
        if i % 2_000 == 1_999:
            pipe.execute()
    pipe.execute()


def _duplicates(client: redis.Redis, base: MeshSettings, ns: str, cfg: BenchConfig) -> float:
    """msg/s of messages whose key is already done: the cost of a duplicate."""
    from mesh.broker.idempotency import Idempotency
    from mesh.contracts import dumps

    run = uuid.uuid4().hex[:8]
    mw = Idempotency(base.model_copy(update={"namespace": ns}), client)
    pipe = client.pipeline(transaction=False)
    bodies = [_envelope(i, run) for i in range(cfg.messages)]
    for body in bodies:
        mw._call("claim", mw.keys.claim(body["key"]), "bench", client=pipe)
        mw._call("done", mw.keys.claim(body["key"]), "bench", dumps({}), client=pipe)
    pipe.execute()
    with _workers("mesh", base, ns, cfg):
        started = time.perf_counter()
        _push(client, ns, MESH_Q, bodies)
        _drained(client, ns, MESH_Q)
        return cfg.messages / (time.perf_counter() - started)


def run(settings: MeshSettings, cfg: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every figure of ``mesh bench``, as a dict with stable keys."""
    ns = f"bench-{uuid.uuid4().hex[:10]}"
    # The configured Redis (and its TLS files); every other setting at its default, as measured.
    settings = MeshSettings(**settings.model_dump(include=set(SETTINGS)))
    client = connect(settings)
    try:
        pairs = []
        for i in range(cfg.pairs):
            progress(f"throughput pair {i + 1}/{cfg.pairs}")
            mesh = _throughput(client, settings, ns, cfg, "mesh")
            raw = _throughput(client, settings, ns, cfg, "raw")
            pairs.append((mesh, raw))
        progress("enqueue")
        enqueue = _enqueue(client, settings, ns, cfg)
        progress("pickup latency")
        pickup = {side: _pickup(client, settings, ns, cfg, side) for side in ("mesh", "raw")}
        progress("dead-letter queue")
        dlq = _dlq(client, settings, ns, cfg)
        progress("duplicates")
        dup = _duplicates(client, settings, ns, cfg)
    finally:
        _clean(client, ns)
        client.close()
    return {
        "config": {"messages": cfg.messages, "processes": cfg.processes, "threads": cfg.threads,
                   "prefetch": cfg.effective_prefetch, "pairs": cfg.pairs},
        "throughput": {"mesh_msg_s": statistics.median(m[0] for m, _ in pairs),
                       "raw_msg_s": statistics.median(r[0] for _, r in pairs),
                       "ratio": statistics.median(m[0] / r[0] for m, r in pairs),
                       "pairs": [{"mesh_msg_s": m[0], "raw_msg_s": r[0]} for m, r in pairs]},
        "redis_commands_per_message": {"mesh": statistics.median(m[1] for m, _ in pairs),
                                       "raw": statistics.median(r[1] for _, r in pairs),
                                       "mesh_by_command": pairs[-1][0][2], "raw_by_command": pairs[-1][1][2]},
        "enqueue": enqueue,
        "pickup_latency": pickup,
        "dlq": dlq,
        "duplicates": {"msg_s": dup},
    }


def _clean(client: redis.Redis, ns: str) -> None:
    batch = []
    for key in client.scan_iter(match=f"{ns}:*", count=2_000):
        batch.append(key)
        if len(batch) >= 1_000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)
