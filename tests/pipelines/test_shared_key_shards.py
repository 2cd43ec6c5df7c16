"""A shared ``idempotency_key`` keeps sharing when the namespace's jobs are spread over shards
(MESH_SHARDS): two jobs on two shards rendering one key run its step once, through the claim kept in
the key's own shard (broker/shared_claims.py), whose ``done`` is written before the job's own write.

Until a worker consumes every shard, each shard here has a worker of its own (``settings.on_shard``),
and each job is sent by a client of its shard."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh import MeshClient
from mesh.broker import claims, trace
from mesh.broker.client import job_id_for
from mesh.broker.keys import prefix
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards
from mesh.contracts import State
from tests.pipelines.agents import app
from tests.pipelines.test_shared_key import shared

SHARDS = 3


def job_keys(shards: Shards, tag: str) -> Iterator[tuple[str, int]]:
    """Job keys with the shard each job lands on."""
    for n in itertools.count():
        key = f"{tag}-{n}"
        yield key, shards.shard_of(job_id_for(key))


def pick(shards: Shards, tag: str, *, apart_from_key: bool) -> tuple[str, str, str]:
    """Two job keys on two different shards, and a goal whose coder key (``{goal}:coder``) is kept in a
    third shard (``apart_from_key``) or in the first job's shard."""
    first = next(job_keys(shards, f"{tag}-a"))
    second = next((k, s) for k, s in job_keys(shards, f"{tag}-b") if s != first[1])
    for n in itertools.count():
        goal = f"{tag}-goal-{n}"
        at = shards.of_key(f"{goal}:coder").shard
        if (at not in (first[1], second[1])) if apart_from_key else at == first[1]:
            return first[0], second[0], goal
    raise AssertionError("unreachable")


@pytest.fixture
def sharded(make_settings: Callable[..., MeshSettings], rclient: Any,
            start_worker: Any) -> Callable[..., tuple[MeshSettings, Callable[[str], MeshClient]]]:
    """Settings over SHARDS shards, a worker serving the tests' agents on each, and a client per job key."""
    from mesh.ops.worker import start_worker as start

    workers = []

    def make(**overrides: Any) -> tuple[MeshSettings, Callable[[str], MeshClient]]:
        settings = make_settings(shards=SHARDS, **overrides)
        shards = Shards.of(settings)
        for s in range(shards.first, shards.first + shards.count):
            workers.append(start(settings.on_shard(s), None, 2, app=app))

        def client(job_key: str) -> MeshClient:
            return MeshClient(settings.on_shard(shards.shard_of(job_id_for(job_key))), client=rclient, app=app)

        return settings, client

    yield make  # type: ignore[misc]
    for worker in workers:
        worker.stop(timeout=10_000)
        worker.broker.close()


def runs(rclient: Any, settings: MeshSettings) -> dict[str, int]:
    raw = rclient.hgetall(f"{prefix(settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.mark.slow
@pytest.mark.parametrize("apart_from_key", [True, False], ids=["key-in-a-third-shard", "key-in-one-jobs-shard"])
def test_two_jobs_on_two_shards_rendering_one_key_run_its_step_once(sharded, rclient, apart_from_key):
    settings, client = sharded()
    shards = Shards.of(settings)
    a, b, goal = pick(shards, f"share{int(apart_from_key)}", apart_from_key=apart_from_key)
    spec = shared()
    first = client(a).wait(client(a).run(spec, {"goal": goal}, key=a).id, timeout_s=30)
    second = client(b).wait(client(b).run(spec, {"goal": goal}, key=b).id, timeout_s=30)

    assert first.state is State.SUCCEEDED, first.error
    assert second.state is State.SUCCEEDED, second.error
    key = f"{goal}:coder"
    assert first.steps["coder"].key == second.steps["coder"].key == key
    assert second.steps["coder"].result == first.steps["coder"].result
    assert runs(rclient, settings)[key] == 1  # one effect for both jobs
    assert runs(rclient, settings)[f"{b}/reviewer/reviewer"] == 1  # the second job went on past it
    # the key is done in its own shard, with the output both jobs recorded
    kept = claims.read(rclient, shards.of_key(key).claim(key))
    assert kept.state == "done"
    events = [e for e in trace.read(rclient, shards.of_job(second.job_id), second.job_id)
              if e["event"] == "succeeded" and e.get("step_id") == "coder"]
    assert events and events[0].get("shared") is True


@pytest.mark.slow
def test_jobs_of_every_shard_started_together_on_one_key_share_the_effect(sharded, rclient):
    settings, client = sharded()
    shards = Shards.of(settings)
    keys: dict[int, str] = {}
    for key, shard in job_keys(shards, "together"):
        keys.setdefault(shard, key)
        if len(keys) == shards.count:
            break
    spec = shared()
    refs = [(client(k), client(k).run(spec, {"goal": "together"}, key=k)) for k in keys.values()]
    records = [mesh.wait(ref.id, timeout_s=30) for mesh, ref in refs]

    assert [r.state for r in records] == [State.SUCCEEDED] * shards.count, [r.error for r in records]
    assert runs(rclient, settings)["together:coder"] == 1
    assert len({str(r.steps["coder"].result) for r in records}) == 1
