"""A real worker process SIGKILLed in the middle of a tool loop: the model (a loopback server) asks
for five effectful ``charge`` calls, one a turn, and kills the worker when asked for turn 4 (after
the third call). The redelivered message resumes the loop on another worker from its checkpoints:
exactly five charges, each once in the effect ledger, and the job succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker import trace
from mesh.broker.ledger import Ledger
from mesh.contracts import State
from tests.agents.openai_server import FakeOpenAI, Reply, completion, tool_calls
from tests.apps.tool_loop import app

HEARTBEAT_TIMEOUT_S = 3.0
SCRIPT = [*(tool_calls(("charge", {"order_id": "o-7", "n": n}), usage=(10, 5), turn=n) for n in range(1, 6)),
          completion(json.dumps({"order_id": "o-7", "charges": 5}), usage=(10, 5))]


class Model:
    """Plays SCRIPT by turn; SIGKILLs ``victim`` on its first request for turn 4, before answering."""

    def __init__(self) -> None:
        self.victim: subprocess.Popen[bytes] | None = None
        self.turns: list[int] = []

    def __call__(self, request: dict[str, Any]) -> Reply:
        n = sum(1 for m in request["messages"] if m["role"] == "assistant")
        self.turns.append(n + 1)
        if n == 3 and self.victim is not None and self.victim.poll() is None:
            os.kill(self.victim.pid, signal.SIGKILL)
            self.victim.wait(10)
        return 200, SCRIPT[n], {}


@pytest.mark.slow
def test_a_worker_killed_mid_loop_resumes_on_another_from_the_last_completed_turn(
        make_settings, rclient, worker_process, cli):
    model = Model()
    with FakeOpenAI(model) as api:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        mesh = MeshClient(settings, client=rclient, app=app)
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_MODEL_PROVIDER": "openai",
               "MESH_MODEL_URL": api.url, "MESH_MODEL_NAME": "gpt-test"}
        model.victim = worker_process("--app", "tests.apps.tool_loop:app", **env)
        ref = mesh.send("biller", {"order_id": "o-7"}, key="bill-o-7")
        assert model.victim.wait(90) == -signal.SIGKILL  # killed by the model server, mid-loop
        worker_process("--app", "tests.apps.tool_loop:app", **env)  # the survivor takes the message over
        record = mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 90)

    assert record.state is State.SUCCEEDED, record.error
    assert record.result["biller"] == {"order_id": "o-7", "charges": 5}
    assert int(rclient.get(f"{mesh.keys.prefix}:test.charges") or 0) == 5  # exactly five effects
    # each call was given a key of its own, derived from the step's key and the turn, the same on a re-run
    given = [k.decode() for k in rclient.lrange(f"{mesh.keys.prefix}:test.charge_keys", 0, -1)]
    assert given == [f"{record.steps['biller'].key}/turn-{n}/call-1" for n in range(1, 6)]
    entries = Ledger(rclient, mesh.keys, record.job_id, "biller", 60).entries()
    assert [(e.n, e.args["n"]) for e in entries] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    # the model was asked turns 1-4, then (resumed) turn 4 again, 5 and 6: turns 1-3 were not asked again
    assert model.turns == [1, 2, 3, 4, 4, 5, 6]
    events = trace.read(rclient, mesh.keys, record.job_id)
    replayed = [e["call"] for e in events if e["event"] == "tool_replayed"]
    assert replayed == ["turn-1/call-1", "turn-2/call-1", "turn-3/call-1"]
    asked = [(e.get("turn"), e.get("tools")) for e in events if e["event"] == "model_call"]
    assert asked == [(1, ["charge"]), (2, ["charge"]), (3, ["charge"]), (4, ["charge"]), (5, ["charge"]),
                     (6, [])]
    charges = [e for e in events if e["event"] == "tool_call" and e.get("tool") == "charge"]
    assert len(charges) == 5
    # mesh trace shows every turn and call of the loop, in the order they happened
    timeline = cli("trace", record.job_id, COLUMNS="200").stdout
    lines = [line for line in timeline.splitlines() if "turn" in line or "charge →" in line]
    assert "turn 1 asked charge" in lines[0] and "charge → mesh ok" in lines[1], timeline
    assert any("turn-2/call-1 charge: its recorded result replayed, not called again" in line for line in lines)
    assert "turn 6 answered" in lines[-1]
