"""Sagas: a job that halts (or is cancelled) after effectful steps succeeded undoes their effects.

A step declares ``compensate:`` (an agent and its input over the step's ``input`` and ``output``).
When its job halts — a false gate or a denial (a step ``halted``), a step dead-lettered under
``on_false: halt_pipeline`` (a permanent failure, retries spent, a join not met), or a cancel —
and at least one such step succeeded (or is still in flight, or its effect is ``unknown``), the job
records why (``JobRecord.unwind``) and becomes ``compensating``:

* every compensable step (each item of a ``for_each`` step) that succeeded, is in flight or is
  ``unknown`` gets a compensation record ``undo:<step>`` (queued, unsent), keyed from the step's key
  (``<step key>/undo``), so a compensation re-sent after a crash, or reached again, is one effect;
* compensations run ONE at a time, in reverse order of completion of their steps: the next is sent
  only when the previous succeeded, and none while a compensable step is still in flight or
  ``unknown`` (it ends last, so it is undone first — or, when ``mesh settle`` says its effect did
  not happen, its compensation is ``skipped``);
* a compensation that fails follows its own ``retry_policy``, then is dead-lettered
  ``compensation_failed``: the job is ``unknown`` and the later compensations wait (a DLQ replay of
  that dead letter, once the cause is fixed, takes the chain up again);
* the job is ``compensated`` when every compensation ended (succeeded, or skipped with nothing to
  undo); a cancelled job with nothing to undo is ``cancelled``; a halt with nothing to undo keeps its
  ``halted`` or ``dead_lettered`` state.

A job that began unwinding is never resumed: no step of it is sent again, and a DLQ replay of one
of its steps' dead letters is refused (``mesh rerun`` starts a new run). Everything here is a pure
change of the job record plus the messages it sends, written by the caller in one transaction.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

from dramatiq.message import Message

from mesh.broker import trace
from mesh.broker.outbox import build_message, encode_checked
from mesh.contracts import LOST, Envelope, JobRecord, LimitExceeded, State, StepRecord, transition
from mesh.contracts.jobs import UNDO_CALLS, UNWOUND, Unwind, compensations, known, undo_id

from .expr import ExpressionError
from .spec import FailureMode, PipelineSpec, StepSpec

#: How long a compensation's message may wait and run (s), counted when it is sent: the job's own
#: deadline may have passed (that may be why it halted), and an effect must still be undone.
COMPENSATION_DEADLINE_S = 3600.0

#: Longest message key (the envelope's own limit).
MAX_KEY_CHARS = 512


def undo_key(key: str) -> str:
    """A compensation's message key, derived from its step's: the same step always gives the same
    key, so its compensation is one effect however often it is sent."""
    derived = f"{key}/undo"
    if len(derived) <= MAX_KEY_CHARS:
        return derived
    return f"{key[:MAX_KEY_CHARS - 47]}/undo/{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def declares(spec: PipelineSpec) -> bool:
    """Whether any step of ``spec`` declares a compensation."""
    return any(s.compensate is not None for s in spec.steps)


def compensable(spec: PipelineSpec, rec: StepRecord) -> StepSpec | None:
    """The spec of the step whose compensation undoes ``rec`` (a step, or an item of a ``for_each``
    step), or None: it declares no ``compensate:`` and made no call of a tool declared with
    ``compensate=`` (``rec.undo_calls``), it is a compensation, or it is a ``for_each`` step itself
    (its items are compensated each)."""
    if rec.compensates is not None or rec.need is not None:
        return None
    try:
        step = spec.step(rec.parent or rec.step_id)
    except KeyError:
        return None
    return step if step.compensate is not None or rec.undo_calls else None


def by_tools(step: StepSpec, rec: StepRecord) -> bool:
    """Whether ``rec`` is undone by its calls' compensating tools (run by its own agent's worker):
    its step declares no ``compensate:``, or it ended without output (dead-lettered after some of
    those calls returned), so an agent's compensation of its output has nothing to go on."""
    return step.compensate is None or (rec.state is State.DEAD_LETTERED and bool(rec.undo_calls))


def effect(rec: StepRecord) -> str:
    """``done`` (its effect happened: it succeeded, or it finished after its job was cancelled),
    ``pending`` (in flight, or ``unknown`` until ``mesh verify``/``mesh settle`` decide) or ``none``."""
    if rec.state is State.SUCCEEDED or (rec.state is State.CANCELLED and rec.result is not None):
        return "done"
    if rec.state is State.DEAD_LETTERED and rec.undo_calls:
        return "done"  # failed after calls of tools declared with compensate= returned: those are undone
    if rec.state in (State.RUNNING, State.FAILED, State.UNKNOWN) or (rec.state is State.QUEUED and rec.sent_at):
        return "pending"
    return "none"


def cause(spec: PipelineSpec, record: JobRecord) -> Unwind | None:
    """Why the job must undo its effects, or None: a step halted (``halted``: a false gate, a denial),
    or a step blocking the job is dead-lettered under ``on_false: halt_pipeline`` (``failed``).
    A dead-lettered step under ``continue`` leaves the job dead-lettered, waiting for a replay."""
    if record.state is State.HALTED:
        return Unwind(cause="halted", reason=record.error or "halted")
    if record.state is State.DEAD_LETTERED:
        for rec in record.steps.values():
            if rec.state is not State.DEAD_LETTERED or rec.compensates is not None:
                continue
            try:
                step = spec.step(rec.parent or rec.step_id)
            except KeyError:
                continue
            if step.on_false is FailureMode.HALT_PIPELINE:
                return Unwind(cause="failed", reason=record.error or f"step {rec.step_id} failed")
    return None


def after(spec: PipelineSpec, record: JobRecord, routes: Any, events: list[dict[str, Any]], now: float,
          messages: list[Message]) -> tuple[JobRecord, list[Message]]:
    """What ends every pass of the engine: a job that must undo its effects (:func:`cause`) and has
    something to undo starts unwinding; one that unwinds goes on (:func:`proceed`)."""
    if record.unwind is None:
        if not known(record.state) or not (declares(spec) or any(r.undo_calls for r in record.steps.values())):
            return record, messages
        why = cause(spec, record)
        if why is None or not _undoable(spec, record.steps.values()):
            return record, messages
        record = record.model_copy(update={"unwind": why.model_copy(update={"at": now}), "updated_at": now})
        events.append(_event("compensating", record, None, cause=why.cause, reason=why.reason))
        for rec in [r for r in record.steps.values() if r.state is State.WAITING]:
            # nothing of it goes on: a wait (sleep:, wait_for:) is withdrawn now, its index entry and
            # timers removed with this write, rather than left to end into nothing when its timer fires
            record = record.with_step(transition(rec, State.CANCELLED, now=now, failure_class="cancelled",
                                                 error=f"withdrawn from its wait: the job {why.cause} and "
                                                 "undoes its effects"))
    record, more = proceed(spec, record, routes, events, now)
    return record, [*messages, *more]


def _undoable(spec: PipelineSpec, recs: Iterable[StepRecord]) -> bool:
    return any(compensable(spec, r) is not None and effect(r) != "none" for r in recs)


def proceed(spec: PipelineSpec, record: JobRecord, routes: Any, events: list[dict[str, Any]],
            now: float) -> tuple[JobRecord, list[Message]]:
    """One pass over an unwinding job: record the compensations still missing, skip those whose step
    ended without effect, send the next one when none is in flight, and derive the job's state."""
    from .engine import settle

    assert record.unwind is not None
    for rec in list(record.steps.values()):
        step = compensable(spec, rec)
        if step is None or undo_id(rec.step_id) in record.steps or effect(rec) == "none":
            continue
        undo = step.compensate
        # a tool's compensation (compensate: {tool:}, or its calls' own) runs on the step's agent's worker
        agent = undo.agent if undo is not None and undo.agent is not None and not by_tools(step, rec) else rec.agent
        record = record.with_step(StepRecord(step_id=undo_id(rec.step_id), agent=agent,
                                             key=undo_key(rec.key), compensates=rec.step_id,
                                             created_at=now, updated_at=now))
    for comp in compensations(record):
        orig = record.steps[comp.compensates or ""]
        if comp.state is State.QUEUED and comp.sent_at is None and effect(orig) == "none":
            why = f"nothing to undo: step {orig.step_id} ended {orig.state.value} without effect"
            record = record.with_step(transition(comp, State.SKIPPED, now=now, error=why))
            events.append(_event("compensation_skipped", record, record.steps[comp.step_id], reason=why))
    messages: list[Message] = []
    was = record.state
    record = settle(_send_next(spec, record, routes, events, now, messages), now, spec)
    if record.state is State.COMPENSATED and was is not State.COMPENSATED:
        events.append(_event("compensated", record, None, cause=record.unwind.cause if record.unwind else None))
    return record, messages


def _send_next(spec: PipelineSpec, record: JobRecord, routes: Any, events: list[dict[str, Any]], now: float,
               messages: list[Message]) -> JobRecord:
    comps = compensations(record)
    if any(c.state in LOST for c in comps):
        return record  # one failed for good: the rest wait for its replay (the job is unknown)
    if any(c.sent_at is not None and c.state not in (State.SUCCEEDED, State.SKIPPED) for c in comps):
        return record  # one at a time
    waiting = [c for c in comps if c.state is State.QUEUED and c.sent_at is None]
    origs = {c.step_id: record.steps[c.compensates or ""] for c in waiting}
    if not waiting or any(effect(o) == "pending" for o in origs.values()):
        return record  # a step still in flight (or unknown) ended last: it is undone first
    comp = max(waiting, key=lambda c: (origs[c.step_id].finished_at or 0.0, origs[c.step_id].updated_at))
    orig = origs[comp.step_id]
    step = compensable(spec, orig)
    assert step is not None
    try:
        payload = _input(step, orig, record)
        message = _message(step, record, routes, comp, payload, now)
    except (ExpressionError, LimitExceeded) as exc:
        why = f"its input could not be built: {exc.message}"
        record = record.with_step(transition(comp, State.DEAD_LETTERED, now=now, error=why,
                                             failure_class="compensation_failed"))
        events.append(_event("compensation_failed", record, record.steps[comp.step_id], reason=why))
        return record
    messages.append(message)
    record = record.with_step(comp.model_copy(update={"input": payload, "sent_at": now, "updated_at": now}))
    events.append(_event("compensation_sent", record, record.steps[comp.step_id], compensates=orig.step_id))
    return record


def _input(step: StepSpec, orig: StepRecord, record: JobRecord) -> dict[str, Any]:
    """The compensation's input: its ``input:`` fields over the step's input and output, else both; for
    a step without ``compensate:``, the calls of its compensating tools (run by its own agent's worker)."""
    from .engine import _build_input

    if by_tools(step, orig):  # the compensating tools of its calls, last call first
        return {UNDO_CALLS: list(reversed(orig.undo_calls or []))}
    undo = step.compensate
    assert undo is not None
    scope = {"input": orig.input, "output": orig.result or {}, "key": record.key, "task_id": record.key,
             "job_id": record.job_id}
    if undo.tool is not None:  # one call of the declared tool, its args built (default: the step's output)
        args = _build_input(undo.input, scope) if undo.input is not None else dict(orig.result or {})
        return {UNDO_CALLS: [{"tool": undo.tool, "args": args}]}
    if undo.input is None:
        return {"input": orig.input, "output": orig.result or {}}
    return _build_input(undo.input, scope)


def _message(step: StepSpec, record: JobRecord, routes: Any, comp: StepRecord, payload: dict[str, Any],
             now: float) -> Message:
    undo = step.compensate
    policy = undo.retry_policy if undo is not None else step.retry_policy
    env = Envelope(key=comp.key, job_id=record.job_id, step_id=comp.step_id, agent=comp.agent,
                   trace_id=record.trace_id, deadline=now + COMPENSATION_DEADLINE_S,
                   contract_version=routes.version(comp.agent), payload=payload,
                   flow_key=routes.flow_key(comp.agent, payload),
                   max_retries=policy.max_attempts - 1 if policy else None,
                   backoff=policy.backoff.value if policy else None, priority=record.priority,
                   # the undo of an effect jobs share (a rendered key) is shared as the effect is: the
                   # compensations of jobs of two shards meet in the key's shard (broker/shared_claims.py)
                   shared_key=step.idempotency_key is not None and getattr(routes, "shared_keys", True))
    timeout = undo.timeout_ms if undo is not None else None
    message = build_message(env, **({"time_limit": timeout} if timeout is not None else {}))
    queue = routes.queue(comp.agent)
    if queue != message.queue_name:
        message = message.copy(queue_name=queue)
    if routes.max_message_bytes is not None:
        encode_checked(message, routes.max_message_bytes, routes.max_json_depth or 200)
    return message


def cancel(spec: PipelineSpec | None, record: JobRecord, reason: str, routes: Any, events: list[dict[str, Any]],
           now: float | None = None) -> tuple[JobRecord, list[Message]]:
    """``record`` cancelled: nothing more is sent; every step not yet running (queued, waiting for a
    retry, awaiting approval, waiting on a timer or an event) is ``cancelled``; a running one stays
    until its handler ends (it sees ``ctx.cancelled``), and is then recorded ``cancelled``, never
    ``succeeded``; compensations run for what succeeded. A job already unwinding (or ended) is
    returned as it is: cancel is idempotent."""
    from mesh.contracts import settle as settle_job

    now = stamp(now)
    if record.unwind is not None or record.state in (State.SUCCEEDED, *UNWOUND) or not known(record.state):
        return record, []
    why = f"cancelled: {reason}" if reason else "cancelled"
    record = record.model_copy(update={"unwind": Unwind(cause="cancelled", reason=why, at=now), "updated_at": now})
    events.append(_event("cancelled", record, None, reason=reason))
    for rec in list(record.steps.values()):
        if rec.compensates is not None:
            continue
        if rec.state in (State.QUEUED, State.FAILED, State.AWAITING_APPROVAL, State.WAITING) or (
                rec.state is State.RUNNING and rec.need is not None):
            note = ("withdrawn from approval: the job was cancelled" if rec.state is State.AWAITING_APPROVAL
                    else "withdrawn from its wait: the job was cancelled" if rec.state is State.WAITING
                    else "not run: the job was cancelled")
            record = record.with_step(transition(rec, State.CANCELLED, now=now, error=note, failure_class="cancelled"))
    if spec is None:
        return settle_job(record, now), []
    return proceed(spec, record, routes, events, now)


def _event(kind: str, record: JobRecord, rec: StepRecord | None, **fields: Any) -> dict[str, Any]:
    env = {"job_id": record.job_id, "step_id": rec.step_id if rec else None, "agent": rec.agent if rec else None,
           "key": rec.key if rec else record.key, "trace_id": record.trace_id}
    return trace.event(kind, env, pipeline=record.pipeline, **fields)


def stamp(now: float | None) -> float:
    return time.time() if now is None else now
