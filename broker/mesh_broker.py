"""A dramatiq ``RedisBroker`` built from settings, with the mesh's consumer and middleware stack."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.message import Message
from dramatiq.middleware import Middleware, MiddlewareError, ShutdownNotifications

from mesh.contracts import OrjsonEncoder
from mesh.contracts.deadletter import Attempt, DeadLetter

from . import compat, lanes
from .claims import script_source
from .clock import DelayClock, ServerClock
from .connection import SLOT_ERRORS, HeldConnection, connect, is_cluster, may_hold, node_client, run_script
from .consumer import EagerSlot, MeshConsumer
from .deadline import Deadline
from .idempotency import Idempotency
from .jobs import JobStore
from .keys import Keys, shard_prefix
from .redact import redact
from .router import FailureRouter
from .settings import MeshSettings
from .time_limit import MeshTimeLimit

logger = logging.getLogger(__name__)

SETTLE_LUA = script_source("settle.lua", lanes.LIB)

#: How long an idle consumer of a stopping worker blocks between looks (s): it is woken when the stop
#: begins, and then must notice within this that dramatiq asked it to stop.
STOPPING_WAIT_S = 0.1
#: How long a stopping worker's wake-up tokens are kept (s): a consumer not blocked takes none.
STOP_TOKENS_TTL_S = 10
#: How long closing a broker waits for its stop-tokens push (a Redis that does not answer: given up then).
STOP_WAKE_JOIN_S = 2.0

#: dramatiq's dispatch.lua writes the caller's timestamp (ARGV[2]) as the worker's heartbeat on
#: every command (enqueue, ack, requeue, ...), and a heartbeat from a skewed host either gets a
#: live worker reaped (behind) or keeps a dead one alive (ahead). The mesh runs dramatiq's own
#: script with this prelude, which puts the Redis server's clock in ARGV[2] before the script reads
#: it. Chosen over routing the commands through settle.lua or a copy of dispatch.lua: every command
#: is covered, the script stays the installed dramatiq's, and no TIME round trip is added. (The
#: delay queue's due time is the message's own ``eta``, which the script does not read: it is
#: written on the server's clock too, see broker/clock.py.)
SERVER_CLOCK_PRELUDE = """local mesh_t = redis.call("time")
ARGV[2] = tonumber(mesh_t[1]) * 1000 + math.floor(tonumber(mesh_t[2]) / 1000)
"""
DISPATCH_LUA = SERVER_CLOCK_PRELUDE + resources.files("dramatiq.brokers").joinpath("redis/dispatch.lua").read_text()


class MeshBroker(RedisBroker):
    """dramatiq's Redis broker with the mesh's consumer, settle script and key layout."""

    def __init__(
        self,
        settings: MeshSettings,
        *,
        client: redis.Redis | None = None,
        records: redis.Redis | None = None,
        middleware: list[Middleware] | None = None,
        clock: Callable[[], int] = current_millis,
    ) -> None:
        #: Per hook name, the middleware as it was and those of it that define the hook (see ``_hooks``).
        self._hook_cache: dict[str, tuple[list[Middleware], list[Middleware]]] = {}
        client = client or queue_client(settings)
        #: The connection for claims and job records (``client`` is for fetching and settling).
        self.records = records or records_client(settings)
        super().__init__(
            # dramatiq's namespace is the prefix (``{ns}``, broker/keys.py): its keys are in the namespace's
            # hash slot, and the scripts it and the mesh run get it as their KEYS[1] (``self.namespace``).
            namespace=shard_prefix(settings.namespace, settings.shard),
            # Recovery runs deterministically in every fetch (settle.lua), not by chance.
            maintenance_chance=0,
            heartbeat_timeout=int(settings.heartbeat_timeout_s * 1000),
            middleware=middleware if middleware is not None else default_middleware(settings, self.records),
            client=client,
        )
        self.settings = settings
        # dramatiq's @actor refuses an option no middleware declares with a bare "undefined": let the
        # refused ones reach declare_actor, which names what the mesh does instead.
        self.actor_options |= set(compat.REFUSED)
        #: This host's clock (ms), sent where dramatiq's script layout has the caller's timestamp.
        self.clock = clock
        #: The Redis server's clock as this host reads it: due times and deadline checks.
        self.server_clock = ServerClock(self.records, local=clock)
        self.keys = Keys(settings.namespace, settings.shard)
        self.scripts["settle"] = self.client.register_script(SETTLE_LUA)
        self.scripts["dispatch"] = self.client.register_script(DISPATCH_LUA)
        #: The connection :meth:`settle`'s calls go on (a fetch, a group of acks), kept rather than checked
        #: out of the pool and back per call (see ``connection.HeldConnection``); None: the pool's own.
        self._settles = HeldConnection(self.client) if may_hold(self.client) else None
        self.host = socket.gethostname()
        self.pid = os.getpid()
        #: Per queue, the ids this process has handed to dramatiq and not yet settled (see consumer).
        self.in_hand: dict[str, set[str]] = {}
        #: Queues of agents whose steps write job records: their fetches read each message's record too.
        self.record_queues: set[str] = set()
        #: Set when a worker on this broker starts stopping (see ``emit_before``).
        self.stopping = threading.Event()
        #: Per thread, the connection its waits for wake-up tokens go on (see ``_blpop``).
        self._waits = threading.local()
        #: The dramatiq worker consuming through this broker (set as it boots): whose consumers a step's
        #: success may fetch its next step for (:meth:`eager_slot`).
        self.worker: Any = None
        #: Queues whose agents take flow limits before they run (FlowControl): no eager fetch for them
        #: (:meth:`eager_slot`); worked out at the first look, once the app's actors are declared.
        self._limited_queues: frozenset[str] | None = None
        #: Held while a step write that fetches for a consumer is on its way and its message is handed
        #: over, and by a consumer's reclaim: a reclaim never puts back a message on its way into hand.
        self.eager_lock = threading.Lock()

    def declare_actor(self, actor: dramatiq.Actor[Any, Any]) -> None:
        """dramatiq's declaration, refusing the actor options the mesh would silently ignore
        (:mod:`mesh.broker.compat`): ConfigError, naming the mesh's equivalent."""
        declared = {name for m in self.middleware for name in m.actor_options}
        compat.check_options(actor.actor_name, actor.options, declared)
        super().declare_actor(actor)

    def do_enqueue(self, queue_name: str, message_id: str, data: bytes) -> Any:
        """dramatiq's enqueue (``actor.send``, a delayed message coming due) into the message's lane
        (broker/lanes.py), with the wake-up token, in one script call."""
        if queue_name.endswith(".DQ"):
            return self._dispatch("enqueue")(queue_name, message_id, data)
        return self.settle("push", queue_name, message_id, data)

    def _dispatch(self, command: str) -> Callable[..., Any]:
        """dramatiq's dispatch (see SERVER_CLOCK_PRELUDE), sending this broker's clock as the caller's
        timestamp, which the script replaces with the server's."""
        dispatch, keys = self.scripts["dispatch"], [self.namespace]

        def do_dispatch(queue_name: str, *args: Any) -> Any:
            return run_script(dispatch, keys, [
                command, self.clock(), queue_name, self.broker_id, self.heartbeat_timeout, self.dead_message_ttl,
                self._should_do_maintenance(command), self._max_unpack_size(), *args])

        return do_dispatch

    def wait_for_work(self, queue_name: str, timeout_s: float) -> bool:
        """Block until a wake-up token for ``queue_name`` arrives or ``timeout_s`` passes. A consumer
        of a stopping worker is woken by its own token and from then on blocks only briefly, so
        stopping a worker does not wait out an idle consumer's block."""
        if self.stopping.is_set():
            timeout_s = min(timeout_s, STOPPING_WAIT_S)
        keys = [self.keys.wake(queue_name), self.keys.stop(self.broker_id)]
        if not is_cluster(self.client) and self.client.connection is not None:  # a single-connection client
            return self.client.blpop(keys, timeout=timeout_s) is not None
        return self._blpop(keys, timeout_s) is not None

    def _blpop(self, keys: list[str], timeout_s: float) -> Any:
        """BLPOP on a connection the calling thread keeps for its waits, not one checked out of the pool
        for each: the pool's check of a connection it hands out polls the socket, a system call that
        releases the GIL, and a consumer that has just handed a message to a worker thread would lose the
        GIL to that thread there and block only after the thread's pick-up (its drop request waits out
        the interpreter's switch interval, 5 ms). The connection's replies are always read in full, or
        it is dropped. A kept connection that fails (the server closed it meanwhile) is connected again
        and the wait sent once more: a token taken by the lost wait costs one ``WAIT_S`` at most, as a
        message pushed without a token does.

        On a cluster, the connection is one to the primary of the keys' slot (kept while the slot stays
        there); a node that does not serve the slot (any more), or fails, and the wait goes the cluster
        client's own way once, which learns where the slot went."""
        cluster = is_cluster(self.client)
        pool = node_client(self.client, keys[0]).connection_pool if cluster else self.client.connection_pool
        held = getattr(self._waits, "connection", None)
        if held is not None and (held.pid != os.getpid() or getattr(self._waits, "pool", pool) is not pool):
            if held.pid == os.getpid():  # kept for another node's slot: given back
                self._waits.pool.release(held)
            held = None  # else kept by the process this one was forked from
        try:
            conn = held or pool.get_connection()  # checked by the pool once
        except redis.ConnectionError:
            if not cluster:
                raise
            self._waits.__dict__.pop("connection", None)
            return self.client.blpop(keys, timeout=timeout_s)
        self._waits.connection, self._waits.pool = conn, pool
        for attempt in (1, 2):
            try:
                conn.send_command("BLPOP", *keys, timeout_s)
                return conn.read_response()
            except SLOT_ERRORS:
                if not cluster:
                    raise
                return self.client.blpop(keys, timeout=timeout_s)
            except redis.ConnectionError:
                conn.disconnect()  # connected again by the next send
                if cluster:
                    return self.client.blpop(keys, timeout=timeout_s)
                if attempt == 2 or held is None:
                    raise
            except BaseException:  # a reply half read: the connection goes
                conn.disconnect()
                raise
        return None

    def wait_then_fetch(self, queue_name: str, timeout_s: float, *fetch: Any) -> tuple[bool, Any]:
        """:meth:`wait_for_work`, then ``settle("fetch", queue_name, *fetch)`` at once, whether a token
        ended the block or ``timeout_s`` did: whether a token ended it, and the fetch's answer. (The
        fetch is not queued behind the block on the same connection: Redis would run it whenever the
        block ends, also on a connection being cut, and what it took, messages and claims, would never
        reach this worker.)"""
        return self.wait_for_work(queue_name, timeout_s), self.settle("fetch", queue_name, *fetch)

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """dramatiq's hook dispatch, plus the broker's own part of a worker's boot and stop."""
        if signal == "worker_boot":
            self.stopping.clear()
            self.worker = args[0] if args else None
            self._limited_queues = None  # worked out again from what is declared now
        elif signal == "worker_shutdown":
            queues = getattr(args[0], "consumers", {}) if args else {}
            self._wake_for_stop(sum(1 for queue in queues if not queue.endswith(".DQ")))
        elif signal == "consumer_thread_shutdown":
            # Sent from the stopping consumer thread itself: the connection its waits kept goes back to
            # the pool, or it would stay checked out (and open) for as long as the broker lives.
            conn = self._waits.__dict__.pop("connection", None)
            if conn is not None:
                self._waits.pool.release(conn)
        name = "before_" + signal
        hooks = self._hooks(name)
        if hooks is None:
            return super().emit_before(signal, *args, **kwargs)
        for middleware in hooks:  # as dramatiq's emit_before
            try:
                getattr(middleware, name)(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", name, middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        """dramatiq's hook dispatch, the middleware's hooks in reverse order."""
        if signal == "worker_shutdown" and self._settles is not None:
            # Every thread of the worker has stopped: the connection its settlements kept goes back to the
            # pool, not held for as long as the broker lives (a worker started again takes one again).
            self._settles.give_back()
        name = "after_" + signal
        hooks = self._hooks(name)
        if hooks is None:
            return super().emit_after(signal, *args, **kwargs)
        for middleware in reversed(hooks):  # as dramatiq's emit_after
            try:
                getattr(middleware, name)(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", name, middleware, exc_info=True)

    def _hooks(self, name: str) -> list[Middleware] | None:
        """The middleware whose hook ``name`` is its own, in the middleware's order: dramatiq calls every
        middleware's, and most are :class:`Middleware`'s no-op (a message goes through four signals,
        each through every middleware). Worked out again whenever the middleware changes; None for a
        hook :class:`Middleware` does not define (dramatiq's dispatch then runs as it is)."""
        cached = self._hook_cache.get(name)
        if cached is not None and cached[0] == self.middleware:
            return cached[1]
        noop = getattr(Middleware, name, None)
        if noop is None:
            return None
        # One copy, both looked through and noted: middleware another thread adds meanwhile makes the
        # list differ from the noted one (worked out again next time), never noted with hooks without it.
        middleware = list(self.middleware)
        hooks = [m for m in middleware
                 if getattr(type(m), name, noop) is not noop or name in getattr(m, "__dict__", ())]
        self._hook_cache[name] = (middleware, hooks)
        return hooks

    #: The stop-tokens push :meth:`_wake_for_stop` starts, joined by :meth:`close` (at most STOP_WAKE_JOIN_S).
    _stop_wake: threading.Thread | None = None

    def _wake_for_stop(self, consumers: int) -> None:
        """As a worker's stop begins, wake its idle consumers, each blocked on Redis for up to
        ``WAIT_S``: otherwise every stop (a deploy, a SIGTERM) waits that out. The tokens are pushed
        from a thread of their own, so an unresponsive Redis cannot hold up the stop."""
        self.stopping.set()
        self._stop_wake = threading.Thread(target=self._push_stop_tokens, args=(max(consumers, 1),),
                                           name="mesh-stop-wake", daemon=True)
        self._stop_wake.start()

    def _push_stop_tokens(self, n: int) -> None:
        stop = self.keys.stop(self.broker_id)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.rpush(stop, *([1] * n))
                pipe.expire(stop, STOP_TOKENS_TTL_S)
                pipe.execute()
        except redis.RedisError as exc:  # then the stop waits out the block, as it did before
            logger.warning("could not wake the consumers for the stop", extra={"error": str(exc)})

    def close(self) -> None:
        if self._stop_wake is not None:  # its push done (or given up) before the connections it uses close
            self._stop_wake.join(STOP_WAKE_JOIN_S)
        super().close()
        self.client.close()
        self.records.close()

    def eager_slot(self, queue_name: str) -> EagerSlot | None:
        """A place in the window of this worker's consumer of ``queue_name`` for the message a step's
        success write fetches for it (see :class:`~mesh.broker.consumer.EagerSlot`); None when this
        process consumes no such queue with room, or its worker is stopping."""
        worker = self.worker
        if worker is None or self.stopping.is_set() or queue_name in self.limited_queues():
            return None
        thread = worker.consumers.get(queue_name)
        consumer = getattr(thread, "consumer", None)
        if not isinstance(consumer, MeshConsumer) or not thread.running or thread.paused:
            return None
        return consumer.reserve(thread)

    def limited_queues(self) -> frozenset[str]:
        """The queues whose agents take flow limits before they run (their FlowControl plan): a success
        fetches no next step for them, which goes by its wake-up token and a fetch. (The step lets go
        of its slots before its success's write, ``limits.let_go``, so such a next step would find its
        slot free either way; with the eager fetch on for them, a limited agent's pipeline measured no
        faster: docs/performance.md, "A limited agent's next step finds its slot free".)"""
        if self._limited_queues is None:
            from .flow_control import FlowControl

            plan = next((m.plan for m in self.middleware if isinstance(m, FlowControl)), {})
            self._limited_queues = frozenset(actor.queue_name for name, actor in self.actors.items()
                                             if name in plan)
        return self._limited_queues

    @property
    def consumer_class(self) -> type[MeshConsumer]:
        return MeshConsumer

    def settle(self, command: str, queue_name: str, *args: Any) -> Any:
        """Run one command of ``settle.lua`` for this worker on ``queue_name``."""
        return run_script(self.scripts["settle"], [self.namespace],
                          [command, self.clock(), queue_name, self.broker_id, self.heartbeat_timeout, *args],
                          self._settles)

    def dead_letter_entry(
        self, message: Message, failure_class: str, error: str, traceback: str | None, *,
        dependency: str | None = None,
    ) -> DeadLetter:
        """Everything the DLQ keeps about ``message``, whose last attempt failed with ``error``
        (``dependency``: the one the failure names, when it names one)."""
        envelope = message.args[0] if message.args and isinstance(message.args[0], dict) else None
        env = envelope or {}
        error = redact(error)  # the entry's and its last attempt's: some callers pass an exception's raw text
        history = []
        for a in message.options.get("mesh_attempts", []) or []:
            try:
                history.append(Attempt.model_validate(a))
            except ValueError:  # a malformed record from elsewhere: the entry is still written
                continue
        history.append(
            Attempt(
                attempt=int(env.get("attempt", 1)) if isinstance(env.get("attempt", 1), int) else 1,
                outcome="dead_lettered",
                failure_class=failure_class,
                error=error,
                at=current_millis() / 1000,
                worker=self.worker_label,
            )
        )
        return DeadLetter(
            entry_id=message.message_id,
            queue=message.queue_name,
            agent=message.actor_name,
            failure_class=failure_class,
            error=error,
            traceback=redact(traceback) if traceback else None,
            envelope=envelope,
            key=_str(env.get("key")),
            job_id=_str(env.get("job_id")),
            trace_id=_str(env.get("trace_id")),
            attempts=tuple(history),
            worker=self.worker_label,
            host=self.host,
            replay_of=_str(env.get("replay_of")),
            replay_count=int(message.options.get("mesh_replays", 0) or 0),
            dependency=dependency,
        )

    @property
    def worker_label(self) -> str:
        return f"{self.host}:{self.pid}:{self.broker_id[:8]}"


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def queue_client(settings: MeshSettings) -> redis.Redis:
    """The connection the broker fetches and settles on. redis-py's automatic retry is off: a fetch
    re-sent after a lost reply would strand its first batch, while a surfaced error makes dramatiq
    rebuild the consumer, which reclaims whatever the lost connection left behind."""
    return connect(settings, retries=False)


def records_client(settings: MeshSettings) -> redis.Redis:
    """The connection for claims, leases, breakers and job records: their commands are safe to
    re-send (claims are idempotent per owner, job writes are WATCH/MULTI transactions), so a
    dropped connection or a restarting Redis is retried for a few seconds before anything fails."""
    return connect(settings, retries=True)


def default_middleware(settings: MeshSettings, client: redis.Redis) -> list[Middleware]:
    """The mesh's stack, in order. ``client`` serves claims and job records (its commands are safe
    to re-send). No dramatiq ``Retries``: the FailureRouter decides every failed message's fate."""
    return [
        ShutdownNotifications(),
        FailureRouter(settings, JobStore(client, Keys(settings.namespace, settings.shard), settings.job_retention_s,
                                         settings.dead_letter_job_retention_s)),
        Idempotency(settings, client),
        Deadline(settings),
        DelayClock(),
        # Last, so its after-hook (run first) cancels the timer before the router does any work; raises
        # only while the limit stands (broker/time_limit.py).
        MeshTimeLimit(time_limit=int(settings.time_limit_s * 1000)),
    ]


def build_broker(settings: MeshSettings, *, client: redis.Redis | None = None) -> MeshBroker:
    """A broker for ``settings``, installed as dramatiq's global broker with the orjson encoder.
    ``client`` (default: a new one) serves the middleware's claims and job records. The encoder is
    the process's, shared with dramatiq's result backends: it takes any JSON value (see
    :class:`~contracts.OrjsonEncoder`)."""
    dramatiq.set_encoder(OrjsonEncoder())
    broker = MeshBroker(settings, records=client or records_client(settings))
    dramatiq.set_broker(broker)
    return broker
