"""A real worker process SIGKILLed after its effectful call went out and before its outcome was
written: the survivor settles the call by its verifier and never calls again; without a verifier
the step is ``unknown`` and the call is not repeated either. The loopback server counts requests
and does the killing itself, on receiving the POST, so the call has certainly gone out."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker.ledger import Ledger, unknown_count
from mesh.contracts import State
from mesh.contracts.effects import Verdict
from tests.httpserver import RecordingServer

HEARTBEAT_TIMEOUT_S = 3.0


class Killer:
    """A POST responder that SIGKILLs the worker holding the call before it answers the first POST."""

    def __init__(self) -> None:
        self.victim: subprocess.Popen[bytes] | None = None

    def __call__(self, n: int, _request: dict[str, Any]) -> tuple[int, Any]:
        if n == 1 and self.victim is not None:
            os.kill(self.victim.pid, signal.SIGKILL)
            self.victim.wait(10)  # dead before any answer leaves: its outcome is never written
        return 200, {"ok": True}


def echo_key(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
    return 200, {"idempotency_key": request["headers"]["idempotency-key"]}


def run(make_settings: Any, rclient: Any, worker_process: Any, *, verify: bool) -> tuple[Any, RecordingServer, Any]:
    killer = Killer()
    with RecordingServer(killer, get=echo_key) as server:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, http_allow=server.host_port)
        mesh = MeshClient(settings, client=rclient)
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_HTTP_ALLOW": server.host_port}
        killer.victim = worker_process("--agents", "executor", **env)
        args = {"url": server.url("/orders"), **({"verify_url": server.url("/orders/7")} if verify else {})}
        ref = mesh.send("executor", {"tool": "http_post", "args": args}, key="order-7")
        assert killer.victim.wait(60) == -signal.SIGKILL  # killed by the server, mid-call
        worker_process("--agents", "executor", **env)  # the survivor recovers the message
        record = mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
    return record, server, mesh


@pytest.mark.slow
def test_a_worker_killed_mid_call_is_verified_on_recovery_and_never_calls_again(make_settings, rclient,
                                                                                 worker_process):
    record, server, mesh = run(make_settings, rclient, worker_process, verify=True)

    assert record.state is State.SUCCEEDED, record.error
    assert len(server.requests) == 1  # the call went out once, and only once
    assert server.gets and all(g["headers"]["idempotency-key"] == "order-7" for g in server.gets)
    step = record.steps["executor"]
    assert step.effect is Verdict.VERIFIED and step.picked_up == 2
    [entry] = Ledger(rclient, mesh.keys, record.job_id, "executor", 60).entries()
    # settled by the check: its outcome is what the verifier found, the tool's own answer never arrived
    assert entry.verdict is Verdict.VERIFIED and entry.outcome["detail"]["verified_by"] == server.url("/orders/7")
    assert record.result["executor"]["tool"] == "http_post"


@pytest.mark.slow
def test_a_worker_killed_mid_call_without_a_verifier_leaves_the_step_unknown_never_recalled(
        make_settings, rclient, worker_process):
    record, server, mesh = run(make_settings, rclient, worker_process, verify=False)

    assert record.state is State.UNKNOWN
    step = record.steps["executor"]
    assert step.state is State.UNKNOWN and step.result is None and "outcome was never written" in (step.error or "")
    assert len(server.requests) == 1  # an irreversible effect is never retried automatically
    [entry] = Ledger(rclient, mesh.keys, record.job_id, "executor", 60).entries()
    assert entry.verdict is Verdict.UNKNOWN
    assert unknown_count(rclient, mesh.keys) == 1
