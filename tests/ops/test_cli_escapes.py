"""Terminal escapes in data never reach the operator's terminal: a producer's key, a dependency's
error text and a DLQ entry's agent name carrying ESC sequences are printed escaped by the real
``mesh`` commands (``\\x1b``), and ``--json`` keeps them as JSON escapes."""

from __future__ import annotations

import json
import re
import time

from dramatiq.message import Message

from mesh.broker import MeshClient
from mesh.broker.outbox import encode
from mesh.dlq import DeadLetter, DeadLetterStore
from mesh.dlq.entry import Attempt

#: What a terminal acts on (newline aside).
ACTS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
TITLE = "\x1b]0;owned\x07"  # retitles the terminal
CLEAR = "\x1b[2J\x1b[H"  # clears the screen
RED = "\x1b[31m"


def hostile_entry(client: MeshClient) -> DeadLetter:
    """A dead letter as a hostile DLQ file or dependency leaves it: ESC in its agent, key and error."""
    at = time.time()
    key = f"order-{CLEAR}7"
    envelope = {"key": key, "job_id": "job-esc-1", "step_id": "executor", "agent": "executor",
                "trace_id": "0" * 32, "deadline": at + 600, "hops": [], "attempt": 1, "schema_version": 1,
                "replay_of": None, "payload": {"tool": "note", "args": {"title": RED}}}
    entry = DeadLetter(entry_id="e5c00000-1111-4222-8333-000000000001", queue="executor",
                       agent=f"exec{TITLE}utor", failure_class="permanent",
                       error=f"tickets:443 answered 400: {RED}bad order{CLEAR}", envelope=envelope, key=key,
                       job_id="job-esc-1", trace_id="0" * 32,
                       attempts=(Attempt(attempt=1, outcome="dead_lettered", at=at, error=f"{RED}400"),),
                       worker=f"w{TITLE}", dead_lettered_at=at)
    raw = encode(Message(queue_name="executor", actor_name="executor", args=(envelope,), kwargs={}, options={},
                         message_id=entry.entry_id))
    assert DeadLetterStore(client.redis, client.keys).put(entry, raw)
    return entry


def test_mesh_prints_escape_sequences_from_keys_errors_and_agent_names_escaped(client, cli):
    hostile_entry(client)
    ref = client.send("executor", {"tool": "note", "args": {"title": f"t{RED}"}}, key=f"k-{CLEAR}1")
    for args in (("dlq", "list"), ("dlq", "list", "--wide"), ("dlq", "stats"), ("dlq", "show", "e5c0"),
                 ("status", ref.id), ("status", ref.id[:12]), ("jobs",), ("jobs", "--wide"), ("status",)):
        done = cli(*args, COLUMNS="80")
        assert done.returncode == 0, (args, done.stderr)
        shown = done.stdout + done.stderr
        assert not ACTS.search(shown.replace("\n", "")), (args, shown)
    assert "\\x1b[2J" in cli("jobs", "--wide").stdout  # shown, escaped, not dropped
    assert "\\x1b]0;owned\\x07" in cli("dlq", "list", "--wide").stdout

    [listed] = json.loads(cli("dlq", "list", "--json").stdout)
    assert listed["agent"] == f"exec{TITLE}utor"  # --json: the same string once parsed
