"""A destructive tool (``@app.tool(destructive=True)``) in a tool loop on a real worker: the step
waits for a person's approval of exactly the call the model asked for; approved, it resumes from its
checkpoints (nothing made again, the model not asked again for a recorded turn) and makes the call
once; denied, the call is never made."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import wait_for

from mesh import MeshClient, Pipeline
from mesh.agents.pipelines import check
from mesh.broker import trace
from mesh.contracts import State
from tests.agents.openai_server import FakeOpenAI, Reply, completion, tool_calls
from tests.apps.tool_loop import app

SCRIPT = [tool_calls(("charge", {"order_id": "o-5", "n": 1}), usage=(10, 5), turn=1),
          tool_calls(("refund", {"order_id": "o-5", "cents": 500}), usage=(10, 5), turn=2),
          completion(json.dumps({"order_id": "o-5", "cents": 500}), usage=(10, 5))]


class Model:
    def __init__(self) -> None:
        self.turns: list[int] = []

    def __call__(self, request: dict[str, Any]) -> Reply:
        n = sum(1 for m in request["messages"] if m["role"] == "assistant")
        self.turns.append(n + 1)
        return 200, SCRIPT[n], {}


def parked(make_settings, rclient, worker_process, api: FakeOpenAI) -> tuple[MeshClient, str]:
    mesh = MeshClient(make_settings(), client=rclient, app=app)
    worker_process("--app", "tests.apps.tool_loop:app", MESH_MODEL_PROVIDER="openai", MESH_MODEL_URL=api.url,
                   MESH_MODEL_NAME="gpt-test")
    flow = check(Pipeline("refunds").step("refund", agent="refunder").build(), app)
    job_id = mesh.run(flow, {"order_id": "o-5"}).id
    wait_for(lambda: mesh.status(job_id).state is State.AWAITING_APPROVAL, timeout_s=90)
    return mesh, job_id


def counted(rclient, mesh: MeshClient, what: str) -> int:
    return int(rclient.get(f"{mesh.keys.prefix}:test.{what}") or 0)


@pytest.mark.slow
def test_a_destructive_call_waits_for_approval_then_resumes_the_loop_and_is_made_once(
        make_settings, rclient, worker_process) -> None:
    model = Model()
    with FakeOpenAI(model) as api:
        mesh, job_id = parked(make_settings, rclient, worker_process, api)
        step = mesh.status(job_id).steps["refund"]
        assert counted(rclient, mesh, "refunds") == 0 and counted(rclient, mesh, "charges") == 1
        assert step.approval is not None and step.approval.model_extra["call"] == {
            "tool": "refund", "args": {"order_id": "o-5", "cents": 500}}
        [pending] = [p for p in mesh.approvals() if p.job_id == job_id]
        mesh.approve(job_id, "refund", by="ana")
        record = mesh.wait(job_id, timeout_s=90)

    assert record.state is State.SUCCEEDED, record.error
    assert record.result["refund"] == {"order_id": "o-5", "cents": 500}
    assert counted(rclient, mesh, "refunds") == 1 and counted(rclient, mesh, "charges") == 1
    assert model.turns == [1, 2, 3]  # turns 1 and 2 replayed after the approval, not asked again
    events = trace.read(rclient, mesh.keys, job_id)
    kinds = [e["event"] for e in events if e["event"] in ("awaiting_approval", "approved", "tool_replayed")]
    assert kinds == ["awaiting_approval", "approved", "tool_replayed"]
    # mesh approvals lists it with the call it asks for
    assert pending.step.step_id == "refund" and pending.approval.model_extra["call"]["tool"] == "refund"


@pytest.mark.slow
def test_a_denied_destructive_call_is_never_made(make_settings, rclient, worker_process) -> None:
    with FakeOpenAI(Model()) as api:
        mesh, job_id = parked(make_settings, rclient, worker_process, api)
        mesh.deny(job_id, "refund", reason="not this one", by="ana")
        record = mesh.wait(job_id, timeout_s=60)
    assert record.state is not State.SUCCEEDED
    assert "approval denied by ana: not this one" in (record.steps["refund"].error or "")
    assert counted(rclient, mesh, "refunds") == 0
