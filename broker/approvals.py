"""Human approvals in Redis: the index of what waits, its timers, the audit stream and the decision.

A pipeline step that needs a person's approval is parked in ``awaiting_approval`` with an
:class:`~mesh.contracts.approvals.Approval` on its record (the engine does that). Every write of a
job record brings along, in the same MULTI (:func:`stage_approvals`, called by the job store):

- ``{ns}:approvals``: the step added (score: when it was asked) while it waits, removed once not;
- its durable timers (:mod:`mesh.broker.timers`): ``approval`` at its timeout, ``approval.warn`` at
  ``warn_before`` before it; both removed when it stops waiting. The member names the ask
  (``{job}|{step}|{asks}``), so an ask made again gets its own timeout;
- the job's record and trace kept without a TTL while a step waits: retention never takes it.

A decision (:func:`decide`) is one WATCH/MULTI on the job record: the first to land wins, and the
loser is told which decision won (:class:`AlreadyDecided`). A decision read after the timeout's due
time on the Redis clock is refused (:class:`ApprovalExpired`), even before a worker fired the timer.
What a decision does to the job (send the step, halt, skip) is the pipeline engine's; it is
registered here (:func:`on_decide`), so the broker imports nothing of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from dramatiq.message import Message

from mesh.contracts import TERMINAL, FailureClass, JobRecord, MeshError, State, StepRecord, dumps, loads
from mesh.contracts.approvals import Approval, Decision
from mesh.contracts.deadletter import DeadLetter

from . import timers
from .clock import server_ms
from .connection import stage_eval
from .keys import Keys
from .outbox import encode
from .trace import operator

#: Gives each key that has no TTL one of ARGV[1] ms (PEXPIRE's NX, before Redis 7).
EXPIRE_IF_NONE = """
for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ARGV[1]) end
end
"""

#: Timer kinds (:mod:`mesh.broker.timers`).
EXPIRY, WARNING = "approval", "approval.warn"
#: The audit stream keeps about this many records.
AUDIT_MAXLEN = 100_000


class ApprovalError(MeshError):
    """A decision that was not taken; the attributes say why (``exit_code``: what ``mesh`` exits with)."""

    exit_code = 1
    terminal = True


class NotAwaiting(ApprovalError):
    """The step is not waiting for an approval (never was, or not any more and undecided)."""

    exit_code = 2


class AlreadyDecided(ApprovalError):
    """Another decision landed first; ``decision``, ``by`` and ``at`` say which."""

    exit_code = 5

    def __init__(self, job_id: str, step_id: str, approval: Approval) -> None:
        won = approval.decision.value if approval.decision else "decided"
        super().__init__(f"step {step_id} of job {job_id} was already {won} by {approval.by or '?'} at "
                         f"{_iso(approval.at)}", job_id=job_id, step_id=step_id, decision=won, by=approval.by)
        self.decision, self.by, self.at = won, approval.by, approval.at


class ApprovalExpired(ApprovalError):
    """The approval's timeout passed (by the Redis clock) before the decision came."""

    exit_code = 6

    def __init__(self, job_id: str, step_id: str, due_ms: int) -> None:
        super().__init__(f"step {step_id} of job {job_id}: its approval expired at {_iso(due_ms / 1000)}; "
                         "too late to decide", job_id=job_id, step_id=step_id)
        self.due_ms = due_ms


#: The longest name (``by``) and note a person's decision takes, in characters: both are kept on the
#: job record, its trace and the audit stream, and printed by ``mesh status`` and ``mesh trace``.
BY_MAX, NOTE_MAX = 200, 4000


class InvalidDecision(ApprovalError):
    """A decision whose ``by`` or note cannot be recorded: too long, or a name with a line break or
    another control character (it would forge lines in ``mesh trace``)."""

    exit_code = 2


def check_decision(by: str, note: str | None) -> None:
    """Raise :class:`InvalidDecision` unless ``by`` is a printable name of 1 to :data:`BY_MAX`
    characters and ``note`` at most :data:`NOTE_MAX` characters."""
    if not by or len(by) > BY_MAX or not by.isprintable():
        raise InvalidDecision(f"who decides is 1 to {BY_MAX} printable characters on one line, not "
                              f"{by[:40]!r}{'...' if len(by) > 40 else ''} ({len(by)} characters)", by=by[:BY_MAX])
    if note is not None and len(note) > NOTE_MAX:
        raise InvalidDecision(f"a decision's note or reason is at most {NOTE_MAX} characters, not {len(note)}")


class NotAnApprover(ApprovalError):
    """The (authenticated) user is not among the step's ``approvers``."""

    exit_code = 2


#: ``user@host`` of this process: who decides when no name is given.
default_by = operator


def _iso(at: float | None) -> str:
    if at is None:
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def ref(job_id: str, step_id: str) -> str:
    """A waiting step's member of ``{ns}:approvals``."""
    return f"{job_id}|{step_id}"


def ask_ref(job_id: str, step_id: str, asks: int) -> str:
    """The reference of one ask's timers (an ask made again gets new ones)."""
    return f"{job_id}|{step_id}|{asks}"


def check_approver(approval: Approval, user: str) -> None:
    """Raise :class:`NotAnApprover` unless ``user`` may decide (no ``approvers``: anyone). The CLI
    does not call this (``approvers`` is advisory there: anyone with access can pass ``--by``); a
    front end that authenticates its users (the console) does, before :func:`decide`."""
    if approval.approvers and user not in approval.approvers:
        raise NotAnApprover(f"{user} is not among the approvers ({', '.join(approval.approvers)})",
                            user=user, approvers=list(approval.approvers))


def waiting(record: JobRecord) -> bool:
    """Whether a step of ``record`` waits for a person's approval."""
    return any(s.state is State.AWAITING_APPROVAL for s in record.steps.values())


def stage_approvals(pipe: Any, keys: Keys, record: JobRecord, ended_ttl_ms: int | None = None,
                    before: JobRecord | None = None) -> None:
    """Stage, with a write of ``record``, the index, timers and TTLs its waiting steps imply (above).
    ``ended_ttl_ms``: the retention an ended job takes once nothing waits any more; given to a record
    that has none (it waited while ended) in the same MULTI. ``before``: the record as this write
    found it (read under WATCH), when the writer has it: a step that did not wait in it has nothing
    left to remove (the write that ended its wait removed it), so only the write that leaves
    ``awaiting_approval`` stages the removal; without it, every step that ever waited is cleared again."""
    waits = False
    for step in record.steps.values():
        approval = step.approval
        if approval is None:
            continue
        member = ref(record.job_id, step.step_id)
        ask = ask_ref(record.job_id, step.step_id, approval.asks)
        if step.state is State.AWAITING_APPROVAL:
            waits = True
            pipe.zadd(keys.approvals, {member: int(approval.asked_at * 1000)})
            timers.stage_schedule(pipe, keys, EXPIRY, ask, int(approval.timeout_s * 1000))
            if approval.warn_before_s is not None:
                timers.stage_schedule(pipe, keys, WARNING, ask,
                                      int((approval.timeout_s - approval.warn_before_s) * 1000))
            if approval.asks > 1:  # an earlier ask's timers (asked again in the same write)
                earlier = ask_ref(record.job_id, step.step_id, approval.asks - 1)
                timers.stage_cancel(pipe, keys, EXPIRY, earlier)
                timers.stage_cancel(pipe, keys, WARNING, earlier)
        elif before is None or _waited(before, step.step_id):
            pipe.zrem(keys.approvals, member)
            timers.stage_cancel(pipe, keys, EXPIRY, ask)
            timers.stage_cancel(pipe, keys, WARNING, ask)
    if waits:  # a job waiting for a person is never taken by retention
        pipe.persist(keys.job(record.job_id))
        pipe.persist(keys.trace(record.job_id))
    elif (ended_ttl_ms is not None and record.state in TERMINAL and any(s.approval for s in record.steps.values())
          and (before is None or waiting(before))
          and not any(s.state is State.WAITING for s in record.steps.values())):  # a sleep's keeps it
        # ended while a step waited (no TTL then): its retention starts now that nothing waits
        stage_eval(pipe, EXPIRE_IF_NONE, 2, keys.job(record.job_id), keys.trace(record.job_id), ended_ttl_ms)


def _waited(before: JobRecord, step_id: str) -> bool:
    step = before.steps.get(step_id)
    return step is not None and step.state is State.AWAITING_APPROVAL


def stage_audit(pipe: Any, keys: Keys, what: str, job_id: str, step_id: str, **detail: Any) -> None:
    """One record of the approvals audit stream (in the MULTI that does what it records)."""
    fields = {"op": what, "job_id": job_id, "step_id": step_id, "at": f"{time.time():.3f}",
              "detail": dumps({k: v for k, v in detail.items() if v is not None})}
    pipe.xadd(keys.approvals_audit, fields, maxlen=AUDIT_MAXLEN, approximate=True)


def audit(client: redis.Redis, keys: Keys, limit: int = 100) -> list[dict[str, Any]]:
    """The newest ``limit`` audit records, newest first."""
    rows: Any = client.xrevrange(keys.approvals_audit, count=limit)
    out = []
    for stream_id, f in rows:
        rec = {k.decode(): v.decode() for k, v in f.items()}
        rec["detail"] = loads(rec.get("detail", "{}"))
        rec["id"] = stream_id.decode()
        out.append(rec)
    return out


def stage_dead_letter(pipe: Any, keys: Keys, message: Message, error: str, worker: str) -> DeadLetter:
    """Stage a dead letter for ``message`` (a parked step's, never sent) with its indexes, as the DLQ
    writes one: an approval that expired under ``on_timeout: escalate`` waits there for a replay."""
    env = message.args[0]
    entry = DeadLetter(entry_id=message.message_id, queue=message.queue_name, agent=message.actor_name,
                       failure_class=FailureClass.APPROVAL_EXPIRED.value, error=error, envelope=env, key=env.get("key"),
                       job_id=env.get("job_id"), trace_id=env.get("trace_id"), worker=worker)
    at = int(entry.dead_lettered_at * 1000)
    pipe.zadd(keys.dlq, {entry.entry_id: at})
    pipe.hset(keys.dead_letter(entry.entry_id), mapping={"entry": dumps(entry), "raw": encode(message),
                                                           "agent": entry.agent or "-", "class": entry.failure_class})
    pipe.zadd(keys.dlq_by_agent(entry.agent or "-"), {entry.entry_id: at})
    pipe.zadd(keys.dlq_by_class(entry.failure_class), {entry.entry_id: at})
    pipe.sadd(keys.dlq_agents, entry.agent or "-")
    if entry.job_id:
        pipe.zadd(keys.dlq_by_job(entry.job_id), {entry.entry_id: at})
        pipe.set(keys.dlq_jobs_since, at, nx=True)
    return entry


@dataclass(frozen=True)
class Verdict:
    """A decision on a waiting step: ``approved``, ``denied`` or ``expired`` (by its timer)."""

    step_id: str
    decision: Decision
    by: str
    note: str | None = None
    #: The server's time (s) when it was made: a released step's deadline counts from it.
    at: float = field(default_factory=time.time)
    #: The ask it answers (a timer's); None: whatever ask waits now.
    asks: int | None = None


#: What a decision does to a declared pipeline's job: (record, verdict, events, dead) → (record,
#: messages), the engine's (``mesh.agents.pipelines.approvals``). ``dead`` receives the message an
#: escalated expiry dead-letters. Registered with the routes of the process that decides.
DecideChange = Callable[[JobRecord, Verdict, list[dict[str, Any]], list[Message]], tuple[JobRecord, list[Message]]]


@dataclass
class Pending:
    """A step waiting for approval, as ``mesh approvals`` lists it."""

    job_id: str
    key: str
    pipeline: str | None
    step: StepRecord
    approval: Approval
    asked_at: float
    #: When it expires (s, Redis clock); None when its timer is gone (firing now).
    expires_at: float | None

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "key": self.key, "pipeline": self.pipeline, "step_id": self.step.step_id,
                "agent": self.step.agent, "input": self.step.input, "step_key": self.step.key,
                "hash": self.approval.hash, "since": self.asked_at, "expires_at": self.expires_at,
                "on_timeout": self.approval.on_timeout, "approvers": list(self.approval.approvers),
                "asks": self.approval.asks}


def pending(client: redis.Redis, keys: Keys, limit: int = 1000) -> list[Pending]:
    """The steps waiting for approval, oldest first."""
    rows: Any = client.zrange(keys.approvals, 0, limit - 1, withscores=True)
    out: list[Pending] = []
    for raw, _score in rows:
        job_id, _, step_id = raw.decode().partition("|")
        data = client.get(keys.job(job_id))
        if data is None:
            continue
        record = JobRecord.model_validate(loads(data))
        step = record.steps.get(step_id)
        if step is None or step.state is not State.AWAITING_APPROVAL or step.approval is None:
            continue
        due = timers.due_at(client, keys, EXPIRY, ask_ref(job_id, step_id, step.approval.asks))
        out.append(Pending(job_id, record.key, record.pipeline, step, step.approval, step.approval.asked_at,
                           None if due is None else due / 1000))
    return out


def counts(client: redis.Redis, keys: Keys) -> tuple[int, float]:
    """(steps waiting for approval, the oldest one's age in seconds by the Redis clock; 0 when none)."""
    n = int(client.zcard(keys.approvals))
    if not n:
        return 0, 0.0
    oldest: Any = client.zrange(keys.approvals, 0, 0, withscores=True)
    return n, max(0.0, server_ms(client) / 1000 - float(oldest[0][1]) / 1000)


def expiry_due_ms(client: redis.Redis, keys: Keys, job_id: str, step: StepRecord) -> int | None:
    """When ``step``'s current ask expires (ms, Redis clock); None when it has no timer."""
    if step.approval is None:
        return None
    return timers.due_at(client, keys, EXPIRY, ask_ref(job_id, step.step_id, step.approval.asks))


#: Builds the change a decision makes, for a process that routes with ``queue`` and ``version``
#: (agent → queue, agent → contract version) and reads specs from ``pipelines``: registered by the
#: agents layer when ``mesh`` is imported (see :func:`on_decide`).
DecideFactory = Callable[[Any, Callable[[str], str], Callable[[str], "int | None"], Any], DecideChange]
_factory: DecideFactory | None = None


def on_decide(factory: DecideFactory) -> None:
    """Register what builds a decision's change (``mesh.agents.pipelines.approvals`` does)."""
    global _factory
    _factory = factory


def decide_change(pipelines: Any, queue: Callable[[str], str], version: Callable[[str], int | None],
                  settings: Any) -> DecideChange:
    """The registered decision change for this process's routes."""
    if _factory is None:
        raise MeshError("no approval engine is registered: import mesh (mesh.agents registers it)")
    return _factory(pipelines, queue, version, settings)


def decide(jobs: Any, job_id: str, verdict: Verdict, change: DecideChange, *,
           worker: str = "") -> tuple[JobRecord, list[dict[str, Any]]]:
    """Record ``verdict`` on the waiting step in one transaction with what it sets in motion; the
    record as written and its trace events. Raises :class:`InvalidDecision` (``by`` or the note),
    :class:`NotAwaiting`, :class:`AlreadyDecided` (the first decision won), or
    :class:`ApprovalExpired` (read after the timeout's due time)."""
    client, keys = jobs.client, jobs.keys
    if verdict.decision is not Decision.EXPIRED:
        check_decision(verdict.by, verdict.note)
        data = client.get(keys.job(job_id))
        if data is not None:
            step = JobRecord.model_validate(loads(data)).steps.get(verdict.step_id)
            due = expiry_due_ms(client, keys, job_id, step) if step is not None else None
            if step is not None and step.state is State.AWAITING_APPROVAL and due is not None \
                    and server_ms(client) >= due:
                raise ApprovalExpired(job_id, verdict.step_id, due)
    events: list[dict[str, Any]] = []
    dead: list[Message] = []

    def also(pipe: Any, record: JobRecord) -> None:
        step = record.steps[verdict.step_id]
        approval = step.approval
        stage_audit(pipe, keys, verdict.decision.value, job_id, verdict.step_id, by=verdict.by, note=verdict.note,
                    hash=approval.hash if approval else None, state=step.state.value,
                    asks=approval.asks if approval else None)
        for message in dead:
            stage_dead_letter(pipe, keys, message, step.error or "approval expired", worker or verdict.by)
        if dead:
            pipe.hincrby(keys.stats, "dead_lettered", 1)
        pipe.hincrby(keys.stats, f"approvals_{verdict.decision.value}", 1)

    def apply(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        del dead[:], events[:]  # a transaction retried after a conflict starts over
        return change(record, verdict, events, dead)

    record = jobs.update(job_id, apply, events=events, also=also)
    return record, events
