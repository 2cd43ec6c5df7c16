"""Send one ticket through the support app and print what became of it, as JSON.

    mesh worker --app examples.support.agents:app &
    python -m examples.support.run "Charged twice" "My card was charged twice for March."

Triage and summary run side by side; the ticket is then filed in the queue triage chose, or in
``general`` (read by a person) when triage was not sure. The ticket id defaults to a hash of its
text and every message key derives from it, so running this twice files the ticket once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from mesh import JobRef, MeshClient, MeshError, State

from .agents import MIN_CONFIDENCE, Filed, Filing, Ticket, Triage, app


@dataclass(frozen=True)
class Outcome:
    triage: Triage
    summary: str
    filed: Filed


def handle(client: MeshClient, ticket: Ticket, *, timeout_s: float = 60.0) -> Outcome:
    """Triage and summarize ``ticket``, then file it; raises MeshError if a step did not succeed."""
    payload = ticket.model_dump(mode="json")
    triage_job = client.send("triage", payload, key=f"support/{ticket.id}/triage")
    summary_job = client.send("summarize", payload, key=f"support/{ticket.id}/summarize")
    triage = Triage.model_validate(output(client, triage_job, "triage", timeout_s))
    summary = str(output(client, summary_job, "summarize", timeout_s)["summary"])
    queue = triage.queue if triage.confidence >= MIN_CONFIDENCE else "general"
    filing = Filing(ticket=ticket, queue=queue, summary=summary)
    filed_job = client.send("file", filing.model_dump(mode="json"), key=f"support/{ticket.id}/file")
    return Outcome(triage, summary, Filed.model_validate(output(client, filed_job, "file", timeout_s)))


def output(client: MeshClient, job: JobRef, agent: str, timeout_s: float) -> dict[str, Any]:
    """The output of the one step of ``job``, once it succeeded."""
    record = client.wait(job.id, timeout_s=timeout_s)
    step = record.steps[agent]
    if record.state is not State.SUCCEEDED or step.result is None:
        raise MeshError(f"{agent} job {job.id} ended {record.state}: {step.error}", job_id=job.id)
    return step.result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("subject")
    parser.add_argument("body")
    parser.add_argument("--id", help="the ticket id (default: a hash of subject and body)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each step")
    args = parser.parse_args(argv)
    ticket_id = args.id or "t-" + hashlib.sha256(f"{args.subject}\n{args.body}".encode()).hexdigest()[:12]
    client = MeshClient(app=app)  # settings from MESH_*; payloads checked against the app's agents
    try:
        outcome = handle(client, Ticket(id=ticket_id, subject=args.subject, body=args.body), timeout_s=args.timeout)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps({"ticket": ticket_id, "triage": outcome.triage.model_dump(mode="json"),
                      "summary": outcome.summary, "filed": outcome.filed.model_dump(mode="json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
