"""How the pipeline moves: planner fans out to researchers, researchers fan in to the executor.

Every function here is a pure change to a job record that also returns the messages it implies;
the job store writes both in one transaction (the outbox), so no step is recorded as done
without its downstream messages, and no message is sent for a step not recorded.
"""

from __future__ import annotations

import time
from typing import Any

from dramatiq.message import Message
from pydantic import BaseModel

from mesh.agents.pipelines import PipelineSpec
from mesh.agents.pipelines.engine import Routes, Run, advance
from mesh.broker.jobs import Change
from mesh.broker.outbox import build_message
from mesh.contracts import (
    TERMINAL,
    Envelope,
    Findings,
    JobRecord,
    Plan,
    State,
    StepRecord,
    add_tokens,
    child_key,
    settle,
    transition,
)

#: The order agents come in; a job's result is the output of its last agent's steps.
ORDER = ("planner", "researcher", "executor")


def downstream(env: Envelope, agent: str, step_id: str, payload: dict[str, Any]) -> Envelope:
    """The envelope of the next hop: derived key, same job, trace, deadline and token budget, one more hop."""
    return Envelope(
        key=child_key(env.key, agent, step_id), job_id=env.job_id, step_id=step_id, agent=agent,
        trace_id=env.trace_id, deadline=env.deadline, hops=(*env.hops, env.agent), token_budget=env.token_budget,
        payload=payload,
    )


def start(env: Envelope, token: int) -> Change:
    """An attempt holding the key's claim (fencing ``token``) picked the step up; the job is running."""

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        now = time.time()
        step = record.steps.get(env.step_id) or StepRecord(
            step_id=env.step_id, agent=env.agent, key=env.key, input=env.payload
        )
        if step.state in TERMINAL or (step.state is State.RUNNING and step.token == token):
            return record, []  # finished, or this attempt's pick-up already written (a re-sent update)
        step = transition(step, State.RUNNING, now=now, attempt=env.attempt, picked_up=step.picked_up + 1,
                          token=token)
        record = settle(record.with_step(step), now)  # a replay while another step is dead stays dead
        if record.state in (State.QUEUED, State.FAILED):
            record = transition(record, State.RUNNING, now=now)
        return record, []

    return change


def complete(env: Envelope, output: BaseModel, tokens: tuple[int, int] = (0, 0), *,
             spec: PipelineSpec | None = None, routes: Routes | None = None,
             events: list[dict[str, Any]] | None = None) -> Change:
    """The step succeeded with ``output``, spending ``tokens`` (in, out) in this attempt; work out what
    it sets in motion. A declared pipeline's job (``spec``: the spec it started with) moves by its DAG
    (:func:`mesh.agents.pipelines.engine.advance`), whose trace events are appended to ``events``;
    any other job by the built-in flow."""
    events = [] if events is None else events
    given = len(events)

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        del events[given:]  # a transaction retried after a conflict starts over
        now = time.time()
        step = record.steps[env.step_id]
        if step.state is State.SUCCEEDED:
            return record, []
        step = add_tokens(step, *tokens)
        record = add_tokens(record, *tokens).with_step(
            transition(step, State.SUCCEEDED, now=now, result=output.model_dump(mode="json"))
        )
        messages: list[Message] = []
        if spec is not None and record.pipeline_digest is not None:
            run = Run(trace_id=env.trace_id, deadline=env.deadline, token_budget=env.token_budget)
            return advance(spec, record, run, routes or Routes(), events, now=now)
        if isinstance(output, Plan):
            record, messages = _fan_out(env, record, output, now)
            if not output.research:  # nothing to wait for: the actions go now
                record, actions = _fan_in(env, record, now)
                messages += actions
        elif isinstance(output, Findings):
            record, messages = _fan_in(env, record, now)
        return _finish_if_done(record, now), messages

    return change


def _fan_out(env: Envelope, record: JobRecord, plan: Plan, now: float) -> tuple[JobRecord, list[Message]]:
    messages = []
    for research in plan.research:
        payload: dict[str, Any] = {"question": research.question}
        nxt = downstream(env, "researcher", research.step_id, payload)
        record = record.with_step(StepRecord(step_id=research.step_id, agent="researcher", key=nxt.key,
                                             input=payload, sent_at=now, created_at=now, updated_at=now))
        messages.append(build_message(nxt))
    for action in plan.actions:
        action_input: dict[str, Any] = {"tool": action.tool, "args": action.args}
        record = record.with_step(StepRecord(step_id=action.step_id, agent="executor",
                                             key=child_key(env.key, "executor", action.step_id),
                                             input=action_input, created_at=now, updated_at=now))
    return record, messages


def _fan_in(env: Envelope, record: JobRecord, now: float) -> tuple[JobRecord, list[Message]]:
    research = [s for s in record.steps.values() if s.agent == "researcher"]
    planner = record.steps.get("plan")
    if planner is None or planner.result is None or any(s.state is not State.SUCCEEDED for s in research):
        return record, []
    plan = Plan.model_validate(planner.result)
    findings = [
        {"question": s.input.get("question"), "summary": (s.result or {}).get("summary"),
         "sources": [f["source"] for f in (s.result or {}).get("findings", [])]}
        for s in research
    ]
    messages = []
    for action in plan.actions:
        step = record.steps[action.step_id]
        if step.sent_at is not None:
            continue
        args = {**action.args, "findings": findings} if action.use_findings else dict(action.args)
        payload = {"tool": action.tool, "args": args}
        nxt = downstream(env, "executor", action.step_id, payload)
        nxt = nxt.model_copy(update={"key": step.key})
        record = record.with_step(step.model_copy(update={"input": payload, "sent_at": now, "updated_at": now}))
        messages.append(build_message(nxt))
    return record, messages


def _finish_if_done(record: JobRecord, now: float) -> JobRecord:
    """The job's state derived from its steps (:func:`mesh.contracts.settle`); when it succeeds, its
    result is its last built-in agent's outputs (a user agent's job: every step's output)."""
    builtin = [ORDER.index(s.agent) for s in record.steps.values() if s.agent in ORDER]
    if builtin:  # the built-in flow: the job's result is its last agent's output
        result = {sid: s.result for sid, s in record.steps.items() if s.agent == ORDER[max(builtin)]}
    else:  # a user agent's job: every step's output
        result = {sid: s.result for sid, s in record.steps.items()}
    return settle(record, now, result)
