"""A secret a tool's dependency echoes back never reaches what the mesh keeps or prints: not the job
record, the claim, the trace (``log_outputs``), the next step's message or its dead letter, a drain
file, ``mesh`` output or the worker's log. Real ``mesh worker --app`` processes, real Redis, a real
loopback service that echoes the ``Authorization`` header."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from mesh import MeshClient
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from tests.apps.echoing import app
from tests.apps.test_ticketing import namespace_values
from tests.httpserver import RecordingServer


def echo(_n: int, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return 200, {"you_sent": request["headers"].get("authorization")}


@pytest.mark.slow
def test_a_secret_echoed_into_a_tools_result_and_a_steps_output_reaches_nothing_the_mesh_keeps_or_prints(
        settings, rclient, worker_process, cli, namespace, tmp_path: Path):
    token = f"ek-{secrets.token_hex(16)}"
    mesh = MeshClient(settings, client=rclient, app=app)
    with RecordingServer(echo) as service:
        worker = worker_process("--app", "tests.apps.echoing:app", "--threads", "2", ECHO_TOKEN=token,
                                MESH_HTTP_ALLOW=service.host_port)
        ref = mesh.run("echo", {"url": service.url()})
        record = mesh.wait(ref.id, timeout_s=30)
        wait_for(lambda: DeadLetterStore(rclient, mesh.keys).count() == 1)

    # Not vacuous: the token went out and came back in the answer, and the output went on to sink.
    assert service.requests[0]["headers"]["authorization"] == f"Bearer {token}"
    assert record.state is State.DEAD_LETTERED, record.error
    fetched = record.steps["fetch"].result
    assert fetched == {"echo": "Bearer [secret]", "headers": {"Bearer [secret]": "sent"}, "count": 1234567890123}
    assert record.steps["sink"].input == fetched

    secret = token.encode()
    values = namespace_values(rclient, namespace)
    assert {k for k, v in values.items() if secret in v} == set()

    drained = tmp_path / "dlq.jsonl"
    outputs = {args: cli(*args) for args in [
        ("status", ref.id), ("status", ref.id, "--json"), ("trace", ref.id), ("trace", ref.id, "--json"),
        ("jobs", "--json"), ("dlq", "list", "--json"), ("dlq", "list", "--wide")]}
    [entry] = json.loads(outputs[("dlq", "list", "--json")].stdout)
    entry_id = entry.get("entry_id") or entry.get("id")
    outputs[("dlq", "show", entry_id)] = cli("dlq", "show", entry_id)
    outputs[("dlq", "drain")] = cli("dlq", "drain", "--to", str(drained), "--yes")
    for args, done in outputs.items():
        assert done.returncode == 0, (args, done.stderr)
        assert token not in done.stdout + done.stderr, args
    assert "[secret]" in outputs[("trace", ref.id, "--json")].stdout  # log_outputs kept the masked output
    text = drained.read_text()
    assert "sink" in text and "[secret]" in text and token not in text
    assert token not in worker.log_path.read_text()
