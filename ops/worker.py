"""Running agents: one worker process, or a supervisor of several."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import typing
from collections.abc import Callable
from typing import Any

import dramatiq
import dramatiq.worker
import redis
import tenacity
from dramatiq import Worker
from pydantic import BaseModel
from pydantic.errors import PydanticInvalidForJsonSchema

from mesh.agents.app import AgentSpec, App, load_app
from mesh.agents.runtime import AgentRuntime, declare_app
from mesh.broker.keys import Keys
from mesh.broker.layout import check_layout
from mesh.broker.mesh_broker import MeshBroker, build_broker
from mesh.broker.registry import PublishedAgent, Registry
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards, check_shards
from mesh.contracts import ConfigError
from mesh.ops.sweeper import Sweeper
from mesh.ops.timer_loop import TimerLoop

logger = logging.getLogger(__name__)

#: How long an idle consumer waits between polls of an empty queue (ms).
IDLE_POLL_MS = 100

#: dramatiq's waits after a lost connection (s): before a consumer is rebuilt, before a settlement is
#: re-sent. MESH_RECONNECT_DELAY_S replaces both; unset, these stand.
DRAMATIQ_DELAYS = (dramatiq.worker.CONSUMER_RESTART_DELAY_SECS, dramatiq.worker.POST_PROCESS_MESSAGE_RETRY_DELAY_SECS)


def flow_control(broker: Any, settings: MeshSettings, app: App) -> None:
    """The app's flow limits taken before each message's claim (nothing when it declares none)."""
    from mesh.agents.flow import flow_plan
    from mesh.broker.flow_control import FlowControl
    from mesh.broker.idempotency import Idempotency
    from mesh.broker.limits import Limiter

    declared, plan = flow_plan(app)
    if plan:
        broker.add_middleware(FlowControl(Limiter(settings, broker.records, declared), plan, app.flow_key),
                              before=Idempotency)


def start_worker(settings: MeshSettings, agents: list[str] | None, threads: int, app: App | str | None = None
                 ) -> MeshWorker | ShardWorkers:
    """Build the broker, declare the app's ``agents`` (default: all of them) on it, publish them
    (``mesh agents``) and start consuming their queues in this process. ``app``: an App, an import
    path (``pkg.module:app``) or None for the built-in planner, researcher and executor.

    With MESH_SHARDS > 1, one set of consumers per shard (:class:`ShardWorkers`): each shard's broker,
    runtime, timers' loop, sweeper and flow control, built from the settings as that shard sees them
    (``settings.on_shard``), and a worker of its own with :func:`shard_threads` of ``threads``; one
    worker id (its heartbeat in every shard) and one publication for the process."""
    app = load_app(app) if isinstance(app, str) else app or builtin_app()
    check_served(app, agents, settings)
    reconnect_delays(settings.reconnect_delay_s)
    shards = Shards.of(settings)
    numbers = [keys.shard for keys in shards.keys]  # from 1 with several: shard 0 is the fleet-wide keys' slot
    home = settings.on_shard(numbers[0]) if shards.many else settings
    broker = build_broker(home)
    try:  # one round trip: data of an older key layout left unmigrated is refused, not served around
        stray = check_layout(broker.client, settings.namespace)
        check_shards(broker.records, shards, record=True)  # another count than the namespace's: refused
    except ConfigError:
        broker.close()
        raise
    if stray:
        logger.warning("keys of the older key layout written since the namespace was migrated: a worker or client of "
                       "the older release still runs on it, unseen; stop it and run `mesh migrate` again",
                       extra={"namespace": settings.namespace, "old_keys": stray})
    worker: MeshWorker | ShardWorkers
    if not shards.many:
        worker, runtime, actors = _consumers(broker, home, app, agents, threads)
    else:
        brokers = [broker]
        try:
            for shard in numbers[1:]:
                brokers.append(build_broker(settings.on_shard(shard)))
                # One worker id for the process: its heartbeat in every shard, the registry's entry under it.
                brokers[-1].broker_id = broker.broker_id
            per_shard = shard_threads(threads, shards.count)
            built = [_consumers(b, b.settings, app, agents, per_shard) for b in brokers]
        except BaseException:
            for b in brokers:
                b.close()
            raise
        dramatiq.set_broker(broker)  # the process's global broker: the first shard's, as with one shard
        runtime, actors = built[0][1], built[0][2]
        worker = ShardWorkers([w for w, _, _ in built])
    entries = [published(runtime.app.agents[a.actor_name], runtime.app.name) for a in actors]
    stopped = threading.Event()  # set as the worker stops: a publication not made by then is given up
    publisher = threading.Thread(target=_publish, args=(registry(home, broker), broker.broker_id,
                                                        broker.worker_label, entries, runtime.app.name),
                                 kwargs={"stopped": stopped, "shards": shards}, name="mesh-publish", daemon=True)
    publisher.start()
    if runtime.app.mcp_servers:  # pin the MCP tools the served agents call: in the background, as publishing
        threading.Thread(target=_register_mcp, args=(runtime.app, [a.actor_name for a in actors], home, broker),
                         name="mesh-mcp-register", daemon=True).start()
    worker.publication = (publisher, stopped)
    for w in worker.workers if isinstance(worker, ShardWorkers) else [worker]:
        w.broker.emit_after("process_boot")  # as dramatiq's CLI does: starts TimeLimit's timer thread
        w.start()
    return worker


def _consumers(broker: MeshBroker, settings: MeshSettings, app: App, agents: list[str] | None, threads: int
               ) -> tuple[MeshWorker, AgentRuntime, list[Any]]:
    """What consumes one shard's queues (``settings``: as that shard sees them) through ``broker``: its
    sweeper, runtime, timers' loop, flow control and the app's actors, and a worker (not started)."""
    broker.add_middleware(Sweeper(settings, broker.records))  # retention, on its own schedule
    runtime = AgentRuntime.from_settings(settings, broker.records, app)
    broker.add_middleware(TimerLoop(settings, broker.records, runtime.timer_handlers()))  # durable timers
    flow_control(broker, settings, runtime.app)
    actors = declare_app(broker, runtime, agents)
    queues = {actor.queue_name for actor in actors}
    worker = MeshWorker(broker, queues=queues, worker_threads=threads, worker_timeout=IDLE_POLL_MS,
                        tenant_queues=set() if settings.prefetch else tenant_queues(runtime.app, actors))
    if settings.prefetch:
        worker.queue_prefetch = settings.prefetch
    return worker, runtime, actors


def shard_threads(threads: int, shards: int) -> int:
    """Each shard's worker threads when a process serving ``shards`` shards is given ``threads``: an even
    share, rounded up (at least one). A dramatiq worker's threads run only its own consumers' messages,
    so each shard has its share to itself: a burst on one shard never holds the threads another's jobs
    need. Rounded up, so the process never runs fewer than ``threads`` (at most ``shards - 1`` more)."""
    return max(1, -(-threads // shards))


class ShardWorkers:
    """The workers of a process serving several shards (MESH_SHARDS > 1), one :class:`MeshWorker` per
    shard, in shard order, used as one: started and stopped together. ``broker`` is the first shard's
    (its id is the process's worker id; every shard's broker heartbeats under it)."""

    def __init__(self, workers: list[MeshWorker]) -> None:
        self.workers = workers
        #: the thread publishing the worker's agents and the event that ends its tries (start_worker, withdraw)
        self.publication: tuple[threading.Thread, threading.Event] | None = None

    @property
    def broker(self) -> MeshBroker:
        return typing.cast(MeshBroker, self.workers[0].broker)

    @property
    def brokers(self) -> list[MeshBroker]:
        """Each shard's broker, in shard order."""
        return [typing.cast(MeshBroker, w.broker) for w in self.workers]

    @property
    def worker_threads(self) -> int:
        return sum(w.worker_threads for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def pause(self) -> None:
        for w in self.workers:
            w.pause()

    def resume(self) -> None:
        for w in self.workers:
            w.resume()

    def join(self) -> None:
        for w in self.workers:
            w.join()

    def stop(self, timeout: int = 600_000) -> None:
        """Stop every shard's worker, all at once (each within ``timeout`` ms, as one worker's stop):
        each puts the messages it fetched and did not start back in its shard's queues."""
        stops = [threading.Thread(target=w.stop, kwargs={"timeout": timeout}, name="mesh-stop-shard")
                 for w in self.workers]
        for t in stops:
            t.start()
        for t in stops:
            t.join()

    def close(self) -> None:
        """Close every shard's broker (after :meth:`stop`)."""
        for b in self.brokers:
            b.close()


class MeshWorker(Worker):
    """dramatiq's worker, with a prefetch of one message per thread on the queues of agents whose
    messages carry a tenant's key (``tenant_queues``) rather than twice that: the fetch serves tenants
    round robin, but what a worker already holds runs first, so another tenant's job waits behind one
    prefetch of a burst (with steps of 100 ms and the default, up to two rounds: ~200 ms; with one
    per thread, one round). MESH_PREFETCH, when set, is used for every queue."""

    def __init__(self, *args: Any, tenant_queues: set[str] | frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tenant_queues = tenant_queues
        #: the thread publishing the worker's agents and the event that ends its tries (start_worker, withdraw)
        self.publication: tuple[threading.Thread, threading.Event] | None = None

    def _add_consumer(self, queue_name: str, *, delay: bool = False) -> None:
        if delay or queue_name not in self.tenant_queues:
            return super()._add_consumer(queue_name, delay=delay)
        default, self.queue_prefetch = self.queue_prefetch, max(1, self.worker_threads)
        try:
            super()._add_consumer(queue_name, delay=delay)
        finally:
            self.queue_prefetch = default


def tenant_queues(app: App, actors: list[Any]) -> set[str]:
    """The queues of ``actors`` whose agents key their limits by tenant (a rate's or a concurrency's
    ``key``): their messages go to per-tenant lanes (broker/lanes.py)."""
    out = set()
    for actor in actors:
        limits = app.agents[actor.actor_name].limits
        if limits is not None and any(part is not None and part.key for part in (limits.rate, limits.concurrency)):
            out.add(actor.queue_name)
    return out


def check_served(app: App | None, agents: list[str] | None, settings: MeshSettings) -> None:
    """Refuse to serve ``agents`` (default: all) of ``app`` (None: the built-in one) when every call
    would fail on a mistake of the deployment: an agent naming an undeclared tool, a tool naming an
    undeclared one to undo its calls, a secret of a tool they call that is not set (or too short to
    mask). A ConfigError naming the agent, tool and secret, before the worker connects anywhere, rather
    than a first call dead-lettered. Only the worker serving the agent needs its tools' secrets."""
    from mesh.agents.context import read_secret

    app = app or builtin_app()
    app.check()
    names = list(app.agents) if agents is None else [a for a in agents if a in app.agents]
    for tool, agent in app.tools_of(names).items():
        for secret in app.tools[tool].secrets:
            try:
                read_secret(secret, settings.secrets_dir)
            except ConfigError as exc:
                raise ConfigError(f"agent {agent!r} calls tool {tool!r}: {exc}", **exc.context, tool=tool) from None


def builtin_app() -> App:
    """The built-in planner, researcher and executor: loaded here, where a worker serves them (a
    bare ``mesh worker``, ``--agents planner``), as any app is; the runtime knows no app of its own."""
    from mesh.agents.builtin import app

    return app


def reconnect_delays(delay_s: float | None) -> None:
    """Set how long dramatiq waits after a lost Redis connection before it rebuilds a consumer and
    before it re-sends a settlement (MESH_RECONNECT_DELAY_S; None: dramatiq's own). They are module
    globals of ``dramatiq.worker``, read at each wait, so they hold for every worker of the process."""
    restart_s, resend_s = DRAMATIQ_DELAYS if delay_s is None else (delay_s, delay_s)
    dramatiq.worker.CONSUMER_RESTART_DELAY_SECS = restart_s
    dramatiq.worker.POST_PROCESS_MESSAGE_RETRY_DELAY_SECS = resend_s  # type: ignore[assignment]  # an int there


#: How often a worker's main thread wakes to run the handler of a SIGTERM or SIGINT another thread received (s).
SIGNAL_POLL_S = 0.2


def run_worker(settings: MeshSettings, agents: list[str] | None, threads: int, app: str | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully: in-memory messages go back to their queues."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = start_worker(settings, agents, threads, app)
    logger.info("worker started", extra={"app": app or "builtin", "agents": ",".join(agents or ["all"]),
                                         "threads": threads, "pid": os.getpid(),
                                         "namespace": settings.namespace,
                                         **({"shards": settings.shards, "threads_per_shard": worker.workers[0]
                                             .worker_threads} if isinstance(worker, ShardWorkers) else {})})
    # Woken now and then: a signal the kernel gives another of the process's threads runs its Python handler
    # only once the main thread runs Python again, and a wait with no end ran none (the worker served on
    # after a SIGTERM until a second one reached the main thread).
    while not stop.wait(SIGNAL_POLL_S):
        pass
    logger.info("worker stopping", extra={"pid": os.getpid()})
    worker.stop(timeout=30_000)
    brokers = worker.brokers if isinstance(worker, ShardWorkers) else [typing.cast(MeshBroker, worker.broker)]
    withdraw(registry(brokers[0].settings, brokers[0]), brokers[0].broker_id, worker.publication)
    for broker in brokers:  # each shard's heartbeat
        try:
            sign_off(broker)
        except redis.RedisError as exc:  # then its heartbeat just ages out (MESH_HEARTBEAT_TIMEOUT_S)
            logger.warning("could not remove the worker's heartbeat", extra={"error": str(exc),
                                                                              "shard": broker.keys.shard})
    for broker in brokers:
        broker.close()
    return 0


def withdraw(reg: Registry, worker_id: str, publication: tuple[threading.Thread, threading.Event] | None,
             timeout_s: float = 10.0, again_s: float | None = None) -> None:
    """The stopping worker's agents unpublished, as the last word: the tries of its publication
    (``publication``, start_worker's) are ended first, and a try still under way past ``timeout_s``
    (Redis stalled: a fork's pause, a partition; the unpublish waits on it too) is waited for again
    once the unpublish is through (for ``again_s``, by default ``timeout_s``), and the unpublish made
    again: that try's later round trips came after the unpublish's, and its publication (with a
    heartbeat) listed the stopped worker as alive."""
    thread = None
    if publication is not None:
        thread, stopped = publication
        stopped.set()
        thread.join(timeout_s)
    # Whether a try was still under way as the unpublish began, asked before it: a try that ends while
    # the unpublish waits on Redis (its later round trips answered first, or after) is one to undo too.
    late = thread is not None and thread.is_alive()
    _unpublish(reg, worker_id)
    if late and thread is not None:
        thread.join(timeout_s if again_s is None else again_s)
        if thread.is_alive():
            logger.warning("the worker's publication still waits on Redis as it stops: it may list the worker "
                           "until its heartbeat ages out", extra={"worker": worker_id})
        else:
            _unpublish(reg, worker_id)


def _unpublish(reg: Registry, worker_id: str) -> None:
    try:
        reg.unpublish(worker_id)
    except redis.RedisError as exc:  # its heartbeat stops anyway: listed as dead, pruned later
        logger.warning("could not unpublish the worker", extra={"error": str(exc)})


#: KEYS: heartbeats zset, the worker's held-queues set; ARGV: worker id, its acks key prefix.
_SIGN_OFF = """
for _, queue in ipairs(redis.call("smembers", KEYS[2])) do
    if redis.call("scard", ARGV[2] .. queue) > 0 then
        redis.call("zadd", KEYS[1], 0, ARGV[1])
        return 0
    end
end
redis.call("zrem", KEYS[1], ARGV[1])
redis.call("del", KEYS[2])
return 1
"""


def sign_off(broker: MeshBroker) -> bool:
    """A worker that stopped gracefully says so: its heartbeat is removed, so /readyz and ``mesh
    agents`` see it gone now rather than a heartbeat timeout later. Should it still hold unsettled
    messages (its stop timed out), its heartbeat is aged instead, so the next worker's maintenance
    returns them to their queues at once. True when it held nothing. Call after its consumers stopped."""
    keys = broker.keys
    held = keys.held(broker.broker_id)  # written by settle.lua, which names it so
    return bool(broker.client.eval(_SIGN_OFF, 2, keys.heartbeats, held, broker.broker_id,
                                   keys.acks(broker.broker_id, "")))


#: The waits between tries of the worker's publication while Redis refuses it: 0.1s, doubling, at
#: most 5s (tenacity: ``0.1 * 2 ** (try - 1)``, capped).
PUBLISH_WAIT = tenacity.wait_exponential(multiplier=0.1, max=5.0)


def _publish(reg: Registry, worker_id: str, label: str, entries: list[PublishedAgent], app: str, *,
             sleep: Callable[[float], None] | None = None, stopped: threading.Event | None = None,
             shards: Shards | None = None) -> None:
    """Publish the worker's agents; while Redis refuses (down, OOM, read-only) the worker serves
    anyway and the publication is retried with backoff (:data:`PUBLISH_WAIT`) until it is made, so a
    deploy never waits on it, or until ``stopped`` is set (the worker stops: a publication landing
    after its unpublish would list a stopped worker, with a heartbeat). Any other error ends the tries."""
    stop = stopped or threading.Event()

    def wait(seconds: float) -> None:  # cut short by the stop
        stop.wait(seconds)

    def attempt() -> None:
        if stop.is_set():
            raise _Stopped
        reg.publish(worker_id, label, entries, app=app,
                    shards=[keys.shard for keys in shards.keys] if shards is not None else ())

    retrying = tenacity.Retrying(retry=tenacity.retry_if_exception_type(redis.RedisError), wait=PUBLISH_WAIT,
                                 stop=tenacity.stop_when_event_set(stop), before_sleep=_publish_failed,
                                 sleep=sleep or wait, reraise=True)
    try:
        retrying(attempt)
    except (_Stopped, redis.RedisError):
        if not stop.is_set():
            raise
        logger.warning("the worker stopped before its agents could be published", extra={"worker": label})


class _Stopped(Exception):
    """The worker stopped before its publication was made: no more tries."""


def _publish_failed(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else None
    logger.warning("could not publish the worker's agents; retrying", extra={"error": str(exc), "retry_in_s": wait})


def _register_mcp(app: App, agents: list[str], settings: MeshSettings, broker: MeshBroker) -> None:
    """The worker's first registration of the MCP servers its agents use: each allowed tool's
    definition pinned, or checked against its pin (see :mod:`mesh.agents.tools.pins`)."""
    from mesh.agents.tools.mcp import register_servers
    from mesh.agents.tools.pins import Pins

    try:
        register_servers(app, app.tools_of(agents), Pins(broker.records, Keys(settings.namespace, settings.shard)),
                         settings.secrets_dir)
    except Exception as exc:  # a call connects and pins again: never the worker's end
        logger.warning("could not register the MCP servers", extra={"error": str(exc)})


def registry(settings: MeshSettings, broker: MeshBroker) -> Registry:
    return Registry(broker.records, Keys(settings.namespace, settings.shard), settings.heartbeat_timeout_s)


def published(spec: AgentSpec, app: str = "") -> PublishedAgent:
    """How a declared agent of ``app`` is published: its queue, contract version, models as JSON Schema, tools."""
    return PublishedAgent(name=spec.name, queue=spec.queue, version=spec.version, input_schema=_schema(spec.input),
                          output_schema=_schema(spec.output), tools=spec.tools, description=spec.description,
                          app=app)


def _schema(model: type[BaseModel]) -> dict[str, Any] | None:
    try:
        return model.model_json_schema()
    except PydanticInvalidForJsonSchema:  # a field type JSON Schema cannot say: clients need the app
        return None


def supervise(agents: list[str] | None, processes: int, threads: int, app: str | None = None) -> int:
    """Start ``processes`` worker processes and forward SIGTERM/SIGINT to them."""
    cmd = [sys.executable, "-m", "mesh.ops.cli", "worker", "--processes", "1", "--threads", str(threads)]
    if agents:
        cmd += ["--agents", ",".join(agents)]
    if app:
        cmd += ["--app", app]
    children = [subprocess.Popen(cmd) for _ in range(processes)]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
