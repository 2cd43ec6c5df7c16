"""A worker SIGKILLed in the middle of a declared pipeline: the job resumes from its last completed
step on the surviving worker, and no completed step runs again (executions counted per step key)."""

from __future__ import annotations

import os
import signal
from typing import Any

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.agents import app

HEARTBEAT_TIMEOUT_S = 3.0

FIVE = (Pipeline("crash")
        .step("research", agent="researcher")
        .step("code", agent="coder", depends_on=["research"])
        .step("hold", depends_on=["code"])
        .step("review", agent="reviewer", depends_on=["hold"])
        .step("deploy", agent="deployer", depends_on=["review"]))


def test_a_sigkill_mid_dag_reruns_no_completed_step(make_settings: Any, rclient: Any, worker_process: Any) -> None:
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    mesh = MeshClient(settings, client=rclient, app=app)
    ns = settings.namespace
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    procs = [worker_process("--app", "tests.pipelines.agents:app", "--threads", "2", **env) for _ in range(2)]
    ref = mesh.run(check(FIVE.build(), app), {"goal": "g"}, key="crash-1")

    holder = int(wait_for(lambda: rclient.get(f"{prefix(ns)}:test.holder"), timeout_s=60))
    [victim] = [p for p in procs if p.pid == holder]
    before = mesh.status(ref.id)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    completed = {r.key for r in before.steps.values() if r.state is State.SUCCEEDED}
    assert before.steps["hold"].state is State.RUNNING
    rclient.set(f"{prefix(ns)}:test.release", 1)
    record = mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)

    assert record.state is State.SUCCEEDED, record.error
    assert all(s.state is State.SUCCEEDED for s in record.steps.values())
    runs = {k.decode(): int(v) for k, v in rclient.hgetall(f"{prefix(ns)}:test.runs").items()}
    assert sorted(runs) == sorted(r.key for r in record.steps.values())
    assert completed == {record.steps["research"].key, record.steps["code"].key}
    assert all(runs[k] == 1 for k in completed), runs
    assert 1 <= runs["crash-1/hold/hold"] <= 2
    assert runs[record.steps["review"].key] == runs[record.steps["deploy"].key] == 1
    # the survivor ran it: its recorded attempt is not the killed one's
    assert record.steps["hold"].picked_up == 2
