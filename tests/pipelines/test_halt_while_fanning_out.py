"""A job that halts while a ``for_each`` step is fanning out: the items not yet sent are
``not_run``, the item in flight runs to its end, and then the ``for_each`` step ends too. A step
left ``running`` in a halted job would be a state that lies: nothing will ever decide its join."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.keys import prefix
from mesh.contracts import TERMINAL, State
from tests.conftest import wait_for
from tests.pipelines.agents import app


def halts_beside_a_fan_out() -> Any:
    """scout lists the sources; fetch takes them one at a time; coder → reviewer, whose gate is false
    (coder answers 0.9), halts the job while fetch is still on its first item."""
    return check(Pipeline("halt-fan")
                 .step("scout")
                 .step("fetch", depends_on=["scout"], for_each="scout.sources", max_parallel=1,
                       retry_policy={"max_attempts": 100})
                 .step("digest", depends_on=["fetch"])
                 .step("coder", depends_on=["scout"])
                 .step("reviewer", depends_on=["coder"], gate="coder.confidence >= 2.0")
                 .build(), app)


@pytest.mark.slow
def test_a_for_each_step_running_when_its_job_halts_ends_once_its_item_in_flight_ends(mesh: MeshClient,
                                                                                   run_workers):
    ns = mesh.settings.namespace
    first = "halt-1/fetch/fetch/0"
    mesh.redis.sadd(f"{prefix(ns)}:test.flaky", first)  # in flight (retried) until the job has halted
    run_workers()
    ref = mesh.run(halts_beside_a_fan_out(), {"goal": "g", "count": 3}, key="halt-1")
    halted = mesh.wait(ref.id, timeout_s=30)
    assert halted.state is State.HALTED and halted.steps["reviewer"].state is State.HALTED
    assert {halted.steps[s].state for s in ("fetch[1]", "fetch[2]", "digest")} == {State.NOT_RUN}

    mesh.redis.srem(f"{prefix(ns)}:test.flaky", first)
    wait_for(lambda: mesh.status(ref.id).steps["fetch[0]"].state is State.SUCCEEDED, timeout_s=30)
    record = mesh.status(ref.id)
    assert record.state is State.HALTED
    stuck = {sid: str(s.state) for sid, s in record.steps.items() if s.state not in TERMINAL}
    assert stuck == {}, f"steps left active in a halted job: {stuck}"
    fetch = record.steps["fetch"]
    assert fetch.state is State.NOT_RUN
    assert fetch.error == "not sent: the job halted at step reviewer: 1 of 3 items were sent"
