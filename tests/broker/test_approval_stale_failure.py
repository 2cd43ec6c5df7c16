"""A stale copy of a step's message that fails while the step waits for a person (its deadline passed
while deferred, or it is dead-lettered as poison) settles through the consumer's script, which keeps
no approval index: the step is not taken out of ``awaiting_approval`` by it, so its index entry and
timers never outlive its wait (no later write removes them: only the write that ends a wait does)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_for

from mesh.broker import MeshClient, MeshSettings, approvals, timers
from mesh.broker.mesh_broker import MeshBroker
from mesh.broker.router import dead_letter_with_step
from mesh.broker.settle import decide
from mesh.contracts import FailureClass, JobRecord, State
from mesh.contracts.approvals import Approval


@pytest.fixture
def broker(settings: MeshSettings) -> Iterator[MeshBroker]:
    made = MeshBroker(settings)
    yield made
    made.close()


def _park(record: JobRecord) -> tuple[JobRecord, list[Any]]:
    rec = record.steps["executor"]
    approval = Approval(hash="h", asked_at=time.time(), timeout_s=600, warn_before_s=60)
    return record.with_step(rec.model_copy(update={"state": State.AWAITING_APPROVAL, "approval": approval})), []


def _index(client: MeshClient, job_id: str) -> tuple[bool, bool]:
    """(the step is in the approvals index, its expiry timer is scheduled)."""
    member = approvals.ref(job_id, "executor")
    ask = approvals.ask_ref(job_id, "executor", 1)
    return (client.redis.zscore(client.keys.approvals, member) is not None,
            timers.due_at(client.redis, client.keys, approvals.EXPIRY, ask) is not None)


def test_a_stale_message_failing_leaves_a_waiting_step_waiting_and_its_index_matches(
        client: MeshClient, broker: MeshBroker):
    ref = client.send("executor", {"tool": "note", "args": {"title": "parked"}})
    client.jobs.update(ref.id, _park)  # parked for approval; the message is a stale copy now
    assert _index(client, ref.id) == (True, True)

    consumer = broker.consume("executor", prefetch=8, timeout=100)
    message: Any = wait_for(lambda: next(consumer))
    decide(message, dead_letter_with_step(broker, message, FailureClass.DEADLINE, "its deadline passed", None))
    consumer.ack(message)

    record = client.jobs.get(ref.id)
    assert record is not None
    # before: the step was dead-lettered by the script, its index entry and timers left behind
    assert record.steps["executor"].state is State.AWAITING_APPROVAL
    assert _index(client, ref.id) == (True, True)
    assert [p.job_id for p in approvals.pending(client.redis, client.keys)] == [ref.id]

    # mesh cancel withdraws it: the one write that ends the wait removes its entry and timers
    client.cancel(ref.id)
    assert client.jobs.get(ref.id).steps["executor"].state is State.CANCELLED  # type: ignore[union-attr]
    assert _index(client, ref.id) == (False, False)
    assert approvals.counts(client.redis, client.keys)[0] == 0
