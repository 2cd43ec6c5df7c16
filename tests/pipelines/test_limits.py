"""MESH_MAX_FAN_OUT over real workers and Redis: a ``for_each`` list longer than the limit fails its
step as invalid_output with no item recorded or sent; a root one over the run's input is refused by
the client before anything is written."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.keys import prefix
from mesh.contracts import ContractError, LimitExceeded, State
from tests.pipelines.agents import app


@pytest.fixture
def settings(make_settings: Any) -> Any:
    return make_settings(max_fan_out=5)


def fan() -> Any:
    return check(Pipeline("fan-limit").step("scout").step("fetch", depends_on=["scout"], for_each="scout.sources")
                 .step("digest", depends_on=["fetch"]).build(), app)


def test_a_for_each_list_over_the_limit_fails_the_step_and_sends_no_item(mesh: MeshClient, run_workers):
    run_workers()
    ref = mesh.run(fan(), {"goal": "g", "count": 6}, key="too-many")
    record = mesh.wait(ref.id, timeout_s=30)

    assert record.state is State.DEAD_LETTERED
    assert record.steps["scout"].state is State.SUCCEEDED and len(record.steps["scout"].result["sources"]) == 6
    fetch = record.steps["fetch"]
    assert fetch.state is State.DEAD_LETTERED and fetch.failure_class == "invalid_output"
    assert "6 items, over MESH_MAX_FAN_OUT (5)" in fetch.error
    assert not [s for s in record.steps.values() if s.parent == "fetch"]
    assert record.steps["digest"].sent_at is None
    assert mesh.queues(["fetch"])["fetch"] == {"ready": 0, "delayed": 0, "in_flight": 0}
    assert not mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs").get(b"too-many/fetch/fetch/0")


def test_a_list_at_the_limit_runs(mesh: MeshClient, run_workers):
    run_workers()
    record = mesh.wait(mesh.run(fan(), {"goal": "g", "count": 5}, key="just-enough").id, timeout_s=30)
    assert record.state is State.SUCCEEDED, record.error


def test_a_root_for_each_over_the_input_is_refused_by_the_client_and_nothing_is_written(mesh: MeshClient):
    spec = check(Pipeline("root-fan").step("fetch", for_each="input.items").build(), app)
    with pytest.raises(LimitExceeded, match=r"MESH_MAX_FAN_OUT \(5\)"):
        # (the client checks a root's input against its agent's model too: this one passes)
        mesh.run(spec, {"url": "u", "score": 1.0, "items": [{"url": f"u{i}", "score": 1.0} for i in range(6)]},
                 key="root")
    assert not [k for pattern in mesh.keys.patterns for k in mesh.redis.scan_iter(match=pattern)]


def test_a_root_whose_for_each_cannot_be_evaluated_is_refused_by_the_client(mesh: MeshClient):
    spec = check(Pipeline("root-missing").step("fetch", for_each="input.missing").build(), app)
    with pytest.raises(ContractError, match=r"step fetch: for_each expression 'input\.missing': cannot evaluate"):
        mesh.run(spec, {"url": "u", "score": 1.0}, key="root-missing")
    assert not [k for pattern in mesh.keys.patterns for k in mesh.redis.scan_iter(match=pattern)]
