"""A tool loop on a real worker process held to its job's token budget: every turn is metered, and
the turn that takes the job past the budget fails the step closed, its calls never made."""

from __future__ import annotations

import pytest

from mesh import MeshClient
from mesh.broker import trace
from mesh.contracts import State
from tests.agents.openai_server import FakeOpenAI, turns
from tests.agents.test_tool_loop_chaos import SCRIPT
from tests.apps.tool_loop import app


@pytest.mark.slow
def test_a_tool_loop_fails_closed_on_the_jobs_token_budget(make_settings, rclient, worker_process) -> None:
    with FakeOpenAI(turns(SCRIPT)) as api:  # each turn spends 15 tokens
        settings = make_settings()
        mesh = MeshClient(settings, client=rclient, app=app)
        worker_process("--app", "tests.apps.tool_loop:app", MESH_MODEL_PROVIDER="openai", MESH_MODEL_URL=api.url,
                       MESH_MODEL_NAME="gpt-test")
        ref = mesh.send("biller", {"order_id": "o-7"}, key="bill-budget", token_budget=40)
        record = mesh.wait(ref.id, timeout_s=90)

    assert record.state is not State.SUCCEEDED
    assert "spent 45 of its 40 model tokens" in (record.steps["biller"].error or ""), record.steps["biller"].error
    # turns 1 and 2 made their calls; turn 3 took the job past its budget: its call was never made
    assert int(rclient.get(f"{settings.namespace}:test.charges") or 0) == 2
    asked = [e.get("outcome") for e in trace.read(rclient, mesh.keys, record.job_id) if e["event"] == "model_call"]
    assert asked[:3] == ["ok", "ok", "budget_exceeded"] and len(api.requests) == 3
