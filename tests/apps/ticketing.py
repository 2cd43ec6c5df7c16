"""A user's own app, outside the mesh's packages: tickets are triaged, then filed with a tickets
service that wants a bearer token. Built on the public API only (``from mesh import ...``), served
with ``mesh worker --app tests.apps.ticketing:app``; tests/apps/test_ticketing.py holds the mesh's
guarantees against it.

The tickets service's URL comes in the filer's input, so each test points it at its own loopback
server; its ``host:port`` is the tool's dependency (and so the name of its circuit breaker).
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from mesh import App, Context, MeshError, Receipt, ToolContext
from mesh.agents.tools import effect_id, host_port, send_request

logger = logging.getLogger(__name__)

app = App("ticketing")


class Ticket(BaseModel):
    customer: str
    text: str


class Triage(BaseModel):
    queue: str
    priority: int
    summary: str


class Filing(BaseModel):
    """What the filer is sent: the ticket, its triage, and where the tickets service is."""

    url: str
    ticket: Ticket
    triage: Triage


class Filed(BaseModel):
    ticket_id: str
    queue: str
    status: int


class FileTicket(BaseModel):
    url: str
    queue: str
    priority: int
    title: str
    body: str


@app.agent(version=1)
def triage(ctx: Context, ticket: Ticket) -> Triage:
    """Routes a ticket by its words: no model, no tool, no effect."""
    text = ticket.text.lower()
    queue = "billing" if any(w in text for w in ("refund", "invoice", "charge")) else "support"
    priority = 1 if any(w in text for w in ("down", "urgent", "outage")) else 3
    return Triage(queue=queue, priority=priority, summary=ticket.text[:60])


@app.tool(dependency=lambda args: host_port(args.url), secrets=["TICKETS_TOKEN"], effect=True)
def file_ticket(ctx: ToolContext, args: FileTicket) -> Receipt:
    """POSTs the ticket to the tickets service with its bearer token."""
    headers = {"Authorization": f"Bearer {ctx.secret('TICKETS_TOKEN')}"}
    body = {"queue": args.queue, "priority": args.priority, "title": args.title, "body": args.body}
    try:
        response = send_request(ctx, "POST", args.url, json=body, headers=headers)
    except MeshError as exc:
        # Careless on purpose, as real tools are: the failure and the log line name the request's
        # headers, token included. The mesh must keep the token out of Redis and its logs anyway.
        logger.warning("filing failed: %s", exc, extra={"request_headers": headers})
        exc.message = f"{exc.message} (request headers {headers})"
        exc.args = (exc.message,)
        raise
    answer = response.json()
    return Receipt(tool="file_ticket", effect_id=effect_id(ctx.key),
                   detail={"status": response.status_code, "ticket_id": str(answer.get("id", ""))})


@app.agent(version=1, tools=["file_ticket"], timeout_retries=0)
def filer(ctx: Context, filing: Filing) -> Filed:
    """Files a triaged ticket (an outside effect: a timed-out call is never retried blindly)."""
    receipt: Receipt = ctx.call("file_ticket", FileTicket(
        url=filing.url, queue=filing.triage.queue, priority=filing.triage.priority,
        title=filing.triage.summary, body=f"{filing.ticket.customer}: {filing.ticket.text}"))
    ctx.progress(f"filed as {receipt.detail['ticket_id']}")
    return Filed(ticket_id=receipt.detail["ticket_id"], queue=filing.triage.queue, status=receipt.detail["status"])
