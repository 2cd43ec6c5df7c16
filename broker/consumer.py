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
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed, DecodeError
from dramatiq.message import Message

from mesh.contracts import TERMINAL, FailureClass, JobRecord, State, dumps, loads
from mesh.contracts.deadletter import DeadLetter, format_traceback

from . import trace
from .outbox import encode
from .settle import DeadLetterIt, JobWrite, RetryLater, decide, decision_of, options_problem, raw_of
from .trace import TRACE_MAXLEN

if TYPE_CHECKING:
    from .mesh_broker import MeshBroker

logger = logging.getLogger(__name__)

#: How long an idle consumer blocks waiting for work before it looks again (s).
WAIT_S = 1.0

#: Times a settlement re-reads a job record that another writer changed meanwhile.
CONFLICT_RETRIES = 50


class MeshConsumer(_RedisConsumer):
    broker: MeshBroker

    def __init__(self, broker: MeshBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self.pairs: list[tuple[str, bytes]] = []
        self.last_beat = 0.0
        self.in_hand: set[str] = broker.in_hand.setdefault(queue_name, set())
        self.reclaimed = False
        #: Set by every settlement: a consumer whose prefetch window is full waits on it, not on a timer.
        self.settled = threading.Event()
        self.window_full = False

    @property
    def outstanding_message_count(self) -> int:
        return len(self.queued_message_ids) + len(self.pairs)

    def ack(self, message: MessageProxy) -> None:
        decision = decision_of(message)
        rid = message.options["redis_message_id"]
        try:
            if decision is None and message.__dict__.get("_exception") is not None:
                # The attempt failed and no hook decided its fate (one of them broke): never acked away.
                decision = self._unrouted(message)
            if isinstance(decision, RetryLater):
                new = decision.message
                self._settle_job("retry", decision.job, rid, new.options["redis_message_id"], new.encode(),
                                 decision.stat, decision.route)
            elif isinstance(decision, DeadLetterIt):
                self._dead(rid, decision.entry, raw_of(message), decision.stat, decision.route, decision.job)
            else:
                self.broker.do_ack(self.queue_name, rid)
        except (redis.RedisError, ConnectionClosed) as exc:
            # Any Redis error (a lost connection, OOM, READONLY after a failover, BUSY): dramatiq
            # retries the settlement until it goes through, and the message stays in hand meanwhile.
            raise ConnectionClosed(exc) from None
        except Exception:
            # Not retried by dramatiq: let go of the message (the next consumer's reclaim puts it
            # back), so the prefetch window does not shrink for good.
            self._let_go(message, rid)
            raise
        self._let_go(message, rid)

    def _let_go(self, message: MessageProxy, rid: str) -> None:
        self.queued_message_ids.discard(message.message_id)
        self.in_hand.discard(rid)
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

    def _settle_job(self, command: str, job: JobWrite | None, rid: str, *args: Any) -> None:
        """Settle with the job-record change in the same script; a record changed meanwhile by
        another writer is read again and the change recomputed (optimistic, like WATCH)."""
        for _ in range(CONFLICT_RETRIES):
            arg = self._job_arg(job)
            if arg is None:
                # The failure struck after this attempt's success was written (a time limit landing
                # after EXEC): the record is the truth, and the message is done.
                assert job is not None
                logger.warning("attempt failed after its success was recorded: settled as done",
                               extra={"job_id": job.job_id, "step_id": job.step_id})
                self.broker.do_ack(self.queue_name, rid)
                return
            if self.broker.settle(command, self.queue_name, rid, *args, arg) != -1:
                return
        raise RuntimeError(f"job record {job.job_id if job else '?'} kept changing while settling {rid}")

    def _job_arg(self, job: JobWrite | None) -> str | None:
        """The settle script's job argument for ``job``, from one read of its record; None when that
        record shows this very attempt's step succeeded (then there is no failure to record)."""
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
                return None
            record, messages = job.change(before)
            # What the failure sets in motion (a pipeline's next steps) is sent with the record.
            arg["msgs"] = [{"hash": keys.messages(m.queue_name), "queue": keys.queue(m.queue_name),
                            "wake": keys.wake(m.queue_name), "rid": m.options["redis_message_id"],
                            "data": encode(m).decode()} for m in messages]
            arg["events"] += [dumps(trace.event("enqueued", m.args[0], queue=m.queue_name)).decode()
                              for m in messages]
            arg["sha"] = hashlib.sha1(current).hexdigest()
            arg["new"] = dumps(record).decode()
            if record.state in TERMINAL and before.state not in TERMINAL:
                # Ending the job starts its retention clock (as jobs.stage_record does); else KEEPTTL.
                arg["ttl"] = max(1, int(self.broker.settings.job_retention_s))
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
              job: JobWrite | None = None) -> None:
        # Indexed under its agent only when this worker declares it: a name a producer invented keeps
        # its place in the entry but creates no index key of its own.
        agent = entry.agent if entry.agent in self.broker.actors else "-"
        self._settle_job("dead", job, rid, entry.entry_id, dumps(entry), raw, stat, route,
                         agent, entry.failure_class)

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
        try:
            self._dead(rid, entry, data, "poison", "invalid_input:dead_letter")
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None

    def _next_message(self) -> MessageProxy | None:
        while self.pairs:
            rid, data = self.pairs.pop(0)
            try:
                message = Message.decode(data)
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
                continue
            message.options["redis_message_id"] = rid
            self.queued_message_ids.add(message.message_id)
            self.in_hand.add(rid)
            proxy = MessageProxy(message)
            proxy.mesh_raw = data  # type: ignore[attr-defined]
            return proxy
        return None

    def _fetch(self) -> bool:
        if not self.reclaimed:
            # dramatiq never hands delay-queue messages to worker threads: a rebuilt delay-queue
            # consumer holds none of them, whatever the last one had.
            keep = () if self.queue_name.endswith(".DQ") else tuple(self.in_hand)
            n = self.broker.settle("reclaim", self.queue_name, *keep)
            self.reclaimed = True
            if n:
                logger.warning("messages left behind by a lost connection put back",
                               extra={"queue": self.queue_name, "count": n})
        self.settled.clear()
        wanted = self.prefetch - self.outstanding_message_count
        self.window_full = wanted <= 0
        if self.window_full:
            self._beat()
            return False
        flat: list[Any] = self.broker.settle("fetch", self.queue_name, wanted)
        self.last_beat = time.monotonic()
        self.pairs = [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]
        return bool(self.pairs)

    def _beat(self) -> None:
        # Busy consumers do not fetch; without this a long handler would look like a dead worker.
        if time.monotonic() - self.last_beat >= self.broker.heartbeat_timeout / 4000:
            self.broker.settle("heartbeat", self.queue_name)
            self.last_beat = time.monotonic()

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                proxy = self._next_message()
                if proxy is not None:
                    self.misses = 0
                    return proxy
                if not self._fetch():
                    if self.window_full:
                        # Every prefetched message is still being worked on: go on as soon as one
                        # settles (dramatiq sleeps with backoff here, as if the queue were empty).
                        self.settled.wait(self.timeout / 1000)
                    elif self.queue_name.endswith(".DQ"):
                        # dramatiq checks delayed messages' due times between polls: keep polling.
                        self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                        time.sleep(backoff_ms / 1000)
                    else:
                        # Idle: block until an enqueue pushes a wake-up token (or a second passes, so
                        # heartbeats, recovery and shutdown go on), instead of polling with backoff.
                        self.broker.wait_for_work(self.queue_name, WAIT_S)
                    return None
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None

    def close(self) -> None:
        if self.queue_name.endswith(".DQ"):
            # Before a delay-queue consumer is closed, dramatiq has requeued or dropped every delayed
            # message it held: none is in hand any more, and the next consumer reclaims the dropped.
            self.in_hand.clear()
        super().close()

    def requeue(self, messages: Any) -> None:
        messages = list(messages)
        pairs, self.pairs = self.pairs, []
        # dramatiq lets go of these whatever happens here; should the requeue fail, the next
        # consumer's reclaim puts them back.
        for message in messages:
            self.in_hand.discard(message.options["redis_message_id"])
        try:
            super().requeue(messages)
            # Fetched but never handed out: these go back too, so a restart strands nothing.
            for rid, _ in pairs:
                self.broker.settle("requeue", self.queue_name, rid)
        except redis.RedisError as exc:
            raise ConnectionClosed(exc) from None
