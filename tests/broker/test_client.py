"""MeshClient: refuses bad payloads before Redis, names jobs by key, and waits honestly."""

from __future__ import annotations

import pytest
from conftest import wait_for

from mesh.broker import MeshClient, WaitTimeout, job_id_for
from mesh.contracts import ContractError, State, UnknownAgent

NOTE = {"tool": "note", "args": {"title": "t"}}


def nothing_in_redis(client: MeshClient) -> bool:
    return not list(client.redis.scan_iter(match=f"{client.keys.namespace}:*"))


def test_invalid_payload_is_refused_naming_the_field_and_nothing_reaches_redis(client):
    with pytest.raises(ContractError) as caught:
        client.send("executor", {"tool": "note", "args": {}})
    assert caught.value.fields == ["args.title"]
    with pytest.raises(ContractError, match="goal"):
        client.submit("")
    assert nothing_in_redis(client)


def test_send_many_checks_every_payload_before_sending_any(client):
    items = [(NOTE, "a"), ({"tool": "note", "args": {"title": ""}}, "b"), (NOTE, "c")]
    with pytest.raises(ContractError, match="item 1") as caught:
        client.send_many("executor", items)
    assert caught.value.context["index"] == 1
    assert nothing_in_redis(client)


def test_unknown_agent_is_refused(client):
    with pytest.raises(UnknownAgent):
        client.send("nobody", {})
    assert nothing_in_redis(client)


def test_the_same_key_names_the_same_job_and_the_record_is_not_reset(client):
    first = client.send("executor", NOTE, key="same")
    second = client.send("executor", NOTE, key="same")
    assert first.id == second.id == job_id_for("same")
    assert client.queues()["executor"]["ready"] == 2  # delivered twice; receivers deduplicate
    assert client.status(first.id).trace_id == first.trace_id


def test_submit_records_a_queued_job_with_its_planner_step_and_envelope_fields(client):
    ref = client.submit("what is a brownout", key="k")
    record = client.status(ref.id)
    assert record.state is State.QUEUED and record.goal == "what is a brownout"
    # The built-in pipeline's steps are recorded at once; only the planner's is sent.
    assert list(record.steps) == ["plan", "researcher", "executor"] and record.steps["plan"].sent_at is not None
    assert all(record.steps[s].state is State.QUEUED and record.steps[s].sent_at is None
               for s in ("researcher", "executor"))
    assert record.pipeline == "mesh" and record.pipeline_input == {"goal": "what is a brownout"}
    assert sum(len(client.redis.hvals(client.keys.messages(q))) for q in ("researcher", "executor")) == 0
    raw = client.redis.hvals(client.keys.messages("planner"))
    assert len(raw) == 1 and ref.trace_id.encode() in raw[0]


def test_wait_raises_with_the_current_record_when_the_job_does_not_end_in_time(client):
    ref = client.send("executor", NOTE)
    with pytest.raises(WaitTimeout) as caught:
        client.wait(ref.id, timeout_s=0.2)
    assert caught.value.record.state is State.QUEUED


def test_duplicate_delivery_of_a_done_step_is_acked_with_the_stored_result(client, settings, start_worker):
    ref = client.send("executor", NOTE, key="dup")
    start_worker(settings, ("executor",))
    done = client.wait(ref.id, timeout_s=30)
    client.send("executor", NOTE, key="dup")
    wait_for(lambda: client.redis.hget(client.keys.stats, "duplicates") == b"1")
    again = client.status(ref.id)
    assert again.result == done.result and again.steps["executor"].picked_up == 1
    assert client.redis.zcard(client.keys.notes) == 1
