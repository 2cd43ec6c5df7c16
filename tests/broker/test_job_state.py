"""A job's state is a function of its steps', in the built-in planner → researchers → executor flow:
two research steps dead-lettered keep the job dead-lettered until both are resolved; replaying one
leaves it dead-lettered (one blocking step left), replaying the other runs it on to succeeded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.contracts import JobRecord, State, StepRecord, job_state, settle
from tests.agents.openai_server import FakeOpenAI, Reply, completion
from tests.conftest import wait_for

BROKEN: set[str] = set()


def responder(request: dict[str, Any]) -> Reply:
    """A plan of two research questions and one action; a question in BROKEN is refused (400)."""
    msgs = request.get("messages") or []
    system = next((m.get("content", "") for m in msgs if m.get("role") == "system"), "")
    user = next((m.get("content", "") for m in msgs if m.get("role") == "user"), "")
    if "planner" in system:
        answer: dict[str, Any] = {"goal": user, "steps": [
            {"kind": "research", "step_id": "r1", "question": "alpha"},
            {"kind": "research", "step_id": "r2", "question": "beta"},
            {"kind": "action", "step_id": "a1", "tool": "note", "args": {"title": "t"}, "use_findings": True}]}
    elif any(q in user for q in BROKEN):
        return 400, {"error": {"message": "this question is refused"}}, {}
    else:
        answer = {"question": user, "summary": "found", "findings": [{"text": "x", "source": "docs/a.md"}]}
    return 200, completion(json.dumps(answer)), {}


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    BROKEN.clear()
    with FakeOpenAI(responder) as server:
        yield server
    BROKEN.clear()


def test_partial_replays_keep_the_job_dead_lettered_until_every_blocking_step_is_resolved(
        client, make_settings, api, start_worker, cli):
    BROKEN.update({"alpha", "beta"})
    start_worker(make_settings(model_provider="openai", model_url=api.url, model_api_key="sk-test-key",
                               model_name="gpt-test", model_timeout_s=10))
    ref = client.submit("two questions", key="partial-1")
    record = wait_for(lambda: (r := client.status(ref.id)).steps.get("r2") is not None
                      and all(r.steps[s].state is State.DEAD_LETTERED for s in ("r1", "r2")) and r, timeout_s=30)
    # Nothing of the executor was sent: its for_each step waits, and no action item exists yet.
    assert record.state is State.DEAD_LETTERED and record.steps["executor"].sent_at is None
    assert "a1" not in record.steps

    BROKEN.clear()
    done = cli("dlq", "replay", "--key", "partial-1/researcher/r1", "--yes")
    assert done.returncode == 0, done.stderr
    record = wait_for(lambda: (r := client.status(ref.id)).steps["r1"].state is State.SUCCEEDED and r, timeout_s=30)
    assert record.state is State.DEAD_LETTERED  # r2 still blocks
    assert "r2" in (record.error or "")
    assert record.steps["executor"].sent_at is None and "a1" not in record.steps

    done = cli("dlq", "replay", "--key", "partial-1/researcher/r2", "--yes")
    assert done.returncode == 0, done.stderr
    record = client.wait(ref.id, timeout_s=30)
    assert record.state is State.SUCCEEDED, record.error
    # Every step ran to success, each once; the for_each steps (researcher, executor) joined.
    assert {s: r.state for s, r in record.steps.items()} == dict.fromkeys(
        ["plan", "researcher", "executor", "r1", "r2", "a1"], State.SUCCEEDED)
    assert {s: r.picked_up for s, r in record.steps.items() if r.need is None} == {"plan": 1, "r1": 2, "r2": 2,
                                                                                    "a1": 1}
    assert set(record.result) == {"a1"}


def _job(*steps: StepRecord, state: State = State.RUNNING) -> JobRecord:
    record = JobRecord(job_id="j", key="k", trace_id="0" * 32, state=state)
    for s in steps:
        record = record.with_step(s)
    return record


def _step(sid: str, state: State, **fields: Any) -> StepRecord:
    return StepRecord(step_id=sid, agent="a", key=f"k/{sid}", state=state, **fields)


def test_state_is_a_function_of_the_steps():
    halted = _job(_step("a", State.HALTED), _step("b", State.DEAD_LETTERED))
    assert job_state(halted) is State.HALTED
    unknown = _job(_step("a", State.UNKNOWN), _step("b", State.SUCCEEDED))
    assert job_state(unknown) is State.UNKNOWN
    reopened = _job(_step("a", State.QUEUED), _step("b", State.SUCCEEDED), state=State.DEAD_LETTERED)
    assert job_state(reopened) is State.QUEUED
    done = settle(_job(_step("a", State.SUCCEEDED, result={"x": 1}), _step("b", State.SKIPPED),
                       state=State.DEAD_LETTERED), now=1.0)
    assert done.state is State.SUCCEEDED and done.result == {"a": {"x": 1}}


def test_a_job_still_dead_lettered_after_a_replay_names_the_step_that_still_blocks_it():
    # r1 was dead-lettered last (the job's error named it), then replayed and succeeded; r2 still blocks.
    stale = _job(_step("r1", State.SUCCEEDED, result={"x": 1}), _step("r2", State.DEAD_LETTERED, error="r2 failed"),
                 state=State.DEAD_LETTERED).model_copy(update={"error": "step r1: r1 failed"})
    settled = settle(stale, now=2.0)
    assert settled.state is State.DEAD_LETTERED and settled.error == "step r2: r2 failed"


def test_a_lost_item_blocks_only_when_its_join_can_no_longer_be_met():
    parent = _step("f", State.RUNNING, need=2)
    items = [_step(f"f[{i}]", s, parent="f") for i, s in enumerate([State.DEAD_LETTERED, State.RUNNING,
                                                                       State.SUCCEEDED])]
    assert job_state(_job(parent, *items)) is State.RUNNING
    two_lost = [*items[:1], _step("f[1]", State.DEAD_LETTERED, parent="f"), items[2]]
    assert job_state(_job(parent, *two_lost)) is State.DEAD_LETTERED
    met = parent.model_copy(update={"state": State.SUCCEEDED})
    assert job_state(_job(met, *two_lost)) is State.SUCCEEDED
