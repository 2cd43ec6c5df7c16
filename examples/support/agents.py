"""Support-ticket triage on the mesh: three agents and one tool, declared on ``app``.

    triage     Ticket  -> Triage    the model routes the ticket to a queue, with its confidence
    summarize  Ticket  -> Summary   the model writes a two-line summary for the agent who picks it up
    file       Filing  -> Filed     files the ticket in the tickets system through the tool below
    file_ticket (tool)              POSTs to SUPPORT_TICKETS_URL with the SUPPORT_TICKETS_TOKEN secret
    support (pipeline)              triage and summarize side by side, then file once a person approves


Served by ``mesh worker --app examples.support.agents:app``. The model is the worker's provider:
an OpenAI-compatible endpoint with ``MESH_MODEL_PROVIDER=openai MESH_MODEL_URL=...``, the offline
``local`` one otherwise.
"""

from __future__ import annotations

import os
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mesh import App, Context, Pipeline, Receipt, ToolContext, host_port, send_request

app = App("support")                                    # holds the app's agents and tools

Queue = Literal["billing", "technical", "account", "general"]
QUEUES: tuple[str, ...] = typing.get_args(Queue)


class Contract(BaseModel):
    """What agents exchange: immutable, and an unknown field is an error (a typo is not ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Ticket(Contract):
    id: str = Field(min_length=1, max_length=64)
    subject: str = Field(max_length=200)
    body: str = Field(max_length=10_000)


class Triage(Contract):
    queue: Queue
    confidence: float = Field(ge=0, le=1)
    reason: str = ""


class Summary(BaseModel):
    """The model's answer and the agent's output: a lenient model, since models add keys."""

    summary: str


class Route(BaseModel):
    """What the model is asked for; the handler checks it before trusting it."""

    queue: str
    confidence: float
    reason: str = ""


class Filing(Contract):
    ticket: Ticket
    queue: Queue
    summary: str = ""


class FileTicket(Contract):
    """The tool's arguments: what the tickets system is sent."""

    ticket_id: str
    queue: Queue
    subject: str
    summary: str


class Filed(Contract):
    ticket_id: str
    queue: Queue
    reference: str


TRIAGE_SYSTEM = (f"You triage customer support tickets. Pick the queue that should handle the ticket, one of "
                 f"{', '.join(QUEUES)}, and say how sure you are, from 0 to 1.")
SUMMARY_SYSTEM = "You summarize customer support tickets in at most two sentences for the agent who takes them."


def _text(ticket: Ticket) -> str:
    return f"Subject: {ticket.subject}\n\n{ticket.body}"


@app.agent(version=1, time_limit_s=60, max_attempts=4, timeout_retries=1)
def triage(ctx: Context, ticket: Ticket) -> Triage:
    """Routes a ticket to a queue (a model call: it changes nothing outside, so a timeout is retried once)."""
    route = ctx.model.complete(_text(ticket), Route, system=TRIAGE_SYSTEM)
    queue = route.queue.strip().lower()
    answer = Triage(queue=typing.cast(Queue, queue if queue in QUEUES else "general"),
                    confidence=min(1.0, max(0.0, route.confidence)), reason=route.reason[:500])
    ctx.progress(f"routed to {answer.queue} ({answer.confidence:.2f})")
    return answer


@app.agent(timeout_retries=1)
def summarize(ctx: Context, ticket: Ticket) -> Summary:
    """Summarizes a ticket for whoever picks it up."""
    summary: Summary = ctx.model.complete(_text(ticket), Summary, system=SUMMARY_SYSTEM)
    return summary


@app.agent(name="file", time_limit_s=30, max_attempts=6, tools=["file_ticket"])
def file(ctx: Context, filing: Filing) -> Filed:
    """Files the ticket in its queue: an outside effect, so a timed-out attempt is never re-run blindly."""
    receipt: Receipt = ctx.call("file_ticket", FileTicket(ticket_id=filing.ticket.id, queue=filing.queue,
                                                           subject=filing.ticket.subject, summary=filing.summary))
    return Filed(ticket_id=filing.ticket.id, queue=filing.queue, reference=receipt.effect_id)


def tickets_url() -> str:
    """Where tickets are filed; read when a call is made, never at import."""
    return os.environ.get("SUPPORT_TICKETS_URL", "http://127.0.0.1:8088/tickets")


def tickets_endpoint(_args: FileTicket) -> str:
    """The dependency ``file_ticket`` reaches, ``host:port``: it names the circuit breaker."""
    return host_port(tickets_url())


def with_tickets(allowed: frozenset[str]) -> set[str]:
    """What ``file_ticket`` may reach: MESH_HTTP_ALLOW and the tickets service the operator configured."""
    return {*allowed, host_port(tickets_url())}


@app.tool(dependency=tickets_endpoint, secrets=["SUPPORT_TICKETS_TOKEN"], effect=True, allow=with_tickets)
def file_ticket(ctx: ToolContext, args: FileTicket) -> Receipt:
    """POSTs the ticket with the message key as ``Idempotency-Key``, so a repeat files nothing twice."""
    token = ctx.secret("SUPPORT_TICKETS_TOKEN")
    response = send_request(ctx, "POST", tickets_url(), json=args.model_dump(mode="json"),
                            headers={"Authorization": f"Bearer {token}"})
    try:
        reference = str(response.json()["id"])
    except (ValueError, KeyError, TypeError):
        reference = ctx.key  # a tickets system that answers no id: the key names the effect
    return Receipt(tool="file_ticket", effect_id=reference, detail={"status": response.status_code})


#: Below this, triage's queue is not trusted: a person reads the ticket in ``general``.
MIN_CONFIDENCE = 0.6

# The whole flow as a pipeline: a person approves the filing (its queue and summary) within 4 hours,
# else it is not filed (``on_timeout: deny`` halts the job).
app.pipeline(Pipeline("support")
             .step("triage")
             .step("summarize")
             .step("file", depends_on=["triage", "summarize"], approval={"timeout": "4h"},
                   input={"ticket": "input",
                          "queue": f'triage.confidence >= {MIN_CONFIDENCE} ? triage.queue : "general"',
                          "summary": "summarize.summary"}))
