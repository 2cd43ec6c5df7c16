"""A key shared across shards (broker/shared_claims.py) under the failures a review found: a large output
written to the shared claim before the job's own write, the fencing token an endpoint sees, the
compensation of a shared effect, and the envelopes a single-shard deployment sends."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker import claims, trace
from mesh.broker.keys import prefix
from mesh.broker.shards import Shards
from mesh.broker.shared_claims import SharedClaims
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.test_shared_key_shards import (
    HEARTBEAT_TIMEOUT_S,
    apart,
    counted,
    process_env,
    spread,
)


@pytest.mark.slow
def test_a_large_output_outlives_a_kill_between_the_shared_done_and_its_job_write(
        make_settings, rclient, worker_process):
    """The shared claim is written before the job's record: a reference to that record (a large output)
    would name an output the record never got, and the redelivery would fail the step for good."""
    from tests.pipelines import shared_app

    settings = spread(make_settings, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    shards = Shards.of(settings)
    _, b, goal, _ = apart(shards, "bigkill")
    key = f"{goal}:post"
    ns = prefix(settings.namespace)
    rclient.set(f"{ns}:test.kill", 1)
    victim = worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2",
                            **process_env(settings, TEST_KILL_AFTER_SHARED_DONE="1"))
    home = MeshClient(settings.on_shard(shards.start), client=rclient, app=shared_app.app)
    pad = settings.claim_result_bytes + 1000  # an output over MESH_CLAIM_RESULT_BYTES
    big = check(Pipeline("posting-big").step("post", agent="post_big", idempotency_key="{{input.goal}}:post").build(),
                shared_app.app)
    ref = home.run(big, {"goal": goal, "pad": pad}, key=b)

    assert victim.wait(60) == -signal.SIGKILL  # killed right after the shared done, before the job's write
    assert claims.read(rclient, shards.of_key(key).claim(key)).state == "done"
    assert home.status(ref.id).steps["post"].state is not State.SUCCEEDED

    worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2", **process_env(settings))
    record = home.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["post"].result == {"goal": goal, "pid": victim.pid, "pad": "x" * pad}
    assert counted(rclient, settings, "effects") == {key: 1}
    assert counted(rclient, settings, "runs") == {key: 1}



def test_the_compensation_of_a_shared_effect_is_claimed_in_the_keys_shard_as_the_effect_was(make_settings, rclient):
    """Two jobs of two shards share one rendered key's effect; when both unwind, their compensations
    (one key: the effect's, ``/undo``) must meet in one claim, as on one shard, or the effect is undone
    twice."""
    from mesh.agents.pipelines.compensate import undo_key
    from mesh.agents.pipelines.engine import Routes, after_loss
    from mesh.contracts import transition
    from tests.pipelines.test_compensation import _job, _ok

    spec = (Pipeline("undo-shared").step("a", agent="book", idempotency_key="{{input.n}}:a",
                                         compensate={"agent": "unbook", "input": {"ref": "output.ref"}})
            .step("b", agent="book", depends_on=["a"]).build())
    record, _ = _job(spec)
    assert record.steps["a"].key == "3:a"  # rendered: jobs with the same input share the effect
    record, _ = _ok(spec, record, "a", now=2.0)
    failed = transition(transition(record.steps["b"], State.RUNNING, now=2.5), State.DEAD_LETTERED, now=3.0,
                        error="boom", failure_class="permanent")
    _, messages = after_loss(spec, record.with_step(failed), Routes(), [], now=3.0)
    [envelope] = [m.args[0] for m in messages]
    assert envelope["key"] == undo_key("3:a")  # one key for every job's compensation of the effect

    settings = spread(make_settings)
    shards = Shards.of(settings)
    for shard in range(shards.start, shards.start + shards.count):
        where = SharedClaims(settings.on_shard(shard), rclient).where(envelope["key"], envelope)
        # a job of any shard claims its compensation where the key lives (its own claim, there, is that one)
        assert (where or shards.keys[shard - shards.start]) == shards.of_key(envelope["key"]), shard


@pytest.mark.slow
def test_the_fencing_token_an_endpoint_sees_for_a_shared_key_grows_across_shards(make_settings, rclient):
    """An endpoint compares tokens per key (docs/design/fencing.md): the attempt of a job of another shard
    that takes a shared key after an attempt that let it go must carry a higher token, whatever the
    fencing counters of the jobs' own shards say."""
    from mesh.ops.worker import start_worker as start
    from tests.pipelines import shared_app
    from tests.pipelines.test_shared_key_shards import job_keys

    settings = spread(make_settings)
    shards = Shards.of(settings)
    goal = "fence-goal"
    at = shards.of_key(f"{goal}:stamp").shard
    a, sa = next((k, s) for k, s in job_keys(shards, "fence-a") if s != at)
    b, sb = next((k, s) for k, s in job_keys(shards, "fence-b") if s not in (at, sa))
    ns = prefix(settings.namespace)
    rclient.hincrby(shards.keys[sa - shards.start].stats, "fence", 100_000)  # a busier shard's counter
    spec = check(Pipeline("stamping").step("stamp", agent="stamp", idempotency_key="{{input.goal}}:stamp").build(),
                 shared_app.app)
    workers = [start(settings.on_shard(s), None, 2, app=shared_app.app) for s in (sa, sb)]
    try:
        rclient.set(f"{ns}:test.fail", 1)
        first = MeshClient(settings.on_shard(sa), client=rclient, app=shared_app.app)
        failed = first.wait(first.run(spec, {"goal": goal}, key=a).id, timeout_s=30)
        assert failed.state is State.DEAD_LETTERED, failed.error  # the key let go, its call made
        rclient.delete(f"{ns}:test.fail")
        second = MeshClient(settings.on_shard(sb), client=rclient, app=shared_app.app)
        done = second.wait(second.run(spec, {"goal": goal}, key=b).id, timeout_s=30)
        assert done.state is State.SUCCEEDED, done.error
    finally:
        for worker in workers:
            worker.stop(timeout=10_000)
            worker.broker.close()
    seen = [int(t) for t in rclient.lrange(f"{ns}:test.tokens", 0, -1)]
    assert len(seen) == 2
    assert seen[1] > seen[0]  # the later owner's token is higher: an endpoint accepts it, and refuses the earlier
    assert done.steps["stamp"].result == {"token": seen[1]}  # ctx.token is the token the call carried
    assert seen[1] == claims.read(rclient, shards.of_key(f"{goal}:stamp").claim(f"{goal}:stamp")).token


@pytest.mark.parametrize("shards", [1, 3])
def test_a_rendered_keys_envelope_says_shared_key_only_where_a_shard_reads_it(make_settings, shards):
    """With one shard nothing reads ``shared_key``: the message is written as before, so a worker of an
    earlier release, whose envelope refuses unknown fields, runs it during a rolling deploy instead of
    dead-lettering it (and its job) as an invalid envelope."""
    from mesh.agents.pipelines.engine import Routes, Run, begin
    from mesh.contracts import Envelope, JobRecord

    settings = make_settings(shards=shards)
    spec = Pipeline("rendered").step("coder", agent="coder", idempotency_key="{{input.goal}}:coder").build()
    record = JobRecord(job_id="job-1", key="k", trace_id="4bf92f3577b34da6a3ce929d0e0e4736", pipeline=spec.name,
                       pipeline_digest=spec.digest(), pipeline_input={"goal": "g"})
    routes = Routes.from_settings(settings, queue=lambda agent: agent, version=lambda agent: None)
    _, [message], _ = begin(spec, record, Run(trace_id=record.trace_id, deadline=2e9), routes, now=1.0)
    envelope = message.args[0]
    assert envelope["key"] == "g:coder"
    if shards == 1:
        assert "shared_key" not in envelope  # what an earlier release's Envelope accepts
        assert set(envelope) <= set(Envelope.model_fields) - {"shared_key"}
    else:
        assert envelope["shared_key"] is True


@pytest.mark.slow
def test_a_next_step_waiting_for_its_shared_key_is_not_recorded_running_meanwhile(make_settings, rclient):
    """A success's write may pick its job's next step up for its worker (broker/step_write.py): the step's
    record says running. A next step whose key is held in the key's shard by another job is sent to the
    delay queue instead of running: its record must not say running while it waits there (a mesh cancel
    would wait for it, mesh status and the stuck count would show it)."""
    from mesh.ops.worker import start_worker as start
    from tests.pipelines import shared_app
    from tests.pipelines.test_shared_key_shards import job_keys

    settings = spread(make_settings)
    shards = Shards.of(settings)
    goal = "eager-goal"
    key = f"{goal}:post"
    at = shards.of_key(key).shard
    a = next(k for k, s in job_keys(shards, "eager-a") if s == at)  # its claim is the key's
    b, sb = next((k, s) for k, s in job_keys(shards, "eager-b") if s != at)
    ns = prefix(settings.namespace)
    rclient.sadd(f"{ns}:test.wait_keys", key)
    one = check(Pipeline("posting").step("post", idempotency_key="{{input.goal}}:post").build(), shared_app.app)
    two = check(Pipeline("prep-posting").step("prep", agent="post")
                .step("post", depends_on=["prep"], idempotency_key="{{input.goal}}:post").build(), shared_app.app)
    workers = [start(settings.on_shard(s), None, 2, app=shared_app.app) for s in (at, sb)]
    try:
        first = MeshClient(settings.on_shard(at), client=rclient, app=shared_app.app)
        ref_a = first.run(one, {"goal": goal}, key=a)
        wait_for(lambda: rclient.get(f"{ns}:test.holder"), timeout_s=30)  # the key is held
        second = MeshClient(settings.on_shard(sb), client=rclient, app=shared_app.app)
        ref_b = second.run(two, {"goal": goal}, key=b)

        def deferred() -> bool:
            return any(e["event"] == "deferred" and e.get("step_id") == "post"
                       for e in trace.read(rclient, shards.of_job(ref_b.id), ref_b.id))

        wait_for(deferred, timeout_s=30)  # waits for the key's holder, on the delay queue
        assert second.status(ref_b.id).steps["post"].state is not State.RUNNING
        rclient.set(f"{ns}:test.release", 1)
        done_a = first.wait(ref_a.id, timeout_s=30)
        done_b = second.wait(ref_b.id, timeout_s=30)
    finally:
        for worker in workers:
            worker.stop(timeout=10_000)
            worker.broker.close()
    assert done_a.state is State.SUCCEEDED and done_b.state is State.SUCCEEDED, (done_a.error, done_b.error)
    assert done_b.steps["post"].result == done_a.steps["post"].result
    assert counted(rclient, settings, "runs")[key] == 1


@pytest.mark.slow
def test_a_worker_paused_between_the_shared_done_and_its_job_write_is_fenced_and_its_output_kept(
        make_settings, rclient, worker_process):
    """Paused past its leases right after the shared done: its job's redelivery records the output the
    shared claim keeps (a large one whole), running nothing; the paused write, once it wakes, is refused."""
    from tests.conftest import wait_stopped
    from tests.pipelines import shared_app

    settings = spread(make_settings, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    shards = Shards.of(settings)
    _, b, goal, _ = apart(shards, "bigstop")
    key = f"{goal}:post"
    ns = prefix(settings.namespace)
    rclient.set(f"{ns}:test.stop", 1)
    paused = worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2",
                            **process_env(settings, TEST_STOP_AFTER_SHARED_DONE="1"))
    home = MeshClient(settings.on_shard(shards.start), client=rclient, app=shared_app.app)
    pad = settings.claim_result_bytes + 1000
    big = check(Pipeline("posting-big").step("post", agent="post_big", idempotency_key="{{input.goal}}:post").build(),
                shared_app.app)
    ref = home.run(big, {"goal": goal, "pad": pad}, key=b)
    wait_for(lambda: not rclient.exists(f"{ns}:test.stop"), timeout_s=60)
    wait_stopped(paused.pid, timeout_s=30)
    try:
        assert claims.read(rclient, shards.of_key(key).claim(key)).state == "done"
        worker_process("--app", "tests.pipelines.shared_app:app", "--threads", "2", **process_env(settings))
        record = home.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert record.state is State.SUCCEEDED, record.error
    assert record.steps["post"].result == {"goal": goal, "pid": paused.pid, "pad": "x" * pad}
    assert counted(rclient, settings, "effects") == {key: 1}
    assert counted(rclient, settings, "runs") == {key: 1}

    # the paused attempt wakes: its own job write is refused (its job's claim was taken over), nothing changes
    wait_for(lambda: "attempt superseded" in paused.log_path.read_text(), timeout_s=30)  # type: ignore[attr-defined]
    assert home.status(ref.id).steps["post"].result == record.steps["post"].result
    assert counted(rclient, settings, "effects") == {key: 1}


def test_a_shared_claim_that_cannot_be_renewed_keeps_no_job_claim_from_its_renewal(make_settings, rclient,
                                                                                    monkeypatch):
    """On a Redis Cluster a shared claim is another slot, whose node may be down or failing over: the
    renewal of the job claims this process holds (for every message it runs) must not fail with it, or
    their leases run out while their handlers run, and another delivery takes their keys over."""
    import itertools

    import redis

    from mesh.broker.idempotency import Idempotency, Lease
    from mesh.broker.shared_claims import SharedClaim

    settings = spread(make_settings, lease_s=60)
    shards = Shards.of(settings)
    home = settings.on_shard(shards.start)
    idem = Idempotency(home, rclient)
    rendered = {"shared_key": True}
    away = next(k for n in itertools.count() if idem.shared.where(k := f"renew-away-{n}", rendered) is not None)
    where = idem.shared.where(away, rendered)
    assert where is not None
    leases = []
    for key, envelope in ((f"renew-plain-{shards.start}", {}), (away, rendered)):
        claim_key = idem.keys.claim(key)
        verdict = idem._call("claim", claim_key, f"owner-{key}")
        assert verdict[0] == b"run"
        leases.append(Lease(key=key, claim_key=claim_key, owner=f"owner-{key}", token=int(verdict[1]),
                            envelope=envelope))
    taken = idem.shared.take(where, away, leases[1].owner)
    leases[1].across = SharedClaim(away, where, leases[1].owner, int(taken[1]))
    try:
        for lease in leases:
            idem._hold(lease)
        before = {lease.key: claims.read(rclient, lease.claim_key).expires_ms for lease in leases}
        start = claims.read(rclient, where.claim(away)).expires_ms

        def later() -> bool:
            seconds, micros = rclient.time()
            return seconds * 1000 + micros // 1000 > max(before.values()) - 60_000 + 2

        wait_for(later, timeout_s=5)

        def down(self: Any, claim: Any, client: Any = None) -> Any:
            raise redis.ConnectionError(f"the node of shard {claim.keys.shard} is down")

        monkeypatch.setattr(type(idem.shared), "renew", down)
        with contextlib.suppress(redis.RedisError):  # the renewer logs it and tries again
            idem.renew()
        after = {lease.key: claims.read(rclient, lease.claim_key).expires_ms for lease in leases}
        assert all(after[k] > before[k] for k in before), (before, after)  # every job claim renewed
        assert claims.read(rclient, where.claim(away)).expires_ms == start  # the shared one could not be
        assert not any(lease.lost for lease in leases)  # nor is any lease taken for lost
    finally:
        idem._stop.set()
        rclient.delete(*(lease.claim_key for lease in leases), where.claim(away))
