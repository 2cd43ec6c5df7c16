"""Replay: dead letters back onto their agents' queues, each in one transaction.

A replayed message keeps its **original key** (so idempotency absorbs an effect that already
happened), gets a fresh attempt counter and deadline, and carries ``replay_of`` (the entry id)
as lineage. Its job step goes back to ``queued``, the message is enqueued, and the entry leaves
the DLQ with its audit record, all in one MULTI/EXEC: a replay killed at any point leaves every
entry either replayed or still in the DLQ, never lost and never enqueued twice.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from dramatiq.message import Message

from broker.keys import Keys
from broker.outbox import stage
from broker.settings import MeshSettings
from contracts import JobRecord, State, dumps, loads, transition

from .audit import Audit
from .store import DeadLetterStore, Filter, Stored

#: Step and job states a replay moves back to ``queued``.
REPLAYABLE = frozenset({State.DEAD_LETTERED, State.UNKNOWN, State.FAILED})


class NotReplayable(ValueError):
    """The entry's bytes do not hold a mesh message that could run again (e.g. poison)."""


@dataclass
class ReplayReport:
    """What a replay moved (or, in a dry run, would move) and what it left, with the reason."""

    dry_run: bool
    replayed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    by_agent: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)

    def count(self, stored: Stored) -> None:
        self.replayed.append(stored.entry.entry_id)
        agent = stored.entry.agent or "-"
        self.by_agent[agent] = self.by_agent.get(agent, 0) + 1
        self.by_class[stored.entry.failure_class] = self.by_class.get(stored.entry.failure_class, 0) + 1


def replay_message(stored: Stored, settings: MeshSettings, now: float) -> Message[Any]:
    """The message a replay enqueues: the original envelope and key, a fresh attempt and deadline."""
    try:
        body = loads(stored.raw)
        message: Message[Any] = Message(queue_name=body["queue_name"], actor_name=body["actor_name"],
                                        args=tuple(body["args"]), kwargs=body.get("kwargs") or {}, options={})
    except (ValueError, TypeError, KeyError) as exc:
        raise NotReplayable(f"not a message that can run again ({exc.__class__.__name__}); drain or purge it") from None
    if len(message.args) != 1 or not isinstance(message.args[0], dict):
        raise NotReplayable("carries no envelope; drain or purge it")
    envelope = {**message.args[0], "attempt": 1, "deadline": now + settings.job_deadline_s,
                "replay_of": stored.entry.entry_id}
    return Message(queue_name=message.queue_name.removesuffix(".DQ"), actor_name=message.actor_name,
                   args=(envelope,), kwargs={}, message_id=str(uuid.uuid4()),
                   options={"redis_message_id": str(uuid.uuid4()), "mesh_replays": stored.entry.replay_count + 1})


class Replayer:
    def __init__(self, store: DeadLetterStore, settings: MeshSettings, audit: Audit | None = None) -> None:
        self.store = store
        self.settings = settings
        self.client: redis.Redis = store.client
        self.keys: Keys = store.keys
        self.audit = audit or Audit(store.client, store.keys)

    def replay(self, entries: Iterable[Stored], *, dry_run: bool = False, rate: float | None = None,
               progress: Callable[[int], None] | None = None) -> ReplayReport:
        """Replay ``entries`` (at most ``rate`` per second); a dry run changes nothing."""
        report = ReplayReport(dry_run=dry_run)
        pace = _pacer(rate)
        for stored in entries:
            try:
                message = replay_message(stored, self.settings, time.time())
                if not dry_run:
                    next(pace)
                    if not self._replay_one(stored, message):
                        report.skipped[stored.entry.entry_id] = "no longer in the DLQ (replayed or removed meanwhile)"
                        continue
                report.count(stored)
            except NotReplayable as exc:
                report.skipped[stored.entry.entry_id] = str(exc)
            if progress:
                progress(1)
        return report

    def entries(self, ids: Iterable[str] | None = None, flt: Filter | None = None,
                *, dry_run: bool = False) -> Iterator[Stored]:
        """The entries to replay: the given ids, or every entry ``flt`` matches, oldest first."""
        if ids is not None:
            for entry_id in ids:
                stored = self.store.load(entry_id)
                if stored is not None:
                    yield stored
            return
        for batch in self.store.iter(flt or Filter(), removing=not dry_run):
            yield from batch

    def _replay_one(self, stored: Stored, message: Message[Any]) -> bool:
        entry = stored.entry
        entry_key = self.keys.dead_letter(entry.entry_id)
        env = message.args[0]
        job_key = self.keys.job(env["job_id"]) if isinstance(env.get("job_id"), str) else None
        now = time.time()

        def apply(pipe: Any) -> bool:
            if not pipe.exists(entry_key):
                return False
            record = None
            if job_key is not None:
                data = pipe.get(job_key)
                record = _requeue(JobRecord.model_validate(loads(data)), env.get("step_id"), now) if data else None
            pipe.multi()
            if record is not None and job_key is not None:
                pipe.set(job_key, dumps(record))
            stage(pipe, self.keys, message)
            self.store.remove([entry], pipe)
            self.audit.stage(pipe, "replay", entry.entry_id, message_id=message.message_id, key=env.get("key"),
                             queue=message.queue_name, replay_count=entry.replay_count + 1)
            pipe.hincrby(self.keys.stats, "replayed", 1)
            return True

        watched = [entry_key] + ([job_key] if job_key else [])
        return bool(self.client.transaction(apply, *watched, value_from_callable=True))  # type: ignore[arg-type]


def _requeue(record: JobRecord, step_id: Any, now: float) -> JobRecord:
    """The job with the replayed step queued again (its stale error and timestamps scrubbed)."""
    step = record.steps.get(step_id) if isinstance(step_id, str) else None
    if step is not None and step.state in REPLAYABLE:
        record = record.with_step(transition(step, State.QUEUED, now=now, sent_at=now))
    if record.state in REPLAYABLE:
        record = transition(record, State.QUEUED, now=now)
    return record


def _pacer(rate: float | None) -> Iterator[None]:
    """Yields no faster than ``rate`` times per second (unbounded when None)."""
    interval = 1 / rate if rate else 0.0
    next_at = time.monotonic()
    while True:
        if interval:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at, time.monotonic() - interval) + interval
        yield
