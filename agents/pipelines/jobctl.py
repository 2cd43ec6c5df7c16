"""Job control: cancel a job (``mesh cancel``, ``MeshClient.cancel``) and rerun a declared pipeline's
job from a step (``mesh rerun``, ``MeshClient.rerun``).

Registered with the broker's client when ``mesh`` is imported (as what loads the built-in pipeline is),
so the broker imports nothing of the engine. Both write in one transaction: the cancel changes the job
record (and sends the first compensation) atomically; the rerun creates the new job, sends its ready
steps and links the old job to it, together.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import redis

from mesh.broker import trace
from mesh.broker.client import JobRef, MeshClient, job_id_for, on_job_control, payload_hash, trace_id_of
from mesh.broker.connection import transaction
from mesh.broker.jobs import JobNotFound, stage_record
from mesh.broker.outbox import stage_all
from mesh.contracts import ConfigError, JobRecord, MeshError, State, StepRecord, items_of
from mesh.contracts.jobs import compensations

from . import compensate
from .engine import Routes, Run, advance, load_spec
from .spec import PipelineSpec
from .validate import upstream


def _routes(client: MeshClient) -> Routes:
    """How the client routes a message to an agent it may not declare itself (a compensation's): by
    the app or the published schemas, else the agent's own queue, unchecked."""

    def queue(agent: str) -> str:
        try:
            return client.target(agent).queue
        except MeshError:
            return agent

    def version(agent: str) -> int | None:
        try:
            return client.target(agent).version
        except MeshError:
            return None

    return Routes.from_settings(client.settings, queue=queue, version=version)


def _spec(client: MeshClient, record: JobRecord) -> PipelineSpec | None:
    if not (record.pipeline and record.pipeline_digest):
        return None
    return load_spec(client.pipelines, record.pipeline, record.pipeline_digest)


def cancel(client: MeshClient, job_id: str, reason: str | None = None) -> tuple[JobRecord, bool]:
    """Cancel job ``job_id`` (see :func:`compensate.cancel`); (its record, whether this call cancelled
    it). A job already cancelled, undoing its effects or succeeded is left as it is."""
    record = client.status(job_id)
    spec, routes = _spec(client, record), _routes(client)
    events: list[dict[str, Any]] = []
    changed = False

    def change(before: JobRecord) -> tuple[JobRecord, list[Any]]:
        nonlocal changed
        del events[:]
        after, messages = compensate.cancel(spec, before, reason or "", routes, events, time.time())
        changed = after is not before
        return after, messages

    def flag(pipe: Any, _record: JobRecord) -> None:
        # What the lease renewal reads: running steps see ctx.cancelled.
        pipe.set(client.keys_of(job_id).cancel(job_id), reason or "cancelled",
                 ex=max(1, int(client.settings.job_retention_s)))

    record = client.jobs_of(job_id).update(job_id, change, events=events, also=flag)
    return record, changed


def downstream(spec: PipelineSpec, step_id: str) -> set[str]:
    """``step_id`` and every step that depends on it, directly or not."""
    up = upstream(spec)
    return {step_id} | {sid for sid, deps in up.items() if step_id in deps}


def rerun(client: MeshClient, job_id: str, from_step: str, *, key: str | None = None) -> JobRef:
    """A new run of job ``job_id``'s pipeline (the same spec digest and input) that reuses the outputs
    of every step not downstream of ``from_step`` that succeeded (every step upstream of it must have),
    and runs ``from_step`` and everything downstream again under new keys: a new effect by intent. The
    new job's ``rerun_of`` names the old one, whose ``reruns`` lists the new one."""
    old = client.status(job_id)
    spec = _spec(client, old)
    if spec is None:
        raise ConfigError(f"job {job_id} is not a declared pipeline's run: only those are rerun from a step")
    ids = [s.id for s in spec.steps]
    if from_step not in ids:
        raise ConfigError(f"pipeline {spec.name} has no step {from_step!r}; its steps: {', '.join(ids)}")
    again = downstream(spec, from_step)
    missing = sorted(s for s in upstream(spec)[from_step]
                     if old.steps.get(s) is None or old.steps[s].state not in (State.SUCCEEDED, State.SKIPPED))
    if missing:
        raise ConfigError(f"step(s) {', '.join(missing)} upstream of {from_step} did not succeed in job {job_id}: "
                          "their outputs cannot be reused; rerun from the first of them")
    # A step with a compensation that was not skipped is undone, or is being or will be (the job is
    # still compensating): its output describes an effect that does not stand.
    undoing = {s.id for s in spec.steps
               if any(c.compensates in (s.id, *(i.step_id for i in items_of(old, s.id)))
                      and c.state is not State.SKIPPED for c in compensations(old))}
    undone = sorted(undoing & upstream(spec)[from_step])
    if undone:
        raise ConfigError(f"step(s) {', '.join(undone)} upstream of {from_step} were compensated (or are being) in "
                          f"job {job_id}: their effects are undone, so their outputs are not reused; rerun from the "
                          "first of them")
    again |= undoing  # another step whose effect is undone runs again rather than being reused
    key = key or f"{old.key}/rerun/{len(old.reruns) + 1}"
    now = time.time()
    trace_id = trace_id_of(job_id_for(key))
    record = JobRecord(job_id=job_id_for(key), key=key, trace_id=trace_id, goal=old.goal, created_at=now,
                       updated_at=now, payload_hash=payload_hash(f"pipeline:{spec.name}", old.pipeline_input or {}),
                       pipeline=old.pipeline, pipeline_digest=old.pipeline_digest, pipeline_input=old.pipeline_input,
                       rerun_of=old.job_id, rerun_from=from_step, priority=old.priority)
    for step in spec.steps:
        kept = old.steps.get(step.id)
        if step.id not in again and kept is not None and kept.state in (State.SUCCEEDED, State.SKIPPED):
            for rec in (kept, *items_of(old, step.id)):
                record = record.with_step(rec)
        else:
            record = record.with_step(StepRecord(step_id=step.id, agent=step.agent_name,
                                                 key=f"{key}/{step.agent_name}/{step.id}", created_at=now,
                                                 updated_at=now))
    run = Run(trace_id=trace_id, deadline=client.clock.now_s() + client.settings.job_deadline_s,
              token_budget=client.settings.job_token_budget or None)
    events: list[dict[str, Any]] = [trace.event("rerun", {"job_id": record.job_id, "key": key, "trace_id": trace_id},
                                                rerun_of=old.job_id, rerun_from=from_step)]
    record, messages = advance(spec, record, run, _routes(client), events, now=now)
    ref: JobRef[JobRecord] = JobRef(id=record.job_id, key=key, trace_id=trace_id, client=client)
    keys = client.keys_of(old.job_id)
    if client.keys_of(record.job_id) != keys:  # the new job in another shard than the old one
        return _rerun_apart(client, old, record, messages, events, ref)
    while True:
        with transaction(client.redis, client.settings) as pipe:
            try:
                pipe.watch(keys.job(old.job_id), keys.job(record.job_id))
                data = pipe.get(keys.job(old.job_id))
                if data is None:
                    raise JobNotFound(old.job_id)
                if pipe.exists(keys.job(record.job_id)):
                    raise ConfigError(f"key {key} already names job {record.job_id}: give the rerun another key")
                before = JobRecord.model_validate_json(data)
                linked = before.model_copy(update={"reruns": [*before.reruns, record.job_id]})
                pipe.multi()
                _stage_new(pipe, client, record, messages, events)
                stage_record(pipe, keys, linked, was=before.state, retention_s=client.settings.job_retention_s,
                             keep_s=client.settings.dead_letter_job_retention_s, before=before)
                pipe.execute()
                return ref
            except redis.WatchError:
                continue


def _stage_new(pipe: Any, client: MeshClient, record: JobRecord, messages: list[Any],
               events: list[dict[str, Any]]) -> None:
    """Stage a rerun's new job in its shard: its record, its trace (each message's ``enqueued`` and
    ``events``) and its ready steps' messages."""
    keys = client.keys_of(record.job_id)
    client.jobs_of(record.job_id).stage_create(pipe, record)
    for message in messages:
        trace.stage(pipe, keys, trace.event("enqueued", message.args[0], queue=message.queue_name, by="client"))
    for ev in events:
        trace.stage(pipe, keys, ev)
    stage_all(pipe, keys, messages)


def _rerun_apart(client: MeshClient, old: JobRecord, record: JobRecord, messages: list[Any],
                 events: list[dict[str, Any]], ref: JobRef[JobRecord]) -> JobRef[JobRecord]:
    """:func:`rerun`'s writes when the new job's shard is not the old one's (MESH_SHARDS: a job's shard
    is a hash of its id), where no transaction holds both: the new job first (its record, its trace and
    its ready steps' messages, in one transaction of its shard), then the old job's ``reruns`` (in one of
    the old job's). A rerun that dies between the two leaves the new job running, naming the old one
    (``rerun_of``) that does not name it yet: the same rerun again (the same key; the default one is the
    same while the old job names no new rerun) finds that job and writes the link only. A key naming a
    job that is no such rerun, or one the old job lists already, is refused as on one shard."""
    keys = client.keys_of(record.job_id)
    while True:
        with transaction(client.redis, client.settings) as pipe:
            try:
                pipe.watch(keys.job(record.job_id))
                data = pipe.get(keys.job(record.job_id))
                if data is not None:
                    found = JobRecord.model_validate_json(data)
                    if (found.rerun_of, found.rerun_from) != (old.job_id, record.rerun_from) \
                            or record.job_id in old.reruns:
                        raise ConfigError(f"key {record.key} already names job {record.job_id}: give the rerun "
                                          "another key")
                    break  # this rerun's job, left unlinked by a rerun that stopped: linked below
                pipe.multi()
                _stage_new(pipe, client, record, messages, events)
                pipe.execute()
                break
            except redis.WatchError:
                continue

    def link(before: JobRecord) -> tuple[JobRecord, list[Any]]:
        if record.job_id in before.reruns:
            return before, []
        return before.model_copy(update={"reruns": [*before.reruns, record.job_id]}), []

    with contextlib.suppress(JobNotFound):  # the old job's record expired meanwhile: the new one runs, naming it
        client.jobs_of(old.job_id).update(old.job_id, link)
    return ref


on_job_control(cancel=cancel, rerun=rerun)
