"""Shared fixtures: a real Redis, a namespace per test (only its keys are ever deleted), workers
in-process or as real processes, and the CLI (in-process, as a process would run it)."""

from __future__ import annotations

import functools
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from mesh.broker import MeshClient, MeshSettings, idempotency
from mesh.broker.connection import connect, is_cluster, parse_url, primaries
from mesh.broker.keys import Keys, legacy_pattern
from mesh.broker.outbox import wake
from mesh.broker.settings import DEFAULT_REDIS_URL
from mesh.broker.shards import Shards
from mesh.ops.local_redis import ensure_redis
from tests.tier import (
    WORKER_COMMANDS,
    _slow_marker_guard,  # noqa: F401  (autouse: the fast tier's guard)
)

ROOT = Path(__file__).resolve().parent.parent

#: MESH_RECONNECT_DELAY_S of the tests' workers, in-process and processes: dramatiq's own 3 s (rebuilding
#: a consumer) and 5 s (re-sending a settlement) after a lost Redis connection are what a test that cuts
#: or restarts Redis would otherwise spend most of its time waiting out.
RECONNECT_DELAY_S = 0.5

# Fixtures that start a worker: a test using one is in the slow tier without saying so.
WORKER_FIXTURES = frozenset({"start_worker", "worker_process", "run_workers"})

#: TEST_REDIS, which Redis the tests' fixtures (``redis_url``, ``rclient``, ``client``, ``settings``...)
#: use: ``single`` (the default) the one MESH_REDIS_URL names (a cluster's too: ``redis+cluster://...``),
#: or the local default, started privately when none answers; ``cluster`` a Redis Cluster of 3 primaries
#: and 3 replicas started for the session on this worker's ports (tests/cluster.py, TEST_CLUSTER_PORT).
#: Not a MESH_* name: the mesh would take it for one of its settings and refuse it.
TEST_REDIS = os.environ.get("TEST_REDIS", "single")
if TEST_REDIS not in ("single", "cluster"):
    raise pytest.UsageError(f"TEST_REDIS={TEST_REDIS!r}: it is 'single' (the default) or 'cluster'")


#: TEST_SHARD, the shard (MESH_SHARD) the tests' settings put their jobs on: 0 by default; another one puts
#: every job, queue and index in ``{ns:N}`` and leaves the fleet-wide keys in ``{ns}``, so on a cluster
#: (TEST_REDIS=cluster) a script, transaction or multi-key command touching both fails (CROSSSLOT).
TEST_SHARD = int(os.environ.get("TEST_SHARD", "0"))

#: TEST_SHARDS, how many shards (MESH_SHARDS) the tests' jobs are spread over, from TEST_SHARD: 1 by default;
#: more puts each job in the shard of its id, and every worker consumes them all (broker/shards.py).
TEST_SHARDS = int(os.environ.get("TEST_SHARDS", "1"))


def on_cluster() -> bool:
    """Whether the session's Redis tests run on a Redis Cluster: TEST_REDIS=cluster, or a MESH_REDIS_URL
    of one."""
    return TEST_REDIS == "cluster" or parse_url(os.environ.get("MESH_REDIS_URL", DEFAULT_REDIS_URL)).cluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts a worker through a fixture; the others that start a
    worker or a redis-server say so themselves (``tests/tier.py`` refuses them otherwise). On a Redis
    Cluster (:func:`on_cluster`), skip the tests marked ``no_cluster(reason)``, with their reason."""
    cluster = on_cluster()
    for item in items:
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        marker = item.get_closest_marker("no_cluster")
        if cluster and marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"not on a Redis Cluster: {reason}"))


@pytest.fixture(autouse=True)
def _no_lease_left_behind() -> Iterator[None]:
    """A test that runs a message's middleware on its own thread without ending it (``before_`` without
    ``after_process_message``) leaves that thread acting for the message's lease: a later test on the
    same thread would see it (a model call labelled with that message's agent)."""
    yield
    idempotency._current.lease = None


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


def wait_stopped(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until every thread of process ``pid`` is stopped (SIGSTOP), as a test that goes on as if it
    were paused needs: ``kill`` returns once the signal is queued, and the process's threads run on
    until one of them (the main one, as a rule) takes it and stops the others; a handler let go on
    meanwhile (a gate opened, an answer passed on) ends its step and writes what it did first.

    A child of this process (``worker_process``, a ``subprocess.Popen``) is stopped once ``waitpid``
    reports it so (``WUNTRACED``): the kernel reports it when the last of its threads has stopped. Any
    other process is stopped once each of its threads is in state ``T`` in ``/proc/PID/task/*/stat``."""

    def stopped() -> bool:
        try:
            reported, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        except ChildProcessError:
            return _all_threads_stopped(pid)
        if reported == pid and not os.WIFSTOPPED(status):
            raise AssertionError(f"process {pid} ended (wait status {status}) instead of stopping")
        return reported == pid

    wait_for(stopped, timeout_s=timeout_s, interval_s=0.001)


def _all_threads_stopped(pid: int) -> bool:
    """Whether each thread of process ``pid`` (not this process's child) is stopped (state ``T``)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):  # a thread that ended meanwhile
            continue
    return bool(states) and all(state == "T" for state in states)


def sigstop(pid: int, timeout_s: float = 30.0) -> None:
    """SIGSTOP process ``pid`` and return once it is stopped, every thread of it (``wait_stopped``)."""
    os.kill(pid, signal.SIGSTOP)
    wait_stopped(pid, timeout_s=timeout_s)


def push_raw(client: MeshClient, queue: str, data: bytes, keys: Keys | None = None) -> str:
    """Put ``data`` on ``queue`` exactly as the mesh's enqueue would (dramatiq's two writes, then the
    queue's wake-up token: an idle consumer takes it at once, not at the end of its block), bypassing
    every check; in the shard of ``keys``, by default the namespace's first (``client.shards.home``:
    with several shards, MESH_SHARDS, shard 0 holds no queue a worker consumes)."""
    keys = keys or client.shards.home
    rid = str(uuid.uuid4())
    pipe = client.redis.pipeline(transaction=False)
    pipe.hset(keys.messages(queue), rid, data)
    pipe.rpush(keys.queue(queue), rid)
    wake(pipe, keys, queue)
    pipe.execute()
    return rid


def stat(r: redis.Redis, settings: MeshSettings, name: str) -> int:
    """Counter ``name`` of the namespace's ``stats``, added up over its shards (MESH_SHARDS: each shard
    counts its own jobs' claims, takeovers and recoveries)."""
    return sum(int(r.hget(keys.stats, name) or 0) for keys in Shards.of(settings).keys)


def heartbeats_since(r: redis.Redis, settings: MeshSettings, since_ms: float) -> int:
    """How many heartbeats at ``since_ms`` or later the shards of the namespace hold (a worker heartbeats
    in each shard it consumes)."""
    return sum(int(r.zcount(keys.heartbeats, since_ms, "+inf")) for keys in Shards.of(settings).keys)


def flat(text: str) -> str:
    """Output with rich's line wrapping undone, so messages can be matched whole."""
    return " ".join(text.split())


@contextmanager
def ops_server(client: MeshClient) -> Iterator[str]:
    """``mesh ops serve``'s server on a free loopback port, served from a thread; yields its base URL."""
    from mesh.ops.server import OpsServer

    server = OpsServer(client, "127.0.0.1", 0)
    thread = server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(10)


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client of the Redis at ``url``, for a test's own reads and writes: redis-py's of the URL
    (``redis.Redis.from_url``) for a single server; for a cluster's (``redis+cluster://...``) or
    Sentinel's (``redis+sentinel://...``), which redis-py's URLs do not take, the mesh's (``connect``):
    it sends each command to the primary of its key's slot, or to the master Sentinel names.
    ``options``: more redis-py connection arguments, a cluster's for each node's pool
    (``connection_class=Counting``: every connection the client makes counts what it sends)."""
    address = parse_url(url)
    if address.cluster or address.sentinel:
        if address.sentinel and "connection_class" in options:  # Sentinel's pool needs its own class
            raise ValueError("redis_client: no connection_class through Sentinel")
        return connect(MeshSettings(redis_url=url), **options)
    return redis.Redis.from_url(url, **options)


def close_client(client: redis.Redis) -> None:
    """Drop ``client``'s connections, as ``redis.Redis.close`` does: a later command connects again (a
    lease renewer a test left running). A cluster client's ``close`` would end it for good (its next
    command raises ``RedisClusterException``); its nodes' connections are dropped instead."""
    if is_cluster(client):
        for node in primaries(client):
            node.connection_pool.disconnect()
    else:
        client.close()


def delete_keys(client: redis.Redis, pattern: str) -> int:
    """Delete the keys matching ``pattern``, on every primary of a cluster (SCAN is a node's): how many."""
    deleted = 0
    for node in primaries(client):
        keys = list(node.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 500):
            pipe = node.pipeline(transaction=False)
            for key in keys[i:i + 500]:  # one DEL each: a cluster's node refuses one of keys in several slots
                pipe.delete(key)
            deleted += sum(pipe.execute())
    return deleted


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of the tests' Redis (see :data:`TEST_REDIS`)."""
    if TEST_REDIS == "cluster":
        from tests.cluster import SESSION_OFFSET, redis_cluster
        with redis_cluster(offset=SESSION_OFFSET) as nodes:
            yield nodes.url
        return
    yield ensure_redis(os.environ.get("MESH_REDIS_URL", DEFAULT_REDIS_URL))


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis_client(redis_url)
    # The namespace's keys (``{ns}:*``) and any of the older layout (``ns:*``: a test writing them, as
    # one of raw dramatiq or of a migration does).
    for pattern in (*Keys(ns).patterns, legacy_pattern(ns)):
        delete_keys(client, pattern)
    close_client(client)


@pytest.fixture
def redis_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """MESH_REDIS_URL set to the tests' Redis (:data:`TEST_REDIS`) for one test, for the code that takes
    it from the environment as a user's program or test would (``mesh.testing``'s ``TestMesh``)."""
    monkeypatch.setenv("MESH_REDIS_URL", redis_url)
    return redis_url


@pytest.fixture
def make_settings(redis_url: str, namespace: str) -> Callable[..., MeshSettings]:
    def make(**overrides: Any) -> MeshSettings:
        values: dict[str, Any] = {"redis_url": redis_url, "namespace": namespace, "shard": TEST_SHARD,
                                  "shards": TEST_SHARDS,
                                  "retry_min_backoff_ms": 20, "retry_max_backoff_ms": 100,
                                  "reconnect_delay_s": RECONNECT_DELAY_S}
        values.update(overrides)
        return MeshSettings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., MeshSettings]) -> MeshSettings:
    return make_settings()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis_client(redis_url)
    yield client
    close_client(client)


@pytest.fixture
def client(settings: MeshSettings, rclient: redis.Redis) -> MeshClient:
    return MeshClient(settings, client=rclient)


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Any]]:
    """Start an in-process dramatiq worker for some agents; stopped at teardown."""
    from mesh.ops.worker import start_worker as start

    started = []

    def run(settings: MeshSettings, agents: tuple[str, ...] = ("planner", "researcher", "executor"),
            threads: int = 4, app: Any = None) -> Any:
        worker = start(settings, list(agents), threads, app)
        started.append(worker)
        return worker

    yield run
    for worker in started:
        worker.stop(timeout=10_000)
        for broker in getattr(worker, "brokers", [worker.broker]):  # each shard's (ShardWorkers)
            broker.close()


def mesh_env(settings: MeshSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_REDIS_URL": settings.redis_url, "MESH_NAMESPACE": settings.namespace,
                "PYTHONPATH": str(ROOT)})
    if settings.shard:
        env["MESH_SHARD"] = str(settings.shard)
    if settings.shards != 1:
        env["MESH_SHARDS"] = str(settings.shards)
    env.update(extra)
    return env


@pytest.fixture
def worker_process(settings: MeshSettings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``mesh worker`` as a real process; killed at teardown if still alive. Its log goes to a
    file (``proc.log_path``), never to an unread pipe that would block the worker once full. It runs
    with MESH_RECONNECT_DELAY_S set to RECONNECT_DELAY_S unless ``extra_env`` says otherwise."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(*args: str, **extra_env: str) -> subprocess.Popen[bytes]:
        log_path = tmp_path / f"worker-{len(procs)}.log"
        extra_env = {"MESH_RECONNECT_DELAY_S": str(RECONNECT_DELAY_S), **extra_env}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "worker", *args],
                                    env=mesh_env(settings, **extra_env), cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=log)
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_started(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until a ``worker_process`` says in its log that it started: its consumers, its timers'
    loop and its sweeper run. A start (the interpreter, the mesh and the app imported) takes seconds
    on a loaded machine (13 s seen at a load average of 15): a test whose timed bound is not about
    that start waits for this before the bound counts. Fails at once if the process ended."""

    def started() -> bool:
        log = proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
        if proc.poll() is not None:
            raise AssertionError(f"worker {proc.pid} ended ({proc.returncode}) before it started: {log[-2000:]}")
        return '"msg":"worker started"' in log

    wait_for(started, timeout_s=timeout_s, interval_s=0.05)


#: ``mesh`` commands that start workers of their own (tests/tier.py): they run as a process, as deployed.
PROCESS_COMMANDS = WORKER_COMMANDS | {"ops"}

#: Settings of the interpreter itself: a command given one runs as a process, where they take effect.
INTERPRETER_ENV = ("PYTHON",)


def run_cli_process(settings: MeshSettings, *args: str, timeout: float = 60,
                    **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``python -m mesh.ops.cli ARGS`` as a process against ``settings``' namespace, stdin closed."""
    return subprocess.run([sys.executable, "-m", "mesh.ops.cli", *args], env=mesh_env(settings, **extra_env),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class _Stream(io.TextIOWrapper):
    """A captured standard stream: text over bytes in strict UTF-8, as a pipe is, and no terminal."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8", errors="strict", newline="\n",
                         write_through=True)

    def value(self) -> str:
        return self.buffer.getvalue().decode("utf-8")  # type: ignore[attr-defined]


def _set_environ(env: dict[str, str]) -> None:
    """Make ``os.environ`` ``env``, touching only the variables that differ (threads of the test,
    such as an in-process worker reading a tool's secret, never see the others go)."""
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


@contextmanager
def _as_a_process(env: dict[str, str]) -> Iterator[tuple[_Stream, _Stream]]:
    """What a ``mesh`` process would see, for one command run in this one: ``env`` as the whole
    environment, the repository as the current directory, stdin at end of file, stdout and stderr
    captured (and not a terminal), ``mesh``'s consoles plain and as wide as COLUMNS says (80 without
    it, a pipe's width). The logging the command sets up takes only its own records (not those of
    threads already running, such as a test's in-process worker), and is undone afterwards."""
    from mesh.ops import logs
    from mesh.ops.console import err, out

    stdout, stderr = _Stream(), _Stream()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    consoles = [(c, c._width, c._height, c._color_system) for c in (out, err)]
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in ("dramatiq", "dramatiq.worker.WorkerThread")]
    saved_logging = list(root.handlers), root.level, [logger.level for logger in loggers]
    setup_logging = logs.setup_logging
    others = {thread.ident for thread in threading.enumerate()} - {threading.get_ident()}

    def setup_own_logging(*args: Any, **kwargs: Any) -> None:
        setup_logging(*args, **kwargs)
        for handler in root.handlers:
            handler.addFilter(lambda record: record.thread not in others)

    _set_environ({"COLUMNS": "80", **env})
    os.chdir(ROOT)
    sys.stdin, sys.stdout, sys.stderr = _Stream(), stdout, stderr
    for console, *_ in consoles:
        console._width = console._height = console._color_system = None
    logs.setup_logging = setup_own_logging
    try:
        yield stdout, stderr
    finally:
        logs.setup_logging = setup_logging
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        os.chdir(saved_cwd)
        _set_environ(saved_env)
        for console, width, height, color_system in consoles:
            console._width, console._height, console._color_system = width, height, color_system
        root.handlers[:], root.level = saved_logging[0], saved_logging[1]
        for logger, level in zip(loggers, saved_logging[2], strict=True):
            logger.setLevel(level)


def run_cli(settings: MeshSettings, *args: str, timeout: float = 60,
            **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``mesh ARGS`` against ``settings``' namespace, run in this process through the entry point's
    own code (``mesh.ops.cli.invoke``) with what a process would see (see :func:`_as_a_process`): the
    same stdout, stderr and exit code, without the 0.6 s of CPU a process costs to start. Commands
    that start workers or serve (``worker``, ``demo``, ``soak``, ``bench``, ``ops``), and any given a
    PYTHON* variable, run as a process; so does ``run_cli_process``, for the tests of the entry
    point itself. ``timeout`` bounds only a process (pytest-timeout bounds the test)."""
    if (args and args[0] in PROCESS_COMMANDS and "--help" not in args) or any(
            name.startswith(INTERPRETER_ENV) for name in extra_env):
        return run_cli_process(settings, *args, timeout=timeout, **extra_env)
    from mesh.ops.cli import invoke

    with _as_a_process(mesh_env(settings, **extra_env)) as (stdout, stderr):
        try:
            invoke(list(args), prog_name="mesh")
            code: int = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
            if isinstance(exit_.code, str):
                sys.stderr.write(exit_.code + "\n")
        except Exception:
            traceback.print_exc()  # as the interpreter would, before exiting 1
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    return subprocess.CompletedProcess(["mesh", *args], code, stdout.value(), stderr.value())


@pytest.fixture
def cli(settings: MeshSettings) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``mesh ...`` against this test's namespace: ``cli(*args, **extra_env)`` returns a
    ``CompletedProcess`` (``returncode``, ``stdout``, ``stderr``). It runs in-process (see
    :func:`run_cli`), as a process would; ``cli_process`` runs a real one."""
    return functools.partial(run_cli, settings)


@pytest.fixture
def cli_process(settings: MeshSettings) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m mesh.ops.cli ...`` as a process against this test's namespace (the entry
    point itself: its exit codes, stdin closed); same interface as ``cli``."""
    return functools.partial(run_cli_process, settings)


@pytest.fixture(scope="module")
def redis_cluster_nodes() -> Iterator[Any]:
    """A real Redis Cluster (3 primaries, 3 replicas) on this worker's private ports, for one module's
    slow tests (see tests/cluster.py)."""
    from tests.cluster import redis_cluster
    with redis_cluster() as nodes:
        yield nodes


@pytest.fixture
def nodes(redis_cluster_nodes: Any) -> Any:
    """The module's Redis Cluster, every slot served (``wait_ok``) before the test starts."""
    redis_cluster_nodes.wait_ok()
    return redis_cluster_nodes
