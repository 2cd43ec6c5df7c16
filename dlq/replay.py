"""Replay: dead letters back onto their agents' queues, each in one transaction.

A replayed message keeps its **original key** (so idempotency absorbs an effect that already
happened), gets a fresh attempt counter and deadline, and carries ``replay_of`` (the entry id)
as lineage. Its job step goes back to ``queued``, the message is enqueued, and the entry leaves
the DLQ with its audit record and a tombstone (``mesh dlq show`` of the replayed id), all in one
MULTI/EXEC: a replay killed at any point leaves every entry either replayed or still in the DLQ,
never lost and never enqueued twice. The job's trace gets a ``replayed``
event (who, from which entry) in that transaction too.

A job that ended holding a dead letter keeps its record while the dead letter may be replayed
(``MeshSettings.dead_letter_job_retention_s``, broker/jobs.py). One whose record is gone all the same
(an entry that waited past the dedup window, or was drained and loaded back later): a job of one
message (``mesh send``) has its record recreated by the replay, queued with that one step; a step of a
pipeline's job cannot run without the job's other steps and spec, so its entry is skipped (it stays in
the DLQ, its error intact) with the reason, in a dry run as in a replay.

``to_version``: a message stamped with a contract version no worker serves any more (a rolling deploy)
is sent to the version the agent's workers publish now, when its payload validates against that
version's input schema; otherwise it is skipped with the validation error.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from dramatiq.message import Message

from mesh.broker import trace
from mesh.broker.client import job_id_for, payload_hash
from mesh.broker.clock import ServerClock
from mesh.broker.connection import staged
from mesh.broker.jobs import stage_record
from mesh.broker.keys import Keys
from mesh.broker.ledger import Ledger
from mesh.broker.outbox import encode_checked, stage, wake
from mesh.broker.registry import Registry
from mesh.broker.settings import MeshSettings
from mesh.contracts import (
    ContractError,
    JobRecord,
    LimitExceeded,
    State,
    StepRecord,
    dumps,
    loads,
    settle,
    transition,
)
from mesh.contracts.effects import HAPPENED
from mesh.contracts.jobs import is_compensation, newer_state

from .audit import Audit
from .checks import Routes, message_body
from .store import DeadLetterShards, DeadLetterStore, Filter, Stored

#: Entries replayed per MULTI/EXEC when no rate is set.
BATCH = 200

#: Why an entry a replay was handed is left where it is.
GONE = "no longer in the DLQ (replayed or removed meanwhile)"

#: The Redis type each key of a queue must have (or none) for a replay to enqueue onto it.
QUEUE_TYPES = {"queue": b"list", "messages": b"hash", "wake": b"list"}

#: Step and job states a replay moves back to ``queued``.
REPLAYABLE = frozenset({State.DEAD_LETTERED, State.UNKNOWN, State.FAILED})


class NotReplayable(ValueError):
    """The entry's bytes do not hold a mesh message that could run again (e.g. poison), or not as
    asked (``to_version``)."""


@dataclass
class ReplayReport:
    """What a replay moved (or, in a dry run, would move) and what it left, with the reason."""

    dry_run: bool
    replayed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    by_agent: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)
    #: Commands of a replay's transaction Redis refused that did not stop an enqueue (an audit record,
    #: a counter): the entries were replayed, but what these record is missing.
    errors: list[str] = field(default_factory=list)

    def add(self, other: ReplayReport) -> None:
        """Add ``other``'s (another shard's) to this report."""
        self.replayed += other.replayed
        self.skipped.update(other.skipped)
        for name, n in other.by_agent.items():
            self.by_agent[name] = self.by_agent.get(name, 0) + n
        for name, n in other.by_class.items():
            self.by_class[name] = self.by_class.get(name, 0) + n
        self.errors += other.errors

    def count(self, stored: Stored) -> None:
        self.replayed.append(stored.entry.entry_id)
        agent = stored.entry.agent or "-"
        self.by_agent[agent] = self.by_agent.get(agent, 0) + 1
        self.by_class[stored.entry.failure_class] = self.by_class.get(stored.entry.failure_class, 0) + 1


def replay_message(stored: Stored, settings: MeshSettings, now: float, *,
                   contract_version: int | None = None) -> Message[Any]:
    """The message a replay enqueues: the original envelope and key, a fresh attempt and deadline
    (and ``contract_version`` in place of the one it was stamped with, when given)."""
    try:
        body = loads(stored.raw)
        message: Message[Any] = Message(queue_name=body["queue_name"], actor_name=body["actor_name"],
                                        args=tuple(body["args"]), kwargs=body.get("kwargs") or {}, options={})
    except (ValueError, TypeError, KeyError) as exc:
        raise NotReplayable(f"not a message that can run again ({exc.__class__.__name__}); drain or purge it") from None
    if len(message.args) != 1 or not isinstance(message.args[0], dict) or not message.args[0].get("key"):
        raise NotReplayable("carries no envelope; drain or purge it")
    envelope = {**message.args[0], "attempt": 1, "deadline": now + settings.job_deadline_s,
                "replay_of": stored.entry.entry_id}
    if contract_version is not None:
        envelope["contract_version"] = contract_version
    options: dict[str, Any] = {"redis_message_id": str(uuid.uuid4()), "mesh_replays": stored.entry.replay_count + 1}
    output = (body.get("options") or {}).get("mesh_output") if isinstance(body.get("options"), dict) else None
    if isinstance(output, dict):
        # A handler that finished but whose outcome was never recorded: the replay records it, not re-runs it.
        options["mesh_output"] = output
    return Message(queue_name=message.queue_name.removesuffix(".DQ"), actor_name=message.actor_name,
                   args=(envelope,), kwargs={}, message_id=str(uuid.uuid4()), options=options)


class Replayer:
    def __init__(self, store: DeadLetterStore, settings: MeshSettings, audit: Audit | None = None, *,
                 to_version: int | None = None, decided: frozenset[tuple[str, str]] = frozenset()) -> None:
        """``to_version``: send each message to this contract version of its agent (see the module).
        ``decided``: the (job, step) pairs whose unknown effects ``mesh verify`` or ``mesh settle``
        just decided happened: replayed even in a job undoing its effects (see :func:`_unwound`)."""
        self.decided = decided
        self.store = store
        self.settings = settings
        self.client: redis.Redis = store.client
        self.keys: Keys = store.keys
        self.audit = audit or Audit(store.client, store.keys)
        self.to_version = to_version
        self.registry = Registry(store.client, store.keys, settings.heartbeat_timeout_s)
        self._versions: dict[str, set[int]] | None = None
        #: The fresh deadline is on the Redis server's clock, where workers check it, whatever this host's says.
        self.clock = ServerClock(store.client)

    def replay(self, entries: Iterable[Stored], *, dry_run: bool = False, rate: float | None = None,
               progress: Callable[[int], None] | None = None) -> ReplayReport:
        """Replay ``entries`` (at most ``rate`` per second); a dry run changes nothing and reports
        what a replay would do, skips included.

        Unpaced, entries go in batches of BATCH, each batch one MULTI/EXEC; paced, one by one.
        """
        report = ReplayReport(dry_run=dry_run)
        pace = _pacer(rate)
        routes = Routes.read(self.client, self.keys)
        batch: list[tuple[Stored, Message[Any]]] = []

        def flush() -> None:
            outcomes = self._check_batch(batch) if dry_run else self._replay_batch(batch, report)
            for (stored, _), skipped in zip(batch, outcomes, strict=True):
                if skipped is None:
                    report.count(stored)
                else:
                    report.skipped[stored.entry.entry_id] = skipped
            if progress:
                progress(len(batch))
            batch.clear()

        for stored in entries:
            try:
                message = self._message(stored, routes)
            except NotReplayable as exc:
                report.skipped[stored.entry.entry_id] = str(exc)
                if progress:
                    progress(1)
                continue
            if not dry_run:
                next(pace)
            batch.append((stored, message))
            if (rate is not None and not dry_run) or len(batch) >= BATCH:
                flush()
        if batch:
            flush()
        return report

    def _message(self, stored: Stored, routes: Routes) -> Message[Any]:
        """The message replaying ``stored`` enqueues; NotReplayable when there is none (as asked), when
        its bytes address anything but a known agent's own queue under the entry's label, or when it
        would be over the message limits."""
        body = message_body(stored.raw)
        problem = routes.problem(stored.entry, body) if body is not None else None
        if problem:
            raise NotReplayable(f"{problem}; purge it, or drain it to fix it by hand")
        message = self._versioned(stored)
        try:
            encode_checked(message, self.settings.max_message_bytes, self.settings.max_json_depth)
        except LimitExceeded as exc:
            raise NotReplayable(f"{exc}: a worker would refuse it; drain or purge it") from None
        return message

    def _versioned(self, stored: Stored) -> Message[Any]:
        """The message as ``to_version`` asks (NotReplayable when its agent's workers do not serve it)."""
        if self.to_version is None:
            return replay_message(stored, self.settings, self.clock.now_s())
        message = replay_message(stored, self.settings, self.clock.now_s(), contract_version=self.to_version)
        agent = message.actor_name
        published = self.registry.get(agent)
        if published is None or published.version != self.to_version:
            now = "publish no version" if published is None else f"publish version {published.version}"
            raise NotReplayable(f"--to-version {self.to_version}: the workers of {agent!r} {now}")
        served = self._served().get(agent, set())
        if self.to_version not in served:
            now = ", ".join(map(str, sorted(served))) or "none"
            raise NotReplayable(f"--to-version {self.to_version}: no live worker of {agent!r} serves it "
                                f"(live workers serve: {now})")
        try:
            published.validate_input(message.args[0].get("payload"))
        except ContractError as exc:
            raise NotReplayable(f"--to-version {self.to_version}: the payload does not fit it: {exc.message}") from None
        return message

    def _served(self) -> dict[str, set[int]]:
        """Per agent, the contract versions its live workers serve (read once per replay): the registry
        holds what was published last, which a rollback leaves naming a version nobody serves."""
        if self._versions is None:
            self._versions = {x.agent.name: {w.version for w in x.workers if w.alive and w.version is not None}
                              for x in self.registry.listing()}
        return self._versions

    def _check_batch(self, batch: list[tuple[Stored, Message[Any]]]) -> list[str | None]:
        """A dry run's answer for a batch, per entry: None (it would be replayed) or why it would be
        skipped, as the replay's own transaction would decide it from the same reads."""
        pipe = self.client.pipeline(transaction=False)
        for stored, message in batch:
            pipe.exists(self.keys.dead_letter(stored.entry.entry_id))
            job_id = message.args[0].get("job_id")
            pipe.get(self.keys.job(job_id if isinstance(job_id, str) else ""))
        found = pipe.execute()
        out: list[str | None] = []
        for i, (_, message) in enumerate(batch):
            here, job = found[2 * i], found[2 * i + 1]
            env = message.args[0]
            if not here:
                out.append("no longer in the DLQ (replayed or removed meanwhile)")
            elif job is not None:
                record = JobRecord.model_validate(loads(job))
                out.append(_owned_by_newer(record, env.get("step_id"))
                           or _unwound(record, env.get("step_id"), self._decided))
            else:
                out.append(None if not isinstance(env.get("job_id"), str) else _unrecreatable(env))
        return out

    def _decided(self, job_id: str, step_id: str) -> bool:
        """Whether this replay is ``mesh verify``'s or ``mesh settle``'s (``decided``) and every effect
        in the step's ledger is decided as having happened (verified, or settled applied): its re-run
        is answered from the ledger and calls nothing. A plain DLQ replay never is."""
        if (job_id, step_id) not in self.decided:
            return False
        found = Ledger(self.client, self.keys, job_id, step_id, self.settings.dedup_ttl_s).entries()
        return bool(found) and all(e.verdict in HAPPENED for e in found)

    def entries(self, ids: Iterable[str] | None = None, flt: Filter | None = None) -> Iterator[Stored]:
        """The entries to replay: the given ids, or every entry ``flt`` matches, oldest first."""
        if ids is not None:
            for entry_id in ids:
                stored = self.store.load(entry_id)
                if stored is not None:
                    yield stored
            return
        for batch in self.store.iter(flt or Filter()):
            yield from batch

    def _replay_batch(self, batch: list[tuple[Stored, Message[Any]]], report: ReplayReport) -> list[str | None]:
        """Replay a batch in one MULTI/EXEC, watching its entries, their jobs and their queues' keys:
        every entry still in the DLQ goes back to its queue with its step requeued, or, if anything
        changed, none does and the batch is read again. Per entry: None (replayed) or why it was skipped."""
        entry_keys = [self.keys.dead_letter(s.entry.entry_id) for s, _ in batch]
        job_ids = sorted({m.args[0]["job_id"] for _, m in batch if isinstance(m.args[0].get("job_id"), str)})
        job_keys = [self.keys.job(j) for j in job_ids]
        queue_keys = {k: t for q in sorted({m.queue_name for _, m in batch}) for k, t in self._queue_keys(q)}
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*entry_keys, *job_keys, *queue_keys)
                    # Read on another connection: WATCH still voids the EXEC if any of these change.
                    reads = self.client.pipeline(transaction=False)
                    for key in entry_keys:
                        reads.exists(key)
                    for key in job_keys:
                        reads.get(key)
                    for key in queue_keys:
                        reads.type(key)
                    values = reads.execute()
                    n, m = len(entry_keys), len(entry_keys) + len(job_keys)
                    records = {j: JobRecord.model_validate(loads(d))
                               for j, d in zip(job_ids, values[n:m], strict=True) if d is not None}
                    problems = self._problems(batch, values[:n], dict(zip(queue_keys, values[m:], strict=True)),
                                              records)
                    skipped, spans = self._stage_batch(pipe, batch, problems, records)
                    return self._settle(batch, skipped, spans, execute(pipe), report)
                except redis.WatchError:
                    continue

    def _queue_keys(self, queue: str) -> list[tuple[str, bytes]]:
        """The keys an enqueue onto ``queue`` writes, each with the type it must have."""
        return [(getattr(self.keys, name)(queue), kind) for name, kind in QUEUE_TYPES.items()]

    def _problems(self, batch: list[tuple[Stored, Message[Any]]], present: list[Any],
                  types: dict[str, bytes], records: dict[str, JobRecord]) -> list[str | None]:
        """Per entry, why it cannot be replayed now: gone from the DLQ; its queue's keys hold other
        types (an enqueue would fail inside the transaction, after the entry's removal was queued);
        or its job's step belongs to another agent (the replay would requeue that agent's step)."""
        out: list[str | None] = []
        wrong = {q: [f"{k} holds a {types[k].decode()}" for k, t in self._queue_keys(q) if types[k] not in (t, b"none")]
                 for q in {m.queue_name for _, m in batch}}
        for (_, message), here in zip(batch, present, strict=True):
            env = message.args[0]
            record = records.get(env.get("job_id"))
            step = record.steps.get(env.get("step_id")) if record is not None else None
            if not here:
                out.append(GONE)
            elif wrong[message.queue_name]:
                out.append(f"queue {message.queue_name!r} cannot take it: {', '.join(wrong[message.queue_name])}")
            elif step is not None and step.agent != message.actor_name:
                out.append(f"step {step.step_id} of job {env['job_id']} is agent {step.agent}'s, "
                           f"not {message.actor_name}'s")
            else:
                out.append(None)
        return out

    def _settle(self, batch: list[tuple[Stored, Message[Any]]], problems: list[str | None],
                spans: dict[int, range], refused: list[str | None], report: ReplayReport) -> list[str | None]:
        """Read every reply of the transaction (``refused``: per command, the error Redis answered, or
        None): an entry whose enqueue Redis refused is put back in the DLQ (its removal ran in the same
        transaction) and reported; other refusals go to the report."""
        out = list(problems)
        enqueues = {i for span in spans.values() for i in span}
        for i, (stored, _) in enumerate(batch):
            failed = [r for r in (refused[j] for j in spans.get(i, ())) if r is not None]
            if failed:
                self.store.put(stored.entry, stored.raw)
                audit = self.client.pipeline(transaction=False)
                audit.delete(self.keys.dlq_replayed(stored.entry.entry_id))  # not replayed after all
                self.audit.stage(audit, "replay_failed", stored.entry.entry_id, error=failed[0])
                audit.execute()
                out[i] = f"Redis refused its enqueue ({failed[0]}); it is back in the DLQ"
        report.errors += [r for j, r in enumerate(refused) if r is not None and j not in enqueues]
        return out

    def _stage_batch(self, pipe: Any, batch: list[tuple[Stored, Message[Any]]], problems: list[str | None],
                     records: dict[str, JobRecord]) -> tuple[list[str | None], dict[int, range]]:
        """Stage the batch's replay into ``pipe``; returns per entry None or why it is skipped, and, per
        entry staged, the positions of its enqueue's commands in the transaction (to read their replies)."""
        now = time.time()
        changed: set[str] = set()
        was: dict[str, State | None] = {job_id: record.state for job_id, record in records.items()}
        entries, skipped, spans, per_queue = [], [], {}, Counter[str]()
        pipe.multi()
        for i, ((stored, message), problem) in enumerate(zip(batch, problems, strict=True)):
            env, entry = message.args[0], stored.entry
            job_id = env.get("job_id")
            why = problem
            if why is None and isinstance(job_id, str) and job_id in records:
                why = _owned_by_newer(records[job_id], env.get("step_id")) or _unwound(
                    records[job_id], env.get("step_id"), self._decided)
            if why is None and isinstance(job_id, str) and job_id not in records:
                why = _unrecreatable(env)
                if why is None:
                    records[job_id], was[job_id] = _recreated(env, message.actor_name, now), None
                    pipe.zadd(self.keys.jobs, {job_id: now}, nx=True)
                    pipe.zrem(self.keys.jobs_expired, job_id)
            skipped.append(why)
            if why is not None:
                continue
            recreated = was.get(job_id) is None and job_id in records
            if job_id in records:
                records[job_id] = _requeue(records[job_id], env.get("step_id"), now)
                changed.add(job_id)
            start = len(staged(pipe))
            stage(pipe, self.keys, message, wake_up=False)
            spans[i] = range(start, len(staged(pipe)))
            per_queue[message.queue_name] += 1
            entries.append(entry)
            self._stage_trail(pipe, message, entry, recreated=recreated)
        for queue, n in per_queue.items():
            wake(pipe, self.keys, queue, n)
        self.store.remove(entries, pipe)
        for job_id in changed:
            # Active again: the record and trace lose the retention TTL the job's end gave them.
            stage_record(pipe, self.keys, records[job_id], was=was[job_id] or State.QUEUED,
                         retention_s=self.settings.job_retention_s,
                         keep_s=self.settings.dead_letter_job_retention_s)
        if entries:
            pipe.hincrby(self.keys.stats, "replayed", len(entries))
        return skipped, spans

    def _stage_trail(self, pipe: Any, message: Message[Any], entry: Any, *, recreated: bool) -> None:
        """What a replay leaves behind: the audit record, the entry's tombstone (``mesh dlq show`` of a
        replayed id), and a ``replayed`` event in the job's trace (who replayed which entry, as which
        message, and what it changed)."""
        env = message.args[0]
        detail = {"message_id": message.message_id, "key": env.get("key"), "queue": message.queue_name,
                  "replay_count": entry.replay_count + 1}
        if self.to_version is not None:
            detail["to_version"] = self.to_version
        if recreated:
            detail["recreated_record"] = True
        self.audit.stage(pipe, "replay", entry.entry_id, **detail)
        stage_tombstone(pipe, self.keys, entry, by=self.audit.who, job_id=env.get("job_id"),
                        ttl_s=self.settings.dlq_retention_s or self.settings.dedup_ttl_s, **detail)
        trace.stage(pipe, self.keys, trace.event(
            "replayed", env, entry_id=entry.entry_id, by=self.audit.who, failure_class=entry.failure_class,
            error=entry.error[:200], **{k: v for k, v in detail.items() if k != "key"}))


def replay_shards(dlq: DeadLetterShards, settings: MeshSettings, *, ids: Iterable[str] | None = None,
                  flt: Filter | None = None, who: str | None = None, to_version: int | None = None,
                  decided: frozenset[tuple[str, str]] = frozenset(), dry_run: bool = False, rate: float | None = None,
                  progress: Callable[[int], None] | None = None) -> ReplayReport:
    """Replay the given entry ids, or every entry ``flt`` matches, from every shard's DLQ: a shard at a
    time (each replay's transaction within its shard), each entry onto its shard's queues (its job's),
    the reports added up. ``who``: the operator the audit records name. ``rate`` holds for all of them."""
    report = ReplayReport(dry_run=dry_run)
    work: list[tuple[DeadLetterStore, list[str] | None]]
    if ids is not None:
        chosen: dict[int, list[str]] = {}
        for entry_id in ids:
            chosen.setdefault(dlq.stores.index(dlq.store_of(entry_id)), []).append(entry_id)
        work = [(dlq.stores[i], chosen[i]) for i in sorted(chosen)]
    else:
        work = [(store, None) for store in dlq.stores]
    for store, some in work:
        replayer = Replayer(store, settings, Audit(store.client, store.keys, who=who), to_version=to_version,
                            decided=decided)
        report.add(replayer.replay(replayer.entries(some, None if some is not None else flt), dry_run=dry_run,
                                   rate=rate, progress=progress))
    return report


def stage_tombstone(pipe: Any, keys: Keys, entry: Any, *, by: str, job_id: Any, ttl_s: float,
                    **detail: Any) -> None:
    """Stage the tombstone of a replayed entry into the replay's transaction: what the entry was
    (agent, class, error, key, job, when dead-lettered) and where it went (when, by whom, as which
    message onto which queue), for ``mesh dlq show ID`` once the entry itself left the DLQ. It
    expires after the DLQ retention (MESH_DLQ_RETENTION_S, else MESH_DEDUP_TTL_S when that is 0),
    as long as the entry itself could have stayed; the audit log keeps the record after that."""
    tomb = {"entry_id": entry.entry_id, "agent": entry.agent, "failure_class": entry.failure_class,
            "error": entry.error[:500], "key": entry.key, "job_id": job_id if isinstance(job_id, str) else entry.job_id,
            "trace_id": entry.trace_id, "dead_lettered_at": entry.dead_lettered_at, "replay_of": entry.replay_of,
            "replayed_at": time.time(), "replayed_by": by, **detail}
    pipe.set(keys.dlq_replayed(entry.entry_id), dumps(tomb), ex=max(1, math.ceil(ttl_s)))


def replayed(client: redis.Redis, keys: Keys, entry_id: str) -> dict[str, Any] | None:
    """The tombstone of a replayed entry (see :func:`stage_tombstone`), or None (never replayed, still
    in the DLQ, or its tombstone expired)."""
    raw = client.get(keys.dlq_replayed(entry_id))
    return loads(raw) if raw else None


def _owned_by_newer(record: JobRecord, step_id: Any) -> str | None:
    """Why a replay must leave the job alone: a newer release of the mesh moved it (or the replayed
    step) into a state this release does not know (a rolling deploy: ``archived``, ``quarantined``).
    This release never moves a record out of such a state, so it sends nothing to run behind it."""
    newer = newer_state(record, record.steps.get(step_id) if isinstance(step_id, str) else None)
    if newer is None:
        return None
    what, state = newer
    name = f"job {record.job_id}" if what == "job" else f"step {step_id}"
    return f"{name} is {state.value!r}, a state of a newer release of the mesh: replay it with a worker of that release"


def _unwound(record: JobRecord, step_id: Any, decided: Callable[[str, str], bool] | None = None) -> str | None:
    """Why a replay must leave a step of a job that began undoing its effects alone (it halted, failed
    under ``halt_pipeline`` or was cancelled, and its compensations ran or run): running the step now
    would redo an effect next to undone ones, and a second halt would compensate twice. Its entry
    stays in the DLQ. A compensation's own dead letter is replayed: it takes the chain up again. So
    is the dead letter of an ``unknown`` step the compensations wait for, replayed by ``mesh verify``
    or ``mesh settle`` once they found its effects happened (``decided``): its re-run is answered
    from its ledger, and its output is what its compensation undoes."""
    if record.unwind is None or (isinstance(step_id, str) and is_compensation(step_id)):
        return None
    step = record.steps.get(step_id) if isinstance(step_id, str) else None
    if (step is not None and step.state is State.UNKNOWN and record.state is State.COMPENSATING
            and decided is not None and decided(record.job_id, step.step_id)):
        return None
    return (f"job {record.job_id} is {record.state.value} ({record.unwind.reason}): its steps are not run again; "
            f"start a new run with mesh rerun {record.job_id} --from {step_id}")


def _unrecreatable(env: dict[str, Any]) -> str | None:
    """Why the expired job of ``env`` cannot be recreated by its replay; None when it can: a job of
    one message (``mesh send``: its key names the job, its step is its agent)."""
    key, job_id = env.get("key"), env.get("job_id")
    if isinstance(key, str) and job_id_for(key) == job_id and env.get("step_id") == env.get("agent"):
        return None
    return (f"job {job_id}'s record has expired (MESH_JOB_RETENTION_S) and this is a step of a pipeline, "
            "which cannot run without the job's other steps: run the pipeline again, or drain or purge it")


def _recreated(env: dict[str, Any], agent: str, now: float) -> JobRecord:
    """The record of a one-message job whose record expired, as its client wrote it, queued again."""
    raw = env.get("payload")
    payload: dict[str, Any] = raw if isinstance(raw, dict) else {}
    step = StepRecord(step_id=env["step_id"], agent=agent, key=env["key"], input=payload, created_at=now,
                      updated_at=now)
    return JobRecord(job_id=env["job_id"], key=env["key"], trace_id=env["trace_id"], created_at=now,
                     updated_at=now, payload_hash=payload_hash(agent, payload), steps={step.step_id: step})


def _requeue(record: JobRecord, step_id: Any, now: float) -> JobRecord:
    """The job with the replayed step queued again (its stale error and timestamps scrubbed), the
    ``for_each`` step it is an item of reopened if its join had failed, and the job's state derived
    from its steps: still dead-lettered while another blocking step is."""
    step = record.steps.get(step_id) if isinstance(step_id, str) else None
    if step is not None and step.state in REPLAYABLE:
        record = record.with_step(transition(step, State.QUEUED, now=now, sent_at=now))
        parent = record.steps.get(step.parent) if step.parent else None
        if parent is not None and parent.state in REPLAYABLE:
            record = record.with_step(transition(transition(parent, State.QUEUED, now=now), State.RUNNING, now=now))
    record = settle(record, now)
    if record.state is State.FAILED:
        record = transition(record, State.QUEUED, now=now)
    return record


def execute(pipe: Any) -> list[str | None]:
    """Run the transaction staged in ``pipe``; per command, what Redis refused it with (its name and
    key first), or None. Redis runs every command of an EXEC, so one refusal stops nothing else."""
    commands = [args for args, _ in staged(pipe)]
    replies = pipe.execute(raise_on_error=False)
    return [f"{' '.join(map(str, c[:2]))}: {r}" if isinstance(r, Exception) else None
            for c, r in zip(commands, replies, strict=True)]


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
