"""The whole pipeline over real Redis queues with an in-process worker."""

from __future__ import annotations

from mesh.agents.tools import read_note
from mesh.contracts import State


def test_submitted_goal_flows_planner_researcher_executor_and_succeeds(client, settings, start_worker):
    start_worker(settings)
    ref = client.submit("Find out how retries work and how dead letters are replayed, then write a note")
    record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    # The flow is the pipeline builtin.yaml: its for_each steps (researcher, executor) are recorded
    # with their join's need; the steps that ran are the plan and the items.
    ran = [s for s in record.steps.values() if s.need is None]
    assert [s.agent for s in ran] == ["planner", "researcher", "researcher", "executor"]
    assert all(s.state is State.SUCCEEDED and s.picked_up == 1 for s in ran)
    assert {s.step_id: (s.state, s.need, s.picked_up) for s in record.steps.values() if s.need is not None} == {
        "researcher": (State.SUCCEEDED, 2, 0), "executor": (State.SUCCEEDED, 1, 0)}
    assert set(record.result) == {"a1"}
    receipt = record.result["a1"]
    note = read_note(client.redis, client.keys, receipt["effect_id"])
    assert note["key"] == f"{ref.key}/executor/a1"
    assert [f["question"] for f in note["findings"]] == ["Find out how retries work",
                                                         "how dead letters are replayed"]
    assert all(f["sources"] for f in note["findings"])


def test_downstream_keys_derive_from_the_submitted_key(client, settings, start_worker):
    start_worker(settings)
    ref = client.submit("what is a brownout", key="order-42")
    record = client.wait(ref.id, timeout_s=30)
    assert {s.step_id: s.key for s in record.steps.values() if s.need is None} == {
        "plan": "order-42", "r1": "order-42/researcher/r1", "a1": "order-42/executor/a1"}
    # The for_each steps' own records send nothing: no claim exists under any other key.
    claims = {k.decode().split(":claim:", 1)[1] for k in client.redis.scan_iter(match=client.keys.claim("order-42*"))}
    assert claims == {"order-42", "order-42/researcher/r1", "order-42/executor/a1"}


def test_direct_send_to_executor_records_a_one_step_job(client, settings, start_worker):
    start_worker(settings, ("executor",))
    ref = client.send("executor", {"tool": "note", "args": {"title": "hello"}}, key="k-1")
    record = client.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED
    assert record.result["executor"]["tool"] == "note"
    assert read_note(client.redis, client.keys, record.result["executor"]["effect_id"])["title"] == "hello"


def test_send_many_enqueues_every_message_and_each_job_succeeds(client, settings, start_worker):
    refs = client.send_many("executor", [({"tool": "note", "args": {"title": f"n{i}"}}, f"bulk-{i}")
                                         for i in range(50)])
    assert client.queues()["executor"]["ready"] == 50
    start_worker(settings, ("executor",))
    for ref in refs:
        assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
    assert client.redis.zcard(client.keys.notes) == 50
