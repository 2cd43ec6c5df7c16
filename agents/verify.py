"""Deciding an ``unknown`` step from outside a worker: ``mesh verify`` (run the verifiers again) and
``mesh settle`` (an operator decides by hand).

An ``unknown`` step has open effects in its ledger (an intent whose verdict is missing or
``unknown``). Deciding them:

    every open effect verified, or settled applied
        the step runs again (its dead letter replayed): each call returns the recorded outcome
        from the ledger instead of calling, and the step's success goes through the worker's own
        settlement, which moves the job on (``engine.advance``)
    one refuted, or settled not applied
        the step is dead-lettered (``permanent``: the effect did not happen) and the job moves on by
        the engine's ``after_loss``, as when a worker dead-letters a step; a later replay calls again
    one still undecided
        nothing moves

This module reads the ledger, runs the checks and changes the job record; replaying the dead
letter is the CLI's (:mod:`mesh.ops.effects_cli`), which imports the DLQ.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from mesh.broker import redact, trace
from mesh.broker.jobs import Change
from mesh.broker.ledger import Ledger
from mesh.contracts import ConfigError, JobRecord, State, settle, transition
from mesh.contracts.effects import EffectEntry, Settlement, Verdict

from .effects import Check, as_json, check, typed
from .pipelines.engine import Routes, after_loss, load_spec
from .tools.base import ToolContext

if TYPE_CHECKING:
    from mesh.broker.client import MeshClient

    from .app import App


class CannotDecide(ValueError):
    """The step cannot be verified or settled: it is not ``unknown``, or (settled applied) nothing
    in its ledger would keep a re-run from acting again."""


@dataclass
class Decision:
    """What ``mesh verify`` or ``mesh settle`` decided for one step."""

    job_id: str
    step_id: str
    #: verified / applied: the step runs again; refuted / not_applied: it is dead-lettered;
    #: unknown: nothing moved.
    verdict: Verdict
    checks: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None

    @property
    def happened(self) -> bool:
        return self.verdict in (Verdict.VERIFIED, Verdict.APPLIED)

    def as_json(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "step_id": self.step_id, "verdict": self.verdict.value,
                "reason": self.reason, "effects": self.checks}


def unknown_step(record: JobRecord, step_id: str) -> None:
    """CannotDecide unless ``step_id`` is a step of ``record`` in state ``unknown``."""
    step = record.steps.get(step_id)
    if step is None:
        raise CannotDecide(f"job {record.job_id} has no step {step_id!r}; its steps are {', '.join(record.steps)}")
    if step.state is not State.UNKNOWN:
        raise CannotDecide(f"step {step_id} of job {record.job_id} is {step.state}, not unknown: "
                         "only an unknown step is verified or settled")


def ledger_of(c: MeshClient, job_id: str, step_id: str) -> Ledger:
    return Ledger(c.redis, c.keys_of(job_id), job_id, step_id, c.settings.dedup_ttl_s)  # the job's shard


def verify(c: MeshClient, app: App, record: JobRecord, step_id: str, http: httpx.Client) -> Decision:
    """Run the verifier of every open effect of the step again and record what each says."""
    unknown_step(record, step_id)
    ledger = ledger_of(c, record.job_id, step_id)
    opened = [e for e in ledger.entries() if e.open]
    if not opened:
        return Decision(record.job_id, step_id, Verdict.UNKNOWN, reason=(
            "its ledger holds no open effect to check (the step is unknown for another reason): "
            "mesh settle decides it by hand"))
    checks, verdicts = [], []
    for entry in opened:
        found = _check(c, app, record, entry, http)
        audit = {"op": "verify", "verdict": found.verdict.value, "reason": found.reason}
        if found.verdict is Verdict.VERIFIED and entry.outcome_at is None and found.result is not None:
            # what the verifier found is the call's result: the step's re-run returns it
            entry = entry.model_copy(update={"outcome": as_json(found.result), "outcome_at": time.time()})
        ledger.decide(entry, found.verdict, found.reason, audit=audit)
        checks.append({"call": entry.n, "tool": entry.tool, "verdict": found.verdict.value, "reason": found.reason})
        verdicts.append(found.verdict)
    verdict = (Verdict.REFUTED if Verdict.REFUTED in verdicts else Verdict.UNKNOWN if Verdict.UNKNOWN in verdicts
               else Verdict.VERIFIED)
    reasons = [f"{ch['tool']} call #{ch['call']}: {ch['reason']}" for ch in checks if ch["reason"]]
    return Decision(record.job_id, step_id, verdict, checks, "; ".join(reasons) or None)


def _check(c: MeshClient, app: App, record: JobRecord, entry: EffectEntry, http: httpx.Client) -> Check:
    """What ``entry``'s tool's verifier says now, run with what the call carried (key, fencing token)."""
    spec = app.tools.get(entry.tool)
    if spec is None:
        return Check(Verdict.UNKNOWN, f"app {app.name!r} declares no tool {entry.tool!r}: give its app (--app)")
    if spec.verify is None:
        return Check(Verdict.UNKNOWN, f"tool {entry.tool} has no verifier: mesh settle decides by hand")
    try:
        args = spec.args.model_validate(entry.args)
    except Exception as exc:
        return Check(Verdict.UNKNOWN, f"the recorded args no longer fit {entry.tool}'s model: {exc}")
    try:
        ctx = _tool_context(c, spec, record, entry, http)
    except ConfigError as exc:
        return Check(Verdict.UNKNOWN, str(exc))
    result = None if entry.outcome_at is None else typed(spec, entry.outcome, key=entry.key, verdict=Verdict.UNKNOWN)
    found = check(spec, ctx, args, result)
    if found.verdict is Verdict.UNVERIFIED:
        return Check(Verdict.UNKNOWN, "the verifier has no check for this call: mesh settle decides by hand")
    return found


def _tool_context(c: MeshClient, spec: Any, record: JobRecord, entry: EffectEntry, http: httpx.Client) -> ToolContext:
    from .context import read_secret

    dependency = spec.target(spec.args.model_validate(entry.args)) if spec.dependency is not None else None
    return ToolContext(key=entry.key, job_id=record.job_id, trace_id=record.trace_id, fencing_token=entry.token,
                       settings=c.settings, redis=c.redis, keys=c.keys_of(record.job_id), client=http,
                       deadline=math.inf, clock=c.clock.now_s, allow=spec.allowlist(c.settings), dependency=dependency,
                       secrets={name: read_secret(name, c.settings.secrets_dir) for name in spec.secrets})


def settle_by_hand(c: MeshClient, record: JobRecord, step_id: str, *, applied: bool, reason: str,
                   by: str) -> Decision:
    """Record an operator's decision on every open effect of the step, on the ledger, the step record
    (``settlement``), the job's trace and the audit stream."""
    unknown_step(record, step_id)
    ledger = ledger_of(c, record.job_id, step_id)
    verdict = Verdict.APPLIED if applied else Verdict.NOT_APPLIED
    opened = [e for e in ledger.entries() if e.open]
    if applied and not opened:
        # Nothing in the ledger would answer the step's calls: running it again would act again.
        raise CannotDecide(f"step {step_id} of job {record.job_id} has no open effect in its ledger (its effect was "
                           "not made through a declared tool): settled applied, it would run and act again. Settle "
                           "it not-applied, or replay its dead letter (mesh dlq replay) if acting again is right")
    checks = []
    for entry in opened:
        ledger.decide(entry, verdict, reason, by=by, audit={"op": "settle", "verdict": verdict.value,
                                                             "reason": reason, "by": by})
        checks.append({"call": entry.n, "tool": entry.tool, "verdict": verdict.value, "reason": reason})
    settlement = Settlement(applied=applied, by=by, reason=redact.redact(reason))
    ev = _event(record, step_id, "settled", verdict=verdict.value, by=by, reason=settlement.reason)

    def change(rec: JobRecord) -> tuple[JobRecord, list[Any]]:
        step = rec.steps[step_id]
        if step.state is not State.UNKNOWN:
            return rec, []
        return rec.with_step(step.model_copy(update={"settlement": settlement, "updated_at": time.time()})), []

    c.jobs_of(record.job_id).update(record.job_id, change, events=[ev])
    return Decision(record.job_id, step_id, verdict, checks, reason)


def lose(c: MeshClient, app: App, record: JobRecord, decision: Decision) -> JobRecord:
    """Dead-letter the step whose effect was refuted (or settled not applied) and move the job on as a
    worker's dead-lettered step does (the engine's ``after_loss`` for a declared pipeline)."""
    what = "refuted" if decision.verdict is Verdict.REFUTED else "settled not applied"
    error = f"its effect was {what}: {decision.reason}" if decision.reason else f"its effect was {what}"
    events = [_event(record, decision.step_id, "dead_lettered", failure_class="permanent", error=error[:500],
                     state=State.DEAD_LETTERED.value, verdict=decision.verdict.value)]
    return c.jobs_of(record.job_id).update(record.job_id, _lost(c, app, decision.step_id, error, events),
                                           events=events)


def _lost(c: MeshClient, app: App, step_id: str, error: str, events: list[dict[str, Any]]) -> Change:
    given = len(events)
    agents = app.agents
    routes = Routes.from_settings(c.settings, queue=lambda a: agents[a].queue if a in agents else a,
                                  version=lambda a: agents[a].version if a in agents else None)

    def change(record: JobRecord) -> tuple[JobRecord, list[Any]]:
        del events[given:]
        now = time.time()
        step = record.steps.get(step_id)
        if step is None or step.state is not State.UNKNOWN:
            return record, []
        record = record.with_step(transition(step, State.DEAD_LETTERED, now=now, error=error,
                                             failure_class="permanent"))
        if record.pipeline and record.pipeline_digest:
            spec = load_spec(c.pipelines, record.pipeline, record.pipeline_digest)
            return after_loss(spec, record, routes, events, now=now)
        return settle(record, now), []

    return change


def verified_event(record: JobRecord, decision: Decision, by: str) -> dict[str, Any]:
    """The trace event of a ``mesh verify`` run (whatever it decided)."""
    return _event(record, decision.step_id, "verified", verdict=decision.verdict.value, by=by,
                  reason=decision.reason)


def _event(record: JobRecord, step_id: str, kind: str, **fields: Any) -> dict[str, Any]:
    step = record.steps[step_id]
    envelope = {"job_id": record.job_id, "trace_id": record.trace_id, "step_id": step_id, "agent": step.agent,
                "key": step.key, "attempt": step.attempt}
    return trace.event(kind, envelope, worker="mesh-cli", **fields)
