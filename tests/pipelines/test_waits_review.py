"""Durable waits under a hostile review: a job another branch ended keeps its record (no TTL, not
compacted away, not evicted by count) while one of its steps still waits, and takes its retention
once the last wait ends; event data that is no JSON is refused as such; an event name is matched
whole; an emit reports only the steps it resumed; an emitter that dies after keeping its event still
reaches the steps that waited for it (its delivery is a durable timer); an emit reads the waiting
steps in pages, however many."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.broker.compact import Compaction
from mesh.broker.jobs import fail_step
from mesh.broker.waits import InvalidEvent
from mesh.contracts import State
from tests.pipelines.test_waits import PAY, pay_flow, settle, timers


def _ended_by_another_branch(mesh: MeshClient, name: str) -> Any:
    """A job dead-lettered by one branch while its other branch's step sleeps an hour."""
    spec = (Pipeline(name).step("nap", sleep="1h").step("researcher", input={"goal": "input.goal"}).build())
    ref = mesh.run(spec, {"goal": "g"})
    mesh.jobs.update(ref.id, fail_step("researcher", State.DEAD_LETTERED, "boom", "permanent"))
    record = mesh.status(ref.id)
    assert record.state is State.DEAD_LETTERED and record.steps["nap"].state is State.WAITING
    return ref


def test_a_job_ended_by_another_branch_keeps_its_record_while_a_step_waits(mesh, make_settings):
    ref = _ended_by_another_branch(mesh, "ended")
    assert mesh.redis.pttl(mesh.keys.job(ref.id)) == -1  # no retention clock while a step waits
    assert mesh.redis.pttl(mesh.keys.trace(ref.id)) == -1
    # neither compaction nor count retention takes it while it waits
    settings = make_settings(job_retention_count=1)
    others = [mesh.run(Pipeline("ended").step("researcher").build(), {"goal": "g"}, key=f"o-{i}") for i in range(2)]
    for other in others:
        mesh.cancel(other.id)
    compaction = Compaction(mesh.redis, settings)
    compaction.run(mesh.redis.time()[0] + 1.0)
    compaction.run(mesh.redis.time()[0] + 1.0)
    assert mesh.redis.exists(mesh.keys.job(ref.id)) == 1
    assert mesh.status(ref.id).steps["nap"].state is State.WAITING
    # its last wait ended: the retention clock starts
    mesh.redis.zadd(mesh.keys.timers, {f"wait|{ref.id}|nap|1": 0}, xx=True)
    rec = settle(mesh, ref.id, "nap")
    assert rec.state is State.SUCCEEDED
    assert mesh.redis.pttl(mesh.keys.job(ref.id)) > 0 and mesh.redis.pttl(mesh.keys.trace(ref.id)) > 0


@pytest.mark.parametrize("data", [{"n": 2**70}, {1: "a"}, {"x": b"raw"}, {"x": "\ud800"}, {"x": object()},
                                  {"x": float("nan")}, {"x": float("inf")}])
def test_event_data_that_is_no_json_is_refused_as_an_invalid_event(mesh, data):
    with pytest.raises(InvalidEvent, match="JSON"):
        mesh.emit("payment.settled", data)
    ref = mesh.run(pay_flow(), {"goal": "g", "order": 1})
    with pytest.raises(InvalidEvent, match="JSON"):
        mesh.signal(ref.id, "payment.settled", data)
    assert mesh.redis.exists(mesh.keys.events("payment.settled"), mesh.keys.signals(ref.id)) == 0


@pytest.mark.parametrize("name", ["payment.settled\n", "payment.settled\r\n"])
def test_an_event_name_is_matched_whole(mesh, name):
    with pytest.raises(InvalidEvent, match="event name"):
        mesh.emit(name, {})
    assert not list(mesh.redis.scan_iter(f"{mesh.keys.namespace}:events:*"))


def test_a_job_that_starts_undoing_its_effects_withdraws_its_waiting_steps_at_once():
    from tests.pipelines.test_compensation import UNDO, _job, _lost, _ok

    spec = (Pipeline("undo-wait").step("a", agent="book", compensate=UNDO)
            .step("c", agent="book", depends_on=["a"]).step("pay", wait_for={"event": "paid"}).build())
    record, _ = _job(spec)
    assert record.steps["pay"].state is State.WAITING
    record, _ = _ok(spec, record, "a", 2.0)
    record, sent = _lost(spec, record, "c", 3.0)
    assert sent == ["undo:a"] and record.state is State.COMPENSATING
    pay = record.steps["pay"]
    assert pay.state is State.CANCELLED and "withdrawn from its wait" in (pay.error or "")
    record, _ = _ok(spec, record, "undo:a", 4.0)
    assert record.state is State.COMPENSATED
