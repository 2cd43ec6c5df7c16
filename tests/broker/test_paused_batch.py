"""A worker paused past the heartbeat timeout while it holds a whole fetched batch (two handlers
running, the rest of the batch in hand, not started), black-box: another worker takes the batch
over and finishes it; when the paused one resumes, nothing is sent twice, settled twice, dead-
lettered, or left held, and every job keeps the new owner's outcome."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest
from conftest import sigstop, wait_for

from mesh.broker import MeshClient
from mesh.contracts import State
from mesh.ops.worker import shard_threads
from tests.apps.gated import app, arrived_key, gate_key, passed_key
from tests.httpserver import RecordingServer

APP = "tests.apps.gated:app"
MESSAGES = 12
HEARTBEAT_TIMEOUT_S = 3


def count(client: MeshClient, key: str) -> int:
    return int(client.redis.get(key) or 0)


@pytest.mark.slow
def test_a_worker_paused_holding_a_batch_settles_nothing_of_it_after_the_takeover(
        make_settings, rclient, worker_process):
    with RecordingServer() as server:
        settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient, app=app)
        ns = settings.namespace
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_HTTP_ALLOW": server.host_port}
        paused = worker_process("--app", APP, "--threads", "2", MESH_PREFETCH=str(MESSAGES), **env)
        refs = [client.send("poster", {"url": server.url(), "n": n}, key=f"batch-{n}") for n in range(MESSAGES)]
        # Its two threads run two handlers; with several shards (MESH_SHARDS) each shard has its share of the
        # threads (at least one) and runs as many of its own jobs.
        per_shard = shard_threads(2, settings.shards)
        in_shard = Counter(client.keys_of(ref.id).shard for ref in refs)
        running = sum(min(n, per_shard) for n in in_shard.values())
        wait_for(lambda: count(client, arrived_key(ns)) == running, timeout_s=60)
        wait_for(lambda: client.queues(["poster"])["poster"]["ready"] == 0, timeout_s=30)  # all fetched

        sigstop(paused.pid)  # stopped, every thread, before its handlers may pass the gate
        try:
            rclient.set(gate_key(ns), 1)
            worker_process("--app", APP, "--threads", "4", **env)
            records = [client.wait(ref.id, timeout_s=90) for ref in refs]
            assert [r.state for r in records] == [State.SUCCEEDED] * MESSAGES, [
                (r.state, r.error) for r in records if r.state is not State.SUCCEEDED]
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # The paused worker's running handlers pass the gate; what else it had in hand may run and be fenced.
        wait_for(lambda: count(client, passed_key(ns)) >= MESSAGES + running, timeout_s=60)
        wait_for(lambda: client.queues(["poster"])["poster"] == {"ready": 0, "delayed": 0, "in_flight": 0},
                 timeout_s=60)
        requests = list(server.requests)

    assert len(requests) == MESSAGES
    after = [client.jobs_of(ref.id).get(ref.id) for ref in refs]
    assert [r.state for r in after] == [State.SUCCEEDED] * MESSAGES  # type: ignore[union-attr]
    shards = client.shards.keys  # each shard's (MESH_SHARDS): its jobs' dead letters, outcomes and messages
    assert sum(client.redis.zcard(keys.dlq) for keys in shards) == 0

    def succeeded() -> int:
        return sum(int(client.redis.hget(keys.outcomes, "poster:succeeded") or 0) for keys in shards)

    # the workers write their success counts once per MESH_COUNTER_FLUSH_S
    wait_for(lambda: succeeded() >= MESSAGES)
    assert succeeded() == MESSAGES
    assert sum(rclient.hlen(keys.messages("poster")) for keys in shards) == 0
