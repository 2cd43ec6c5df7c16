"""A shared ``idempotency_key`` keeps sharing when the namespace's jobs are spread over shards
(MESH_SHARDS): two jobs on two shards rendering one key run its step once, through the claim kept in
the key's own shard (broker/shared_claims.py), whose ``done`` is written before the job's own write.

Until a worker consumes every shard, each shard here has a worker of its own (``settings.on_shard``),
and each job is sent by a client of its shard."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker import claims, trace
from mesh.broker.client import job_id_for
from mesh.broker.keys import prefix
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards
from mesh.broker.shared_claims import SharedClaim, SharedClaims
from mesh.contracts import State
from tests.conftest import sigstop, wait_for
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
def sharded(make_settings: Callable[..., MeshSettings],
            rclient: Any) -> Iterator[Callable[..., tuple[MeshSettings, Callable[[str], MeshClient]]]]:
    """Settings over SHARDS shards, a worker serving the tests' agents on each, and a client per job key."""
    from mesh.ops.worker import start_worker as start

    workers = []

    def make(**overrides: Any) -> tuple[MeshSettings, Callable[[str], MeshClient]]:
        settings = spread(make_settings, **overrides)
        shards = Shards.of(settings)
        for s in range(shards.start, shards.start + shards.count):
            workers.append(start(settings.on_shard(s), None, 2, app=app))

        def client(job_key: str) -> MeshClient:
            return MeshClient(settings.on_shard(shards.shard_of(job_id_for(job_key))), client=rclient, app=app)

        return settings, client

    yield make
    for worker in workers:
        worker.stop(timeout=10_000)
        for broker in getattr(worker, "brokers", [worker.broker]):  # every shard's (ShardWorkers)
            broker.close()


def spread(make_settings: Callable[..., MeshSettings], **overrides: Any) -> MeshSettings:
    """Settings over SHARDS shards whose MESH_SHARD is the first shard holding jobs (with several, shard 0
    holds none): what a worker process started with MESH_SHARD serves."""
    settings = make_settings(shards=SHARDS, **overrides)
    start = Shards.of(settings).start
    return settings if start == settings.shard else make_settings(shards=SHARDS, shard=start, **overrides)


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


# -- real worker processes: a SIGKILL between the shared done and the job's write, a SIGSTOP past the lease --

HEARTBEAT_TIMEOUT_S = 3.0


def posting() -> Any:
    from tests.pipelines import shared_app

    return check(Pipeline("posting").step("post", idempotency_key="{{input.goal}}:post").build(), shared_app.app)


def counted(rclient: Any, settings: MeshSettings, name: str) -> dict[str, int]:
    raw = rclient.hgetall(f"{prefix(settings.namespace)}:test.{name}")
    return {k.decode(): int(v) for k, v in raw.items()}


def apart(shards: Shards, tag: str) -> tuple[str, str, str, int]:
    """A job key on the first shard (the one a worker process serves: MESH_SHARD), one on another shard
    sA, and a goal whose ``post`` key is kept in sA; and sA."""
    b = next(k for k, s in job_keys(shards, f"{tag}-b") if s == shards.start)
    a, at = next((k, s) for k, s in job_keys(shards, f"{tag}-a") if s != shards.start)
    goal = next(g for n in itertools.count() if shards.of_key(f"{(g := f'{tag}-goal-{n}')}:post").shard == at)
    return a, b, goal, at


def process_env(settings: MeshSettings, **extra: str) -> dict[str, str]:
    return {"MESH_SHARD": str(settings.shard), "MESH_SHARDS": str(SHARDS),
            "MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), **extra}


@pytest.mark.slow
def test_a_worker_killed_between_the_shared_done_and_its_job_write_applies_the_effect_once(
        make_settings, rclient, worker_process):
    from mesh.ops.worker import start_worker as start
    from tests.pipelines import shared_app

    settings = spread(make_settings, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    shards = Shards.of(settings)
    a, b, goal, at = apart(shards, "killed")
    key = f"{goal}:post"
    ns = prefix(settings.namespace)
    rclient.set(f"{ns}:test.kill", 1)
    victim = worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2",
                            **process_env(settings, TEST_KILL_AFTER_SHARED_DONE="1"))
    home = MeshClient(settings.on_shard(shards.start), client=rclient, app=shared_app.app)
    ref = home.run(posting(), {"goal": goal}, key=b)

    assert victim.wait(60) == -signal.SIGKILL  # killed right after the shared done
    kept = claims.read(rclient, shards.of_key(key).claim(key))
    assert kept.state == "done"  # the key's claim, in its own shard, is done
    assert home.status(ref.id).steps["post"].state is not State.SUCCEEDED  # the job's write never landed
    assert counted(rclient, settings, "effects") == {key: 1}

    worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2", **process_env(settings))
    record = home.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["post"].result == {"goal": goal, "pid": victim.pid}  # the killed attempt's output
    # and a job of another shard rendering the key is served it too
    worker = start(settings.on_shard(at), None, 2, app=shared_app.app)
    try:
        other = MeshClient(settings.on_shard(at), client=rclient, app=shared_app.app)
        second = other.wait(other.run(posting(), {"goal": goal}, key=a).id, timeout_s=30)
    finally:
        worker.stop(timeout=10_000)
        for broker in getattr(worker, "brokers", [worker.broker]):  # every shard's (ShardWorkers)
            broker.close()
    assert second.state is State.SUCCEEDED, second.error
    assert second.steps["post"].result == record.steps["post"].result
    assert counted(rclient, settings, "effects") == {key: 1}  # once, for both jobs and the crash
    assert counted(rclient, settings, "runs") == {key: 1}


@pytest.mark.slow
def test_a_worker_paused_past_its_shared_lease_is_fenced_out_of_the_key(make_settings, rclient, worker_process,
                                                                      monkeypatch):
    from mesh.ops.worker import start_worker as start
    from tests.pipelines import shared_app

    settings = spread(make_settings, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    shards = Shards.of(settings)
    a, b, goal, at = apart(shards, "paused")
    key = f"{goal}:post"
    ns = prefix(settings.namespace)
    rclient.set(f"{ns}:test.wait", 1)
    paused = worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2", **process_env(settings))
    home = MeshClient(settings.on_shard(shards.start), client=rclient, app=shared_app.app)
    ref = home.run(posting(), {"goal": goal}, key=b)
    assert int(wait_for(lambda: rclient.get(f"{ns}:test.holder"), timeout_s=60)) == paused.pid
    shared_key = shards.of_key(key).claim(key)
    held = claims.read(rclient, shared_key)
    assert held.state == "claimed"  # the paused attempt holds the key in its own shard

    sigstop(paused.pid)
    try:
        def expired() -> bool:
            seconds, micros = rclient.time()
            return claims.read(rclient, shared_key).expires_ms < seconds * 1000 + micros // 1000

        wait_for(expired, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
        rclient.set(f"{ns}:test.release", 1)
        # a job of the key's shard takes the key over and applies the effect, on a worker of that shard
        # alone (a worker of every shard would also take the paused one's job over, whose heartbeat is
        # stale: its redelivery, not the other job, would take the key)
        monkeypatch.setattr("mesh.ops.worker.check_shards", lambda *args, **kwargs: None)
        worker = start(settings.model_copy(update={"shard": at, "shards": 1}), None, 2, app=shared_app.app)
        try:
            other = MeshClient(settings.on_shard(at), client=rclient, app=shared_app.app)
            first = other.wait(other.run(posting(), {"goal": goal}, key=a).id, timeout_s=30)
        finally:
            worker.stop(timeout=10_000)
            for broker in getattr(worker, "brokers", [worker.broker]):  # every shard's (ShardWorkers)
                broker.close()
        assert first.state is State.SUCCEEDED, first.error
        taken = claims.read(rclient, shared_key)
        assert taken.state == "done" and taken.token > held.token
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    # the paused attempt wakes: its effect is refused by the fence, and its job is served the key's output
    record = home.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["post"].result == first.steps["post"].result
    assert counted(rclient, settings, "effects") == {key: 1}
    assert counted(rclient, settings, "runs") == {key: 2}  # both handlers started; one effect
    events = trace.read(rclient, shards.of_job(record.job_id), record.job_id)
    fenced = [e for e in events if e["event"] == "fenced"]
    assert fenced and fenced[0]["call"] == "bump", [(e["event"], e.get("worker"), e.get("call")) for e in events]
    assert paused.poll() is None  # it went on serving


def test_a_late_done_on_a_shared_key_taken_over_is_refused(make_settings, rclient):
    settings = spread(make_settings, lease_s=0.2)
    shards = Shards.of(settings)
    shared_claims = SharedClaims(settings.on_shard(shards.start), rclient)
    rendered = {"shared_key": True}  # a key rendered from an idempotency_key (the envelope says so)
    key = next(k for n in itertools.count() if shared_claims.where(k := f"late-{n}", rendered) is not None)
    where = shared_claims.where(key, rendered)
    assert where is not None
    first = shared_claims.take(where, key, "paused")
    assert first[0] == b"run"

    def expired() -> bool:
        seconds, micros = rclient.time()
        return claims.read(rclient, where.claim(key)).expires_ms < seconds * 1000 + micros // 1000

    wait_for(expired, timeout_s=10)
    second = shared_claims.take(where, key, "taker")
    assert second[0] == b"run" and int(second[1]) > int(first[1])  # taken over with a higher token
    assert shared_claims.done(SharedClaim(key, where, "taker", int(second[1])), b'{"by": "taker"}')

    late = SharedClaim(key, where, "paused", int(first[1]))
    assert not shared_claims.done(late, b'{"by": "paused"}')  # refused: nothing written
    assert late.lost and not late.done
    kept = claims.read(rclient, where.claim(key))
    assert kept.state == "done" and kept.token == int(second[1]) and kept.result == b'{"by": "taker"}'
    # the taker's own done, sent again (its answer lost), is its own
    assert shared_claims.done(SharedClaim(key, where, "taker", int(second[1])), b'{"by": "taker"}')


@pytest.mark.slow
def test_a_large_output_shared_across_shards_is_read_from_its_jobs_shard(sharded, rclient):
    from tests.pipelines.test_claim_results import GOAL
    from tests.pipelines.test_claim_results import shared as big

    settings, client = sharded()
    shards = Shards.of(settings)
    a = next((k, s) for k, s in job_keys(shards, "big-a") if shards.of_key("big:3").shard != s)
    b = next(k for k, s in job_keys(shards, "big-b") if s not in (a[1], shards.of_key("big:3").shard))
    first = client(a[0]).wait(client(a[0]).run(big(), {"goal": GOAL, "count": 3}, key=a[0]).id, timeout_s=30)
    assert first.state is State.SUCCEEDED, first.error
    kept = claims.read(rclient, shards.of_key("big:3").claim("big:3"))
    assert kept.state == "done" and kept.result.startswith(b"@")  # a reference: the output is over 4 KB
    assert f'"shard":{a[1]}'.encode() in kept.result  # naming the shard of the job that holds it

    second = client(b).wait(client(b).run(big(), {"goal": GOAL, "count": 3}, key=b).id, timeout_s=30)
    assert second.state is State.SUCCEEDED, second.error
    assert second.steps["coder"].result == first.steps["coder"].result
    assert runs(rclient, settings)["big:3"] == 1


def test_only_a_rendered_key_on_another_shard_is_claimed_twice(make_settings, rclient):
    """A job's own key and a default step key are claimed in the job's shard alone: no second claim, no
    extra round trip; a key rendered from an idempotency_key is claimed in the shard of the job it names."""
    settings = spread(make_settings)
    shards = Shards.of(settings)
    home = shards.start
    shared_claims = SharedClaims(settings.on_shard(home), rclient)
    away = next(k for n in itertools.count() if shards.of_key(k := f"k-{n}").shard != home)
    assert shared_claims.where(away, {"shared_key": True}) == shards.of_key(away)
    assert shards.of_key(away) == shards.of_job(job_id_for(away))  # where a job sent with that key lives
    for envelope in ({}, {"shared_key": False}, None):
        assert shared_claims.where(away, envelope) is None
    near = next(k for n in itertools.count() if shards.of_key(k := f"k-{n}").shard == home)
    assert shared_claims.where(near, {"shared_key": True}) is None
