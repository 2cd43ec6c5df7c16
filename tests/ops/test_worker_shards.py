"""One worker process serves every shard of its agents' queues (MESH_SHARDS > 1; ops/worker.py): one
set of consumers per shard, each with its share of the threads, one worker id heartbeating in every
shard and published once; a worker counting the namespace's shards otherwise refuses to start.

Jobs are put on a shard by a client of that shard's settings (``settings.on_shard(s)``), with keys
whose job id lives in that shard (:func:`keys_on`), so they are where any client would place them."""

from __future__ import annotations

import itertools
import signal
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import TEST_SHARD, on_cluster, wait_for, wait_started

from mesh.broker import MeshClient
from mesh.broker.client import job_id_for
from mesh.broker.keys import Keys
from mesh.broker.registry import Registry
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards, check_shards
from mesh.contracts import ConfigError, State
from mesh.ops.server import ready
from mesh.ops.worker import ShardWorkers, shard_threads, sign_off
from tests.apps import sharded

SHARDS = 3
APP = ("--app", "tests.apps.sharded:app", "--agents", "work")


@pytest.fixture
def settings(make_settings: Callable[..., MeshSettings]) -> MeshSettings:
    """The namespace spread over three shards (from TEST_SHARD), the worker's and the clients'."""
    return make_settings(shards=SHARDS)


def keys_on(settings: MeshSettings, shard: int, count: int, tag: str) -> list[str]:
    """``count`` message keys whose jobs live in ``shard`` (CRC-32 of the job id)."""
    shards = Shards.of(settings)
    found = (f"{tag}-{i}" for i in itertools.count())
    return list(itertools.islice((k for k in found if shards.shard_of(job_id_for(k)) == shard), count))


def clients(settings: MeshSettings, rclient: redis.Redis) -> dict[int, MeshClient]:
    """A client of each shard: what it sends is written in its shard."""
    return {s: MeshClient(settings.on_shard(s), client=rclient, app=sharded.app) for s in shard_numbers(settings)}


def shard_numbers(settings: MeshSettings) -> list[int]:
    """The namespace's shards: from 1 with several (shard 0's slot is the fleet-wide keys')."""
    return [keys.shard for keys in Shards.of(settings).keys]


def send(client: MeshClient, keys: list[str], first_n: int, *, hold: bool = False) -> dict[int, str]:
    """Each key's job (item ``first_n``, ``first_n + 1``, ...): item number -> job id."""
    return {n: client.send("work", {"n": n, "hold": hold}, key=key).id for n, key in enumerate(keys, first_n)}


def runs(rclient: redis.Redis, namespace: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in rclient.hgetall(sharded.runs_key(namespace)).items()}


def done(client: MeshClient, jobs: dict[int, str]) -> bool:
    return all(client.status(job).state == State.SUCCEEDED for job in jobs.values())


def test_threads_divide_evenly_over_the_shards_rounded_up_never_below_one() -> None:
    assert [shard_threads(t, 3) for t in (1, 2, 3, 4, 6, 7)] == [1, 1, 1, 2, 2, 3]
    assert shard_threads(8, 1) == 8 and shard_threads(4, 8) == 1


def test_one_worker_runs_every_shards_jobs_once_each_on_its_shards_consumers(
        settings: MeshSettings, rclient: redis.Redis, start_worker: Callable[..., Any]) -> None:
    # Each shard's keys are in a hash slot of their own, the fleet-wide ones in another: on a Redis Cluster
    # the worker's consumers fetch from as many slots, on more than one primary.
    tags = {k.prefix for k in Shards.of(settings).keys}
    assert len(tags | {Keys(settings.namespace).fleet}) == SHARDS + 1
    assert shard_numbers(settings)[0] == max(TEST_SHARD, 1)
    if on_cluster():
        assert len({rclient.keyslot(tag) for tag in tags | {Keys(settings.namespace).fleet}}) == SHARDS + 1
        assert len({rclient.get_node_from_key(tag).name for tag in tags}) > 1
    by_shard = clients(settings, rclient)
    jobs = {s: send(c, keys_on(settings, s, 4, "every"), 10 * s) for s, c in by_shard.items()}
    worker = start_worker(settings, ("work",), 3, sharded.app)
    assert isinstance(worker, ShardWorkers)
    assert [b.keys.shard for b in worker.brokers] == list(by_shard)
    assert [w.worker_threads for w in worker.workers] == [1, 1, 1]  # 3 threads over 3 shards
    for s, c in by_shard.items():
        wait_for(lambda c=c, s=s: done(c, jobs[s]), timeout_s=60)
    assert runs(rclient, settings.namespace) == {f"{s}:{n}": 1 for s, items in jobs.items() for n in items}
    # One worker, published once (the registry is fleet-wide), its heartbeat in every shard under one id.
    first = next(iter(by_shard.values()))
    [listed], _ = Registry(first.redis, first.keys, settings.heartbeat_timeout_s).workers()
    assert listed.id == worker.broker.broker_id and listed.alive and listed.agents == ("work",)
    assert listed.shards == tuple(by_shard)
    assert all(rclient.zscore(c.keys.heartbeats, listed.id) is not None for c in by_shard.values())
    status, body = ready(MeshClient(settings, client=rclient))  # /readyz: the first shard's heartbeats
    assert (status, body["workers"]) == (200, 1)
    worker.stop(timeout=10_000)
    assert all(sign_off(b) for b in worker.brokers)  # what `mesh worker` does on its way out
    assert all(rclient.zscore(c.keys.heartbeats, listed.id) is None for c in by_shard.values())


def test_a_burst_on_one_shard_does_not_starve_another(settings: MeshSettings, rclient: redis.Redis,
                                                      start_worker: Callable[..., Any]) -> None:
    """Each shard has its share of the threads to itself: a burst holding every thread of one shard
    leaves the others' jobs to run (counted: none of the burst ran while all of theirs did)."""
    by_shard = clients(settings, rclient)
    busy, *others = list(by_shard)
    burst = send(by_shard[busy], keys_on(settings, busy, 12, "burst"), 0, hold=True)
    worker = start_worker(settings, ("work",), 6, sharded.app)
    assert [w.worker_threads for w in worker.workers] == [2, 2, 2]
    ns = settings.namespace
    wait_for(lambda: rclient.get(sharded.arrived_key(ns)) == b"2", timeout_s=60)  # the busy shard's threads held
    quiet = {s: send(by_shard[s], keys_on(settings, s, 5, "quiet"), 100 * s) for s in others}
    for s in others:
        wait_for(lambda s=s: done(by_shard[s], quiet[s]), timeout_s=60)
    assert rclient.get(sharded.arrived_key(ns)) == b"2"
    assert not [k for k in runs(rclient, ns) if k.startswith(f"{busy}:")]  # none of the burst ran
    rclient.set(sharded.gate_key(ns), 1)
    wait_for(lambda: done(by_shard[busy], burst), timeout_s=60)
    assert runs(rclient, ns) == {**{f"{busy}:{n}": 1 for n in burst},
                                 **{f"{s}:{n}": 1 for s, items in quiet.items() for n in items}}


@pytest.mark.slow
def test_a_worker_records_the_shards_and_one_counting_otherwise_refuses_to_start(
        settings: MeshSettings, make_settings: Callable[..., MeshSettings], rclient: redis.Redis,
        cli_process: Callable[..., Any]) -> None:
    from mesh.ops.worker import start_worker

    shards = Shards.of(settings)
    check_shards(rclient, shards, record=True)  # as the namespace's first worker records it
    assert rclient.get(shards.home.shard_count) == f"{settings.shard}+{SHARDS}".encode()
    done_ = cli_process("worker", *APP, timeout=60, MESH_SHARDS="2")
    assert done_.returncode == 2, done_.stderr
    assert "Traceback" not in done_.stderr
    [line] = [ln for ln in done_.stderr.splitlines() if ln.strip()]
    assert line.startswith(f"error: namespace {settings.namespace} spreads its jobs over {SHARDS} shard(s)")
    assert "this process has" in line and "MESH_SHARDS=2" in line
    with pytest.raises(ConfigError, match="spreads its jobs over 3 shard"):  # one shard: refused as well
        start_worker(make_settings(shards=1), ["work"], 1, sharded.app)
    assert rclient.get(shards.home.shard_count) == f"{settings.shard}+{SHARDS}".encode()  # left as it was
    assert not rclient.exists(shards.home.heartbeats)  # nothing consumed


@pytest.mark.slow
def test_a_killed_worker_s_jobs_on_every_shard_are_recovered_by_the_next(
        settings: MeshSettings, rclient: redis.Redis, worker_process: Callable[..., Any]) -> None:
    """A ``mesh worker`` of three shards SIGKILLed with a job of each shard held mid-run and the rest
    queued: the next worker recovers every shard's (its heartbeat aged out in each) and each job ends
    once; stopped with SIGTERM, it leaves no heartbeat in any shard and no place in the registry."""
    by_shard = clients(settings, rclient)
    ns = settings.namespace
    jobs: dict[int, dict[int, str]] = {}
    for s, c in by_shard.items():
        keys = keys_on(settings, s, 7, "kill")
        jobs[s] = {**send(c, keys[:3], 10 * s), **send(c, keys[3:4], 10 * s + 3, hold=True),
                   **send(c, keys[4:], 10 * s + 4)}
    env = {"MESH_HEARTBEAT_TIMEOUT_S": "2"}
    first = worker_process(*APP, "--threads", "3", **env)
    wait_started(first)
    # Each shard's one thread ran what came before its held job and waits at the gate with it.
    wait_for(lambda: rclient.get(sharded.arrived_key(ns)) == b"3", timeout_s=60)
    held = {f"{s}:{10 * s + 3}" for s in by_shard}
    assert not held & set(runs(rclient, ns))
    first.send_signal(signal.SIGKILL)
    assert first.wait(30) == -signal.SIGKILL
    rclient.set(sharded.gate_key(ns), 1)
    second = worker_process(*APP, "--threads", "3", **env)
    wait_started(second)
    for s, c in by_shard.items():
        wait_for(lambda c=c, s=s: done(c, jobs[s]), timeout_s=90)
    assert runs(rclient, ns) == {f"{s}:{n}": 1 for s, items in jobs.items() for n in items}
    assert rclient.get(sharded.arrived_key(ns)) == b"6"  # each held job started twice, ended once
    first_keys = next(iter(by_shard.values())).keys
    reg = Registry(rclient, first_keys, settings.heartbeat_timeout_s)
    alive = wait_for(lambda: [w for w in reg.workers()[0] if w.alive], timeout_s=30)
    assert [w.label.split(":")[1] for w in alive] == [str(second.pid)]
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert [(w.id, w.alive) for w in reg.workers()[0] if w.id == alive[0].id or w.alive] == []
    assert all(rclient.zscore(c.keys.heartbeats, alive[0].id) is None for c in by_shard.values())


@pytest.mark.slow
def test_processes_of_one_mesh_worker_each_serve_every_shard(
        settings: MeshSettings, rclient: redis.Redis, worker_process: Callable[..., Any]) -> None:
    """``--processes 2`` starts each child with the parent's settings, MESH_SHARDS included: two
    workers, each listed with every shard, and every shard's jobs end once."""
    by_shard = clients(settings, rclient)
    jobs = {s: send(c, keys_on(settings, s, 5, "procs"), 10 * s) for s, c in by_shard.items()}
    parent = worker_process(*APP, "--processes", "2", "--threads", "3")
    reg = Registry(rclient, next(iter(by_shard.values())).keys, settings.heartbeat_timeout_s)
    listed = wait_for(lambda: (alive := [w for w in reg.workers()[0] if w.alive]) and len(alive) == 2 and alive,
                      timeout_s=90)
    assert [w.shards for w in listed] == [tuple(by_shard)] * 2
    for s, c in by_shard.items():
        wait_for(lambda c=c, s=s: done(c, jobs[s]), timeout_s=60)
    assert runs(rclient, settings.namespace) == {f"{s}:{n}": 1 for s, items in jobs.items() for n in items}
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(30) == 0
    assert not reg.workers()[0]  # both signed off and withdrew


def test_a_worker_of_several_shards_refuses_a_namespace_whose_one_shard_holds_jobs_nothing_recorded(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis) -> None:
    """A namespace a mesh before MESH_SHARDS served: its jobs in shard 0 and no count recorded. A worker
    with MESH_SHARDS=3 recorded 3 and started, never read shard 0: its queued jobs never ran, and mesh
    status, jobs and queues found none of them."""
    one = make_settings(shard=0, shards=1)
    ref = MeshClient(one, client=rclient).send("executor", {"tool": "note", "args": {"title": "old"}}, key="old-1")
    home = Shards(one.namespace).home
    rclient.delete(home.shard_count)  # as an older mesh left it
    with pytest.raises(ConfigError, match=r"1 job\(s\) in shard 0.*MESH_SHARDS=1"):
        check_shards(rclient, Shards(one.namespace, 0, 3), record=True)
    assert rclient.get(home.shard_count) is None  # nothing recorded: a worker of one shard may still serve it
    assert rclient.zscore(home.jobs, ref.id) is not None
