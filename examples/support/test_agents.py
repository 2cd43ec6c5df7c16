"""The support app's own tests, written with ``mesh.testing``: each agent called directly with a
``TestContext`` and a ``TestModel``, and the ``support`` pipeline run whole on an in-process worker
(``run_pipeline``, ``TestMesh``; they need a Redis, and start a worker: marked ``slow``).

    pytest examples/support/test_agents.py
"""

from __future__ import annotations

import httpx
import pytest

from mesh import Brownout, Receipt, State, ToolRefused
from mesh.testing import TestContext, TestMesh, TestModel, run_pipeline

from .agents import FileTicket, Filing, Route, Summary, Ticket, app, file, file_ticket, summarize, triage

TICKET = Ticket(id="t-42", subject="Charged twice", body="My card was charged twice for the March invoice.")
FILED = Receipt(tool="file_ticket", effect_id="TCK-1")


def test_triage_routes_to_the_models_queue_and_reports_progress() -> None:
    model = TestModel({Route: [{"queue": " Billing ", "confidence": 0.92, "reason": "a duplicate charge"}]})
    ctx = TestContext(app, triage, model=model)
    answer = triage(ctx, TICKET)
    assert (answer.queue, answer.confidence) == ("billing", 0.92)
    assert ctx.progress_notes == ["routed to billing (0.92)"]
    (asked,) = model.prompts
    assert "charged twice" in asked.prompt and asked.output is Route


def test_triage_sends_an_unknown_queue_to_general_and_clamps_the_confidence() -> None:
    ctx = TestContext(app, triage, model=TestModel([Route(queue="sales", confidence=7.0)]))
    answer = triage(ctx, TICKET)
    assert (answer.queue, answer.confidence) == ("general", 1.0)


def test_a_model_brownout_reaches_the_mesh_to_be_retried() -> None:
    ctx = TestContext(app, summarize, model=TestModel(fail=["brownout"]))
    with pytest.raises(Brownout):
        summarize(ctx, TICKET)


def test_file_calls_its_tool_once_with_the_filing() -> None:
    ctx = TestContext(app, file, tools={file_ticket: FILED})
    filed = file(ctx, Filing(ticket=TICKET, queue="billing", summary="Charged twice."))
    assert filed.reference == "TCK-1"
    (call,) = ctx.calls
    assert call.tool == "file_ticket" and call.args == FileTicket(ticket_id="t-42", queue="billing",
                                                                  subject=TICKET.subject, summary="Charged twice.")


def test_file_ticket_posts_with_its_secret_and_the_key_as_idempotency_key() -> None:
    sent: list[httpx.Request] = []

    def tickets(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={"id": "TCK-7"})

    ctx = TestContext(app, file, secrets={"SUPPORT_TICKETS_TOKEN": "token-for-tests"},
                      http=httpx.Client(transport=httpx.MockTransport(tickets)))
    assert file(ctx, Filing(ticket=TICKET, queue="account")).reference == "TCK-7"
    (request,) = sent
    assert request.headers["authorization"] == "Bearer token-for-tests"
    assert request.headers["idempotency-key"] == ctx.key


def test_triage_may_not_call_a_tool_it_did_not_declare() -> None:
    ctx = TestContext(app, triage, tools={file_ticket: FILED})
    with pytest.raises(ToolRefused):
        ctx.call(file_ticket, {"ticket_id": "t", "queue": "billing", "subject": "s", "summary": ""})


MODEL = {Route: [{"queue": "billing", "confidence": 0.9}], Summary: [{"summary": "Charged twice in March."}]}


@pytest.mark.slow
def test_support_pipeline_files_the_approved_ticket_in_triages_queue() -> None:
    record = run_pipeline(app, "support", TICKET.model_dump(), model=TestModel(MODEL), tools={file_ticket: FILED},
                          approve={"file": True})
    assert record.state is State.SUCCEEDED
    assert record.steps["file"].result == {"ticket_id": "t-42", "queue": "billing", "reference": "TCK-1"}


@pytest.mark.slow
def test_support_pipeline_files_an_unsure_triage_in_general() -> None:
    model = TestModel({**MODEL, Route: [{"queue": "billing", "confidence": 0.3}]})
    record = run_pipeline(app, "support", TICKET.model_dump(), model=model, tools={file_ticket: FILED},
                          approve={"file": True})
    assert record.steps["file"].input["queue"] == "general"


@pytest.mark.slow
def test_support_pipeline_files_nothing_when_the_approval_expires() -> None:
    with TestMesh(app, model=TestModel(MODEL), tools={file_ticket: FILED}) as mesh:
        job = mesh.run("support", TICKET.model_dump())
        assert mesh.wait(job).steps["file"].state is State.AWAITING_APPROVAL
        mesh.advance(4 * 3600)
        record = mesh.wait(job)
    assert (record.state, record.steps["file"].state) == (State.HALTED, State.HALTED)
    assert mesh.calls == []
