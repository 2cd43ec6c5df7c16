"""The mesh's Redis consumer: one bad payload never strands or crashes the rest of its batch,
every settlement is a single atomic script, and heartbeats continue while handlers run.

Nothing is stranded by a lost connection either. dramatiq rebuilds a consumer after a
connection error; the rebuilt one first puts back on its queue every message this worker still
holds there but no longer has in hand: the unhanded rest of a fetched batch, and, for a delay
queue, the delayed messages dramatiq dropped from memory. The broker keeps the ids in hand
(``broker.in_hand``) across consumers for that.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.message import Message
from dramatiq.middleware import Interrupt

from mesh.contracts import TERMINAL, FailureClass, JobRecord, State, StepRecord, depth_exceeds, dumps, loads
from mesh.contracts.deadletter import DeadLetter, format_traceback

from . import approvals, claim_results, trace, waits
from .group_commit import GroupCommit
from .idempotency import Idempotency, Lease, done_args, message_key
from .jobs import ended_ttl_s, holds_dead_letters
from .observe import unwind_counts
from .outbox import encode
from .settle import DeadLetterIt, JobWrite, RetryLater, decide, decision_of, options_problem, raw_of
from .trace import TRACE_MAXLEN

if TYPE_CHECKING:
    from .mesh_broker import MeshBroker

logger = logging.getLogger(__name__)

#: How long an idle consumer blocks waiting for work before it looks again (s).
WAIT_S = 1.0

#: The most messages one fetch takes (settle.lua's FETCH_MAX).
FETCH_MAX = 1000

#: Times a settlement re-reads a job record that another writer changed meanwhile.
CONFLICT_RETRIES = 50

#: Numbers the fetches of this process: a fetch's claims are owned by "{worker}:{nonce}:{n}", and a
#: worker id names one broker, so a count is as unique as a random nonce. Not ``uuid4``: its system
#: call for random bytes releases the GIL, which a worker thread just handed a message then takes,
#: and the consumer, short of its block for the next token, waits for it (up to the interpreter's
#: switch interval, 5 ms) while it holds the worker's pick-up write up in turn (docs/performance.md).
_FETCHES = itertools.count(1)
#: Put before the count in a process forked from another (drawn once, at the fork): the child keeps the
#: broker, so its id, and the count, and its fetches would name the parent's owners again.
_FORKED = ""


def _forked() -> None:
    global _FORKED
    _FORKED = f"{uuid.uuid4().hex[:8]}."


os.register_at_fork(after_in_child=_forked)

#: Bytes of a message over MESH_MAX_MESSAGE_BYTES its dead letter keeps (with the full length and sha256).
OVERSIZED_PREFIX_BYTES = 4096


def _refused(data: bytes, why: str) -> DecodeError:
    return DecodeError(why, data, ValueError(why))


class MeshConsumer(_RedisConsumer):
    broker: MeshBroker

    def __init__(self, broker: MeshBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        #: Fetched, decoded (and claimed) messages not yet handed to dramatiq.
        self.pairs: list[MessageProxy] = []
        #: Claims a fetched batch in one call (not on a delay queue: its messages do not run here).
        self.idempotency = None if queue_name.endswith(".DQ") else next(
            (m for m in broker.middleware if isinstance(m, Idempotency)), None)
        #: Fetch only once this many slots of the window are free (or none is in hand): batches stay
        #: large, where fetching whenever one message settled costs a round trip per message.
        self.low_water = max(1, prefetch // 4)
        #: Acks from the worker threads go to Redis in groups (one script call for all that wait).
        self.acks: GroupCommit[tuple[str, Any, Any, Any]] = GroupCommit(
            self._ack_group, name=f"mesh-acks-{queue_name}")
        #: ``on`` while a settlement is re-run after an interruption (its "no longer held" is expected).
        self._quiet = threading.local()
        self.dedup_ttl_s = int(broker.settings.dedup_ttl_s)
        self.last_beat = float("-inf")  # the first fetch beats
        self.in_hand: set[str] = broker.in_hand.setdefault(queue_name, set())
        self.reclaimed = False
        #: Set by a settlement that leaves room to fetch (:meth:`_room`): a consumer whose prefetch window
        #: is full waits on it, not on a timer, and is not woken by the settlements before that one.
        self.settled = threading.Event()
        self.window_full = False
        #: The last fetch emptied the queue (it got fewer messages than it asked for): anything enqueued
        #: since pushed a wake-up token, so the next look is a blocking wait, not another fetch.
        self.drained = False
        #: Places of the window held for messages a step's success fetches for this consumer (EagerSlot).
        self.eager_reserved = 0
        #: Messages in hand here whose step's success write settled them (their ack sends nothing), not
        #: let go yet: their threads are still finishing, and :meth:`reserve` does not count them.
        self.written_off: set[str] = set()
        self._room_lock = threading.Lock()

    def reserve(self, thread: Any) -> EagerSlot | None:
        """A place in the window for a message a step's success write fetches straight into this
        consumer's hands (:class:`EagerSlot`, handed to dramatiq through ``thread``, its consumer thread),
        or None when the window has no room, the consumer holds more than one message, or the queue had
        a backlog at the last fetch."""
        if not self.drained or self.idempotency is None or self.queue_name not in self.broker.record_queues:
            # Only a consumer whose last fetch emptied its queue: it would take the message with a wake-up
            # and a fetch of its own. One with a backlog fetches in batches, at less cost a message.
            return None
        with self._room_lock:
            held = self.outstanding_message_count + self.eager_reserved - len(self.written_off)
            # And only one holding nothing but (maybe) the step whose success fetches: a busy consumer's
            # next batch takes the message at less cost than fetches of one message each. (A step
            # settled by its own success, whose thread has not let it go yet, is not held: the next
            # step, fetched by that success, may succeed before it is let go.)
            if held > 1 or held >= self.prefetch:
                return None
            self.eager_reserved += 1
        return EagerSlot(self, thread)

    def unreserve(self) -> None:
        with self._room_lock:
            self.eager_reserved -= 1

    @property
    def outstanding_message_count(self) -> int:
        return len(self.queued_message_ids) + len(self.pairs)

    def ack(self, message: MessageProxy) -> None:
        """Settle ``message`` by its decision, shielded from dramatiq's interruptions: a time limit or
        shutdown raised into this thread while it settles is held until the settlement is complete
        (settled again from the start when it struck midway: every settle command is safe to re-send),
        then dropped with a warning. It was meant for the handler, which has returned; raised further
        it would end this worker thread with the message still in hand."""
        interrupted: Interrupt | None = None
        while True:
            try:
                self._quiet.on = interrupted is not None
                self._settle(message)
                break
            except Interrupt as exc:
                interrupted = interrupted or exc
        self._quiet.on = False
        if interrupted is not None:
            logger.warning("%s raised while settling: the settlement completed, the exception is dropped",
                           type(interrupted).__name__, extra={"queue": self.queue_name,
                                                              "redis_message_id": message.options["redis_message_id"]})

    def _settle(self, message: MessageProxy) -> None:
        decision = decision_of(message)
        rid = message.options["redis_message_id"]
        lease: Lease | None = message.__dict__.get("mesh_lease")
        if lease is not None and lease.settled:
            # The step's success wrote its record, stored its key as done and settled the message, in
            # one script (broker/step_write.py): nothing is left to settle. A failure raised after that
            # write (a time limit) is the record's to contradict, and it does not.
            if decision is not None or message.__dict__.get("_exception") is not None:
                logger.info("attempt failed after its success was settled: nothing more is settled",
                            extra={"queue": self.queue_name, "redis_message_id": rid})
            self._let_go(message, rid)
            return
        try:
            self._drop_unrun(message)
            if decision is None and message.__dict__.get("_exception") is not None:
                # The attempt failed and no hook decided its fate (one of them broke): never acked away.
                decision = self._unrouted(message)
            if isinstance(decision, RetryLater):
                new = decision.message
                self._settle_job("retry", decision.job, rid, new.options["redis_message_id"], new.encode(),
                                 decision.stat, decision.route, lease=message.__dict__.get("mesh_lease"))
            elif isinstance(decision, DeadLetterIt):
                self._dead(rid, decision.entry, raw_of(message), decision.stat, decision.route, decision.job,
                           lease=message.__dict__.get("mesh_lease"))
            else:
                self._after_done(rid, self.acks.submit((rid, *done_args(message))), message_key(message))
        except (redis.RedisError, ConnectionClosed) as exc:
            # Any Redis error (a lost connection, OOM, READONLY after a failover, BUSY): dramatiq
            # retries the settlement until it goes through, and the message stays in hand meanwhile.
            raise ConnectionClosed(exc) from None
        except Exception as exc:
            # Not retried by dramatiq, and a message left in this live worker's acks set would be
            # held for good (nobody reclaims a worker that heartbeats): it is dead-lettered without
            # its job-record change, or put back on its queue.
            self._settle_anyway(message, rid, decision, exc)
        self._let_go(message, rid)

    def _settle_anyway(self, message: MessageProxy, rid: str, decision: Any, exc: Exception) -> None:
        """Settle a message whose settlement raised ``exc`` (not a Redis error): a failed attempt is
        dead-lettered without its job-record change (the entry says why); anything else, or a dead
        letter that cannot be written either, goes back to the head of its queue."""
        logger.error("settlement failed: %s: %s", type(exc).__name__, exc, exc_info=exc,
                     extra={"queue": self.queue_name, "redis_message_id": rid})
        why = f"the mesh could not settle this message ({type(exc).__name__}: {str(exc)[:300]})"
        try:
            if isinstance(decision, DeadLetterIt):
                entry = decision.entry.model_copy(update={"error": f"{decision.entry.error}; {why}"})
                self._dead(rid, entry, raw_of(message), decision.stat, decision.route)
                return
            if isinstance(decision, RetryLater):
                entry = self.broker.dead_letter_entry(message._message, FailureClass.UNKNOWN,
                                                      f"{why}; it was to be {decision.stat}", None)
                self._dead(rid, entry, raw_of(message), "dead_lettered", "unknown:dead_letter")
                return
        except redis.RedisError as err:
            raise ConnectionClosed(err) from None  # dramatiq retries the whole settlement
        except ConnectionClosed:
            raise
        except Exception:
            logger.exception("dead letter failed too: message put back on its queue",
                             extra={"queue": self.queue_name, "redis_message_id": rid})
        try:
            self.broker.settle("requeue", self.queue_name, rid)
        except redis.RedisError as err:
            raise ConnectionClosed(err) from None

    def _superseded(self, rid: str) -> None:
        if getattr(self._quiet, "on", False):
            return  # settled again after an interruption: the first settlement took it
        logger.warning("message no longer held by this worker (reaped while it was paused): its "
                       "settlement left it to its new owner", extra={"queue": self.queue_name, "redis_message_id": rid})

    def _ack_group(self, group: Sequence[tuple[str, Any, Any, Any]]) -> list[int]:
        return self.broker.settle("ack", self.queue_name, self.dedup_ttl_s, *(a for item in group for a in item))

    def _drop_unrun(self, message: MessageProxy) -> None:
        """A message settled without running (rejected before a thread took it) frees its batch claim."""
        if self.idempotency is not None and "mesh_claim" in message.__dict__:
            self.idempotency.drop_claims([message])

    def _let_go(self, message: MessageProxy, rid: str) -> None:
        self.written_off.discard(rid)  # first: a reserve meanwhile counts it as held, not as neither
        self.queued_message_ids.discard(message.message_id)
        self.in_hand.discard(rid)
        if self._room():  # what a full window waits for: room to fetch, not each settlement
            self.settled.set()

    def _unrouted(self, message: MessageProxy) -> DeadLetterIt:
        from .router import unroutable

        exc = message._exception
        logger.error("failed message left without a decision: dead-lettered",
                     extra={"queue": self.queue_name, "message_id": message.message_id})
        decision = unroutable(self.broker, message, f"the mesh could not route this failure "
                                                    f"({type(exc).__name__}: {exc})")
        decide(message, decision)
        return decision

    def _settle_job(self, command: str, job: JobWrite | None, rid: str, *args: Any,
                    lease: Lease | None = None, after: tuple[Any, ...] = ()) -> int:
        """Settle with the job-record change in the same script; a record changed meanwhile by
        another writer is read again and the change recomputed (optimistic, like WATCH); ``after``:
        the command's arguments after the job's. The script's answer."""
        for _ in range(CONFLICT_RETRIES):
            arg = self._job_arg(job)
            if isinstance(arg, StepRecord):
                # The failure struck after this attempt's success was written (a time limit landing
                # after EXEC): the record is the truth, and the message and its key are done.
                assert job is not None
                logger.warning("attempt failed after its success was recorded: settled as done",
                               extra={"job_id": job.job_id, "step_id": job.step_id})
                return self._settle_done(rid, arg, lease)
            answer = int(self.broker.settle(command, self.queue_name, rid, *args, arg, *after))
            if answer == 3:
                self._superseded(rid)
            if answer != -1:
                if job is not None and "waiting" in arg:  # the script stages no wait's index or timers
                    waits.repair(self.broker.client, self.broker.keys, job.job_id)
                return answer
        raise RuntimeError(f"job record {job.job_id if job else '?'} kept changing while settling {rid}")

    def _settle_done(self, rid: str, step: StepRecord, lease: Lease | None) -> int:
        """Settle a message whose attempt's success is recorded (``step``) as done, and store its key
        as done with the step's result (the failure freed the claim: another message under the same
        key, e.g. a shared ``idempotency_key``, must not run the effect again)."""
        claim = (lease.claim_key, lease.owner, lease.token) if lease is not None and not lease.shared else ("", "", 0)
        # Bounded like every done claim (MESH_CLAIM_RESULT_BYTES): the claim outlives the record.
        result = claim_results.encode(step.result, lease.envelope if lease is not None else {},
                                      self.broker.settings.claim_result_bytes)
        answer = int(self.broker.settle("done", self.queue_name, self.dedup_ttl_s, rid, *claim, result))
        self._after_done(rid, answer, lease.key if lease else None)
        return 1

    def _after_done(self, rid: str, answer: int, key: str | None) -> None:
        """What a done settlement's answer says: 0 or 2 the lease was lost before it settled (the key
        is not stored done by this attempt), 2 or more the message is no longer this worker's."""
        if answer in (0, 2):
            logger.warning("lease lost before the attempt settled", extra={"key": key})
        if answer >= 2:
            self._superseded(rid)

    def _job_arg(self, job: JobWrite | None) -> str | StepRecord:
        """The settle script's job argument for ``job``, from one read of its record; the step when
        that record shows this very attempt's step succeeded (then there is no failure to record)."""
        if job is None:
            return ""
        keys = self.broker.keys
        arg: dict[str, Any] = {"job": keys.job(job.job_id), "trace": keys.trace(job.job_id), "maxlen": TRACE_MAXLEN,
                               "events": [dumps(ev).decode() for ev in job.events], "running": keys.running}
        if job.running_member:
            arg["member"] = job.running_member
        if job.release:
            arg["claim"], arg["owner"] = job.release
        current: bytes | None = self.broker.client.get(keys.job(job.job_id))  # type: ignore[assignment]
        if current is None:
            # The record is gone (expired): the events still written must not start an endless trace.
            arg["ttl"] = max(1, int(self.broker.settings.job_retention_s))
        else:
            before = JobRecord.model_validate(loads(current))
            step = before.steps.get(job.step_id) if job.step_id is not None else None
            if (step is not None and job.token is not None and step.state is State.SUCCEEDED
                    and step.token == job.token):
                return step
            record, messages = job.change(before)
            arg["events"] = [dumps(ev).decode() for ev in job.events]  # with what the change added
            arg["incr"] = unwind_counts(job.events)  # a compensation sent or failed, a job compensated
            # What the failure sets in motion (a pipeline's next steps) is sent with the record.
            arg["msgs"] = [{"hash": keys.messages(m.queue_name), "queue": keys.queue(m.queue_name),
                            "wake": keys.wake(m.queue_name), "rid": m.options["redis_message_id"],
                            "data": encode(m).decode()} for m in messages]
            arg["events"] += [dumps(trace.event("enqueued", m.args[0], queue=m.queue_name)).decode()
                              for m in messages]
            arg["sha"] = hashlib.sha1(current).hexdigest()
            arg["new"] = dumps(record).decode()
            settings = self.broker.settings
            if (record.state in TERMINAL and (before.state not in TERMINAL or holds_dead_letters(record))
                    and not approvals.waiting(record)):  # a job a person's decision waits on never expires
                # Ending the job starts its retention clock (as jobs.stage_record does); else KEEPTTL. A
                # job holding dead letters is kept while they may be replayed, counted from the last one.
                arg["ttl"] = max(1, int(ended_ttl_s(record, settings.job_retention_s,
                                                    settings.dead_letter_job_retention_s)))
            if record.state in TERMINAL and not approvals.waiting(record):
                # queued for compaction (broker/compact.py) when it ends, and when it is written once
                # ended (what this writes after its compaction is compacted too), as jobs.stage_record does
                arg["compact"] = [keys.jobs_compact, job.job_id]
        return dumps(arg).decode()

    def nack(self, message: MessageProxy) -> None:
        """dramatiq rejects what it cannot route (an unknown actor): that, too, goes to the mesh DLQ."""
        if decision_of(message) is None:
            exc = message._exception
            entry = self.broker.dead_letter_entry(
                message._message, FailureClass.PERMANENT, str(exc or "rejected"), format_traceback(exc)
            )
            decide(message, DeadLetterIt(entry, route="permanent:dead_letter"))
        self.ack(message)

    def _dead(self, rid: str, entry: DeadLetter, raw: bytes, stat: str, route: str,
              job: JobWrite | None = None, lease: Lease | None = None) -> None:
        # Indexed under its agent only when this worker declares it: a name a producer invented keeps
        # its place in the entry but creates no index key of its own.
        agent = entry.agent if entry.agent in self.broker.actors else "-"
        # Another dead letter may hold the id (a producer gave two messages one id, or this message
        # was dead-lettered before under it): this one is kept under an id of its own, never dropped.
        taken: list[str] = []
        for entry_id in (entry.entry_id, f"{entry.entry_id}.{rid}", f"{entry.entry_id}.{rid}.{uuid.uuid4().hex[:12]}"):
            entry = entry.model_copy(update={"entry_id": entry_id})
            if self._settle_job("dead", job, rid, entry_id, dumps(entry), raw, stat, route,
                                agent, entry.failure_class, lease=lease, after=(entry.job_id or "",)) != 2:
                if taken:
                    logger.warning("dead-letter id taken: kept under another", extra={
                        "queue": self.queue_name, "taken": taken, "entry_id": entry_id})
                return
            taken.append(entry_id)
        raise RuntimeError(f"dead letter of {rid}: every entry id is taken ({', '.join(taken)})")

    def _poison(self, rid: str, data: bytes, error: DecodeError) -> None:
        logger.error("poison message", extra={"queue": self.queue_name, "redis_message_id": rid})
        entry = DeadLetter(
            entry_id=rid,
            queue=self.queue_name,
            agent=self.queue_name.removesuffix(".DQ"),
            failure_class=FailureClass.INVALID_INPUT,
            error=f"undecodable message: {error.error or error}",
            worker=self.broker.broker_id,
        )
        if len(data) > self.broker.settings.max_message_bytes:
            # Only a prefix is kept (a DLQ must not hold what the queue could not); length and hash name the rest.
            entry = entry.model_copy(update={"raw_bytes": len(data), "raw_sha256": hashlib.sha256(data).hexdigest()})
            data = data[:OVERSIZED_PREFIX_BYTES]
        try:
            self._dead(rid, entry, data, "poison", "invalid_input:dead_letter")
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None

    def _decode(self, rid: str, data: bytes) -> MessageProxy | None:
        """The fetched message as dramatiq's proxy; poison (dead-lettered here) is None."""
        try:
            limits = self.broker.settings
            if len(data) > limits.max_message_bytes:
                raise _refused(data, f"{len(data)} bytes, over MESH_MAX_MESSAGE_BYTES "
                                     f"({limits.max_message_bytes}); its first {OVERSIZED_PREFIX_BYTES} "
                                     "bytes are kept")
            message = Message.decode(data)
            if depth_exceeds(data, message.args, limits.max_json_depth - 1):
                raise _refused(data, f"nested deeper than MESH_MAX_JSON_DEPTH ({limits.max_json_depth})")
            # JSON that decodes into a Message with the wrong shapes (options null, an unhashable
            # id, ...) would crash the consumer below and strand itself in flight: poison, too.
            if not (isinstance(message.options, dict) and isinstance(message.message_id, str)
                    and isinstance(message.actor_name, str) and isinstance(message.queue_name, str)
                    and isinstance(message.kwargs, dict)):
                raise DecodeError("not a dramatiq message", data, TypeError("bad field types"))
            problem = options_problem(message.options, self.queue_name)
            if message.queue_name != self.queue_name:
                # dramatiq hands a processed message back to the consumer of the queue it names.
                problem = f"names queue {message.queue_name[:64]!r} but was fetched from {self.queue_name!r}"
            if problem:
                raise DecodeError("malformed mesh options", data, ValueError(f"malformed mesh options: {problem}"))
        except DecodeError as exc:
            self._poison(rid, data, exc)
            return None
        message.options["redis_message_id"] = rid
        proxy = MessageProxy(message)
        proxy.mesh_raw = data  # type: ignore[attr-defined]
        return proxy

    def _next_message(self) -> MessageProxy | None:
        if not self.pairs:
            return None
        proxy = self.pairs.pop(0)
        self.queued_message_ids.add(proxy.message_id)
        self.in_hand.add(proxy.options["redis_message_id"])
        return proxy

    def _fetch(self, wait: bool = False) -> bool:
        """Fetch (and claim) what the window has room for into ``pairs``; whether anything came.
        ``wait``: first block for a wake-up token (up to WAIT_S), then fetch at once."""
        if not self.reclaimed:
            # dramatiq never hands delay-queue messages to worker threads: a rebuilt delay-queue
            # consumer holds none of them, whatever the last one had.
            with self.broker.eager_lock:  # no step write's fetch is on its way into in_hand meanwhile
                keep = () if self.queue_name.endswith(".DQ") else tuple(self.in_hand)
                n = self.broker.settle("reclaim", self.queue_name, *keep)
                self.reclaimed = True
            if n:
                logger.warning("messages left behind by a lost connection put back",
                               extra={"queue": self.queue_name, "count": n})
        self.settled.clear()
        wanted = self._room()
        self.window_full = not wanted
        if self.window_full:
            self._beat()
            return False
        now = time.monotonic()
        beat = now - self.last_beat >= self.broker.heartbeat_timeout / 4000
        idem = self.idempotency
        nonce = f"{_FORKED}{next(_FETCHES):x}"
        # An agent's queue has each claimed message's job record read with it: its pick-up reads nothing.
        records = idem is not None and self.queue_name in self.broker.record_queues
        claim = (nonce, idem.lease_ms, idem.ttl_s, "1" if records else "0") if idem is not None else ()
        # A lease counts from before its request went out (with ``wait``, before the block: sooner).
        args = (wanted, "1" if beat else "0", *claim)
        flat: list[Any] = (self.broker.wait_then_fetch(self.queue_name, WAIT_S, *args)[1] if wait
                           else self.broker.settle("fetch", self.queue_name, *args))
        if beat:
            self.last_beat = now
        self.pairs = []
        step = 3 if claim else 2
        self.drained = len(flat) // step < min(wanted, FETCH_MAX) and not self.queue_name.endswith(".DQ")
        for i in range(0, len(flat), step):
            rid, data = flat[i].decode(), flat[i + 1]
            verdict: Any = flat[i + 2] if claim else 0
            proxy = self._decode(rid, data)
            if idem is not None and verdict:
                owner = f"{self.broker.broker_id}:{nonce}:{i // step + 1}"
                record = (verdict.pop(1) or None) if records else None
                idem.adopt(proxy, verdict[0].decode(), owner, verdict[1:], sent=now, record=record)
            if proxy is not None:
                self.pairs.append(proxy)
        return bool(self.pairs)

    def _room(self) -> int:
        """How many messages a fetch would ask for now; 0 while the window is too full to fetch."""
        outstanding = self.outstanding_message_count
        wanted = self.prefetch - outstanding
        return wanted if wanted >= (self.low_water if outstanding else 1) else 0

    def _beat(self) -> None:
        # Busy consumers do not fetch; without this a long handler would look like a dead worker.
        if time.monotonic() - self.last_beat >= self.broker.heartbeat_timeout / 4000:
            self.broker.settle("heartbeat", self.queue_name)
            self.last_beat = time.monotonic()

    def __next__(self) -> MessageProxy | None:
        try:
            waited = False
            while True:
                proxy = self._next_message()
                if proxy is not None:
                    self.misses = 0
                    return proxy
                # Idle: the last fetch emptied the queue (``drained``), and whatever was enqueued since
                # pushed a wake-up token. Block until one arrives, then fetch at once; after WAIT_S
                # without one the fetch runs all the same (it beats and recovers), and dramatiq's loop
                # goes round. Only with room to fetch: a token taken must lead to a
                # fetch, or its message waits for another consumer's block to end.
                wait = self.drained and self._room() > 0
                if wait and waited:
                    return None  # woken, and another consumer was first: dramatiq's loop goes round
                if wait and self.broker.stopping.is_set():
                    self.broker.wait_for_work(self.queue_name, WAIT_S)  # a stopping worker fetches no more
                    self.drained = False
                    return None
                waited = waited or wait
                if self._fetch(wait=wait):
                    continue
                if self.window_full:
                    # Every prefetched message is still being worked on: go on as soon as one
                    # settles (dramatiq sleeps with backoff here, as if the queue were empty).
                    self.settled.wait(self.timeout / 1000)
                    return None
                if self.queue_name.endswith(".DQ"):
                    # dramatiq checks delayed messages' due times between polls: keep polling.
                    self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                    time.sleep(backoff_ms / 1000)
                    return None
                if wait:
                    return None  # nothing came within WAIT_S (or another consumer was first)
                # The fetch found nothing (``drained`` is set): the loop waits for a token.
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None

    def close(self) -> None:
        if self.idempotency is not None and self.pairs:
            # Fetched and claimed, never handed out: the next consumer's reclaim puts them back, and
            # their leases must not be renewed from here meanwhile.
            self.idempotency.drop_claims(self.pairs)
            self.pairs = []
        if self.queue_name.endswith(".DQ"):
            # Before a delay-queue consumer is closed, dramatiq has requeued or dropped every delayed
            # message it held: none is in hand any more, and the next consumer reclaims the dropped.
            self.in_hand.clear()
        super().close()

    def take(self, thread: Any, rid: str, data: bytes, verdict: Any, owner: str, sent: float,
             record: bytes | None, picked: Any = None) -> None:
        """Take a message a step write fetched for this consumer (its id, body and claim as the fetch
        answers them) as if this consumer had fetched it, and hand it to dramatiq at once. Called with
        the broker's ``eager_lock`` held."""
        proxy = self._decode(rid, data)
        if self.idempotency is not None and verdict:
            self.idempotency.adopt(proxy, verdict[0].decode(), owner, verdict[1:], sent=sent, record=record,
                                   picked=picked)
        if proxy is None:
            return  # poison: dead-lettered (and settled) by _decode
        if self.broker.stopping.is_set() or not thread.running:
            # The worker's stop began after the place was held: its threads take nothing more from the
            # work queue, where the message would wait for the stop's end (or, come after the stop's
            # requeue, for a reaper). Back to the head of its lane at once, its claim freed, as a
            # stopping worker's requeue does.
            self._drop_unrun(proxy)
            self.broker.settle("requeue", self.queue_name, rid)
            return
        self.queued_message_ids.add(proxy.message_id)
        self.in_hand.add(rid)
        thread.handle_message(proxy)

    def requeue(self, messages: Any) -> None:
        messages = list(messages)
        pairs, self.pairs = self.pairs, []
        # dramatiq lets go of these whatever happens here; should the requeue fail, the next
        # consumer's reclaim puts them back.
        for message in messages:
            self.in_hand.discard(message.options["redis_message_id"])
            self.written_off.discard(message.options["redis_message_id"])
        if self.idempotency is not None:
            # Claimed when fetched, never run here: the next worker to fetch them claims them at once.
            self.idempotency.drop_claims(messages + pairs)
        # Back to the head of their lanes (keeping their priority), in the order they were fetched;
        # the fetched but never handed out too, so a restart strands nothing.
        ids = [m.options["redis_message_id"] for m in (*messages, *pairs)]
        try:
            if ids:
                self.broker.settle("requeue", self.queue_name, *ids)
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None


class EagerSlot:
    """A place in a consumer's window, held for the message a step's success write fetches for it in the
    same script call (``step.lua``'s eager fetch, see broker/step_write.py): the queue's next message in
    lane order, fetched and claimed as :meth:`MeshConsumer._fetch` would, is handed to dramatiq by the
    step-writes sender as soon as the write is answered, with no wake-up and no fetch of its own.

    A call whose answer never came (a lost connection), or that was sent again after it had landed
    (its fetch's answer is not known), may have left a message in this worker's hands that it does not
    know of: :meth:`lost` has the consumer reclaim its queue before its next fetch (every message this
    worker holds there and has not handed to dramatiq goes back to the head of its lane), as a
    consumer rebuilt after a lost fetch does. Its claim is then taken over when its lease ends, as a
    lost fetch's is. Both go to the consumer dramatiq's thread has at the time (:meth:`current`): one
    rebuilt after the place was held has reclaimed already and counts what its thread is handed."""

    def __init__(self, consumer: MeshConsumer, thread: Any) -> None:
        self.consumer, self.thread = consumer, thread
        broker = consumer.broker
        nonce = f"{_FORKED}{next(_FETCHES):x}"
        self.owner = f"{broker.broker_id}:{nonce}:1"
        keys, queue, idem = broker.keys, consumer.queue_name, consumer.idempotency
        assert idem is not None
        self.args: list[Any] = [keys.queue(queue), keys.acks(broker.broker_id, queue), keys.held(broker.broker_id),
                                queue, keys.stats, keys.claim(""), self.owner, idem.lease_ms]
        self._open = True

    def hand(self, fetched: Sequence[Any], sent: float, job: bytes, record: bytes, picked: Any = None) -> None:
        """Hand over what the eager fetch answered (``fetched``: nothing, or id, body and claim);
        ``record``: the bytes the write left for job ``job``, the fetched message's record when it is
        a step of the same job; ``picked``: its pick-up, written by the same call (or its refusal)."""
        if fetched:
            rid, data, verdict = fetched[0].decode(), fetched[1], fetched[2]
            same = verdict and verdict[1] == b"run" and _job_of(data, verdict[0]) == job
            self.current().take(self.thread, rid, data, verdict, self.owner, sent, record if same else None,
                               picked if same else None)
        self.release()

    def lost(self) -> None:
        """The write's answer is not known to be its first: reclaim before the next fetch."""
        self.consumer.reclaimed = False
        self.current().reclaimed = False
        self.release()

    def current(self) -> MeshConsumer:
        """The consumer dramatiq's thread has now: one rebuilt since the place was held (a lost
        connection) already reclaimed, and it is the one that counts and settles what is handed over."""
        consumer = getattr(self.thread, "consumer", None)
        return consumer if isinstance(consumer, MeshConsumer) else self.consumer

    def release(self) -> None:
        if self._open:
            self._open = False
            self.consumer.unreserve()


def _job_of(data: bytes, key: bytes) -> bytes | None:
    """The job id a mesh message's envelope names right after its key (as settle.lua reads it), or None."""
    head = b'"args":[{"key":"%s","job_id":"' % key
    at = data.find(head)
    if at < 0:
        return None
    at += len(head)
    end = data.find(b'"', at)
    return data[at:end] if end > at else None
