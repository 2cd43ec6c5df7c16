"""Key layout 2 (broker/keys.py) end to end: every key a real run writes starts with ``{ns}:``, the
namespace as a Redis Cluster hash tag, none is left in the older layout (``ns:...``); and on a Redis
in cluster mode, where a command, transaction or script touching keys of two slots fails with
CROSSSLOT, the same run (a DAG, a dead letter, a retry, a replay, the retention sweep) goes through:
every key of the namespace is in one slot."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mesh import MeshClient, MeshSettings
from mesh.agents.pipelines import Pipeline
from mesh.broker.keys import Keys, legacy_pattern, prefix
from mesh.contracts import State
from tests.conftest import run_cli, wait_for
from tests.pipelines.agents import app
from tests.pipelines.test_engine import DAG, load_pipeline_spec, runs

#: The private port of the cluster-mode redis-server this module starts.
CLUSTER_PORT = 6400

FAILS, FLAKY = "layout-1/combine/merge", "layout-2/researcher/researcher"


def run_the_scenario(mesh: MeshClient, start_worker: Callable[[], Any]) -> None:
    """A five-step DAG whose middle step is dead-lettered, and a one-step pipeline whose step is retried
    (through the delay queue) and dead-lettered, both replayed to success with ``mesh dlq replay``, then
    compacted by the retention sweep."""
    settings, keys = mesh.settings, mesh.keys
    mesh.redis.sadd(f"{prefix(settings.namespace)}:test.fail", FAILS)
    mesh.redis.sadd(f"{prefix(settings.namespace)}:test.flaky", FLAKY)
    start_worker()
    dag = mesh.run(load_pipeline_spec(DAG.build()), {"goal": "g"}, key="layout-1")
    flaky = Pipeline("flaky").step("researcher", retry_policy={"max_attempts": 2}).build()
    retried = mesh.run(load_pipeline_spec(flaky), {"goal": "g"}, key="layout-2")
    for ref in (dag, retried):
        wait_for(lambda ref=ref: mesh.status(ref.id).state is State.DEAD_LETTERED, timeout_s=30)
    mesh.redis.srem(f"{prefix(settings.namespace)}:test.fail", FAILS)
    mesh.redis.srem(f"{prefix(settings.namespace)}:test.flaky", FLAKY)

    done = run_cli(settings, "dlq", "replay", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    for ref in (dag, retried):
        record = mesh.wait(ref.id, timeout_s=30)
        assert record.state is State.SUCCEEDED, record.error
    counted = runs(mesh)
    assert counted[FAILS] == 2 and counted[FLAKY] == 3  # the retry, then the replay
    # The sweep (every 0.2 s) compacts both ended jobs: compact.lua and retention.lua ran too.
    wait_for(lambda: mesh.redis.zcard(keys.jobs_compact) == 0 and mesh.redis.exists(keys.jobs), timeout_s=30)
    assert mesh.status(dag.id).state is State.SUCCEEDED


def keys_of(client: redis.Redis, namespace: str) -> tuple[list[str], list[str]]:
    """Every key that names ``namespace``, and those of them in the older layout (``ns:*``)."""
    named = sorted(k.decode() for k in client.scan_iter(match=f"*{namespace}*", count=1000))
    legacy = sorted(k.decode() for k in client.scan_iter(match=legacy_pattern(namespace), count=1000))
    return named, legacy


@pytest.mark.slow
def test_every_key_a_run_writes_starts_with_the_namespace_as_hash_tag(rclient, make_settings):
    mesh = MeshClient(make_settings(sweep_interval_s=0.2), client=rclient, app=app)
    run_the_scenario(mesh, run_workers_with(mesh.settings))

    named, legacy = keys_of(mesh.redis, mesh.settings.namespace)
    assert legacy == []
    # The shard's tag (MESH_SHARD; the namespace's own on shard 0) or the namespace's (the fleet-wide keys)
    keys = mesh.keys
    assert named and [k for k in named if not k.startswith((f"{keys.prefix}:", f"{keys.fleet}:"))] == []
    # What the run wrote: queues (dramatiq's layout), the DLQ, claims, job records, the sweep's lock; all
    # under the shard's tag, none under the fleet's on a shard.
    for family in (":__heartbeats__", ":__held__.", ":dlq.", ":claim:", ":job:", ":stats", ":sweep.lock"):
        assert any(k.startswith(keys.prefix + family) for k in named), family
        assert keys.fleet == keys.prefix or not any(k.startswith(keys.fleet + family) for k in named), family


_STARTED: list[Any] = []


def run_workers_with(settings: MeshSettings) -> Callable[[], Any]:
    """Start an in-process worker serving the tests' agents with ``settings`` (stopped by ``_stop``)."""
    from mesh.ops.worker import start_worker

    return lambda: _STARTED.append(start_worker(settings, None, 4, app=app))


@pytest.fixture(autouse=True)
def _stop() -> Iterator[None]:
    yield
    while _STARTED:
        worker = _STARTED.pop()
        worker.stop(timeout=10_000)
        worker.broker.close()


@pytest.fixture
def cluster_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server in cluster mode on CLUSTER_PORT, owning every slot (state ok): a plain client
    reaches every key, and any command, transaction or script touching two slots fails (CROSSSLOT)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no redis-server")
    proc = subprocess.Popen([server, "--port", str(CLUSTER_PORT), "--cluster-enabled", "yes",
                             "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=CLUSTER_PORT)
    try:
        wait_for(lambda: _pings(client), timeout_s=10)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"), timeout_s=10)
        yield f"redis://127.0.0.1:{CLUSTER_PORT}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.slow
def test_a_run_on_a_redis_cluster_node_touches_one_slot(cluster_redis, make_settings):
    settings = make_settings(redis_url=cluster_redis, sweep_interval_s=0.2)
    client = redis.Redis.from_url(cluster_redis)
    with pytest.raises(redis.ResponseError, match="same slot"):  # CROSSSLOT: the server refuses two slots
        client.mget("a", "b")
    mesh = MeshClient(settings, client=client, app=app)
    run_the_scenario(mesh, run_workers_with(settings))

    named, legacy = keys_of(client, settings.namespace)
    assert legacy == [] and named
    slots = {client.execute_command("CLUSTER", "KEYSLOT", k) for k in named}
    # the shard's slot, and on a shard >= 1 the fleet-wide keys' (each script or transaction touches one)
    keys = mesh.keys
    assert client.execute_command("CLUSTER", "KEYSLOT", keys.prefix) in slots
    assert slots <= {client.execute_command("CLUSTER", "KEYSLOT", tag) for tag in (keys.prefix, keys.fleet)}
    client.close()


def test_redis_glob_patterns_read_the_prefix_braces_literally(rclient, namespace):
    keys = Keys(namespace)
    rclient.set(keys.job("j"), b"1", ex=60)
    rclient.set(f"{namespace}:job:j", b"1", ex=60)
    found = sorted(k.decode() for k in rclient.scan_iter(match=keys.everything, count=1000))
    older = sorted(k.decode() for k in rclient.scan_iter(match=keys.legacy_everything, count=1000))
    assert found == [f"{{{namespace}}}:job:j"] and older == [f"{namespace}:job:j"]
