"""What a person's decision on a parked step does to its job, and the check a worker makes again.

A decision is a pure change to the job record (:func:`decision`), written by
:func:`mesh.broker.approvals.decide` in one transaction with its audit record:

- ``approved``: the step goes back to ``queued`` holding the approval, and the engine sends it
  (:func:`mesh.agents.pipelines.engine.advance` sends a step only when it holds an approval of
  exactly the call it would make), with what its run had left of its deadline counted from now;
- ``denied``, or ``expired`` under ``on_timeout: deny``: the step's ``on_false`` applies —
  ``halt_pipeline`` halts the job the way a false gate does, ``continue`` skips the step and its
  dependents go on;
- ``expired`` under ``on_timeout: escalate``: the step is dead-lettered ``approval_expired`` with the
  message it would have sent; a DLQ replay brings that message to a worker, which parks the step
  again (:func:`recheck`) instead of running it.

:func:`recheck` is the worker's check before a step's agent runs: a step of a spec that asks for
approval runs only holding an approval of the call its message makes (input, key, spec digest);
otherwise it is asked again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from dramatiq.message import Message

from mesh.broker import approvals as store
from mesh.broker.approvals import AlreadyDecided, NotAwaiting, Verdict
from mesh.broker.pipelines import PipelineStore
from mesh.contracts import TERMINAL, Envelope, JobRecord, State, StepRecord, loads, transition
from mesh.contracts.approvals import Approval, Decision, call_hash, show_duration
from mesh.contracts.jobs import known

from . import compensate, engine
from .spec import ApprovalPolicy, FailureMode, OnTimeout, PipelineSpec

#: Trace event kinds of the decisions.
EVENT = {Decision.APPROVED: "approved", Decision.DENIED: "denied", Decision.EXPIRED: "approval_expired"}


def decision(spec: PipelineSpec, routes: engine.Routes, verdict: Verdict, events: list[dict[str, Any]],
             dead: list[Message], now: float | None = None) -> Callable[[JobRecord], tuple[JobRecord, list[Message]]]:
    """The change ``verdict`` makes to its job (see the module's docstring). Raises NotAwaiting or
    AlreadyDecided (the first decision landed) when the step does not wait for one any more."""

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        at = time.time() if now is None else now
        rec = record.steps.get(verdict.step_id)
        if rec is None:
            raise NotAwaiting(f"job {record.job_id} has no step {verdict.step_id!r}", job_id=record.job_id)
        if not known(record.state) or not known(rec.state):  # a newer release's: it moves it
            raise NotAwaiting(f"job {record.job_id} is {record.state.value}: a newer release's state, not decided "
                              "here", job_id=record.job_id, state=record.state.value)
        if record.unwind is not None:  # cancelled, or undoing its effects: nothing of it is sent any more
            raise NotAwaiting(f"job {record.job_id} is {record.state.value} ({record.unwind.cause}): nothing of it "
                              "is decided any more", job_id=record.job_id, state=record.state.value)
        approval = rec.approval
        stale = verdict.asks is not None and approval is not None and approval.asks != verdict.asks
        if rec.state is not State.AWAITING_APPROVAL or approval is None or stale:
            if approval is not None and approval.decision is not None:
                raise AlreadyDecided(record.job_id, verdict.step_id, approval)
            raise NotAwaiting(f"step {verdict.step_id} of job {record.job_id} is {rec.state.value}, not waiting "
                              "for an approval", job_id=record.job_id, state=rec.state.value)
        approval = approval.model_copy(update={"decision": verdict.decision, "by": verdict.by, "at": verdict.at,
                                               "note": verdict.note})
        rec = rec.model_copy(update={"approval": approval})
        step = spec.step(rec.parent or rec.step_id)
        events.append(engine._event(EVENT[verdict.decision], record, rec, by=verdict.by, note=verdict.note,
                                    hash=approval.hash, asks=approval.asks))
        left = approval.deadline_left_s or 600.0
        run = engine.Run(trace_id=record.trace_id, deadline=verdict.at + left, token_budget=approval.token_budget)
        if verdict.decision is Decision.APPROVED:
            record = record.with_step(transition(rec, State.QUEUED, now=at, sent_at=None))
            return engine.advance(spec, record, run, routes, events, now=at)
        if verdict.decision is Decision.EXPIRED:
            why = f"approval expired after {show_duration(approval.timeout_s)} (on_timeout: {approval.on_timeout})"
        else:
            why = f"approval denied by {verdict.by}" + (f": {verdict.note}" if verdict.note else "")
        if verdict.decision is Decision.EXPIRED and approval.on_timeout == OnTimeout.ESCALATE.value:
            dead.append(engine._message(step, record, run, routes, rec.step_id, rec.key, rec.input))
            record = record.with_step(transition(rec, State.DEAD_LETTERED, now=at, error=why,
                                                 failure_class="approval_expired"))
            return engine.after_loss(spec, record, routes, events, now=at)
        failure = "approval_expired" if verdict.decision is Decision.EXPIRED else "approval_denied"
        if step.on_false is FailureMode.CONTINUE:
            rec = transition(rec, State.SKIPPED, now=at, error=why, failure_class=failure)
            events.append(engine._event("skipped", record, rec, reason=why))
            return engine.advance(spec, record.with_step(rec), run, routes, events, now=at)
        # halted as a false gate halts it: what succeeded before is compensated (compensate.py)
        return compensate.after(spec, engine._halt(record, rec, why, {}, at, events, failure_class=failure),
                                routes, events, at, [])

    return change


def recheck(spec: PipelineSpec | None, record: JobRecord, env: Envelope, events: list[dict[str, Any]],
            now: float | None = None) -> JobRecord | None:
    """Before a step's agent runs: the record with the step parked again when its spec asks for
    approval and the step does not hold an approval of exactly this message's call (a replayed
    step, an expired or denied ask, another input or key); None when it may run."""
    if spec is None or record.pipeline_digest is None or record.unwind is not None:
        return None  # not a pipeline's, or cancelled / undoing its effects: progress.start decides
    rec = record.steps.get(env.step_id)
    if rec is None or rec.parent is not None or rec.state in TERMINAL or not known(rec.state):
        return None  # an item of an approved fan-out, a duplicate, or a newer release's
    try:
        step = spec.step(env.step_id)
    except KeyError:
        return None
    policy = step.approval_policy
    if policy is None:
        return None
    payload = env.payload if step.for_each is None else rec.input
    if engine.approved(rec, call_hash(payload, env.key, record.pipeline_digest)):
        return None
    at = time.time() if now is None else now
    rec = engine.park(record, rec, policy, payload, env.key, deadline_left_s=env.deadline - at,
                      token_budget=env.token_budget, now=at)
    record = record.with_step(rec)
    approval = rec.approval
    events.append(engine._event("awaiting_approval", record, rec, hash=approval.hash if approval else None,
                                timeout=policy.timeout, on_timeout=policy.on_timeout.value,
                                approvers=list(policy.approvers), asks=approval.asks if approval else 1,
                                asked_again="the call is not the one approved"))
    return engine.settle(record, at, spec)


def park_call(spec: PipelineSpec | None, env: Envelope, call: dict[str, Any], digest: str,
              events: list[dict[str, Any]], now: float | None = None
              ) -> Callable[[JobRecord], tuple[JobRecord, list[Message]]]:
    """The running step of ``env`` parked in ``awaiting_approval`` for a person to approve exactly the
    destructive ``call`` (tool and args) its tool loop asked for, hashed ``digest``: approved, the step
    is sent again and runs from its checkpoints (see :mod:`mesh.agents.tool_loop`); denied or expired,
    its ``on_false`` applies as for any approval. The wait keeps what the run had left of its deadline."""

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        at = time.time() if now is None else now
        rec = record.steps[env.step_id]
        if rec.state is not State.RUNNING:  # settled meanwhile (cancelled, a newer attempt's): left as it is
            return record, []
        policy = ApprovalPolicy()
        asks = rec.approval.asks + 1 if rec.approval is not None else 1
        approval = Approval(hash=digest, asked_at=at, timeout_s=policy.timeout_s, on_timeout=policy.on_timeout.value,
                            asks=asks, deadline_left_s=max(1.0, env.deadline - at), token_budget=env.token_budget,
                            call=call)
        rec = transition(rec, State.AWAITING_APPROVAL, now=at, approval=approval, sent_at=None)
        record = record.with_step(rec)
        events.append(engine._event("awaiting_approval", record, rec, hash=digest, timeout=policy.timeout,
                                    on_timeout=policy.on_timeout.value, asks=asks, call=call))
        return engine.settle(record, at, spec), []

    return change


def _factory(pipelines: PipelineStore, queue: Callable[[str], str], version: Callable[[str], int | None],
             settings: Any) -> store.DecideChange:
    routes = engine.Routes.from_settings(settings, queue=queue, version=version) if settings is not None else \
        engine.Routes(queue=queue, version=version)

    def change(record: JobRecord, verdict: Verdict, events: list[dict[str, Any]],
               dead: list[Message]) -> tuple[JobRecord, list[Message]]:
        if not (record.pipeline and record.pipeline_digest):
            raise NotAwaiting(f"job {record.job_id} is not a pipeline's run: nothing of it waits for approval",
                              job_id=record.job_id)
        spec = engine.load_spec(pipelines, record.pipeline, record.pipeline_digest)
        return decision(spec, routes, verdict, events, dead)(record)

    return change


store.on_decide(_factory)


def waiting_step(record: JobRecord, step_id: str) -> StepRecord | None:
    """The step ``step_id`` of ``record`` when it waits for approval."""
    rec = record.steps.get(step_id)
    return rec if rec is not None and rec.state is State.AWAITING_APPROVAL else None


def timer_handlers(jobs: Any, pipelines: PipelineStore, routes: engine.Routes, clock: Any,
                   worker: str) -> dict[str, Callable[[Any], bool]]:
    """What fires the approvals' durable timers in a worker (:class:`mesh.broker.timers.Timers`):
    ``approval`` decides ``expired`` (its ``on_timeout`` applies), ``approval.warn`` writes the
    warning event. Both are idempotent: an ask decided meanwhile, or asked again, is left alone."""
    from mesh.broker.jobs import JobNotFound

    def change(record: JobRecord, verdict: Verdict, events: list[dict[str, Any]],
               dead: list[Message]) -> tuple[JobRecord, list[Message]]:
        spec = engine.load_spec(pipelines, record.pipeline or "", record.pipeline_digest or "")
        return decision(spec, routes, verdict, events, dead)(record)

    def expire(due: Any) -> bool:
        job_id, step_id, asks = due.ref.rsplit("|", 2)
        # when it fired, on the Redis clock: never before its due time (the timer was read with TIME)
        at = max(clock.now_s(), due.now_ms / 1000)
        verdict = Verdict(step_id=step_id, decision=Decision.EXPIRED, by="timeout", at=at, asks=int(asks), note=None)
        # decided, asked again or gone meanwhile: nothing left to expire
        with contextlib.suppress(NotAwaiting, AlreadyDecided, JobNotFound):
            store.decide(jobs, job_id, verdict, change, worker=worker)
        return True

    def warn(due: Any) -> bool:
        job_id, step_id, asks = due.ref.rsplit("|", 2)
        from mesh.broker import trace

        def write(pipe: Any) -> None:
            # watched with the record: a lock holder paused past its lock that resumes after another
            # worker sent this warning (and removed its timer) finds it gone, and sends none again
            score = pipe.zscore(jobs.keys.timers, due.member)
            if score is None or int(score) != due.due_ms:
                return
            data = pipe.get(jobs.keys.job(job_id))
            record = JobRecord.model_validate(loads(data)) if data is not None else None
            rec = waiting_step(record, step_id) if record is not None else None
            pipe.multi()
            pipe.zrem(jobs.keys.timers, due.member)
            if record is None or rec is None or rec.approval is None or rec.approval.asks != int(asks):
                return
            left = max(0.0, rec.approval.timeout_s - (rec.approval.warn_before_s or 0))
            ev = engine._event("approval_warning", record, rec, expires_in=show_duration(
                rec.approval.warn_before_s or 0), asked=show_duration(left), hash=rec.approval.hash)
            trace.stage(pipe, jobs.keys, ev)
            store.stage_audit(pipe, jobs.keys, "warning", job_id, step_id, hash=rec.approval.hash,
                              expires_in_s=rec.approval.warn_before_s)
            pipe.hincrby(jobs.keys.stats, "approval_warnings", 1)

        jobs.client.transaction(write, jobs.keys.timers, jobs.keys.job(job_id))
        return True

    return {store.EXPIRY: expire, store.WARNING: warn}
