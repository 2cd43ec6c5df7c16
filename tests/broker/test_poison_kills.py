"""A message that takes down every worker that runs it is dead-lettered as poison after
MESH_POISON_KILLS deaths, counted in Redis across redeliveries (each death is a claim taken over
from an owner whose lease ran out), instead of taking the fleet down one worker after another.
Real ``mesh worker`` processes, really dying."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker.keys import prefix
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from tests.broker.poison_app import app
from tests.conftest import wait_for

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT_S = 2.0
APP = "tests.broker.poison_app:app"


def test_a_message_that_kills_three_workers_is_dead_lettered_as_poison(make_settings: Any, rclient: Any,
                                                                       worker_process: Any) -> None:
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    mesh = MeshClient(settings, client=rclient, app=app)
    ns, env = settings.namespace, {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    ref = mesh.send("crash", {"text": "boom"}, key="poison-1")

    for death in range(1, settings.poison_kills + 1):
        worker = worker_process("--app", APP, "--threads", "1", **env)
        assert worker.wait(timeout=60) == 70, worker.log_path.read_text()  # it died on the message
        assert int(rclient.get(f"{prefix(ns)}:test.deaths")) == death
    survivor = worker_process("--app", APP, "--threads", "1", **env)
    record = mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S * 4 + 60)

    assert survivor.poll() is None  # the fourth worker did not run it
    assert int(rclient.get(f"{prefix(ns)}:test.deaths")) == settings.poison_kills
    assert record.state is State.DEAD_LETTERED
    step = next(iter(record.steps.values()))
    assert step.state is State.DEAD_LETTERED and step.failure_class == "invalid_input"
    keys = mesh.keys_of(ref.id)  # the job's shard (MESH_SHARDS), where its dead letter and claim are
    [entry] = DeadLetterStore(rclient, keys).newest()
    assert entry.job_id == ref.id and entry.failure_class == "invalid_input"
    assert entry.error.startswith("poison: 3 workers died running this message (MESH_POISON_KILLS=3)")
    assert rclient.hget(keys.stats, "poison") == b"1"
    assert not rclient.exists(keys.kills("poison-1"))  # the dead letter let go of the claim


def test_a_replayed_poison_message_runs_again(make_settings: Any, rclient: Any, worker_process: Any,
                                             cli: Any) -> None:
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, poison_kills=1)
    mesh = MeshClient(settings, client=rclient, app=app)
    ns = settings.namespace
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_POISON_KILLS": "1"}
    ref = mesh.send("crash", {"text": "fixed"}, key="poison-2")
    assert worker_process("--app", APP, "--threads", "1", **env).wait(timeout=60) == 70
    worker_process("--app", APP, "--threads", "1", **env)
    assert mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S * 4 + 60).state is State.DEAD_LETTERED

    rclient.set(f"{prefix(ns)}:test.heal", 1)  # the fault is fixed: a replay runs it once more
    run = cli("dlq", "replay", "--all", "--yes")
    assert run.returncode == 0, run.stderr
    wait_for(lambda: mesh.status(ref.id).state is State.SUCCEEDED, timeout_s=60)
    assert int(rclient.get(f"{prefix(ns)}:test.deaths")) == 2
