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

from mesh import MeshClient, MeshError

from .agents import MIN_CONFIDENCE, Filed, Filing, Ticket, Triage, app, file, summarize, triage


@dataclass(frozen=True)
class Outcome:
    triage: Triage
    summary: str
    filed: Filed


def handle(client: MeshClient, ticket: Ticket, *, timeout_s: float = 60.0) -> Outcome:
    """Triage and summarize ``ticket``, then file it; raises MeshError (NoOutput, naming the job's
    state and error) if a step did not succeed."""
    triage_job = client.send(triage, ticket, key=f"support/{ticket.id}/triage")      # a JobRef[Triage]
    summary_job = client.send(summarize, ticket, key=f"support/{ticket.id}/summarize")
    triaged = triage_job.result(timeout_s=timeout_s)                                   # a Triage
    summary = summary_job.result(timeout_s=timeout_s).summary
    queue = triaged.queue if triaged.confidence >= MIN_CONFIDENCE else "general"
    filing = Filing(ticket=ticket, queue=queue, summary=summary)
    filed = client.send(file, filing, key=f"support/{ticket.id}/file").result(timeout_s=timeout_s)
    return Outcome(triaged, summary, filed)


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
