"""The local (offline) provider on its own, and each agent run by a real worker with it."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT, wait_for

from mesh.agents.providers import LocalProvider
from mesh.agents.tools import effect_id, read_note
from mesh.contracts import ActionStep, Findings, Plan, Receipt, ResearchStep, State

CORPUS = ROOT / "agents" / "corpus"
SOURCE = re.compile(r"^corpus/([A-Za-z0-9_.-]+\.md)#([a-z0-9-]+)$")


def headings(path: Path) -> set[str]:
    """The slugs of a corpus file's ``##`` sections, computed independently of the provider."""
    return {re.sub(r"[^a-z0-9]+", "-", line[3:].strip().lower()).strip("-")
            for line in path.read_text().splitlines() if line.startswith("## ")}


def test_local_planner_is_deterministic_for_the_same_goal():
    goal = "How do retries work and what is a poison message, then write a note about backoff"
    first, second = LocalProvider().plan(goal), LocalProvider().plan(goal)
    assert first == second
    assert first.model_dump(mode="json") == LocalProvider().plan(goal).model_dump(mode="json")


def test_local_planner_splits_research_and_action_clauses():
    plan = LocalProvider().plan("How do retries work and what is a poison message, then write a note about it")
    assert [(s.step_id, s.question) for s in plan.research] == [
        ("r1", "How do retries work"), ("r2", "what is a poison message")]
    [action] = plan.actions
    assert isinstance(action, ActionStep)
    assert (action.step_id, action.tool, action.use_findings) == ("a1", "note", True)
    assert action.args == {"title": "write a note about it"}


def test_local_planner_picks_http_post_when_an_action_clause_has_a_url():
    plan = LocalProvider().plan("what is a brownout; post the summary to http://127.0.0.1:8080/hook")
    assert [s.question for s in plan.research] == ["what is a brownout"]
    [action] = plan.actions
    assert action.tool == "http_post"
    assert action.args == {"url": "http://127.0.0.1:8080/hook",
                           "json": {"text": "post the summary to http://127.0.0.1:8080/hook"}}
    assert action.use_findings


def test_local_planner_keeps_a_url_in_a_research_clause_as_research():
    plan = LocalProvider().plan("what does http://127.0.0.1:8080/doc say about retries")
    assert [type(s) for s in plan.steps] == [ResearchStep, ActionStep]
    assert plan.actions[0].tool == "note"


def test_local_researcher_cites_sections_that_exist_in_the_corpus():
    provider = LocalProvider()
    for question in ("how are poison messages handled", "what is a brownout",
                     "how do idempotency keys work", "how are dead letters replayed"):
        findings = provider.research(question)
        assert findings.question == question and findings.findings, question
        for finding in findings.findings:
            match = SOURCE.match(finding.source)
            assert match, finding.source
            path = CORPUS / match.group(1)
            assert path.is_file(), finding.source
            assert match.group(2) in headings(path), finding.source
            assert finding.text


def test_planner_alone_records_its_plan_and_queues_research_then_researchers_run(
        client, settings, start_worker):
    goal = "what is a brownout and how are dead letters replayed, then write a note"
    expected = LocalProvider().plan(goal)
    start_worker(settings, ("planner",))
    ref = client.submit(goal)

    record = wait_for(lambda: (r := client.status(ref.id)).steps["plan"].state is State.SUCCEEDED and r)
    assert Plan.model_validate(record.steps["plan"].result) == expected
    assert record.state is State.RUNNING
    # The research items of the for_each step `researcher` (builtin.yaml) are sent.
    research = {s.step_id: s for s in record.steps.values() if s.parent == "researcher"}
    assert sorted(research) == ["r1", "r2"]
    assert all(s.state is State.QUEUED and s.sent_at is not None for s in research.values())
    # actions wait for the research: the executor's for_each step has not fanned out
    assert record.steps["executor"].sent_at is None and "a1" not in record.steps
    assert client.queues(["researcher"])["researcher"]["ready"] == 2

    start_worker(settings, ("researcher",))
    record = wait_for(lambda: "a1" in (r := client.status(ref.id)).steps and r.steps["a1"].sent_at is not None and r)
    for step in research:
        findings = Findings.model_validate(record.steps[step].result)
        assert findings.question == research[step].input["question"] and findings.findings
    assert record.state is State.RUNNING
    assert [f["question"] for f in record.steps["a1"].input["args"]["findings"]] == [
        "what is a brownout", "how are dead letters replayed"]
    assert client.queues(["executor"])["executor"]["ready"] == 1


def test_researcher_alone_records_typed_findings_as_the_job_result(client, settings, start_worker):
    start_worker(settings, ("researcher",))
    question = "how are poison messages handled"
    ref = client.send("researcher", {"question": question})
    record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    findings = Findings.model_validate(record.result["researcher"])
    assert findings == LocalProvider().research(question)
    assert all(SOURCE.match(f.source) for f in findings.findings)


def test_executor_alone_records_a_typed_receipt_for_its_note(client, settings, start_worker):
    start_worker(settings, ("executor",))
    ref = client.send("executor", {"tool": "note", "args": {"title": "hello", "body": "world"}}, key="n-1")
    record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.SUCCEEDED
    receipt = Receipt.model_validate(record.result["executor"])
    assert receipt.tool == "note" and receipt.effect_id == effect_id("n-1")
    assert receipt.detail == {"title": "hello", "created": True}
    note = read_note(client.redis, client.keys, receipt.effect_id)
    assert (note["title"], note["body"], note["job_id"]) == ("hello", "world", ref.id)
