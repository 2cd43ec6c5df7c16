"""MESH_MAX_FAN_OUT on the planner's plan and MESH_MAX_OUTPUT_BYTES on any step's output, with the
built-in agents on a real worker over real Redis: the step fails as invalid_output before anything
is recorded or sent, and its message is in the DLQ to replay once the limit is raised."""

from __future__ import annotations

from conftest import wait_for

from mesh.broker import MeshClient
from mesh.contracts import State
from mesh.dlq import DeadLetterStore


def test_a_plan_with_more_steps_than_the_fan_out_limit_fails_the_planner_and_sends_nothing(
        make_settings, rclient, start_worker):
    settings = make_settings(max_fan_out=2, max_retries=1)
    client = MeshClient(settings, client=rclient)
    start_worker(settings)
    ref = client.submit("what is a brownout, then what is a dead letter, then write a note")
    record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "invalid_output"
    assert "planned 3 steps, over MESH_MAX_FAN_OUT (2); no step was sent" in record.steps["plan"].error
    # Nothing but the plan ran: the for_each steps never fanned out, no item exists.
    assert set(record.steps) == {"plan", "researcher", "executor"}
    assert all(record.steps[s].state is State.QUEUED and record.steps[s].sent_at is None
               for s in ("researcher", "executor"))
    store = DeadLetterStore(client.redis, client.keys)
    wait_for(lambda: store.count() == 1)
    [entry_id] = client.redis.zrange(client.keys.dlq, 0, -1)
    entry = store.get(entry_id.decode())
    assert entry.failure_class == "invalid_output" and entry.agent == "planner"
    assert client.queues(["researcher", "executor"]) == {q: {"ready": 0, "delayed": 0, "in_flight": 0}
                                                       for q in ("researcher", "executor")}


def test_an_output_over_the_size_limit_fails_the_step_and_is_not_kept(make_settings, rclient, start_worker):
    settings = make_settings(max_output_bytes=1024, max_retries=1)
    client = MeshClient(settings, client=rclient)
    start_worker(settings, ("researcher",))
    ref = client.send("researcher", {"question": "what is a circuit breaker and a brownout"})
    record = client.wait(ref.id, timeout_s=30)

    step = record.steps["researcher"]
    assert record.state is State.DEAD_LETTERED and step.failure_class == "invalid_output"
    assert "is over MESH_MAX_OUTPUT_BYTES (1024); not kept" in step.error and "sha256" in step.error
    assert step.result is None and record.result is None
    assert step.picked_up == 2  # invalid_output: retried within MESH_MAX_RETRIES, then dead-lettered
    store = DeadLetterStore(client.redis, client.keys)
    wait_for(lambda: store.count() == 1)
