"""How a job moves when one of its steps starts or succeeds.

Every function here is a pure change to a job record that also returns the messages it implies;
the job store writes both in one transaction (the outbox), so no step is recorded as done
without its downstream messages, and no message is sent for a step not recorded. A declared
pipeline's job (the built-in planner → researchers → executor flow is one: ``builtin.yaml``) moves
by its DAG (:mod:`.engine`); a job of one directly sent step just ends.
"""

from __future__ import annotations

import time
from typing import Any

from dramatiq.message import Message
from pydantic import BaseModel

from mesh.broker.jobs import Change
from mesh.contracts import (
    TERMINAL,
    Envelope,
    JobRecord,
    State,
    StepRecord,
    add_tokens,
    settle,
    transition,
)
from mesh.contracts.errors import PermanentFailure
from mesh.contracts.jobs import newer_state

from .engine import Routes, Run, advance
from .spec import PipelineSpec


def cancelled(record: JobRecord, step: StepRecord) -> bool:
    """Whether ``step`` belongs to a cancelled job and is not one of its compensations (which run)."""
    return record.unwind is not None and record.unwind.cause == "cancelled" and step.compensates is None


def start(env: Envelope, token: int) -> Change:
    """An attempt holding the key's claim (fencing ``token``) picked the step up; the job is running."""

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        now = time.time()
        step = record.steps.get(env.step_id) or StepRecord(
            step_id=env.step_id, agent=env.agent, key=env.key, input=env.payload
        )
        if step.state in TERMINAL or (step.state is State.RUNNING and step.token == token):
            return record, []  # finished, or this attempt's pick-up already written (a re-sent update)
        if newer := newer_state(record, step):
            # A newer release moved it (archived, say): that release owns it, and this
            # one runs nothing of it; the message is dead-lettered, kept for that release.
            what, state = newer
            raise PermanentFailure(f"the {what} is {state.value!r}, a state of a newer release of the mesh: "
                                   "not run by this release", job_id=record.job_id)
        if cancelled(record, step) and not (env.replay_of and step.state is State.QUEUED):
            # A retry (or a message sent before the cancel) picked up after it: never run. A step
            # queued by a replay after the cancel is one whose unknown effect was decided applied
            # (mesh verify, mesh settle; dlq.replay refuses any other): it runs, answered from its
            # ledger, and its output is what its compensation undoes.
            step = transition(step, State.CANCELLED, now=now, error="not run: the job was cancelled",
                              failure_class="cancelled")
            return settle(record.with_step(step), now), []
        step = transition(step, State.RUNNING, now=now, attempt=env.attempt, picked_up=step.picked_up + 1,
                          token=token)
        record = settle(record.with_step(step), now)  # a replay while another step is dead stays dead
        if record.state in (State.QUEUED, State.FAILED):
            record = transition(record, State.RUNNING, now=now)
        return record, []

    return change


def complete(env: Envelope, output: BaseModel, tokens: tuple[int, int] = (0, 0), *,
             spec: PipelineSpec | None = None, routes: Routes | None = None,
             events: list[dict[str, Any]] | None = None,
             undo_calls: list[dict[str, Any]] | None = None) -> Change:
    """The step succeeded with ``output``, spending ``tokens`` (in, out) in this attempt; work out what
    it sets in motion. A declared pipeline's job (``spec``: the spec it started with) moves by its DAG
    (:func:`mesh.agents.pipelines.engine.advance`), whose trace events are appended to ``events``;
    a job of one directly sent step ends with its output as the result. ``undo_calls``: what undoes
    the calls the attempt made of tools declared with ``compensate=``, kept on the step."""
    events = [] if events is None else events
    given = len(events)

    def change(record: JobRecord) -> tuple[JobRecord, list[Message]]:
        del events[given:]  # a transaction retried after a conflict starts over
        now = time.time()
        step = record.steps[env.step_id]
        if step.state is State.SUCCEEDED or (step.state is State.CANCELLED and step.result is not None):
            return record, []  # this change's own end (cancelled with its output): applied again, it is done
        step = add_tokens(step, *tokens)
        if undo_calls:
            step = step.model_copy(update={"undo_calls": undo_calls})
        if cancelled(record, step):
            # Its job was cancelled while it ran: it is not a success and nothing reads its output, but
            # its effect happened, so the output is kept for its compensation (compensate.effect).
            done = transition(step, State.CANCELLED, now=now, error="ended after the job was cancelled: its "
                              "output is not used", failure_class="cancelled")
            for ev in events[:given]:  # the attempt's own "succeeded" event says what it is
                if ev.get("event") == "succeeded" and ev.get("step_id") == env.step_id:
                    ev["event"] = "cancelled"
            record = add_tokens(record, *tokens).with_step(done.model_copy(
                update={"result": output.model_dump(mode="json", by_alias=True)}))
        else:
            record = add_tokens(record, *tokens).with_step(
                transition(step, State.SUCCEEDED, now=now, result=output.model_dump(mode="json", by_alias=True))
            )
        if spec is not None and record.pipeline_digest is not None:
            run = Run(trace_id=env.trace_id, deadline=env.deadline, token_budget=env.token_budget)
            return advance(spec, record, run, routes or Routes(), events, now=now)
        return settle(record, now), []  # a directly sent step: its job's result is its output

    return change
