"""What the engine builds is held to the limits, over real workers and Redis: a step whose message
would be over MESH_MAX_MESSAGE_BYTES, a fan-out that would grow the job record past
MESH_MAX_JOB_BYTES, an idempotency_key that cannot render or is too long, a for_each that cannot be
evaluated — each dead-letters that step in its job (the job ends dead_lettered), never the upstream
step, and nothing is sent for it."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.keys import prefix
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from tests.pipelines.agents import app

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(make_settings: Any) -> Any:
    return make_settings(max_job_bytes=1024 * 1024)


def dead_letters(mesh: MeshClient) -> list[Any]:
    return DeadLetterStore(mesh.redis, mesh.keys).newest()


def runs(mesh: MeshClient) -> dict[str, int]:
    counts = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in counts.items()}


def test_five_large_outputs_feeding_one_step_dead_letter_that_step_with_its_job(mesh: MeshClient, run_workers):
    builder = Pipeline("wide")
    for i in range(5):
        builder.step(f"r{i}", agent="researcher")
    spec = check(builder.step("combine", depends_on=[f"r{i}" for i in range(5)]).build(), app)
    run_workers()
    # each researcher's output (~250 KB) is under MESH_MAX_OUTPUT_BYTES; the five together are not
    record = mesh.wait(mesh.run(spec, {"goal": "x" * 250_000}, key="wide").id, timeout_s=60)

    assert record.state is State.DEAD_LETTERED
    assert all(record.steps[f"r{i}"].state is State.SUCCEEDED for i in range(5))
    combine = record.steps["combine"]
    assert combine.state is State.DEAD_LETTERED and combine.failure_class == "invalid_input"
    assert "over MESH_MAX_MESSAGE_BYTES (1048576)" in combine.error
    assert combine.sent_at is None and mesh.queues(["combine"])["combine"] == {"ready": 0, "delayed": 0,
                                                                               "in_flight": 0}
    assert not dead_letters(mesh)  # no message without a job in the DLQ


def test_a_fan_out_that_would_grow_the_job_record_past_the_limit_sends_no_item(mesh: MeshClient, run_workers):
    spec = check(Pipeline("grow").step("scout")
                 .step("fetch", depends_on=["scout"], for_each="scout.sources",
                       input={"url": "scout.summary", "score": "item.score"}).build(), app)
    run_workers()
    # 8 items each carrying scout's 200 KB summary: 1.6 MB of item inputs, over the 1 MB set above
    record = mesh.wait(mesh.run(spec, {"goal": "y" * 200_000, "count": 8}, key="grow").id, timeout_s=60)

    assert record.state is State.DEAD_LETTERED
    fetch = record.steps["fetch"]
    assert fetch.state is State.DEAD_LETTERED and fetch.failure_class == "invalid_input"
    assert "past MESH_MAX_JOB_BYTES (1048576); no item was sent" in fetch.error
    assert not [s for s in record.steps.values() if s.parent == "fetch"]
    assert len(mesh.redis.get(mesh.keys.job(record.job_id)) or b"") < 1024 * 1024


@pytest.mark.parametrize(("template", "goal", "why"), [
    ("{{input.missing}}:coder", "g", "cannot evaluate"),
    ("{{input.goal}}:coder", "k" * 600, "gave a key of 606 characters; a key has 1 to 512"),
])
def test_a_key_that_cannot_render_is_the_downstream_steps_error(mesh: MeshClient, run_workers, template: str,
                                                               goal: str, why: str):
    spec = check(Pipeline("keyed").step("researcher")
                 .step("coder", depends_on=["researcher"], idempotency_key=template).build(), app)
    run_workers()
    record = mesh.wait(mesh.run(spec, {"goal": goal}, key="keyed").id, timeout_s=60)

    assert record.state is State.DEAD_LETTERED
    researcher, coder = record.steps["researcher"], record.steps["coder"]
    assert researcher.state is State.SUCCEEDED and researcher.picked_up == 1
    assert list(runs(mesh).values()) == [1]  # the researcher ran once: nothing blamed it
    assert coder.state is State.DEAD_LETTERED and why in coder.error and coder.sent_at is None
    assert not dead_letters(mesh)


def test_a_for_each_that_cannot_be_evaluated_is_an_error_not_an_empty_list(mesh: MeshClient, run_workers):
    spec = check(Pipeline("no-list").step("scout").step("fetch", depends_on=["scout"], for_each="input.missing")
                 .step("digest", depends_on=["fetch"]).build(), app)
    run_workers()
    record = mesh.wait(mesh.run(spec, {"goal": "g", "count": 2}, key="no-list").id, timeout_s=60)

    assert record.state is State.DEAD_LETTERED
    fetch = record.steps["fetch"]
    assert fetch.state is State.DEAD_LETTERED and "cannot evaluate" in fetch.error
    assert record.steps["digest"].sent_at is None
