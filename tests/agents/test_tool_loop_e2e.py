"""A tool loop on a real worker process: held to its job's token budget (every turn is metered, and
the turn that takes the job past the budget fails the step closed, its calls never made), and each
of its turns and calls exported as an OpenTelemetry GenAI span under its step's span."""

from __future__ import annotations

import pytest
from conftest import wait_for

from mesh import MeshClient, Pipeline
from mesh.agents.pipelines import check
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
    assert int(rclient.get(f"{mesh.keys.prefix}:test.charges") or 0) == 2
    asked = [e.get("outcome") for e in trace.read(rclient, mesh.keys, record.job_id) if e["event"] == "model_call"]
    assert asked[:3] == ["ok", "ok", "budget_exceeded"] and len(api.requests) == 3


@pytest.mark.slow
def test_each_turn_and_call_of_a_loop_is_a_genai_span_under_its_steps_span(make_settings, rclient,
                                                                           worker_process) -> None:
    otlp = pytest.importorskip("tests.pipelines.test_otlp_export",
                               reason="the otlp extra is not installed (pip install 'agent-mesh[otlp]')")
    collector = otlp.Collector()
    try:
        with FakeOpenAI(turns(SCRIPT)) as api:
            mesh = MeshClient(make_settings(), client=rclient, app=app)
            worker_process("--app", "tests.apps.tool_loop:app", MESH_MODEL_PROVIDER="openai",
                           MESH_MODEL_URL=api.url, MESH_MODEL_NAME="gpt-test", MESH_OTLP_ENDPOINT=collector.url)
            flow = check(Pipeline("billing").step("bill", agent="biller").tracing(provider="langfuse").build(), app)
            record = mesh.wait(mesh.run(flow, {"order_id": "o-9"}).id, timeout_s=90)
            assert record.state is State.SUCCEEDED, record.error
            spans = wait_for(lambda: len(s := [x for x in collector.spans if x.trace_id == bytes.fromhex(
                record.trace_id)]) == 12 and s, timeout_s=30)
    finally:
        collector.server.shutdown()
        collector.server.server_close()
    [step] = [s for s in spans if s.name == "billing/bill"]
    children = sorted((s for s in spans if s is not step), key=lambda s: s.start_time_unix_nano)
    assert all(c.parent_span_id == step.span_id for c in children)
    # in the order they happened: a turn, its call, ..., the final turn
    assert [c.name for c in children] == ["chat gpt-test", "execute_tool charge"] * 5 + ["chat gpt-test"]
    first, call = otlp.attrs(children[0]), otlp.attrs(children[1])
    assert first["gen_ai.operation.name"] == "chat" and first["gen_ai.request.model"] == "gpt-test"
    assert first["gen_ai.usage.input_tokens"] == 10 and first["gen_ai.usage.output_tokens"] == 5
    assert first["mesh.turn"] == 1
    assert call["gen_ai.operation.name"] == "execute_tool" and call["gen_ai.tool.name"] == "charge"
