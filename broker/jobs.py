"""Job records in Redis: read, created with their first message, updated in WATCH/MULTI transactions.

Retention rides on the writes: the write that ends a job (moves it to a TERMINAL state) gives its
record and trace a TTL of MESH_JOB_RETENTION_S in the same MULTI; a write that makes it active
again (a DLQ replay) removes both TTLs. A running or waiting job therefore never expires, and an
ended one needs no sweep to go (broker/retention.py only tidies the indexes). A job that ends
holding dead-lettered or unknown steps keeps its record as long as their dead letters may wait for
a replay (``MeshSettings.dead_letter_job_retention_s``), so the replay finds the job to go on with.
A job with a step waiting for a person's approval keeps no TTL while it waits, even once another
branch ended it (broker/approvals.py stages that, its index and its timers, with every write).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from dramatiq.message import Message

from mesh.contracts import (
    TERMINAL,
    JobRecord,
    LeaseLost,
    State,
    StepRecord,
    add_tokens,
    dumps,
    loads,
    settle,
    transition,
)
from mesh.contracts.jobs import COMPENSATION_FAILED, known

from . import approvals, claims, compact, trace, waits
from .keys import Keys
from .observe import unwind_counts
from .outbox import stage_all

if TYPE_CHECKING:
    from .idempotency import Lease

#: A pure change to a record: the new record and the messages it implies (sent atomically with it).
Change = Callable[[JobRecord], tuple[JobRecord, list[Message]]]


#: MESH_JOB_RETENTION_S's default, for stores built without settings.
DEFAULT_RETENTION_S = 7 * 24 * 3600.0


class JobNotFound(LookupError):
    """No record for ``job_id``: never held, or (``expired``) its job ended and retention removed its
    record (MESH_JOB_RETENTION_S, or MESH_JOB_RETENTION_COUNT, which can take it soon after its end)."""

    def __init__(self, job_id: str, *, expired: bool = False) -> None:
        super().__init__(f"{job_id}: the job ended and its record was removed by retention (MESH_JOB_RETENTION_S, "
                         "MESH_JOB_RETENTION_COUNT)" if expired else job_id)
        self.job_id = job_id
        self.expired = expired


#: Step states that come with a dead letter an operator may replay.
HELD_FOR_REPLAY = frozenset({State.DEAD_LETTERED, State.UNKNOWN})


def holds_dead_letters(record: JobRecord) -> bool:
    """Whether ``record`` has a step whose message waits in the DLQ (dead-lettered, or unknown)."""
    return any(step.state in HELD_FOR_REPLAY for step in record.steps.values())


def ended_ttl_s(record: JobRecord, retention_s: float, keep_s: float | None) -> float:
    """How long an ended job's record is kept: ``retention_s``, or ``keep_s`` (when longer) while it
    holds dead-lettered steps a replay must find it for."""
    return max(retention_s, keep_s or 0) if holds_dead_letters(record) else retention_s


#: Step record object id -> (the step, its key in the record, its ``"key":{...}`` bytes): a record's steps
#: that did not change since it was last written are the same (frozen) objects, dumped once. Emptied
#: past _FRAGMENTS_MAX steps or _FRAGMENTS_BYTES bytes.
_FRAGMENTS: dict[int, tuple[StepRecord, str, bytes]] = {}
_FRAGMENTS_MAX = 4096
_FRAGMENTS_BYTES = 16 * 1024 * 1024
_fragment_bytes = [0]
#: Fewest steps a record has for its bytes to be put together from its steps' (below, dumped whole).
SPLICED_STEPS = 8
_NO_STEPS = b'"steps":{}'


def record_bytes(record: JobRecord) -> bytes:
    """``dumps(record)``, byte for byte, with each step's part dumped once per step object rather than
    once per write: a pipeline's step changes one or two steps of its record, and dumping all of them
    twice a step cost in proportion to the pipeline's size. The record is dumped with no steps and
    each step's ``"id":{...}`` put in its place, in the record's order; a step id JSON would escape,
    or a record whose bytes say ``"steps":{}`` elsewhere too (in its input, say), is dumped whole."""
    steps = record.steps
    if len(steps) < SPLICED_STEPS:
        return dumps(record)
    head = dumps(record.replaced({"steps": {}}))
    at = head.find(_NO_STEPS)
    if at < 0 or head.find(_NO_STEPS, at + 1) >= 0:
        return dumps(record)
    parts = []
    for sid, step in steps.items():
        kept = _FRAGMENTS.get(id(step))
        if kept is not None and kept[0] is step and kept[1] == sid:
            parts.append(kept[2])
            continue
        if not (sid.isascii() and sid.isprintable()) or '"' in sid or "\\" in sid:
            return dumps(record)
        part = b'"%s":%s' % (sid.encode(), dumps(step))
        if len(_FRAGMENTS) >= _FRAGMENTS_MAX or _fragment_bytes[0] + len(part) > _FRAGMENTS_BYTES:
            _FRAGMENTS.clear()
            _PLAIN.clear()
            _fragment_bytes[0] = 0
        _FRAGMENTS[id(step)] = (step, sid, part)
        _fragment_bytes[0] += len(part)
        parts.append(part)
    at += len(_NO_STEPS) - 1
    return b"".join((head[:at], b",".join(parts), head[at:]))


#: Step record object id -> (the step, its JSON as plain data): what :func:`validated` compares a step read
#: back with. Emptied with the steps' bytes.
_PLAIN: dict[int, tuple[StepRecord, Any]] = {}


def _plain(step: StepRecord, sid: str) -> Any:
    """``step``'s JSON as plain data, when its bytes are kept (:func:`record_bytes`); else None."""
    plain = _PLAIN.get(id(step))
    if plain is not None and plain[0] is step:
        return plain[1]
    kept = _FRAGMENTS.get(id(step))
    if kept is None or kept[0] is not step or kept[1] != sid:
        return None
    if len(_PLAIN) >= _FRAGMENTS_MAX:
        _PLAIN.clear()
    value = loads(kept[2][len(sid) + 3:])  # after '"sid":' (an id kept so is ASCII, escaping nothing)
    _PLAIN[id(step)] = (step, value)
    return value


def validated(data: bytes, known: JobRecord | None = None) -> JobRecord:
    """``JobRecord.model_validate_json(data)``, with the steps of ``known`` (a record this process wrote of
    the same job, maybe changed since) whose JSON ``data`` holds unchanged taken as they are, not validated
    again: a pipeline's step changes one or two steps of its record, and validating every step cost in
    proportion to the pipeline's size. Only a record whose own bytes (:func:`record_bytes`) are ``data``,
    byte for byte, is answered so; any other is validated whole."""
    if known is None or len(known.steps) < SPLICED_STEPS:
        return JobRecord.model_validate_json(data)
    plain = loads(data)
    given = plain.get("steps") if isinstance(plain, dict) else None
    if not isinstance(given, dict) or plain.get("job_id") != known.job_id:
        return JobRecord.model_validate_json(data)
    steps: dict[str, StepRecord] = {}
    for sid, value in given.items():
        kept = known.steps.get(sid)
        if kept is not None and value == _plain(kept, sid):
            steps[sid] = kept
        else:
            steps[sid] = StepRecord.model_validate(value)
    plain["steps"] = {}
    record = JobRecord.model_validate(plain).replaced({"steps": steps})
    return record if record_bytes(record) == data else JobRecord.model_validate_json(data)


def stage_record(pipe: Any, keys: Keys, record: JobRecord, *, was: State, retention_s: float,
                 keep_s: float | None = None, before: JobRecord | None = None) -> None:
    """Stage the write of ``record`` (which was in state ``was``) with the TTLs its state implies.
    ``before``: the record as the write found it, when the writer read it (an approval's index entry
    and timers are then removed only by the write that ends its wait: see
    :func:`~mesh.broker.approvals.stage_approvals`).

    Ending the job starts the retention clock on its record and trace (``keep_s`` instead, when
    longer, if the job holds dead-lettered steps: see :func:`ended_ttl_s`), and on the effect ledgers
    of its steps that made effectful calls or wait for a replay; later writes to an ended
    job keep that clock (KEEPTTL) rather than restart it; an active record has no TTL (a plain SET
    drops it) and neither has its trace. Stage trace events before this, so the stream exists to expire.
    A write that ends the job, or rewrites it once ended, queues it for compaction
    (:func:`mesh.broker.compact.stage_ended`: one ZADD; the sweep does the rest).
    A job in a state a newer release wrote keeps whatever TTL that release gave it.
    """
    # The commands are staged as such (``execute_command``), as redis-py's ``set(...)`` would spell them
    # without its argument checks: a step writes its record twice, and those checks were a part of its CPU.
    key, trace_key, data = keys.job(record.job_id), keys.trace(record.job_id), record_bytes(record)
    # Once the job has ended (nothing below reads it for a job that has not: worked out for an ended one only).
    ttl_ms = max(1, int(ended_ttl_s(record, retention_s, keep_s) * 1000)) if record.state in TERMINAL else None
    if not known(record.state):
        pipe.execute_command("SET", key, data, "KEEPTTL")
    elif record.state not in TERMINAL:
        pipe.execute_command("SET", key, data)
        if was in TERMINAL:
            pipe.persist(trace_key)
    elif was in TERMINAL:
        pipe.execute_command("SET", key, data, "KEEPTTL")
        compact.stage_ended(pipe, keys, record)  # what it wrote after its compaction is compacted too
    else:
        pipe.execute_command("SET", key, data, "PX", ttl_ms)
        pipe.execute_command("PEXPIRE", trace_key, ttl_ms)
        compact.stage_ended(pipe, keys, record)
        for step in record.steps.values():
            if step.effect is not None or step.state in HELD_FOR_REPLAY:
                # its effect ledger (what mesh verify and a replay read) goes with the record
                pipe.pexpire(keys.ledger(record.job_id, step.step_id), ttl_ms)
    # waiting steps: their index, their timers, and no TTL while one waits
    approvals.stage_approvals(pipe, keys, record, ttl_ms, before)
    waits.stage_waits(pipe, keys, record, before, ttl_ms)


class JobStore:
    def __init__(self, client: redis.Redis, keys: Keys, retention_s: float = DEFAULT_RETENTION_S,
                 keep_s: float | None = None) -> None:
        """``keep_s``: how long an ended job holding dead-lettered steps is kept, when longer than
        ``retention_s`` (``MeshSettings.dead_letter_job_retention_s``)."""
        self.client = client
        self.keys = keys
        self.retention_s = retention_s
        self.keep_s = keep_s

    def stage_create(self, pipe: Any, record: JobRecord) -> None:
        """Stage the record's creation into ``pipe``; an existing record is left as it is."""
        pipe.set(self.keys.job(record.job_id), dumps(record), nx=True)
        pipe.zadd(self.keys.jobs, {record.job_id: record.created_at}, nx=True)
        approvals.stage_approvals(pipe, self.keys, record)
        waits.stage_waits(pipe, self.keys, record)

    def get(self, job_id: str) -> JobRecord | None:
        data = self.client.get(self.keys.job(job_id))
        return None if data is None else JobRecord.model_validate_json(data)

    def stage_write(self, pipe: Any, before: JobRecord, record: JobRecord, messages: Sequence[Message], *,
                    events: Sequence[dict[str, Any]] = (), also: Callable[[Any, JobRecord], None] | None = None,
                    retention_s: float | None = None) -> None:
        """Stage what a change of ``before`` into ``record`` sending ``messages`` writes (see
        :meth:`update`): the messages, their ``enqueued`` events, ``events`` and the counters they imply,
        the record with its TTLs, and whatever ``also`` stages."""
        stage_all(pipe, self.keys, messages)
        for message in messages:
            trace.stage(pipe, self.keys, trace.event("enqueued", message.args[0], queue=message.queue_name))
        for ev in events:
            trace.stage(pipe, self.keys, ev)
        for field in unwind_counts(events):
            pipe.hincrby(self.keys.stats, field, 1)
        stage_record(pipe, self.keys, record, was=before.state,
                     retention_s=self.retention_s if retention_s is None else retention_s, keep_s=self.keep_s,
                     before=before)
        if also is not None:
            also(pipe, record)

    def update(self, job_id: str, change: Change, *, fence: Lease | None = None,
               events: Sequence[dict[str, Any]] = (),
               also: Callable[[Any, JobRecord], None] | None = None,
               retention_s: float | None = None) -> JobRecord:
        """Apply ``change`` atomically; concurrent writers are retried, never overwritten.

        With ``fence``, the change lands only while that lease still holds its key: an attempt
        whose key was taken over raises LeaseLost and writes nothing. ``events`` (trace events)
        and whatever ``also`` stages (counters) land in the same MULTI, and every message the
        change sends is traced as ``enqueued``. A change that ends the job gives its record and
        trace their retention TTL in that MULTI too (:func:`stage_record`). A change that leaves
        the record as it is writes nothing at all, so re-sending an update that already landed is
        harmless. ``retention_s`` replaces the store's retention for this write (a declared
        pipeline's ``checkpointing.ttl_minutes``).
        """
        key = self.keys.job(job_id)
        watched = (key,) if fence is None else (key, fence.claim_key)

        def apply(pipe: redis.client.Pipeline) -> JobRecord:
            if fence is not None:
                # One round trip reads the record and the claim (MGET answers None for a claim hash an
                # earlier release wrote: that one is read again, as a hash). As a command: a cluster
                # pipeline refuses mget() (both keys are in the namespace's slot).
                both: Any = pipe.execute_command("MGET", key, fence.claim_key)
                data, raw_claim = both
                claim = claims.parse(raw_claim) if raw_claim is not None else claims.read(pipe, fence.claim_key)
                # A shared lease (another job's step did the effect) holds while the key stays done.
                held = claim.state == "done" if fence.shared else (claim.state == "claimed"
                                                                    and claim.owner == fence.owner)
                if not held:
                    raise LeaseLost(fence.key, fence.token)
            else:
                data = pipe.get(key)
            if data is None:
                raise JobNotFound(job_id)
            before = JobRecord.model_validate_json(data)
            record, messages = change(before)
            if record is before and not messages:
                # Nothing to write: the change was already applied (a transaction re-sent after its
                # reply was lost), so its events and counters are not staged a second time.
                return record
            pipe.multi()
            self.stage_write(pipe, before, record, messages, events=events, also=also, retention_s=retention_s)
            return record

        record: JobRecord = self.client.transaction(apply, *watched, value_from_callable=True)  # type: ignore[arg-type,assignment]
        return record


#: What a declared pipeline's step ending without output sets in motion (the next item of a
#: ``for_each`` step, its join, the dependents a join releases), appending the trace events it
#: makes (a join's decision) to the list given: registered by the agents layer, so the broker
#: imports nothing of the engine. None: only the job's state is derived.
LossChange = Callable[[JobRecord, list[dict[str, Any]]], tuple[JobRecord, list[Message]]]
_after_loss: LossChange | None = None


def on_step_lost(change: LossChange | None) -> None:
    """Register what a pipeline job's dead-lettered (or unknown) step sets in motion (see ``fail_step``)."""
    global _after_loss
    _after_loss = change


def fail_step(step_id: str, state: State, error: str, failure_class: str, *, token: int | None = None,
              tokens: tuple[int, int] = (0, 0), events: list[dict[str, Any]] | None = None,
              undo_calls: list[dict[str, Any]] | None = None) -> Change:
    """A step's attempt failed: it waits for a retry (FAILED), or it ends (DEAD_LETTERED, UNKNOWN) and
    the job's state is derived from its steps (:func:`mesh.contracts.settle`): a lost item of a
    ``for_each`` step whose join can still be met does not end the job, and a declared pipeline's
    job moves on by what :func:`on_step_lost` registered (the messages it sends go with the record).

    ``token`` is the fencing token of the failed attempt: a step a later owner holds now (running
    with a higher token) is not touched, nor a running step by an attempt that held none. A running
    step with a lower token was left by an owner whose claim this attempt took over (it died): the
    failure is this attempt's to record, even before it picked the step up. A step waiting for a
    person's approval is not touched either: its decision (or its timer) ends the wait.
    ``tokens``: the model tokens (in, out) the attempt spent, added to the step and the job while the
    step is still its attempt's (running), so a re-sent write does not count them twice.
    ``events``: where the trace events the loss sets off (a join's decision) are appended, to be
    written with the record; each call of the change starts over from the events first given.
    ``undo_calls``: what undoes the calls of tools declared with ``compensate=`` the attempt made
    before it failed, kept on a step that ends: they happened, so a job that unwinds undoes them too
    (and waits for a step left ``unknown`` holding some, until ``mesh verify``/``mesh settle`` decide).
    """
    events = [] if events is None else events
    given = len(events)

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        del events[given:]  # a settlement recomputed after a conflict starts over
        now = time.time()
        step = record.steps.get(step_id)
        if step is None or step.state in TERMINAL or not known(step.state):
            return record, []  # ended, or in a newer release's state: that release's to move
        if step.state is State.RUNNING and (token is None or (step.token or 0) > token):
            return record, []  # a later claim's owner runs it now
        if step.state in (State.AWAITING_APPROVAL, State.WAITING):
            # Parked for a person (or a timer, an event): no attempt of it runs, so a failing message
            # of it is a stale copy (deferred past its deadline, poison). Its decision or timer ends the
            # wait, by a write that removes its index entry and timers (the consumer's script, which
            # writes this, keeps none).
            return record, []
        if step.state is State.RUNNING:
            step, record = add_tokens(step, *tokens), add_tokens(record, *tokens)
        ends = (state, error, failure_class)
        if record.unwind is not None and record.unwind.cause == "cancelled" and step.compensates is None:
            # Its job was cancelled (mesh cancel): a failure ends the step, never waits for a retry.
            ends = (State.CANCELLED, f"ended after the job was cancelled: {error}", "cancelled")
        elif step.compensates is not None and state in TERMINAL:
            # A compensation failed for good: its job is unknown (its effect may stand), said by one class.
            ends = (state, f"{failure_class}: {error}", COMPENSATION_FAILED)
        ended = transition(step, ends[0], now=now, error=ends[1], failure_class=ends[2])
        if undo_calls and ends[0] in TERMINAL:
            ended = ended.model_copy(update={"undo_calls": undo_calls})
        record = record.with_step(ended)
        if ends[0] not in TERMINAL:
            return record, []
        if _after_loss is not None and record.pipeline_digest is not None:
            return _after_loss(record, events)
        return settle(record, now), []

    return change


def new_step(step_id: str, agent: str, key: str, payload: dict[str, object]) -> StepRecord:
    return StepRecord(step_id=step_id, agent=agent, key=key, input=payload)
