"""The engine that runs a declared pipeline: which steps go next, with which key and input.

Everything here is a pure function of the job record and the spec: the client calls :func:`begin`
to create a run (every step recorded, the roots sent); a worker calls :func:`advance` inside the
transaction that records a step's success, so the steps it releases are sent in the same MULTI
(the outbox). The job's state is then derived from its steps (:func:`settle`).

A step is ready when every dependency succeeded or was skipped. Before it is sent, ``when`` (false:
``skipped``, dependents go on) and ``gate`` (false: ``on_false`` — ``halt_pipeline`` halts the
job with the gate, the values it read and why; ``continue`` skips the step) are evaluated over
``{key, task_id, job_id, input, <step id>: output, ...}``; for a ``for_each`` step, per item, with
``item`` too (a skipped item counts neither as a success nor as a failure for the join). A condition
that cannot be evaluated (a field missing, a wrong type) is neither false nor true: the step is
dead-lettered ``invalid_output`` with the condition and the values it read.
``requires_human_approval`` (or ``approval:``) parks the step in ``awaiting_approval`` instead of
sending it, asking for exactly the call it would make (its input, key and the spec's digest, hashed;
a ``for_each`` step: its list of items); once a person approved that very call it is sent
(:mod:`.approvals` records decisions).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from dramatiq.message import Message

from mesh.broker import trace
from mesh.broker.outbox import build_message, encode_checked
from mesh.broker.pipelines import PipelineStore
from mesh.broker.settings import MeshSettings
from mesh.contracts import (
    LOST,
    Envelope,
    GateCheck,
    JobRecord,
    LimitExceeded,
    State,
    StepRecord,
    child_key,
    dumps,
    items_of,
    transition,
)
from mesh.contracts import settle as settle_job
from mesh.contracts.approvals import Approval, Decision, call_hash
from mesh.contracts.jobs import known, moves
from mesh.contracts.waits import Wait, WaitKind

from . import sandbox
from .expr import Condition, ExpressionError, ExpressionLimit
from .spec import STORED, ApprovalPolicy, FailureMode, PipelineSpec, StepSpec
from .validate import order, upstream

_SPECS: dict[str, PipelineSpec] = {}


@dataclass(frozen=True)
class Graph:
    """What :func:`advance` reads of a spec's DAG on every step: its steps in DAG order (:func:`order`),
    each by id, and (on first use) what each step depends on, directly or not."""

    order: tuple[str, ...]
    steps: Mapping[str, StepSpec]
    upstream: Callable[[], dict[str, set[str]]]


#: Spec object id -> (the spec, its graph): a spec is frozen, and the spec is held with its graph, so an
#: id is never reused for another spec while its entry stands. Bounded: emptied past _GRAPHS_MAX specs.
_GRAPHS: dict[int, tuple[PipelineSpec, Graph]] = {}
_GRAPHS_MAX = 256


def graph(spec: PipelineSpec) -> Graph:
    """The DAG of ``spec``, computed once per spec object (a job's spec comes from :func:`load_spec`,
    one object per digest; an app's spec is one object for its process): a step's advance no longer
    re-orders the spec nor looks each step up by a scan, which made its cost grow with the square of
    the pipeline's size. Another spec object, even a copy of this one, gets a graph of its own."""
    entry = _GRAPHS.get(id(spec))
    if entry is not None and entry[0] is spec:
        return entry[1]
    up: list[dict[str, set[str]]] = []

    def upstream_once() -> dict[str, set[str]]:
        if not up:
            up.append(upstream(spec))
        return up[0]

    built = Graph(order=tuple(order(spec)), steps={s.id: s for s in spec.steps}, upstream=upstream_once)
    if len(_GRAPHS) >= _GRAPHS_MAX:
        _GRAPHS.clear()
    _GRAPHS[id(spec)] = (spec, built)
    return built


def spec_from_json(data: Mapping[str, Any]) -> PipelineSpec:
    """A stored spec's JSON (``PipelineSpec.canonical``) back as the spec, as it was registered (a
    step id reserved since, :data:`~.spec.STORED_IDS`, still reads)."""
    return PipelineSpec.model_validate(dict(data), context=STORED)


def load_spec(store: PipelineStore, name: str, digest: str) -> PipelineSpec:
    """The spec a job started with, read from Redis once per digest per process (a digest names its
    content, so the cache never goes stale)."""
    spec = _SPECS.get(digest)
    if spec is None:
        _, data = store.get(name, digest)
        spec = _SPECS[digest] = spec_from_json(data)
    return spec


def traced(spec: PipelineSpec | None, what: str, value: Any) -> dict[str, Any]:
    """How a step's ``input`` or ``output`` (``what``) appears in its trace event: as it is when the
    spec's ``tracing.log_inputs`` / ``log_outputs`` says so, else its size and SHA-256 (of its JSON,
    keys sorted), so two events can still be compared without keeping the data. Nothing for a job
    that is not a declared pipeline's."""
    if spec is None:
        return {}
    if getattr(spec.tracing, f"log_{what}s"):
        return {what: value}
    data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return {f"{what}_bytes": len(data), f"{what}_sha256": hashlib.sha256(data).hexdigest()}


def retention_s(spec: PipelineSpec | None) -> float | None:
    """How long a finished job of ``spec`` keeps its record (its checkpoints) and trace:
    ``checkpointing.ttl_minutes`` when checkpointing is on and it is set; else None (the store's
    MESH_JOB_RETENTION_S). A job with a step waiting for approval has no TTL at all while it waits
    (:mod:`mesh.broker.approvals`), so no wait can outlast it."""
    if spec is None or not spec.checkpointing.enabled or spec.checkpointing.ttl_minutes is None:
        return None
    return spec.checkpointing.ttl_minutes * 60.0


@dataclass(frozen=True)
class Routes:
    """How a step's message reaches its agent: the agent's queue and contract version (None: unchecked)."""

    queue: Callable[[str], str] = lambda agent: agent
    version: Callable[[str], int | None] = lambda agent: None
    #: Most items a ``for_each`` list may have (MESH_MAX_FAN_OUT); None: no limit.
    max_fan_out: int | None = None
    #: Largest message (MESH_MAX_MESSAGE_BYTES) and deepest nesting (MESH_MAX_JSON_DEPTH) a step's
    #: built input may make; None: unchecked.
    max_message_bytes: int | None = None
    max_json_depth: int | None = None
    #: Largest job record a fan-out may grow (MESH_MAX_JOB_BYTES); None: unchecked.
    max_job_bytes: int | None = None
    #: The flow key of a message to an agent with a payload (its limit ``key`` rendered); None: none known.
    flow_key: Callable[[str, dict[str, Any]], str | None] = lambda agent, payload: None
    #: Whether a message whose key is rendered from an ``idempotency_key`` says so (the envelope's
    #: ``shared_key``): with several shards (MESH_SHARDS) its claim is shared in the key's shard
    #: (broker/shared_claims.py). False with one shard, where nothing reads it: the envelope is written as
    #: before, which a worker of an earlier release (its envelope refuses unknown fields) reads during a
    #: rolling deploy. True when the deployment is not known.
    shared_keys: bool = True

    @classmethod
    def from_settings(cls, settings: MeshSettings, queue: Callable[[str], str],
                      version: Callable[[str], int | None],
                      flow_key: Callable[[str, dict[str, Any]], str | None] | None = None) -> Routes:
        """The routes with the deployment's limits; this process's expressions run under its MESH_EXPR_*."""
        sandbox.configure(sandbox.ExprLimits(timeout_ms=settings.expr_timeout_ms, memory_mb=settings.expr_memory_mb,
                                             max_result_bytes=settings.expr_max_result_bytes))
        return cls(queue=queue, version=version, max_fan_out=settings.max_fan_out,
                   max_message_bytes=settings.max_message_bytes, max_json_depth=settings.max_json_depth,
                   max_job_bytes=settings.max_job_bytes, shared_keys=settings.shards > 1,
                   **({} if flow_key is None else {"flow_key": flow_key}))


@dataclass(frozen=True)
class Run:
    """What every message of one run carries: its trace, deadline and token budget."""

    trace_id: str
    deadline: float
    token_budget: int | None = None


def values(record: JobRecord) -> dict[str, Any]:
    """What expressions read: the job's key (``key``, and ``task_id``, its older name) and id, the run's
    input, each succeeded step's output."""
    out: dict[str, Any] = {"key": record.key, "task_id": record.key, "job_id": record.job_id,
                           "input": record.pipeline_input or {}}
    succeeded = State.SUCCEEDED  # read once, not per step (contracts/jobs.py's _SETTLED says why)
    for sid, step in record.steps.items():
        if (step.state is succeeded and step.result is not None and step.parent is None
                and step.compensates is None):
            # a for_each step reads as the list of its items' outputs
            out[sid] = step.result["items"] if step.need is not None else step.result
    return out


def begin(spec: PipelineSpec, record: JobRecord, run: Run, routes: Routes,
          now: float | None = None) -> tuple[JobRecord, list[Message], list[dict[str, Any]]]:
    """A new run's record: every step queued and not yet sent, then the ready ones (the roots) sent.
    Returns the record, the messages and the trace events (gates, approvals) to write with them."""
    now = time.time() if now is None else now
    for step in spec.steps:
        record = record.with_step(StepRecord(step_id=step.id, agent=step.agent_name, key=_default_key(record, step),
                                             created_at=now, updated_at=now))
    events: list[dict[str, Any]] = []
    record, messages = advance(spec, record, run, routes, events, now=now)
    return record, messages, events


def advance(spec: PipelineSpec, record: JobRecord, run: Run, routes: Routes, events: list[dict[str, Any]],
            *, now: float | None = None) -> tuple[JobRecord, list[Message]]:
    """Send every step that became ready; skip, halt or park the ones their conditions say; derive the
    job's state. Trace events are appended to ``events``."""
    from . import compensate

    now = time.time() if now is None else now
    if record.unwind is not None:  # undoing its effects (compensate.py): no step is sent any more
        return compensate.proceed(spec, _close_fan_outs(spec, record, events, now), routes, events, now)
    if record.state is State.HALTED:  # a parallel branch finishing after a halt releases nothing
        return compensate.after(spec, _close_fan_outs(spec, record, events, now), routes, events, now, [])
    if not known(record.state):  # a newer release's state (archived, say): that release moves the job
        return record, []
    before, mark = record, len(events)
    messages: list[Message] = []
    dag = graph(spec)
    queued = State.QUEUED  # read once, not per step (contracts/jobs.py's _SETTLED says why)
    for sid in dag.order:
        rec = record.steps.get(sid)
        if rec is None:
            continue
        if rec.need is not None and rec.state is State.RUNNING:
            record = _pump(spec, dag.steps[sid], record, run, routes, messages, events, now)
            continue
        if rec.need is not None and rec.state is State.SUCCEEDED:
            record = _revise_join(dag.steps[sid], record, events, now)
            continue
        if rec.state is not queued or rec.sent_at is not None:
            continue
        step, steps = dag.steps[sid], record.steps
        if not all(steps[d].state in _RELEASING for d in step.depends_on):
            continue
        seen = values(record)
        policy = step.approval_policy
        if step.for_each is not None and policy is not None:
            # the whole fan-out is approved at once: the call asked for is its list of items
            asked = _fan_out_call(step, seen)
            if asked is not None and not approved(rec, call_hash(asked, rec.key, record.pipeline_digest)):
                record = _park(record, rec, policy, asked, rec.key, run, events, now)
                continue
        if step.for_each is not None:
            # its when and gate read `item`: checked per item (_fan_out)
            record, halt = _fan_out(step, record, seen, run, events, now, routes)
            if record.steps[sid].state is State.DEAD_LETTERED:  # refused: no item recorded or sent
                events.append(_event("fan_out_refused", record, record.steps[sid], reason=record.steps[sid].error))
                continue
            if halt is not None:
                del events[mark:]
                return compensate.after(spec, _halt_items(before, record, step, *halt, now, events), routes,
                                        events, now, [])
            record = _pump(spec, step, record, run, routes, messages, events, now)
            continue
        try:
            rec, stop = _conditions(step, rec, seen, record, events, now)
        except ExpressionError as exc:  # past a limit, or not evaluable: never a false condition
            detail = {"expression": exc.expression, "values": exc.values} if isinstance(exc, ConditionError) else {}
            record = _refuse(record, rec, exc.message, _failure(exc), events, now, **detail)
            continue
        if stop is not None:
            del events[mark:]
            return compensate.after(spec, _halt(before, rec, *stop, now, events), routes, events, now, [])
        if rec.state is State.SKIPPED:
            record = record.with_step(rec)
            continue
        if step.waits:  # sleep: / wait_for: park the step on a durable timer; nothing is sent
            record = _wait(step, record, rec, run, events, now)
            continue
        try:
            payload = _input(spec, step, record)
        except ExpressionError as exc:  # its input: cannot be built; nothing is sent
            record = _refuse(record, rec, exc.message, _failure(exc), events, now)
            continue
        try:  # the step's own key and message: this step's error, never the upstream step's
            key = _rerun_key(record, step, _key(step, seen, rec.key))
            message = _message(step, record, run, routes, sid, key, payload)
        except (ExpressionError, LimitExceeded) as exc:
            record = _refuse(record, rec, exc.message, "invalid_input", events, now)
            continue
        if policy is not None and not approved(rec, call_hash(payload, key, record.pipeline_digest)):
            record = _park(record, rec, policy, payload, key, run, events, now)
            continue
        messages.append(message)
        record = record.with_step(rec.model_copy(update={"key": key, "input": payload, "sent_at": now,
                                                         "updated_at": now}))
    return compensate.after(spec, settle(record, now, spec), routes, events, now, messages)


#: The states of a dependency that let its dependents go.
_RELEASING = frozenset({State.SUCCEEDED, State.SKIPPED})


def approved(rec: StepRecord, call: str) -> bool:
    """Whether ``rec`` holds an approval of exactly the call hashed ``call``."""
    return rec.approval is not None and rec.approval.decision is Decision.APPROVED and rec.approval.hash == call


def _fan_out_call(step: StepSpec, seen: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a ``for_each`` step asks approval for: its list of items; None when the list cannot be
    had (the fan-out then refuses the step, saying why)."""
    assert step.for_each is not None
    try:
        found = step.for_each.evaluate(seen)
    except ExpressionError:
        return None
    return {"items": _plain(found)} if isinstance(found, list | tuple) else None


def _park(record: JobRecord, rec: StepRecord, policy: ApprovalPolicy, payload: dict[str, Any], key: str,
          run: Run, events: list[dict[str, Any]], now: float) -> JobRecord:
    """Park the step in ``awaiting_approval``, asking for exactly this call (:func:`park`)."""
    rec = park(record, rec, policy, payload, key, deadline_left_s=run.deadline - now,
               token_budget=run.token_budget, now=now)
    record = record.with_step(rec)
    events.append(_event("awaiting_approval", record, rec, hash=rec.approval.hash if rec.approval else None,
                         timeout=policy.timeout, on_timeout=policy.on_timeout.value,
                         approvers=list(policy.approvers), asks=rec.approval.asks if rec.approval else 1))
    return record


def _wait(step: StepSpec, record: JobRecord, rec: StepRecord, run: Run, events: list[dict[str, Any]],
          now: float) -> JobRecord:
    """Park a ``sleep:`` or ``wait_for:`` step in ``waiting``: its :class:`Wait` says for what and until
    when; the job store stages its timer and index entry with the write (:mod:`mesh.broker.waits`).
    What the run had left of its deadline is kept: the wait does not spend it."""
    wf = step.wait_for
    wait = Wait(kind=WaitKind.EVENT if wf is not None else WaitKind.SLEEP, event=wf.event if wf else None,
                match=wf.match.source if wf is not None and wf.match is not None else None, started_at=now,
                duration_s=wf.timeout_s if wf is not None else step.sleep_s or 0.0,
                on_timeout=wf.on_timeout.value if wf is not None else "fail",
                seq=rec.wait.seq + 1 if rec.wait is not None else 1,
                deadline_left_s=max(1.0, run.deadline - now), token_budget=run.token_budget)
    rec = transition(rec, State.WAITING, now=now, sent_at=None, wait=wait)
    record = record.with_step(rec)
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wait.until))
    events.append(_event("waiting", record, rec, waits_for=wait.describe(), until=until, seq=wait.seq,
                         **({"on_timeout": wait.on_timeout} if wf is not None else {})))
    return record


def park(record: JobRecord, rec: StepRecord, policy: ApprovalPolicy, payload: dict[str, Any], key: str, *,
         deadline_left_s: float, token_budget: int | None, now: float) -> StepRecord:
    """``rec`` waiting for a person to approve the call (``payload`` under ``key`` in the job's spec),
    hashed; asked again (``asks`` counted) when it was asked before. What the run had left of its
    deadline is kept: the wait does not spend it (a released step gets it back from its release)."""
    asks = rec.approval.asks + 1 if rec.approval is not None else 1
    approval = Approval(hash=call_hash(payload, key, record.pipeline_digest), asked_at=now,
                        timeout_s=policy.timeout_s, on_timeout=policy.on_timeout.value, approvers=policy.approvers,
                        warn_before_s=policy.warn_before_s, asks=asks,
                        deadline_left_s=max(1.0, deadline_left_s), token_budget=token_budget)
    if State.AWAITING_APPROVAL not in moves(rec.state):
        rec = transition(rec, State.QUEUED, now=now)
    return transition(rec, State.AWAITING_APPROVAL, now=now, input=payload, key=key, sent_at=None, approval=approval)


def after_loss(spec: PipelineSpec, record: JobRecord, routes: Routes, events: list[dict[str, Any]] | None = None,
               now: float | None = None) -> tuple[JobRecord, list[Message]]:
    """A step of the job ended without output (dead-lettered, unknown): a running ``for_each`` step
    sends its next item or decides its join, which may release dependents (with the run its fan-out
    kept), and a met join whose replayed item failed again is revised; the job's state is derived.
    The trace events (a join's decision) are appended to ``events``."""
    from . import compensate

    now = time.time() if now is None else now
    events = [] if events is None else events
    if record.unwind is not None:
        return compensate.proceed(spec, _close_fan_outs(spec, record, events, now), routes, events, now)
    fanned = [s for s in record.steps.values() if s.need is not None and s.state is State.RUNNING]
    if not fanned:
        for step in spec.steps:
            rec = record.steps.get(step.id)
            if rec is not None and rec.need is not None and rec.state is State.SUCCEEDED:
                record = _revise_join(step, record, events, now)
        return compensate.after(spec, settle(record, now, spec), routes, events, now, [])
    kept = fanned[0].input
    run = Run(trace_id=record.trace_id, deadline=float(kept.get("deadline") or now),
              token_budget=kept.get("token_budget"))
    return advance(spec, record, run, routes, events, now=now)


def _fan_out(step: StepSpec, record: JobRecord, seen: Mapping[str, Any], run: Run, events: list[dict[str, Any]],
             now: float, routes: Routes) -> tuple[JobRecord, tuple[StepRecord, str, dict[str, Any]] | None]:
    """Record one item per element of the ``for_each`` list (``<step>[<i>]``, queued, unsent) and the
    step running with its join's need. Each item's ``when`` and ``gate`` are checked with ``item`` in
    scope: a false ``when``, or a false gate under ``continue``, skips the item; a false gate under
    ``halt_pipeline`` is returned as (item, why, values read), for the caller to halt the job. The
    need is ``min_success`` as a count (at most the items not skipped), or that fraction of the items
    not skipped, rounded up; without a join, every item not skipped. The step is dead-lettered with
    no item recorded when its list cannot be had (an error, not an empty list) or is longer than
    MESH_MAX_FAN_OUT, when an item's expressions, key or message cannot be made within the limits, or
    when the items would grow the job record past MESH_MAX_JOB_BYTES."""
    assert step.for_each is not None
    rec = record.steps[step.id]

    def refused(why: str, failure_class: str = "invalid_output") -> tuple[JobRecord, None]:
        return record.with_step(transition(rec, State.DEAD_LETTERED, now=now, error=why,
                                           failure_class=failure_class)), None

    try:
        found = step.for_each.evaluate(seen)
    except ExpressionError as exc:
        return refused(f"{exc.message}; no item was sent", _failure(exc))
    if not isinstance(found, list | tuple):
        return refused(f"for_each {step.for_each.source!r} gave {type(found).__name__}, not a list; no item was sent")
    found = list(found)
    limit = routes.max_fan_out
    if limit is not None and len(found) > limit:
        return refused(f"for_each {step.for_each.source} lists {len(found)} items, over MESH_MAX_FAN_OUT ({limit}); "
                       "no item was sent")
    halt: tuple[StepRecord, str, dict[str, Any]] | None = None
    made: list[StepRecord] = []
    grown = 0
    for i, element in enumerate(found):
        item = _plain(element)
        scope = {**seen, "item": item}
        try:
            it, stop = _item(step, i, item, scope, record, made, run, routes, events, now)
        except (ExpressionError, LimitExceeded) as exc:  # nothing recorded or sent: the step says why
            failure = _failure(exc) if isinstance(exc, ExpressionError) else "invalid_input"
            return refused(f"for_each item {i}: {exc.message}; no item was sent", failure)
        if stop is not None and halt is None:
            halt = (it, *stop)
        grown += len(dumps(it.input)) if it.input is not None else 0
        made.append(it)
    if routes.max_job_bytes is not None and grown and len(dumps(record)) + grown > routes.max_job_bytes:
        return refused(f"for_each {step.for_each.source}: its {len(found)} items' inputs ({grown} bytes) would grow "
                       f"the job record past MESH_MAX_JOB_BYTES ({routes.max_job_bytes}); no item was sent",
                       "invalid_input")
    for it in made:
        record = record.with_step(it)
    ran = sum(1 for s in items_of(record, step.id) if s.state is not State.SKIPPED)
    rule = step.join.min_success if step.join is not None else ran
    need = math.ceil(rule * ran - 1e-9) if isinstance(rule, float) else min(int(rule), ran)
    # The run is kept on the step: an item lost on the failure path sends the next ones with it.
    kept = {"items": len(found), "deadline": run.deadline, "token_budget": run.token_budget}
    return record.with_step(transition(rec, State.RUNNING, now=now, sent_at=now, need=need, input=kept)), halt


def _item(step: StepSpec, i: int, item: Any, scope: Mapping[str, Any], record: JobRecord, made: list[StepRecord],
          run: Run, routes: Routes, events: list[dict[str, Any]],
          now: float) -> tuple[StepRecord, tuple[str, dict[str, Any]] | None]:
    """Item ``i`` of a ``for_each`` step as recorded (queued with its input, or skipped by its
    conditions), and (why, values read) when its gate halts the job. ExpressionError or
    LimitExceeded when its id, key, conditions or message cannot be made within the limits."""
    sid = _item_id(step, i, scope, record, made)
    if step.idempotency_key is not None:
        # one key for every item would make them share one effect
        shared = not any(p[0] == "item" for p in step.idempotency_key.paths)
        key = _rerun_key(record, step, _key(step, scope, "", f"/{i}" if shared else ""))
    else:
        key = child_key(record.key, step.agent_name, sid if step.item_id is not None else f"{step.id}/{i}")
    it = StepRecord(step_id=sid, agent=step.agent_name, key=key, parent=step.id, index=i,
                    created_at=now, updated_at=now)
    it, stop = _conditions(step, it, scope, record, events, now)
    if it.state is State.QUEUED:
        try:
            payload = _build_input(step.input, scope) if step.input is not None else (
                dict(item) if isinstance(item, Mapping) else {"item": item})
        except ExpressionError as exc:
            raise type(exc)(f"item {sid}: {exc.message}") from None
        _message(step, record, run, routes, sid, key, payload)  # within the message limits, or LimitExceeded
        it = it.model_copy(update={"input": payload})
    return it, stop


def _failure(exc: ExpressionError) -> str:
    """The failure class of a step whose expression failed: past a limit, its own (invalid_input);
    else what it read did not fit (invalid_output, the upstream output's)."""
    return "invalid_input" if isinstance(exc, ExpressionLimit) else "invalid_output"


#: What a rendered item id may be: it names the item's record, key and trace lines.
_ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _item_id(step: StepSpec, i: int, scope: Mapping[str, Any], record: JobRecord, made: list[StepRecord]) -> str:
    """Item ``i``'s id: ``item_id`` rendered, else ``<step>[<i>]``; ExpressionError when a rendered
    id is not a plain name, or names a step the job already has (another item's, or a step's)."""
    if step.item_id is None:
        return f"{step.id}[{i}]"
    sid = step.item_id.render(scope)
    if not _ITEM_ID.match(sid):
        raise ExpressionError(f"item_id {step.item_id.source!r} gave {sid!r}, which is not a plain id "
                              f"({_ITEM_ID.pattern})")
    if sid in record.steps or any(m.step_id == sid for m in made):
        raise ExpressionError(f"item_id {step.item_id.source!r} gave {sid!r}, which another step of the job "
                              "already has")
    return sid


def _build_input(fields: Mapping[str, Any], scope: Mapping[str, Any]) -> dict[str, Any]:
    """A step's ``input:`` evaluated: each field's expression over ``scope``, shorter fields first, a
    dotted field set inside the map the shorter ones gave, a null leaving the field out."""
    out: dict[str, Any] = {}
    for name in sorted(fields, key=lambda n: n.count(".")):
        expr = fields[name]
        value = _plain(expr.evaluate(scope))
        if value is None:
            continue
        *inside, last = name.split(".")
        at: Any = out
        for part in inside:
            nxt = at.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ExpressionError(f"input field {name!r}: {part!r} is {type(nxt).__name__}, not a map")
            at = nxt
        at[last] = value
    return out


def _conditions(step: StepSpec, it: StepRecord, scope: Mapping[str, Any], record: JobRecord,
                events: list[dict[str, Any]], now: float) -> tuple[StepRecord, tuple[str, dict[str, Any]] | None]:
    """The step's (or one ``for_each`` item's, with ``item`` in ``scope``) ``when`` and ``gate``: the
    record as it stands after them (queued, or skipped), and (why, values read) when its gate is
    false under ``halt_pipeline``; :class:`ConditionError` when one cannot be evaluated."""
    if step.when is not None:
        ok, why = _check(step.when, scope, "when")
        if not ok:
            events.append(_event("skipped", record, it, reason=why))
            return transition(it, State.SKIPPED, now=now, error=why), None
    if step.gate is not None:
        ok, why = _check(step.gate, scope, "gate")
        read = _read(step.gate, scope)
        it = it.model_copy(update={"gate": GateCheck(expr=step.gate.source, values=read, passed=ok)})
        if not ok:
            if step.on_false is FailureMode.HALT_PIPELINE:
                return it, (why, read)
            events.append(_event("skipped", record, it, reason=why, gate=step.gate.source, values=read))
            return transition(it, State.SKIPPED, now=now, error=why), None
    return it, None


def _halt_items(before: JobRecord, record: JobRecord, step: StepSpec, it: StepRecord, why: str,
                read: dict[str, Any], now: float, events: list[dict[str, Any]]) -> JobRecord:
    """An item's gate halted the job at fan-out: the job as it was before this pass, with the step's
    items recorded (none sent), the step halted and the item halted with the gate's values."""
    for s in items_of(record, step.id):
        if s.step_id != it.step_id:
            before = before.with_step(s)
    parent = transition(before.steps[step.id], State.HALTED, now=now, error=f"{it.step_id}: {why}",
                        failure_class="gate")
    return _halt(before.with_step(parent), it, why, read, now, events)


def _pump(spec: PipelineSpec, step: StepSpec, record: JobRecord, run: Run, routes: Routes,
          messages: list[Message], events: list[dict[str, Any]], now: float) -> JobRecord:
    """Send the ``for_each`` step's next items, at most ``max_parallel`` in flight; once every item has
    ended, decide its join: enough succeeded → the step succeeded (output: the successful items'
    outputs in order, the failed ones listed); else ``continue`` skips it and ``halt_pipeline``
    dead-letters it (its failed items are in the DLQ: replaying them re-decides the join)."""
    items = items_of(record, step.id)
    busy = sum(1 for s in items if s.sent_at is not None and s.state not in (State.SUCCEEDED, *LOST))
    room = (step.max_parallel or len(items)) - busy
    for it in items:
        if room <= 0:
            break
        if it.state is State.QUEUED and it.sent_at is None:
            messages.append(_message(step, record, run, routes, it.step_id, it.key, it.input))
            record = record.with_step(it.model_copy(update={"sent_at": now, "updated_at": now}))
            room -= 1
    items = items_of(record, step.id)
    if not all(_ended(s) for s in items):
        return record
    return _decide_join(step, record, items, events, now)


#: How many failed items a join's error names (the event and the step's result list them all).
_NAMED = 10


def _ended(item: StepRecord) -> bool:
    return item.state in (State.SUCCEEDED, State.SKIPPED) or item.state in LOST


def _tally(step: StepSpec, need: int, items: list[StepRecord]) -> dict[str, Any]:
    """A join's decision as its trace event carries it: the rule, the need, how many items
    succeeded, which failed (in item order) and which were skipped."""
    rule = f"min_success {step.join.min_success}" if step.join is not None else "every item"
    return {"rule": rule, "need": need, "succeeded": sum(s.state is State.SUCCEEDED for s in items),
            "failed": [s.step_id for s in items if s.state in LOST],
            "skipped": [s.step_id for s in items if s.state is State.SKIPPED]}


def _join_result(items: list[StepRecord]) -> dict[str, Any]:
    """A met join's output: the successful items' outputs in order, the failed ones by id with their
    error, the skipped ones listed."""
    result: dict[str, Any] = {"items": [s.result for s in items if s.state is State.SUCCEEDED],
                              "failed": {s.step_id: s.error or str(s.state) for s in items if s.state in LOST}}
    skipped = [s.step_id for s in items if s.state is State.SKIPPED]
    if skipped:  # items a false when (or a continue gate) skipped: neither successes nor failures
        result["skipped"] = skipped
    return result


def _decide_join(step: StepSpec, record: JobRecord, items: list[StepRecord], events: list[dict[str, Any]],
                 now: float) -> JobRecord:
    """Every item ended: the join is met (the step succeeded, ``joined``) or not (``join_failed``: the
    step skipped under ``continue``, else dead-lettered), and the event says why (:func:`_tally`)."""
    rec = record.steps[step.id]
    tally = _tally(step, rec.need or 0, items)
    if tally["succeeded"] >= tally["need"]:
        record = record.with_step(transition(rec, State.SUCCEEDED, now=now, result=_join_result(items)))
        events.append(_event("joined", record, rec, met=True, outcome="succeeded", **tally))
        return record
    ran, failed = len(items) - len(tally["skipped"]), tally["failed"]
    named = ", ".join(failed[:_NAMED]) + (f" and {len(failed) - _NAMED} more" if len(failed) > _NAMED else "")
    why = (f"join not met ({tally['rule']}): {tally['succeeded']} of {ran} items succeeded, {tally['need']} "
           f"needed; failed: {named}")
    target = State.SKIPPED if step.on_false is FailureMode.CONTINUE else State.DEAD_LETTERED
    record = record.with_step(transition(rec, target, now=now, error=why, failure_class="join"))
    events.append(_event("join_failed", record, rec, met=False, outcome=str(target), reason=why, **tally))
    return record


def _close_fan_outs(spec: PipelineSpec, record: JobRecord, events: list[dict[str, Any]], now: float) -> JobRecord:
    """A halted job's ``for_each`` steps still running end once their items in flight have: the join
    decided when every item had been sent, else ``not_run`` (the halt left items unsent), so no step
    of a halted job stays ``running`` with nothing left to decide it."""
    for step in spec.steps:
        rec = record.steps.get(step.id)
        if rec is None or rec.need is None or rec.state is not State.RUNNING:
            continue
        items = items_of(record, step.id)
        cut = [s for s in items if s.state is State.NOT_RUN]
        if not all(_ended(s) or s.state is State.NOT_RUN for s in items):
            continue
        if not cut:
            record = _decide_join(step, record, items, events, now)
            continue
        why = f"{cut[0].error}: {len(items) - len(cut)} of {len(items)} items were sent"
        record = record.with_step(transition(rec, State.NOT_RUN, now=now, error=why))
    return record


def _revise_join(step: StepSpec, record: JobRecord, events: list[dict[str, Any]], now: float) -> JobRecord:
    """A met join whose items changed since it was decided (a failed item replayed, and it succeeded
    or failed anew): its output recomputed from the items as they are now, and a ``joined`` event
    with ``revised``. Steps that already ran on the earlier output are not run again."""
    rec = record.steps[step.id]
    items = items_of(record, step.id)
    if not all(_ended(s) for s in items):
        return record  # a replayed item still running: revised once it ends
    result = _join_result(items)
    if result == rec.result:
        return record
    record = record.with_step(rec.model_copy(update={"result": result, "updated_at": now}))
    events.append(_event("joined", record, rec, met=True, outcome="succeeded", revised=True,
                         **_tally(step, rec.need or 0, items)))
    return record


def _message(step: StepSpec, record: JobRecord, run: Run, routes: Routes, step_id: str, key: str,
             payload: dict[str, Any]) -> Message:
    env = Envelope(key=key, job_id=record.job_id, step_id=step_id, agent=step.agent_name, trace_id=run.trace_id,
                   deadline=run.deadline, contract_version=routes.version(step.agent_name),
                   token_budget=run.token_budget, payload=payload,
                   max_retries=step.retry_policy.max_attempts - 1 if step.retry_policy else None,
                   backoff=step.retry_policy.backoff.value if step.retry_policy else None, model=step.model or None,
                   idempotent=step.idempotent, priority=step.priority or record.priority,
                   flow_key=routes.flow_key(step.agent_name, payload),
                   shared_key=step.idempotency_key is not None and routes.shared_keys)
    # hops stay empty: the DAG is acyclic by validation and the record sequences it; two steps
    # may share an agent, which a hop-based cycle check would refuse.
    options = {"time_limit": step.timeout_ms} if step.timeout_ms is not None else {}
    message = build_message(env, **options)
    queue = routes.queue(step.agent_name)
    if queue != message.queue_name:
        message = message.copy(queue_name=queue)
    if routes.max_message_bytes is not None:  # what a worker would dead-letter unrun, with no job id
        encode_checked(message, routes.max_message_bytes, routes.max_json_depth or 200)
    return message


def _plain(value: Any) -> Any:
    """A CEL value as plain JSON data (maps and lists of the package's types)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def settle(record: JobRecord, now: float, spec: PipelineSpec | None = None) -> JobRecord:
    """The job's state as a function of its steps (:func:`mesh.contracts.settle`): halted if one
    halted; dead-lettered while any blocking step is (an item of a ``for_each`` step whose join can
    still be met is not blocking); succeeded when every step succeeded or was skipped; running
    otherwise (queued until picked up). The result: the outputs of the spec's ``result`` steps (a
    ``for_each`` step's by item id), else each succeeded step's output, items left out."""
    result = job_result(record, spec)
    record = settle_job(record, now, result)
    if record.state is State.SUCCEEDED and record.result != result:
        # Ended already, and a step's output changed since (a join revised after a replayed item):
        # the job's result says what its steps say now.
        record = record.model_copy(update={"result": result, "updated_at": now})
    return record


def job_result(record: JobRecord, spec: PipelineSpec | None) -> dict[str, Any]:
    """What a succeeded job's result is (see :func:`settle`)."""
    if spec is None or spec.result is None:
        succeeded = State.SUCCEEDED  # read once, not per step (contracts/jobs.py's _SETTLED says why)
        return {sid: s.result for sid, s in record.steps.items()
                if s.state is succeeded and s.parent is None and s.compensates is None}
    out: dict[str, Any] = {}
    for sid in spec.result:
        rec = record.steps.get(sid)
        if rec is None or rec.state is not State.SUCCEEDED:
            continue
        if graph(spec).steps[sid].for_each is not None:
            out.update({it.step_id: it.result for it in items_of(record, sid) if it.state is State.SUCCEEDED})
        else:
            out[sid] = rec.result
    return out


def _halt(record: JobRecord, rec: StepRecord, why: str, read: dict[str, Any], now: float,
          events: list[dict[str, Any]], failure_class: str = "gate") -> JobRecord:
    record = record.with_step(transition(rec, State.HALTED, now=now, error=why, failure_class=failure_class))
    record, unsent = _not_run(record, rec.step_id, now)
    if record.state is not State.HALTED:
        if State.HALTED not in moves(record.state):  # ended by another branch (dead-lettered) meanwhile
            record = transition(record, State.QUEUED, now=now)
        record = transition(record, State.HALTED, now=now, error=f"step {rec.step_id}: {why}",
                            failure_class=failure_class)
    events.append(_event("halted", record, rec, reason=why, values=read, not_run=unsent))
    return record


def _not_run(record: JobRecord, halted: str, now: float) -> tuple[JobRecord, list[str]]:
    """Every step (and ``for_each`` item) still queued and unsent when the job halts at ``halted``
    moved to ``not_run``, saying why: nothing will ever send it, so ``queued`` would be a lie."""
    why = f"not sent: the job halted at step {halted}"
    unsent = [s for s in record.steps.values()
              if (s.state is State.QUEUED and s.sent_at is None) or s.state is State.WAITING]
    for s in unsent:
        record = record.with_step(transition(s, State.NOT_RUN, now=now, error=why))
    return record, [s.step_id for s in unsent]


class ConditionError(ExpressionError):
    """A ``when`` or ``gate`` that could not be evaluated (a field missing, a wrong type, no boolean):
    not a false condition but an error of its step, which is dead-lettered ``invalid_output`` with
    the condition (``expression``) and the values it read (``values``), never halted or skipped."""

    def __init__(self, message: str, *, expression: str, values: dict[str, Any]) -> None:
        super().__init__(message)
        self.expression = expression
        self.values = values


def _check(cond: Condition, seen: Mapping[str, Any], what: str) -> tuple[bool, str]:
    """(holds, why not); :class:`ConditionError` when the condition cannot be evaluated: a type bug
    (``urgency >= "high"`` over a number) must not look like a business outcome."""
    read = _read(cond, seen)
    shown = ", ".join(f"{k} = {v!r}" for k, v in read.items())
    try:
        if cond.test(seen):
            return True, ""
    except ExpressionLimit:
        raise  # past a limit: the step is dead-lettered invalid_input (advance, _fan_out)
    except ExpressionError as exc:
        why = exc.message.removeprefix(f"{cond.kind} {cond.source!r}").lstrip(": ")
        raise ConditionError(f"{what} {cond.source!r} could not be evaluated{f' ({shown})' if shown else ''}: "
                             f"{why}", expression=cond.source, values=read) from None
    return False, f"{what} {cond.source!r} was false ({shown})" if shown else f"{what} {cond.source!r} was false"


def _read(cond: Condition, seen: Mapping[str, Any]) -> dict[str, Any]:
    """The values the condition read, by path (``{"coder.confidence": 0.6}``); a missing one is None."""
    out: dict[str, Any] = {}
    for path in cond.paths:
        value: Any = seen
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        out[".".join(path)] = value
    return out


def _input(spec: PipelineSpec, step: StepSpec, record: JobRecord) -> dict[str, Any]:
    """``input:`` evaluated over the job and the upstream outputs; else ``state_input``'s output; else
    one dependency's output, several keyed by id; none: the run's input. Skipped dependencies give
    nothing; if all were skipped, the step gets the run's input."""
    if step.input is not None:
        return _build_input(step.input, values(record))
    if step.state_input:
        dag = graph(spec)
        for source in sorted(dag.upstream()[step.id]):
            if source == step.state_input or dag.steps[source].output_schema == step.state_input:
                return dict(record.steps[source].result or {})
    outputs = {d: record.steps[d].result or {} for d in step.depends_on if record.steps[d].state is State.SUCCEEDED}
    if not outputs:
        return dict(record.pipeline_input or {})
    if len(step.depends_on) == 1:
        return dict(next(iter(outputs.values())))
    return outputs


#: Longest message key (the envelope's own limit).
MAX_KEY_CHARS = 512


def _key(step: StepSpec, scope: Mapping[str, Any], default: str, suffix: str = "") -> str:
    """The step's (or an item's) message key: ``idempotency_key`` rendered over ``scope`` (plus
    ``suffix``), else ``default``; ExpressionError when it cannot be rendered or is no valid key."""
    if step.idempotency_key is None:
        return default
    key = step.idempotency_key.render(scope) + suffix
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise ExpressionError(f"idempotency_key {step.idempotency_key.source!r} gave a key of {len(key)} "
                              f"characters; a key has 1 to {MAX_KEY_CHARS}")
    return key


def _rerun_key(record: JobRecord, step: StepSpec, key: str) -> str:
    """A rerun's (``mesh rerun``) key for a step whose ``idempotency_key`` rendered ``key``: the run is a
    new effect by intent, so it must not share the old run's key (a default key derives from the new
    job's key already)."""
    if record.rerun_of is None or step.idempotency_key is None:
        return key
    suffix = f"/rerun/{record.job_id.removeprefix('job-')[:16]}"
    return key[:MAX_KEY_CHARS - len(suffix)] + suffix


def _refuse(record: JobRecord, rec: StepRecord, why: str, failure_class: str, events: list[dict[str, Any]],
            now: float, **detail: Any) -> JobRecord:
    """The step dead-lettered before anything was sent for it (its expressions, key or input went past
    a limit or could not be had): its job ends dead-lettered, with the reason on the step and in an
    ``input_refused`` event (with ``detail``: a condition's ``expression`` and the ``values`` it read)."""
    record = record.with_step(transition(rec, State.DEAD_LETTERED, now=now, error=why, failure_class=failure_class))
    events.append(_event("input_refused", record, record.steps[rec.step_id], reason=why, **detail))
    return record


def _default_key(record: JobRecord, step: StepSpec) -> str:
    return child_key(record.key, step.agent_name, step.id)


def _event(kind: str, record: JobRecord, rec: StepRecord, **fields: Any) -> dict[str, Any]:
    env = {"job_id": record.job_id, "step_id": rec.step_id, "agent": rec.agent, "key": rec.key,
           "trace_id": record.trace_id}
    return trace.event(kind, env, pipeline=record.pipeline, **fields)
