"""Idempotency: every message claims its key before it runs, so at-least-once delivery applies
each effect once.

absent → claimed with a lease and run; held by a live owner → the duplicate is deferred;
lease expired (owner died) → taken over with a higher fencing token; done → acked as a
duplicate. Leases are renewed while handlers run; a success stores ``done`` with the result,
a failure frees the key for the next attempt. Each phase is one call of ``scripts/claim.lua``.

The round trips are the cost, so the common ones ride on calls the consumer makes anyway: the
fetch claims the key of every message it fetches, in the same script (:meth:`Idempotency.adopt`
takes the claims on; the leases are renewed while the messages wait for a thread), and a
success's ``done`` is stored by the ack that settles the message (:func:`done_args`), in the same
script.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from dramatiq.broker import Broker, MessageProxy
from dramatiq.middleware import Middleware, SkipMessage

from mesh.contracts import TERMINAL, FailureClass, loads
from mesh.contracts.jobs import is_compensation

from . import claim_results, claims, trace
from .claims import script_source
from .clock import server_now_ms
from .keys import Keys
from .observe import count_outcome
from .router import dead_letter_with_step, full_jitter_ms
from .settings import MeshSettings
from .settle import RetryLater, decide, delayed_copy
from .shared_claims import SharedClaim, SharedClaims

logger = logging.getLogger(__name__)

CLAIM_LUA = script_source("claim.lua")

#: Bounds of the wait before a deferred duplicate looks again (ms): short, since owners usually finish.
DEFER_MIN_MS, DEFER_MAX_MS = 100, 2_000


@dataclass
class Lease:
    """A claim this process holds on a message key, and how the attempt should settle it."""

    key: str
    claim_key: str
    owner: str
    token: int
    #: What ``done`` stores: the handler's result. None with ``done=False`` frees the key instead.
    result: dict[str, Any] | None = None
    done: bool = True
    lost: bool = field(default=False, compare=False)
    #: ``time.monotonic()`` when the request that last confirmed the claim in Redis (the claim, a
    #: renewal, a check before an effect) was sent: the lease runs at least a lease from then.
    confirmed_at: float = field(default_factory=time.monotonic, compare=False)
    #: ``time.monotonic()`` at the claim, and at the handler's last progress report.
    started: float = field(default_factory=time.monotonic, compare=False)
    progress: int = field(default=0, compare=False)
    progress_at: float = field(default_factory=time.monotonic, compare=False)
    stuck: bool = field(default=False, compare=False)
    #: The handler runs (False: claimed by the fetch, waiting for a thread; never counted as stuck).
    running: bool = field(default=True, compare=False)
    envelope: dict[str, Any] = field(default_factory=dict, compare=False)
    #: The release of a failed attempt did not reach Redis: the settlement frees the key instead.
    release_pending: bool = field(default=False, compare=False)
    #: Effects this attempt applied (an effectful tool returned): the attempt may not be run blindly again.
    effects: int = field(default=0, compare=False)
    #: An output computed by an earlier attempt whose recording Redis refused: recorded, not recomputed.
    recorded_output: dict[str, Any] | None = field(default=None, compare=False)
    #: Model tokens this attempt spent (prompt, completion): written to its step and job with its outcome.
    tokens_in: int = field(default=0, compare=False)
    tokens_out: int = field(default=0, compare=False)
    #: The key is done for another job (a shared ``idempotency_key``): this lease holds no claim; the
    #: attempt records the stored result (``recorded_output``) on its own job and runs nothing.
    shared: bool = field(default=False, compare=False)
    #: A shared lease whose key's output is no longer kept anywhere: why (the step fails with it).
    output_gone: str | None = field(default=None, compare=False)
    #: The attempt's job was cancelled (``mesh cancel``): seen by the lease renewal (``ctx.cancelled``).
    cancelled: bool = field(default=False, compare=False)
    #: Calls of tools declared with ``compensate=`` that returned, as what undoes each: ``{"tool":
    #: the compensating tool, "args": the call's args}``; kept on the step when it succeeds.
    undo_calls: list[dict[str, Any]] = field(default_factory=list, compare=False)
    #: ``(acks set, bodies hash, redis message id)`` of the message in this worker's hands: a success's
    #: write settles it (:mod:`mesh.broker.step_write`). None: the consumer's ack settles it.
    settles: tuple[str, str, str] | None = field(default=None, compare=False)
    #: The success's write settled the message and stored the key as done: nothing is left to settle.
    settled: bool = field(default=False, compare=False)
    #: The job record as the fetch that claimed the key read it (maybe changed since): the pick-up is
    #: computed from it and written only if it is still the record. None: not read.
    record: bytes | None = field(default=None, compare=False, repr=False)
    #: The attempt's pick-up, written by the success write that fetched its message (a
    #: :class:`~mesh.broker.step_write.Written`), or the refusal of one of its commands; None: the
    #: attempt writes its own (see :mod:`mesh.broker.step_write`).
    picked: Any = field(default=None, compare=False, repr=False)
    #: The claim on the key in the key's own shard, when it is not the job's (several shards: a key
    #: jobs of two shards may share; :mod:`mesh.broker.shared_claims`). None: the job's claim is the key's.
    across: SharedClaim | None = field(default=None, compare=False)

    @property
    def served(self) -> bool:
        """The key's effect happened for another attempt (a shared key, or an earlier attempt of this
        job): the stored output is recorded, nothing runs."""
        return self.shared or (self.across is not None and self.across.served)


@dataclass
class Claim:
    """A claim's verdict for one message (``{run|busy|done, token, ...}`` from claim.lua), and the
    lease when it won one."""

    key: str
    claim_key: str
    owner: str
    verdict: list[Any]
    lease: Lease | None = None


def done_args(message: MessageProxy) -> tuple[Any, Any, Any]:
    """The ack's claim key, owner and result that store a succeeded message's key as done (empty
    strings for other messages)."""
    return message.__dict__.get("mesh_done") or ("", "", "")


_current = threading.local()


def current_lease() -> Lease | None:
    """The lease held by the message this thread is processing, if any."""
    return getattr(_current, "lease", None)


@contextmanager
def acting_for(lease: Lease | None) -> Iterator[None]:
    """This thread acts for ``lease`` while inside (a thread an async handler's call runs in): what
    reads :func:`current_lease` (token metering) sees the message's claim, as on the worker thread."""
    before = getattr(_current, "lease", None)
    _current.lease = lease
    try:
        yield
    finally:
        _current.lease = before


def message_key(message: MessageProxy | Any) -> str | None:
    """The envelope key a mesh message carries, or None for anything else."""
    args = message.args
    if len(args) == 1 and isinstance(args[0], dict):
        key = args[0].get("key")
        if isinstance(key, str) and key:
            return key
    return None


#: Job and step states that end them, as their records spell them.
_TERMINAL = frozenset(str(s) for s in TERMINAL)


class Idempotency(Middleware):
    """Claim / lease / done on the message key, shared by every worker through Redis."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace, settings.shard)
        self.client = client
        self.script = client.register_script(CLAIM_LUA)
        self.shared = SharedClaims(settings, client)
        self.lease_ms = int(settings.claim_lease_s * 1000)
        self.ttl_s = int(settings.dedup_ttl_s)
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _call(self, command: str, claim_key: str, owner: str, *args: Any, client: Any = None) -> Any:
        result = self.script(keys=[self.keys.stats, claim_key],
                             args=[command, self.lease_ms, self.ttl_s, owner, *args], client=client)
        return result[0] if command == "claim" and client is None else result

    def _owner(self, broker: Broker, message: MessageProxy) -> str:
        # Never the producer's message id: it may hold '|', the claim string's separator.
        return f"{broker.broker_id}:{uuid.uuid4().hex}"  # type: ignore[attr-defined]

    def adopt(self, message: MessageProxy | None, key: str, owner: str, verdict: list[Any],
              sent: float | None = None, record: bytes | None = None, picked: Any = None) -> None:
        """Take on the claim the fetch made on ``key`` for ``message`` (``verdict`` as claim.lua answers):
        the message carries it to :meth:`before_process_message`, and a lease won is renewed from now
        on. A claim that does not fit the decoded message (poison, or a key the fetch read otherwise)
        is released, and that message claims for itself when it runs. ``sent``: ``time.monotonic()``
        when the fetch that made the claim was sent, where the lease's confirmation counts from (a
        pause between the fetch and this call must not make the claim look fresher than it is).
        ``record``: the message's job record as the fetch read it (:attr:`Lease.record`); ``picked``:
        its pick-up, written by the fetch (:attr:`Lease.picked`)."""
        claim = Claim(key, self.keys.claim(key), owner, verdict)
        if verdict[0] == b"run":
            claim.lease = Lease(key=key, claim_key=claim.claim_key, owner=owner, token=int(verdict[1]),
                                running=False, confirmed_at=time.monotonic() if sent is None else sent,
                                record=record, picked=picked)
            self._hold(claim.lease)
        if message is None or message_key(message) != key:
            if claim.lease is not None:
                self._drop([claim.lease])
            return
        if claim.lease is not None:
            claim.lease.envelope = message.args[0]
            claim.lease.recorded_output = message.options.get("mesh_output")
        message.mesh_claim = claim  # type: ignore[attr-defined]

    def drop_claims(self, messages: list[MessageProxy]) -> None:
        """Free the fetch's claims of messages that will not run here (requeued, rejected unrun)."""
        leases = []
        for message in messages:
            claim = message.__dict__.pop("mesh_claim", None)
            if claim is not None and claim.lease is not None:
                leases.append(claim.lease)
        self._drop(leases)

    def _drop(self, leases: list[Lease]) -> None:
        if not leases:
            return
        pipe = self.client.pipeline(transaction=False)
        for lease in leases:
            self._release_hold(lease)
            self._call("release", lease.claim_key, lease.owner, lease.token, client=pipe)
        self._quietly(pipe.execute)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        _current.lease = None
        key = message_key(message)
        if key is None:
            return  # not an envelope: the agent rejects it as invalid input
        claim: Claim | None = message.__dict__.pop("mesh_claim", None)
        if claim is not None and claim.lease is not None and claim.lease.lost:
            self._release_hold(claim.lease)  # lost while it waited: claim again
            claim = None
        sent = time.monotonic()  # a lease claimed here counts from before its request went out
        if claim is None:
            claim_key = self.keys.claim(key)
            owner = self._owner(broker, message)
            try:
                claim = Claim(key, claim_key, owner, self._call("claim", claim_key, owner))
            except redis.RedisError as exc:
                # dramatiq would log this hook's error and run the actor anyway, unclaimed: the message
                # waits on the delay queue instead (settled once Redis answers again).
                self._defer(broker, message, key, 0, reason=f"claim failed: {exc}", stat="deferred",
                            route="unknown:defer")
                raise SkipMessage(f"{key}: no claim could be made") from None
        verdict, token, *rest = claim.verdict
        if verdict == b"run":
            lease = claim.lease
            if lease is None:
                lease = Lease(key=key, claim_key=claim.claim_key, owner=claim.owner, token=int(token),
                              envelope=message.args[0], recorded_output=message.options.get("mesh_output"),
                              confirmed_at=sent)
                self._hold(lease)
            else:
                lease.started = lease.progress_at = time.monotonic()  # it runs from now, not from the fetch
                lease.running = True
            message.mesh_lease = lease  # type: ignore[attr-defined]
            lease.settles = self._settles(broker, message)
            kills = int(rest[0]) if rest else 0
            if kills >= self.settings.poison_kills:
                self._poison(broker, message, lease, kills)
            where = self.shared.where(key, message.args[0] if message.args else None)
            if where is not None:
                self._share(broker, message, lease, where)
            _current.lease = lease
            return
        envelope = message.args[0]
        try:
            record = self._record(envelope) if verdict == b"done" else None
            shares = verdict == b"done" and self._shares(envelope, record)
        except redis.RedisError as exc:
            self._defer(broker, message, key, 0, reason=f"job read failed: {exc}", stat="deferred",
                        route="unknown:defer")
            raise SkipMessage(f"{key}: its job could not be read") from None
        if shares:
            # The effect under this key happened (another job's step, or this job's before its record
            # expired): this step takes the stored output (the handler is not run) and its job goes on.
            try:
                stored = claim_results.resolve(self.client, self.keys, key, rest[0] if rest else None)
            except redis.RedisError as exc:
                self._defer(broker, message, key, 0, reason=f"stored output read failed: {exc}", stat="deferred",
                            route="unknown:defer")
                raise SkipMessage(f"{key}: its stored output could not be read") from None
            lease = Lease(key=key, claim_key=claim.claim_key, owner=claim.owner, token=int(token), envelope=envelope,
                          recorded_output=stored.output, shared=True, output_gone=stored.gone,
                          settles=self._settles(broker, message))
            message.mesh_lease = lease  # type: ignore[attr-defined]
            _current.lease = lease
            return
        if verdict == b"done":
            logger.info("duplicate suppressed", extra={"key": key, "trace_id": envelope.get("trace_id"),
                                                        "agent": message.actor_name})
            pipe = self.client.pipeline(transaction=False)
            count_outcome(pipe, self.keys, message.actor_name, "duplicate")
            trace.stage(pipe, self.keys, trace.event("duplicate", envelope, worker=trace.worker_name(),
                                                     token=int(token)))
            job_id = envelope.get("job_id")
            if record is None and isinstance(job_id, str):
                # its job is no longer kept (expired, or removed by the count): the event starts a
                # stream no sweep would find, so it expires on its own
                pipe.expire(self.keys.trace(job_id), max(1, int(self.settings.job_retention_s)))
            elif isinstance(job_id, str) and record is not None and record.get("state") in _TERMINAL:
                # an ended job, maybe compacted (its stream deleted): queued again, so the event joins
                # its history instead of keeping a stream of its own (a re-sent key, every time)
                pipe.zadd(self.keys.jobs_compact, {job_id: float(record.get("finished_at") or time.time())})
            self._quietly(pipe.execute)
            raise SkipMessage(f"{key} is done")
        self._defer(broker, message, key, int(rest[0]), reason="held by a live owner", stat="deferred_in_flight",
                    route="duplicate:defer")
        raise SkipMessage(f"{key} is held by a live owner")

    def _share(self, broker: Broker, message: MessageProxy, lease: Lease, where: Keys) -> None:
        """Claim ``lease``'s key in the key's own shard ``where`` too (see :mod:`mesh.broker.shared_claims`):
        taken, the lease holds both; done, its stored output is the attempt's; held by a live attempt,
        the message waits (its own claim freed). SkipMessage when it does not run now."""
        key = lease.key
        try:
            verdict = self.shared.take(where, key, lease.owner)
            stored = (claim_results.resolve(self.client, where, key, verdict[2] if len(verdict) > 2 else None)
                      if verdict[0] == b"done" else None)
        except redis.RedisError as exc:
            self._let_go(lease)
            self._defer(broker, message, key, 0, reason=f"shared claim failed: {exc}", stat="deferred",
                        route="unknown:defer")
            raise SkipMessage(f"{key}: no shared claim could be made") from None
        if verdict[0] == b"busy":
            self._let_go(lease)
            self._defer(broker, message, key, int(verdict[2]), reason="held by a live owner (shared key)",
                        stat="deferred_in_flight", route="duplicate:defer")
            raise SkipMessage(f"{key} is held by a live owner in its shard")
        claim = SharedClaim(key, where, lease.owner, int(verdict[1]), served=stored is not None)
        lease.across = claim
        if stored is not None:
            # The key's effect happened (another job's step, or this job's attempt that died before its
            # own write): its output is this step's, and nothing runs.
            lease.recorded_output, lease.output_gone = stored.output, stored.gone

    def _let_go(self, lease: Lease) -> None:
        """Free the attempt's own claim (it will not run now); left to its lease when Redis is away."""
        self._release_hold(lease)
        self._quietly(lambda: self._call("release", lease.claim_key, lease.owner, lease.token))

    def _settles(self, broker: Broker, message: MessageProxy) -> tuple[str, str, str] | None:
        """Where the mesh's consumer holds ``message`` (see :attr:`Lease.settles`), or None when
        another consumer fetched it."""
        worker, rid = getattr(broker, "broker_id", None), message.options.get("redis_message_id")
        if not (isinstance(worker, str) and isinstance(rid, str)) or message.queue_name.endswith(".DQ"):
            return None
        return self.keys.acks(worker, message.queue_name), self.keys.messages(message.queue_name), rid

    def _poison(self, broker: Broker, message: MessageProxy, lease: Lease, kills: int) -> None:
        """The message's last ``kills`` owners died running it (their claims were taken over): it is
        dead-lettered as poison, unrun, and its claim freed (which clears the count) by the same
        settlement, so a replay runs it again."""
        self._release_hold(lease)
        lease.release_pending = True
        why = (f"poison: {kills} workers died running this message (MESH_POISON_KILLS="
               f"{self.settings.poison_kills}); not run again")
        decide(message, dead_letter_with_step(broker, message, FailureClass.INVALID_INPUT, why, None, stat="poison"))
        logger.error("message dead-lettered as poison", extra={"key": lease.key, "kills": kills,
                                                                "agent": message.actor_name})
        raise SkipMessage(f"{lease.key}: poison")

    def _record(self, envelope: dict[str, Any]) -> dict[str, Any] | None:
        """The job record (as JSON) of ``envelope``'s job; None when it is not kept (or not named)."""
        job_id = envelope.get("job_id")
        data = self.client.get(self.keys.job(job_id)) if isinstance(job_id, str) else None
        return None if data is None else cast(dict[str, Any], loads(data))

    def _shares(self, envelope: dict[str, Any], record: dict[str, Any] | None) -> bool:
        """A done key whose message's own step has not ended: this job needs the stored result. Either
        the key is shared by two jobs (a pipeline's ``idempotency_key``), or the job was sent again
        after its record expired (MESH_JOB_RETENTION_S) inside the dedup window, which re-created it
        queued: answered from the claim, it ends as it did, never queued for good. A duplicate of a
        step that ended (the usual case), or of a job no longer kept, is acked as a duplicate."""
        step_id = envelope.get("step_id")
        if record is None or not isinstance(step_id, str):
            return False
        step = record.get("steps", {}).get(step_id)
        return isinstance(step, dict) and step.get("state") not in _TERMINAL

    def _defer(self, broker: Broker, message: MessageProxy, key: str, lease_left_ms: int, *, reason: str,
               stat: str, route: str) -> None:
        # Its own counter: waiting for a key's owner spends none of the router's MESH_MAX_DEFERS.
        waits = int(message.options.get("mesh_waits", 0))
        deadline = message.args[0].get("deadline")
        now_ms = server_now_ms(broker)  # the deadline and the due time are on the Redis server's clock
        past = isinstance(deadline, int | float) and deadline * 1000 <= now_ms
        if past or waits >= self.settings.max_waits:
            why = "its deadline passed" if past else f"it waited {waits} times (MESH_MAX_WAITS)"
            failure_class = FailureClass.DEADLINE if past else FailureClass.UNKNOWN
            # The step ends with it (unless another owner is running it: fail_step leaves that alone).
            decide(message, dead_letter_with_step(broker, message, failure_class, f"{reason}: {why}", None))
            logger.warning("message dead-lettered before running", extra={"key": key, "reason": why})
            return
        delay_ms = full_jitter_ms(waits, DEFER_MIN_MS, DEFER_MAX_MS, random.random)
        if lease_left_ms:
            delay_ms = min(lease_left_ms + 50, delay_ms)
        copy = delayed_copy(message._message, delay_ms, now_ms=now_ms, mesh_waits=waits + 1)
        decide(message, RetryLater(copy, delay_ms, stat=stat, route=route))
        ev = trace.event("deferred", message.args[0], worker=trace.worker_name(), reason=reason,
                         until=(now_ms + delay_ms) / 1000)
        self._quietly(lambda: trace.emit(self.client, self.keys, ev))
        logger.info("message deferred before running",
                    extra={"key": key, "trace_id": message.args[0].get("trace_id"), "agent": message.actor_name,
                           "delay_ms": delay_ms, "reason": reason})

    def after_process_message(self, broker: Broker, message: MessageProxy, *,
                              result: Any | None = None, exception: BaseException | None = None) -> None:
        _current.lease = None
        lease: Lease | None = message.__dict__.get("mesh_lease")
        if lease is None or lease.shared:
            return  # a shared lease holds no claim: nothing to settle on the key
        self._release_hold(lease)
        if lease.across is not None and lease.across.held:
            self._settle_shared(lease, exception)
        if lease.settled:
            return  # the success's write stored the key as done and settled the message
        if exception is None and lease.done:
            # Stored by the ack that settles the message, in the same script (MeshConsumer.ack).
            message.mesh_done = (lease.claim_key, lease.owner,  # type: ignore[attr-defined]
                                 claim_results.encode(lease.result, lease.envelope, self.settings.claim_result_bytes))
            return
        try:
            ok = self._call("release", lease.claim_key, lease.owner, lease.token)
        except redis.RedisError as exc:
            # Redis is away. The release goes with the failure's settlement, which is retried until
            # Redis answers.
            lease.release_pending = True
            logger.warning("claim not settled: Redis unavailable", extra={"key": lease.key, "error": str(exc)})
            return
        if not ok:
            # Another owner holds the key now: the router must not record this attempt's failure.
            message.mesh_superseded = True  # type: ignore[attr-defined]
            logger.warning("lease lost before the attempt settled", extra={"key": lease.key, "token": lease.token})

    def _settle_shared(self, lease: Lease, exception: BaseException | None) -> None:
        """The shared claim of an attempt that did not store it as done (the runtime stores it before the
        step's write): done with the result when the attempt succeeded without that write (a step found
        ended), else freed. Left to its lease when Redis is away."""
        claim = lease.across
        assert claim is not None
        if exception is None and lease.done and lease.result is not None:
            result = claim_results.encode(lease.result, lease.envelope, self.settings.claim_result_bytes,
                                          shard=self.settings.shard)
            self._quietly(lambda: self.shared.done(claim, result))
        else:
            self._quietly(lambda: self.shared.release(claim))

    @staticmethod
    def _quietly(write: Any) -> None:
        """A trace or counter write that must not decide the message's fate."""
        try:
            write()
        except redis.RedisError as exc:
            logger.warning("could not write a trace event", extra={"error": str(exc)})

    def after_worker_shutdown(self, broker: Broker, worker: Any) -> None:
        self._stop.set()

    # -- lease renewal: one pipelined round trip for every lease the process holds --

    def _hold(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.owner] = lease
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_loop, name="mesh-lease-renewer", daemon=True)
                self._renewer.start()

    def _release_hold(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.owner, None)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_ms / 3000):
            try:
                self.renew()
            except redis.RedisError as exc:
                logger.warning("lease renewal failed; retrying", extra={"error": str(exc)})

    def renew(self) -> None:
        with self._lock:
            # A settled lease's key is done: renewing it would report it lost.
            leases = [lease for lease in self._leases.values() if not lease.settled]
        if not leases:
            return
        pipe = self.client.pipeline(transaction=False)
        for lease in leases:
            self._call("renew", lease.claim_key, lease.owner, client=pipe)
        # In the same round trip: whether a running attempt's job was cancelled (ctx.cancelled). Not
        # for a compensation: the cancel is what it runs for, and an undo told to stop stops half done.
        watched = [lease for lease in leases if lease.running and not lease.cancelled
                   and isinstance(lease.envelope.get("job_id"), str)
                   and not is_compensation(str(lease.envelope.get("step_id") or ""))]
        for lease in watched:
            pipe.exists(self.keys.cancel(lease.envelope["job_id"]))
        sent = time.monotonic()
        answers = pipe.execute()
        for lease, gone in zip(watched, answers[len(leases):], strict=True):
            lease.cancelled = bool(gone)
        for lease, ok in zip(leases, answers[:len(leases)], strict=True):
            if ok:
                lease.confirmed_at = max(lease.confirmed_at, sent)
            elif not lease.lost and not self._done_by(lease):
                lease.lost = True
                logger.warning("lease lost while running", extra={"key": lease.key, "token": lease.token})
        self._renew_shared(leases)
        self._flag_stuck(leases)

    def _renew_shared(self, leases: list[Lease]) -> None:
        """The shared claims of ``leases`` (the key's shard, when not the job's: broker/shared_claims.py),
        renewed in a round trip of their own: on a Redis Cluster they are other slots, maybe on a node that
        is down or failing over, and that must not keep the job's own claims (and those of every other
        message this process runs) from being renewed. A shared claim that cannot be renewed is confirmed
        by the check before each effect, which fails then (its call is not made)."""
        across = [lease for lease in leases if lease.across is not None and lease.across.held]
        if not across:
            return
        sent = time.monotonic()
        try:
            pipe = self.client.pipeline(transaction=False)
            for lease in across:
                self.shared.renew(lease.across, client=pipe)  # type: ignore[arg-type]
            answers = pipe.execute()
        except redis.RedisError as exc:
            logger.warning("shared lease renewal failed; retrying", extra={"error": str(exc)})
            return
        for lease, ok in zip(across, answers, strict=True):
            claim = lease.across
            assert claim is not None
            if ok:
                claim.confirmed_at = max(claim.confirmed_at, sent)
            elif claim.held and not claim.lost and not self.shared.done_by(claim):
                claim.lost = lease.lost = True
                logger.warning("shared lease lost while running", extra={"key": lease.key, "token": claim.token,
                                                                         "shard": claim.keys.shard})

    def _done_by(self, lease: Lease) -> bool:
        """Whether ``lease``'s own success stored its key as done (its write landed while this renewal
        was on the wire, before the lease said it was settled): not a lost lease."""
        if lease.settled:
            return True
        claim = claims.read(self.client, lease.claim_key)
        return claim.state == "done" and claim.token == lease.token

    def _flag_stuck(self, leases: list[Lease]) -> None:
        """A handler that holds its claim (heartbeats) but reports no progress is stuck: say so once."""
        now = time.monotonic()
        for lease in leases:
            idle = now - lease.progress_at
            if lease.stuck or not lease.running or idle < self.settings.stuck_after_s:
                continue
            lease.stuck = True
            extra = {"key": lease.key, "trace_id": lease.envelope.get("trace_id"),
                     "job_id": lease.envelope.get("job_id"), "idle_s": round(idle, 1)}
            logger.warning("step stuck: holding its claim without progress", extra=extra)
            pipe = self.client.pipeline(transaction=False)
            pipe.hincrby(self.keys.stats, "stuck", 1)
            trace.stage(pipe, self.keys, trace.event("stuck", lease.envelope, worker=trace.worker_name(),
                                                     idle_s=round(idle, 1), progress=lease.progress))
            self._quietly(pipe.execute)

