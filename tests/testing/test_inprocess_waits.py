"""TestMesh and durable waits: ``wait`` returns a job ``waiting`` only once nothing of it is due, so
an event emitted before the run, or a sleep already over, is taken before it returns."""

from __future__ import annotations

import pytest

from mesh import Pipeline, State
from mesh.testing import TestMesh, TestModel
from tests.conftest import wait_for
from tests.testing.test_inprocess import DRAFTS, Posted, app, post

# each test starts an in-process worker, on the suite's Redis (MESH_REDIS_URL, as a user's test sets it)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("redis_env")]

app.pipeline(Pipeline("early").step("paid", wait_for={"event": "paid", "timeout": "2h"})
             .step("nap", depends_on=["paid"], sleep="1ms")
             .step("write", depends_on=["nap"], input={"topic": "paid.topic"}))


def test_wait_takes_an_event_emitted_before_the_run_and_a_sleep_already_over() -> None:
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: Posted(id="never")}) as mesh:
        mesh.client.emit("paid", {"topic": "otters"})
        record = mesh.wait(mesh.run("early", {}))
    assert record.state is State.SUCCEEDED, {s: r.state for s, r in record.steps.items()}
    assert record.steps["paid"].result == {"topic": "otters"} and record.steps["nap"].result == {"slept_s": 0.001}


def test_wait_does_not_return_a_record_read_before_a_timer_that_fired_since() -> None:
    """The order the timer loop may take under load: ``wait`` reads the job (its step waiting on a sleep),
    the timer fires (its handler writes the record, then the timer leaves its set), and only then does
    ``wait`` look at the timers, finding none due. The record it read is out of date: it goes on (the
    code before returned it, ``waiting``)."""
    with TestMesh(app, model=TestModel(DRAFTS), tools={post: Posted(id="never")}) as mesh:
        real, fired = mesh._due, []

        def after_the_timer_fired(job_id: str) -> bool:
            if not fired:  # the first look: held until the sleep's timer has fired and left the set
                keys = mesh.client.keys_of(job_id)
                wait_for(lambda: not any(m.decode().partition("|")[2].startswith(f"{job_id}|")
                                         for m in mesh.client.redis.zrange(keys.timers, 0, -1)))
                fired.append(job_id)
            return real(job_id)

        mesh._due = after_the_timer_fired  # type: ignore[method-assign]
        mesh.client.emit("paid", {"topic": "otters"})
        record = mesh.wait(mesh.run("early", {}))
    assert fired and record.state is State.SUCCEEDED, {s: r.state for s, r in record.steps.items()}
