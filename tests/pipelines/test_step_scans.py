"""The scans a pipeline step's write makes over its job record's steps (the job's state, the waits its
write stages, what expressions read, the job's result, the engine's look for steps to send) compare
each step with ``State`` members read once per scan, not once per step: on Python 3.11 every
``State.X`` goes through ``EnumType.__getattr__``'s slot, and a 40-step pipeline's step read them a
few hundred times (docs/performance.md, "A sequential step measured again")."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mesh.agents.pipelines import Pipeline, engine
from mesh.agents.pipelines.engine import Routes, Run
from mesh.broker import waits
from mesh.broker.keys import Keys
from mesh.contracts import JobRecord, State, StepRecord, job_state, transition

STEPS = 40


@contextmanager
def state_reads() -> Iterator[list[str]]:
    """The names of ``State``'s members read as class attributes (``State.X``) while the block runs."""
    reads: list[str] = []
    plain = type.__getattribute__
    members = plain(State, "_member_map_")

    def counted(cls: Any, name: str) -> Any:
        if cls is State and name in members:
            reads.append(name)
        return plain(cls, name)

    enum.EnumType.__getattribute__ = counted  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        del enum.EnumType.__getattribute__


def chain_record(done: int) -> JobRecord:
    """A linear pipeline's record: its first ``done`` steps succeeded, the next one running, the rest queued."""
    record = JobRecord(job_id="job-scans", key="scans", trace_id="ab" * 16, created_at=1.0, updated_at=1.0,
                       pipeline="chain", pipeline_digest="d" * 64)
    for n in range(1, STEPS + 1):
        step = StepRecord(step_id=f"s{n}", agent="echo", key=f"k/s{n}", input={"text": "x"})
        if n <= done:
            step = transition(transition(step, State.RUNNING, now=2.0, token=n), State.SUCCEEDED, now=3.0,
                              result={"text": "x"})
        elif n == done + 1:
            step = transition(step, State.RUNNING, now=2.0, token=n)
        record = record.with_step(step)
    return transition(record, State.RUNNING, now=2.0)


class _Pipe:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_a_records_scans_read_states_members_once_per_scan_not_once_per_step():
    record = chain_record(STEPS // 2)
    with state_reads() as reads:
        assert job_state(record) is State.RUNNING
        waits.stage_waits(_Pipe(), Keys("scans"), record, record)
        assert engine.values(record)["s1"] == {"text": "x"}
        assert engine.job_result(record, None)["s1"] == {"text": "x"}
    # A handful each, whatever the number of steps: on the code before, job_state alone read 80.
    assert len(reads) < 20, sorted(set(reads))


def test_an_ended_jobs_last_write_reads_states_members_once_per_scan():
    """The write that ends a job asks whether a step still waits (``waits.parked``): on the code before, two
    members read per step (80 for this record)."""
    record = transition(chain_record(STEPS), State.SUCCEEDED, now=4.0)  # every step succeeded
    with state_reads() as reads:
        assert not waits.parked(record)
        waits.stage_waits(_Pipe(), Keys("scans"), record, record, ended_ttl_ms=60_000)
    assert len(reads) < 20, sorted(set(reads))


def test_the_engines_look_for_steps_to_send_reads_states_members_once_per_scan():
    chain = Pipeline("chain").step("s1", agent="echo")
    for n in range(2, STEPS + 1):
        chain.step(f"s{n}", agent="echo", depends_on=[f"s{n - 1}"])
    spec = chain.build()
    done = STEPS // 2
    record = chain_record(done)
    step = record.steps[f"s{done + 1}"]
    record = record.with_step(transition(step, State.SUCCEEDED, now=4.0, result={"text": "x"}))
    with state_reads() as reads:
        moved, messages = engine.advance(spec, record, Run(trace_id="ab" * 16, deadline=9e9), Routes(), [], now=5.0)
    assert [m.args[0]["step_id"] for m in messages] == [f"s{done + 2}"]
    assert moved.steps[f"s{done + 2}"].sent_at == 5.0
    assert len(reads) < 40, sorted(set(reads))
