"""A saga whose compensable step's effect is ``unknown``: its worker SIGKILLed after the call went out
and before its outcome was written (no verifier), while the other step fails for good. The job waits;
``mesh settle --as applied`` has the step's compensation run, once; ``--as not-applied`` skips it and
the job ends. Real worker processes, a real loopback server that does the killing itself."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker.keys import prefix
from mesh.contracts import State
from mesh.dlq import DeadLetterStore, Replayer
from tests.conftest import wait_for
from tests.httpserver import RecordingServer
from tests.pipelines.saga import PAIR, app

HEARTBEAT_TIMEOUT_S = 3.0


class Killer:
    """SIGKILLs the worker holding the first POST /hold before answering it: its outcome is never written."""

    def __init__(self) -> None:
        self.victim: subprocess.Popen[bytes] | None = None
        self.holds = 0

    def __call__(self, _n: int, request: dict[str, Any]) -> tuple[int, Any]:
        if request["path"] == "/hold":
            self.holds += 1
            if self.holds == 1 and self.victim is not None:
                os.kill(self.victim.pid, signal.SIGKILL)
                self.victim.wait(10)
        return 200, {"ok": True}


def _unknown_then_settle(make_settings: Any, rclient: Any, worker_process: Any, cli: Any,
                         as_: str, *, cancel: bool = False) -> tuple[Any, RecordingServer, Any]:
    killer = Killer()
    with RecordingServer(killer) as server:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, http_allow=server.host_port)
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_HTTP_ALLOW": server.host_port,
               "MESH_RETRY_MIN_BACKOFF_MS": "20", "MESH_RETRY_MAX_BACKOFF_MS": "100"}
        mesh = MeshClient(settings, client=rclient, app=app)
        if not cancel:
            rclient.sadd(f"{prefix(settings.namespace)}:test.fail", "other")
        killer.victim = worker_process("--app", "tests.pipelines.saga:app", **env)
        ref = mesh.run(PAIR, {"url": server.url("")}, key=f"pair-{as_}-{cancel}")
        assert killer.victim.wait(60) == -signal.SIGKILL  # killed mid-call by the server
        worker_process("--app", "tests.pipelines.saga:app", **env)  # the survivor finds the intent

        other = State.SUCCEEDED if cancel else State.DEAD_LETTERED

        def waiting() -> Any:
            rec = mesh.status(ref.id)
            states = {k: v.state for k, v in rec.steps.items()}
            return rec if states.get("held") is State.UNKNOWN and states.get("other") is other else None

        record = wait_for(waiting, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
        if cancel:
            cancelled = cli("cancel", ref.id, "--reason", "wrong dates")
            assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
            record = mesh.status(ref.id)
        # The effect is not compensated blindly: the job waits for the operator's word.
        assert record.state is State.COMPENSATING, (record.state, record.error)
        assert record.steps["undo:held"].sent_at is None
        assert not [r for r in server.requests if r["path"] == "/undo"]

        # A plain DLQ replay of the unknown step is still refused: only verify/settle's decision lets it run.
        store = DeadLetterStore(rclient, mesh.keys)
        [held] = [e for e in store.newest() if e.key == record.steps["held"].key]
        report = Replayer(store, mesh.settings).replay(Replayer(store, mesh.settings).entries([held.entry_id]))
        assert report.replayed == [] and "mesh rerun" in report.skipped[held.entry_id]

        settled = cli("settle", ref.id, "held", "--as", as_, "--reason", "seen in the console",
                      "--app", "tests.pipelines.saga:app")
        assert settled.returncode == 0, settled.stdout + settled.stderr
        try:
            wait_for(lambda: mesh.status(ref.id).state not in (State.COMPENSATING, State.QUEUED, State.RUNNING),
                     timeout_s=20)
        except AssertionError:
            rec = mesh.status(ref.id)
            raise AssertionError({k: (v.state, v.error) for k, v in rec.steps.items()}) from None
        record = mesh.status(ref.id)
    return record, server, killer


@pytest.mark.slow
def test_an_unknown_effect_settled_applied_is_compensated_once(make_settings, rclient, worker_process, cli):
    record, server, killer = _unknown_then_settle(make_settings, rclient, worker_process, cli, "applied")

    assert record.state is State.COMPENSATED, (record.state, record.error)
    assert killer.holds == 1  # the settled call is answered from the ledger, never made again
    undos = [r for r in server.requests if r["path"] == "/undo"]
    assert [u["json"] for u in undos] == [{"ref": "held"}]
    assert record.steps["undo:held"].state is State.SUCCEEDED
    assert record.steps["held"].settlement is not None and record.steps["held"].settlement.applied


@pytest.mark.slow
def test_an_unknown_effect_settled_not_applied_is_not_compensated_and_the_job_ends(
        make_settings, rclient, worker_process, cli):
    record, server, killer = _unknown_then_settle(make_settings, rclient, worker_process, cli, "not-applied")

    assert record.state is State.DEAD_LETTERED, (record.state, record.error)
    assert killer.holds == 1
    assert not [r for r in server.requests if r["path"] == "/undo"]
    assert record.steps["undo:held"].state is State.SKIPPED
    assert record.steps["held"].state is State.DEAD_LETTERED


@pytest.mark.slow
def test_an_unknown_effect_of_a_cancelled_job_settled_applied_is_compensated_once(
        make_settings, rclient, worker_process, cli):
    record, server, killer = _unknown_then_settle(make_settings, rclient, worker_process, cli, "applied",
                                                  cancel=True)

    assert record.state is State.COMPENSATED, (record.state, record.error)
    assert killer.holds == 1
    assert [u["json"] for u in server.requests if u["path"] == "/undo"] == [{"ref": "held"}]
    assert record.steps["held"].state is State.CANCELLED and record.steps["held"].result is not None
