"""``mesh soak``: mixed traffic with injected faults for minutes or hours, and the memory it costs.

Runs against the configured Redis in a fresh namespace (deleted at the end) with its own worker
processes (``mesh worker``, one process each). Traffic, at a steady rate: whole jobs through the
built-in planner/researcher/executor flow, single ``note`` steps, ``http_post`` steps to a loopback
server that answers 200, 429 (Retry-After), 503, 400 or too slowly, and poison bytes pushed raw into
a queue. Every ``kill_every_s`` one worker is SIGKILLed and a new one started in its place. Each
interval it samples every worker's resident memory, Redis ``used_memory`` and how many workers serve
(heartbeat), also while it waits at the end: it stops the traffic, waits for the work to settle and
counts: every job must have ended (succeeded, dead-
lettered, ...) and every poison message must be in the DLQ; anything else is ``lost``. A job whose
record expired (MESH_JOB_RETENTION_S) ended before it could: it counts as ended, with the state it
was last seen in.

The workers get the mesh's own settings (every ``MESH_*`` the soak was started with, e.g. its
retention), so the memory figures are the deployment's; where those leave a setting unset, the soak
sets one suited to its fault mix (:data:`SOAK_DEFAULTS`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from mesh.broker.client import MeshClient
from mesh.broker.connection import connect, primaries
from mesh.broker.keys import Keys
from mesh.broker.outbox import wake
from mesh.broker.retention import expired
from mesh.broker.router import breaker_spread_ms
from mesh.broker.settings import ENV_PREFIX, MeshSettings
from mesh.broker.shard_readers import every, live_members, per_shard, queue_depths
from mesh.broker.shards import Shards
from mesh.contracts import TERMINAL, ConfigError, JobRecord, State
from mesh.dlq import DeadLetterShards
from mesh.ops.namespaces import check_scratch, delete_namespace

#: What each fault path of the loopback server answers (status, extra headers, delay s).
FAULTS: dict[str, tuple[int, dict[str, str], float]] = {
    "/ok": (200, {}, 0.0), "/429": (429, {"Retry-After": "1"}, 0.0), "/503": (503, {}, 0.0),
    "/400": (400, {}, 0.0), "/slow": (200, {}, 3.0),
}

#: What the soak's workers run with where the mesh's settings leave it unset: a short HTTP timeout (the
#: loopback's slow answers must time out), quick recovery of killed workers, short backoffs, and few
#: deferrals. The loopback's 503s keep its breaker opening, and every call to it, whatever its path,
#: then waits on the delay queue for the reopen: a call that only ever fails is dead-lettered once its
#: deferrals are spent, each up to the capped cool-down and its spread. With the mesh's 20 that took
#: up to 20 x 15 s, and a soak counted such jobs lost when its wait ended first; 5 take about 75 s.
#: (A probe whose worker was killed frees the breaker after 10 s, not the mesh's 60.)
SOAK_DEFAULTS = {"MESH_HTTP_TIMEOUT_S": "2", "MESH_HEARTBEAT_TIMEOUT_S": "5", "MESH_MAX_RETRIES": "2",
                 "MESH_RETRY_MAX_BACKOFF_MS": "2000", "MESH_BREAKER_COOLDOWN_S": "2",
                 "MESH_BREAKER_MAX_COOLDOWN_S": "10", "MESH_MAX_DEFERS": "5", "MESH_BREAKER_PROBE_TTL_S": "10"}

#: Added to the longest wait the workers' settings allow a job (:func:`settle_wait_s`).
SETTLE_MARGIN_S = 60.0

#: Share of the traffic by kind (poison is pushed raw; http paths are chosen uniformly).
MIX = {"flow": 0.15, "note": 0.45, "http": 0.30, "poison": 0.10}


@dataclass(frozen=True)
class SoakConfig:
    seconds: float
    interval_s: float = 30.0
    processes: int = 2
    threads: int = 4
    #: Messages sent per second (jobs and poison together).
    rate: float = 5.0
    #: A worker is SIGKILLed and replaced this often (0: never).
    kill_every_s: float = 60.0
    #: How long the end waits for the work to settle, at least (longer when the workers' settings let a
    #: job wait longer: :func:`settle_wait_s`).
    settle_s: float = 180.0


@dataclass
class Sample:
    at_s: float
    sent: int
    ended: int
    dead_letters: int
    queued: int
    kills: int
    #: Workers heartbeating within the workers' heartbeat timeout: 0 means nothing could run, whatever
    #: waits (a killed worker's replacement still starting), which a stalled mesh does not look like.
    serving: int
    rss_mb: list[float]
    redis_mb: float
    namespace_mb: float

    def row(self) -> str:
        rss = f"{min(self.rss_mb):.1f}-{max(self.rss_mb):.1f}" if self.rss_mb else "-"
        m, s = divmod(int(self.at_s), 60)
        return (f"{m:4d}:{s:02d} {self.sent:7d} {self.ended:7d} {self.dead_letters:6d} {self.queued:6d} "
                f"{self.kills:5d} {self.serving:3d} {rss:>11} {self.redis_mb:8.1f} {self.namespace_mb:7.1f}")


#: 76 columns: the sample table fits an 80-column terminal.
HEADER = f"{'time':>7} {'sent':>7} {'ended':>7} {'dlq':>6} {'queued':>6} {'kills':>5} {'up':>3} {'worker RSS':>11} " \
         f"{'redis MB':>8} {'ns MB':>7}"


@dataclass
class Traffic:
    """What was sent, to account for it at the end."""

    jobs: dict[str, str] = field(default_factory=dict)  # job id -> kind
    poison: list[str] = field(default_factory=list)  # Redis message ids
    open: set[str] = field(default_factory=set)  # job ids not ended yet
    #: Job id -> the state it ended in, as last seen ("expired": its record expired before it was seen).
    final: dict[str, str] = field(default_factory=dict)


# -- the loopback server ---------------------------------------------------------------------------------


class _Faults(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        status, headers, delay = FAULTS.get(self.path, (404, {}, 0.0))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if delay:
            time.sleep(delay)
        body = json.dumps({"path": self.path}).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (a timeout): nothing to answer
            pass

    def log_message(self, *_args: Any) -> None:
        return


@contextmanager
def fault_server() -> Iterator[str]:
    """The loopback server on a free port; yields its ``host:port``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Faults)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


# -- workers ---------------------------------------------------------------------------------------------


class Workers:
    """``processes`` worker slots, each one ``mesh worker`` process; a killed one is replaced."""

    def __init__(self, env: dict[str, str], threads: int, logs: Path) -> None:
        self.env, self.threads, self.logs = env, threads, logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self, processes: int) -> None:
        """Start ``processes`` workers; each is in :attr:`procs` (and so stopped) as soon as it runs."""
        for _ in range(processes):
            self.procs.append(self._start())

    def _start(self) -> subprocess.Popen[bytes]:
        self.started += 1
        with (self.logs / f"worker-{self.started}.log").open("wb") as log:
            return subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "worker", "--processes", "1",
                                     "--threads", str(self.threads)], env=self.env, stdout=subprocess.DEVNULL,
                                    stderr=log, stdin=subprocess.DEVNULL)

    def kill_one(self, slot: int) -> None:
        """SIGKILL the worker in ``slot`` (no chance to put anything back) and start another."""
        proc = self.procs[slot]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.procs[slot] = self._start()

    def rss_mb(self) -> list[float]:
        return [r for r in (rss_mb(p.pid) for p in self.procs if p.poll() is None) if r is not None]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (Linux /proc), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def serving(client: redis.Redis, keys: Keys | Sequence[Keys], timeout_s: float) -> int:
    """How many workers heartbeated within ``timeout_s`` (on the Redis server's clock), in any shard
    (``keys``: each shard's). Only workers heartbeat in the soak's namespace: its own client sends
    through scripts that do not."""
    secs, micros = client.time()
    return live_members(client, [keys] if isinstance(keys, Keys) else keys, lambda k: k.heartbeats,
                        secs * 1000 + micros // 1000 - timeout_s * 1000)


def _ready(client: redis.Redis, keys: Sequence[Keys], processes: int, timeout_s: float = 120.0) -> None:
    """Wait for every worker's first heartbeat, so the first sample is of serving workers."""
    deadline = time.monotonic() + timeout_s
    while live_members(client, keys, lambda k: k.heartbeats, 0) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"soak workers did not start within {timeout_s:.0f}s")
        time.sleep(0.1)


def namespace_mb(client: redis.Redis, ns: str) -> float:
    """What the soak's own keys take in Redis (MEMORY USAGE of each), in MB: unlike ``used_memory``,
    not moved by other clients of the same server."""
    total = 0
    keys = [k for pattern in Keys(ns).patterns for k in client.scan_iter(match=pattern, count=2_000)]
    for i in range(0, len(keys), 1_000):
        pipe = client.pipeline(transaction=False)
        for key in keys[i:i + 1_000]:
            pipe.memory_usage(key, samples=0)
        total += sum(n or 0 for n in pipe.execute())
    return total / 2**20


def redis_mb(client: redis.Redis) -> float:
    """``used_memory`` in MB (on a cluster: of every primary, summed)."""
    return sum(int(node.info("memory")["used_memory"]) for node in primaries(client)) / 2**20


# -- traffic ---------------------------------------------------------------------------------------------


def send_one(client: MeshClient, traffic: Traffic, host_port: str, rng: random.Random, n: int) -> None:
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    if kind == "poison":
        traffic.poison.append(push_raw(client, "executor", rng.randbytes(rng.randint(0, 64))))
        return
    if kind == "flow":
        ref = client.submit(f"soak {n}: how are failures classified and dead letters replayed?")
    elif kind == "note":
        ref = client.send("executor", {"tool": "note", "args": {"title": f"soak {n}"}})
    else:
        path = rng.choice(list(FAULTS))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": f"http://{host_port}{path}",
                                                                     "json": {"n": n}}})
        kind = f"http{path}"
    traffic.jobs[ref.id] = kind
    traffic.open.add(ref.id)


def push_raw(client: MeshClient, queue: str, data: bytes) -> str:
    """``data`` on ``queue`` as dramatiq's enqueue would store it, bypassing every check: poison. In the
    namespace's first shard (``client.shards.home``): with several (MESH_SHARDS), ``client.keys`` are shard
    0's, which holds no queue a worker consumes."""
    rid = str(uuid.uuid4())
    keys = client.shards.home
    pipe = client.redis.pipeline(transaction=False)
    pipe.hset(keys.messages(queue), rid, data)
    pipe.rpush(keys.queue(queue), rid)
    wake(pipe, keys, queue)
    pipe.execute()
    return rid


def ended(client: MeshClient, traffic: Traffic) -> dict[str, int]:
    """Move jobs that ended out of ``traffic.open`` (one whose record expired ended before it could);
    the count of jobs sent and ended so far."""
    shards = Shards.of(client.settings)
    ids = sorted(traffic.open)
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        found: dict[str, Any] = {}
        for keys, some in per_shard(shards.keys, chunk, shards.of_job):  # one MGET per shard: one slot each
            found.update(zip(some, client.redis.mget([keys.job(j) for j in some]), strict=True))
        for job_id in chunk:
            data = found[job_id]
            state = JobRecord.model_validate_json(data).state if data is not None else None
            if state in TERMINAL:
                traffic.final[job_id] = str(state)
            elif state is None and expired(client.redis, shards.of_job(job_id), job_id):
                traffic.final[job_id] = "expired"
            else:
                continue
            traffic.open.discard(job_id)
    return {"sent": len(traffic.jobs), "ended": len(traffic.jobs) - len(traffic.open)}


def settle_wait_s(env: dict[str, str], floor_s: float) -> float:
    """How long the end waits for the work to settle, for workers run with ``env``: at least ``floor_s``,
    and at least the longest a job may wait before it ends, plus :data:`SETTLE_MARGIN_S`. That is a call
    deferred by an open breaker until its deferrals are spent (MESH_MAX_DEFERS, each the capped cool-down
    and its spread), after a killed probe's slot expired; never past the job's deadline, which dead-letters
    whatever would wait beyond it. A shorter wait would count a job that is still deferred as lost."""
    s = MeshSettings.from_env({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    cooldown_s = s.breaker_max_cooldown_s
    deferral_s = cooldown_s + breaker_spread_ms(cooldown_s * 1000) / 1000
    longest_s = min(s.max_defers * deferral_s + s.breaker_probe_ttl_s, s.job_deadline_s)
    return max(floor_s, longest_s + SETTLE_MARGIN_S)


def worker_env(settings: MeshSettings, namespace: str, host_port: str,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the soak's workers: the process's own without its ``MESH_*``, then
    :data:`SOAK_DEFAULTS`, then every setting the mesh's settings were given, then the soak's
    namespace and the loopback server it may reach."""
    environ = dict(os.environ) if environ is None else environ
    env = {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(SOAK_DEFAULTS)
    env.update(settings_env(settings))
    env.update({"MESH_REDIS_URL": settings.redis_url, "MESH_NAMESPACE": namespace, "MESH_HTTP_ALLOW": host_port})
    return env


#: Settings a summary never prints: they may hold credentials.
SECRET_SETTINGS = frozenset({"MESH_REDIS_URL", "MESH_REDIS_SENTINEL_PASSWORD", "MESH_MODEL_API_KEY"})


def shown_settings(env: dict[str, str]) -> dict[str, str]:
    """The ``MESH_*`` settings of the workers' environment ``env``, without credentials: what the
    figures were measured with."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(ENV_PREFIX) and k not in SECRET_SETTINGS}


def settings_env(settings: MeshSettings) -> dict[str, str]:
    """The ``MESH_*`` variables that give a process the settings ``settings`` was given explicitly."""
    out = {}
    for name in sorted(settings.model_fields_set):
        value = getattr(settings, name)
        if value is None:
            continue
        value = value.get_secret_value() if isinstance(value, SecretStr) else value
        out[ENV_PREFIX + name.upper()] = str(value)
    return out


def queued(client: MeshClient) -> int:
    """Messages ready, delayed or in flight on the built-in agents' queues, in every shard."""
    return sum(sum(v.values()) for v in queue_depths(client, ["planner", "researcher", "executor"]).values())


# -- the run ---------------------------------------------------------------------------------------------


def run(settings: MeshSettings, cfg: SoakConfig, progress: Callable[[str], None] = lambda s: None
        ) -> dict[str, Any]:
    """The whole soak; returns the summary (stable keys, see README). ``progress`` gets the table."""
    ns = f"{settings.namespace}-soak-{uuid.uuid4().hex[:8]}"
    rng = random.Random()
    raw = connect(settings)
    try:
        check_scratch(raw, ns, "mesh soak", memory=True)
    except ConfigError:
        raw.close()
        raise
    with fault_server() as host_port, tempfile.TemporaryDirectory(prefix="mesh-soak-") as logs:
        soak = settings.model_copy(update={"namespace": ns, "http_allow": host_port})
        env = worker_env(settings, ns, host_port)
        client = MeshClient(soak, client=raw)
        traffic = Traffic()
        samples: list[Sample] = []
        # Started inside the try: a failure while they start (or before they serve) stops them too.
        workers = Workers(env, cfg.threads, Path(logs))
        kills = 0
        beat_timeout_s = float(env["MESH_HEARTBEAT_TIMEOUT_S"])

        def sample() -> Sample:
            counts = ended(client, traffic)
            s = Sample(at_s=time.monotonic() - started, sent=counts["sent"] + len(traffic.poison),
                       ended=counts["ended"], dead_letters=DeadLetterShards.of(raw, soak).count(),
                       queued=queued(client), kills=kills, serving=serving(raw, every(soak), beat_timeout_s),
                       rss_mb=workers.rss_mb(), redis_mb=redis_mb(raw),
                       namespace_mb=namespace_mb(raw, ns))
            samples.append(s)
            progress(s.row())
            return s

        try:
            workers.start(cfg.processes)
            _ready(raw, every(soak), cfg.processes)
            started = time.monotonic()
            progress(HEADER)
            sample()
            n, next_sample, next_look = 0, started + cfg.interval_s, started + 1
            next_kill = started + cfg.kill_every_s if cfg.kill_every_s else float("inf")
            while (now := time.monotonic()) < started + cfg.seconds:
                if now >= next_kill:
                    workers.kill_one(kills % len(workers.procs))
                    kills += 1
                    next_kill += cfg.kill_every_s
                if now >= next_sample:
                    sample()
                    next_sample += cfg.interval_s
                elif now >= next_look:
                    # Often, so a job is seen ended before its record expires (MESH_JOB_RETENTION_S may
                    # be seconds); one that expires unseen still counts by its tombstone.
                    ended(client, traffic)
                    next_look = now + 1
                send_one(client, traffic, host_port, rng, n)
                n += 1
                time.sleep(max(0.0, started + n / cfg.rate - time.monotonic()))
            settle_by = time.monotonic() + settle_wait_s(env, cfg.settle_s)
            while (now := time.monotonic()) < settle_by:
                ended(client, traffic)
                if not traffic.open and queued(client) == 0:
                    break
                if now >= next_sample:  # the wait is sampled too: whether it progresses, and who serves
                    sample()
                    next_sample = now + cfg.interval_s
                time.sleep(0.5)
            last = sample()
            summary = _summary(cfg, client, traffic, samples, last, kills, workers.started)
            summary["worker_settings"] = shown_settings(env)
        finally:
            workers.stop()
            delete_namespace(raw, ns)
            raw.close()
    return summary


def _summary(cfg: SoakConfig, client: MeshClient, traffic: Traffic, samples: list[Sample], last: Sample,
             kills: int, started: int) -> dict[str, Any]:
    store = DeadLetterShards.of(client.redis, client.settings)  # a poison entry is in any shard
    shards = Shards.of(client.settings)
    states: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    for job_id, kind in traffic.jobs.items():
        data = client.redis.get(shards.of_job(job_id).job(job_id))
        state = (JobRecord.model_validate_json(data).state.value if data is not None
                 else traffic.final.get(job_id, "missing"))
        states[state] = states.get(state, 0) + 1
        by_kind.setdefault(kind, {}).setdefault(state, 0)
        by_kind[kind][state] += 1
    poison_kept = sum(store.get(rid) is not None for rid in traffic.poison)
    lost_jobs = len(traffic.open)
    rss = [r for s in samples for r in s.rss_mb]
    first, redis_series, ns_series = samples[0], [s.redis_mb for s in samples], [s.namespace_mb for s in samples]
    return {
        "config": {"seconds": cfg.seconds, "interval_s": cfg.interval_s, "processes": cfg.processes,
                   "threads": cfg.threads, "rate": cfg.rate, "kill_every_s": cfg.kill_every_s},
        "duration_s": round(last.at_s, 1),
        "sent": {"jobs": len(traffic.jobs), "poison": len(traffic.poison)},
        "jobs": {"by_state": states, "by_kind": by_kind,
                 "succeeded": states.get(State.SUCCEEDED.value, 0),
                 "dead_lettered": states.get(State.DEAD_LETTERED.value, 0)},
        "dead_letters": last.dead_letters,
        "poison_dead_lettered": poison_kept,
        "lost": lost_jobs + len(traffic.poison) - poison_kept,
        #: Jobs that had not ended when the soak stopped waiting, and where each one's steps were.
        "not_ended": [_where(client, job_id, traffic.jobs[job_id]) for job_id in sorted(traffic.open)[:20]],
        "workers": {"started": started, "killed": kills},
        "worker_rss_mb": {"start": _stat(first.rss_mb), "end": _stat(last.rss_mb),
                          "max": round(max(rss), 1) if rss else None},
        "redis_used_memory_mb": {"start": round(redis_series[0], 2), "end": round(redis_series[-1], 2),
                                 "max": round(max(redis_series), 2)},
        "namespace_memory_mb": {"start": round(ns_series[0], 2), "end": round(ns_series[-1], 2),
                                "max": round(max(ns_series), 2)},
        "samples": [{"at_s": round(s.at_s, 1), "sent": s.sent, "ended": s.ended, "dead_letters": s.dead_letters,
                     "queued": s.queued, "kills": s.kills, "serving": s.serving,
                     "rss_mb": [round(r, 1) for r in s.rss_mb], "redis_mb": round(s.redis_mb, 2),
                     "namespace_mb": round(s.namespace_mb, 2)}
                    for s in samples],
    }


def _where(client: MeshClient, job_id: str, kind: str) -> dict[str, Any]:
    data = client.redis.get(client.keys_of(job_id).job(job_id))
    if data is None:
        return {"job_id": job_id, "kind": kind, "state": "missing"}
    record = JobRecord.model_validate_json(data)
    return {"job_id": job_id, "kind": kind, "state": record.state.value,
            "steps": {k: step.state.value for k, step in record.steps.items()}}


def _stat(values: list[float]) -> float | None:
    """The largest worker's resident memory in a sample (MB)."""
    return round(max(values), 1) if values else None
