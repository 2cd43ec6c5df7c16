"""A job record's write removes an approval's index entry and timers once: on the write that ends
the wait, not on every later write of a job that once waited."""

from __future__ import annotations

from typing import Any

import redis

from mesh.broker import approvals, timers
from mesh.broker.connection import staged as queued
from mesh.broker.jobs import JobStore
from mesh.broker.keys import Keys
from mesh.contracts import JobRecord, State, StepRecord
from mesh.contracts.approvals import Approval


def _waiting_job() -> JobRecord:
    approval = Approval(hash="h", asked_at=1_000.0, timeout_s=600, warn_before_s=60)
    gate = StepRecord(step_id="gate", agent="executor", key="k/gate", state=State.AWAITING_APPROVAL,
                      approval=approval)
    other = StepRecord(step_id="other", agent="executor", key="k/other")
    return JobRecord(job_id="job-staging", key="k", trace_id="0" * 32, state=State.RUNNING,
                     steps={"gate": gate, "other": other})


def _step(record: JobRecord, step_id: str, state: State) -> JobRecord:
    steps = {**record.steps, step_id: record.steps[step_id].model_copy(update={"state": state})}
    return record.model_copy(update={"steps": steps})


def _write(store: JobStore, job_id: str, change: Any) -> list[tuple[Any, ...]]:
    """Apply ``change`` through the store; the commands its MULTI staged."""
    staged: list[tuple[Any, ...]] = []
    store.update(job_id, lambda r: (change(r), []),
                 also=lambda pipe, _r: staged.extend(c[0] for c in queued(pipe)))
    return staged


def _touching(staged: list[tuple[Any, ...]], key: str) -> list[str]:
    return [str(c[0]) for c in staged if len(c) > 1 and c[1] == key]


def test_only_the_write_that_ends_a_wait_removes_its_index_entry_and_timers(rclient: redis.Redis, namespace: str):
    keys = Keys(namespace)
    store = JobStore(rclient, keys)
    record = _waiting_job()
    pipe = rclient.pipeline()
    store.stage_create(pipe, record)
    pipe.execute()
    ask = approvals.ask_ref(record.job_id, "gate", 1)
    assert rclient.zscore(keys.approvals, approvals.ref(record.job_id, "gate")) is not None
    assert timers.due_at(rclient, keys, approvals.EXPIRY, ask) is not None

    # The write that leaves awaiting_approval: the index entry and both timers go, in its MULTI.
    ended = _write(store, record.job_id, lambda r: _step(r, "gate", State.QUEUED))
    assert _touching(ended, keys.approvals) == ["ZREM"]
    assert _touching(ended, keys.timers) == ["ZREM", "ZREM"]
    assert rclient.zcard(keys.approvals) == 0 and rclient.zcard(keys.timers) == 0

    # Later writes of the same job (another step moves on, the job ends) stage none of it again.
    later = _write(store, record.job_id, lambda r: _step(r, "other", State.RUNNING))
    done = lambda r: _step(_step(r, "gate", State.SUCCEEDED), "other", State.SUCCEEDED)  # noqa: E731
    later += _write(store, record.job_id, lambda r: done(r).model_copy(update={"state": State.SUCCEEDED}))
    assert _touching(later, keys.approvals) == [] and _touching(later, keys.timers) == []
    assert not [c for c in later if str(c[0]) == "EVAL"]  # the job had its TTL from the write that ended it
    assert rclient.pttl(keys.job(record.job_id)) > 0  # retention runs: the job ended with nothing waiting

    # A job that ended while its step waited has no TTL; the write that ends the wait starts it.
    record = _waiting_job().model_copy(update={"job_id": "job-ended", "state": State.DEAD_LETTERED})
    pipe = rclient.pipeline()
    store.stage_create(pipe, record)
    pipe.execute()
    assert rclient.pttl(keys.job(record.job_id)) == -1  # a job waiting for a person keeps no TTL

    _write(store, record.job_id, lambda r: _step(r, "gate", State.CANCELLED))
    assert rclient.pttl(keys.job(record.job_id)) > 0
    assert rclient.zcard(keys.approvals) == 0 and rclient.zcard(keys.timers) == 0
