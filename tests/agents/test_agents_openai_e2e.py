"""The whole mesh with the openai provider, against a real loopback chat-completions server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import wait_for

from mesh.contracts import Findings, Plan, State
from mesh.dlq import DeadLetterStore
from tests.agents.openai_server import FakeOpenAI, Reply, completion


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def openai_settings(make_settings, api: FakeOpenAI, **overrides: Any):
    return make_settings(model_provider="openai", model_url=api.url, model_api_key="sk-test-key",
                         model_name="gpt-test", model_timeout_s=10, **overrides)


def test_goal_runs_planner_and_researcher_through_the_model_and_succeeds(
        client, make_settings, api, start_worker):
    start_worker(openai_settings(make_settings, api))
    goal = "summarise the release"
    ref = client.submit(goal)
    record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    # The steps that ran (the for_each steps `researcher` and `executor` of builtin.yaml hold the join).
    assert [(s.step_id, s.agent) for s in record.steps.values() if s.need is None] == [
        ("plan", "planner"), ("r1", "researcher"), ("a1", "executor")]
    plan = Plan.model_validate(record.steps["plan"].result)
    assert plan.goal == goal and plan.research[0].question == f"what is known about {goal}?"
    findings = Findings.model_validate(record.steps["r1"].result)
    assert findings.findings[0].source == "docs/guide.md#answer"
    assert record.result["a1"]["tool"] == "note"

    assert len(api.requests) == 2
    planner_call, researcher_call = api.requests
    for call in api.requests:
        assert call["headers"]["authorization"] == "Bearer sk-test-key"
        assert call["json"]["model"] == "gpt-test"
        assert call["json"]["response_format"]["type"] == "json_schema"
    assert planner_call["json"]["response_format"]["json_schema"]["name"] == "Plan"
    assert researcher_call["json"]["response_format"]["json_schema"]["schema"] == Findings.model_json_schema()
    assert "planner" in planner_call["json"]["messages"][0]["content"]
    assert planner_call["json"]["messages"][1]["content"] == goal
    assert researcher_call["json"]["messages"][1]["content"] == f"what is known about {goal}?"
    assert all(s.picked_up == 1 for s in record.steps.values() if s.need is None)


def test_plan_breaking_the_contract_is_retried_as_invalid_output_then_dead_lettered(
        client, make_settings, api, start_worker):
    def bad_plan(request: dict[str, Any]) -> Reply:
        return 200, completion(json.dumps({"goal": "x", "steps": [], "extra": 1})), {}

    api.responder = bad_plan
    # No repairs within an attempt: what is shown here is the router's retry of the attempt.
    start_worker(openai_settings(make_settings, api, max_retries=1, model_repairs=0))
    ref = client.submit("plan something impossible")
    record = client.wait(ref.id, timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "invalid_output"
    step = record.steps["plan"]
    assert step.state is State.DEAD_LETTERED and step.attempt == 2 and step.picked_up == 2
    assert "invalid planner output" in step.error
    assert len(api.requests) == 2
    # nothing fanned out: the for_each steps were never sent and no item exists
    assert list(record.steps) == ["plan", "researcher", "executor"]
    assert all(record.steps[s].sent_at is None for s in ("researcher", "executor"))
    store = DeadLetterStore(client.redis, client.keys)
    wait_for(lambda: store.count() == 1)
    [entry_id] = client.redis.zrange(client.keys.dlq, 0, -1)
    entry = store.get(entry_id.decode())
    assert entry.failure_class == "invalid_output" and entry.agent == "planner"
    assert [(a.attempt, a.outcome) for a in entry.attempts] == [(1, "retried"), (2, "dead_lettered")]


def test_a_plan_of_actions_only_sends_them_at_once_and_the_job_succeeds(
        client, make_settings, api, start_worker):
    plan = {"goal": "g", "steps": [{"kind": "action", "step_id": "a1", "tool": "note",
                                    "args": {"title": "straight to it"}}]}
    api.responder = lambda request: (200, completion(json.dumps(plan)), {})
    start_worker(openai_settings(make_settings, api))
    record = client.wait(client.submit("just write the note").id, timeout_s=30)

    assert record.state is State.SUCCEEDED
    # No research: its for_each step joins at once on no items, and the action goes.
    assert [(s.step_id, s.agent) for s in record.steps.values() if s.need is None] == [("plan", "planner"),
                                                                                        ("a1", "executor")]
    assert record.steps["researcher"].state is State.SUCCEEDED and record.steps["researcher"].need == 0
    assert record.result["a1"]["tool"] == "note"


def test_a_plan_reusing_a_reserved_step_id_is_invalid_output(client, make_settings, api, start_worker):
    plan = {"goal": "g", "steps": [{"kind": "research", "step_id": "plan", "question": "q"}]}
    api.responder = lambda request: (200, completion(json.dumps(plan)), {})
    start_worker(openai_settings(make_settings, api, max_retries=0))
    record = client.wait(client.submit("overwrite the planner").id, timeout_s=30)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "invalid_output"
    assert "reserved" in record.steps["plan"].error
