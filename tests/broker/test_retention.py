"""Retention: a job's record, trace, note and index entries go MESH_JOB_RETENTION_S (notes:
MESH_NOTE_RETENTION_S) after the job ends, so storage no longer grows with every job, while the
dedup window (claims) holds and running jobs are never removed."""

from __future__ import annotations

import time
from typing import Any

import redis
from conftest import wait_for

from mesh.broker import MeshClient, claims, trace
from mesh.broker.jobs import JobStore, fail_step
from mesh.broker.keys import Keys
from mesh.broker.observe import running_member
from mesh.broker.outbox import build_message, encode
from mesh.broker.retention import Retention, expired
from mesh.contracts import Envelope, JobRecord, State, StepRecord, dumps, transition
from mesh.dlq import DeadLetter, DeadLetterStore
from mesh.dlq.replay import Replayer
from tests.httpserver import RecordingServer

RETENTION_S = 2.0
SWEEP_S = 0.25
GOAL = "Find out how retries work, then write a note"


def counter(r: redis.Redis, key: str, field: str) -> int:
    return int(r.hget(key, field) or 0)


def census(r: redis.Redis, keys: Keys) -> dict[str, int]:
    """Every key of the namespace except the claims (the dedup window), with its MEMORY USAGE."""
    claims = keys.claim("").encode()
    return {k.decode(): int(r.memory_usage(k) or 0) for pattern in keys.patterns
            for k in r.scan_iter(match=pattern, count=1000) if not k.startswith(claims)}


def per_job_left(r: redis.Redis, keys: Keys) -> bool:
    """Whether anything of a job is left: a record, trace or note, an index member or a tombstone."""
    patterns = (keys.job("*"), keys.trace("*"), keys.note("*"))
    return (any(next(r.scan_iter(match=p, count=1000), None) for p in patterns)
            or any(r.zcard(k) for k in (keys.jobs, keys.running, keys.notes, keys.jobs_expired)))


def test_forty_jobs_leave_the_namespace_at_its_baseline_while_the_dedup_window_holds(
        make_settings, start_worker, rclient):
    settings = make_settings(job_retention_s=RETENTION_S, note_retention_s=RETENTION_S, sweep_interval_s=SWEEP_S)
    client = MeshClient(settings, client=rclient)
    keys = client.keys
    start_worker(settings)

    def executed() -> int:
        return counter(rclient, keys.outcomes, "executor:succeeded")

    # A first job creates the keys every deployment has (counters, histograms, heartbeats) ...
    client.submit(GOAL, key="warm-up")
    wait_for(lambda: executed() == 1, timeout_s=30)
    # ... and, once it has expired, what is left is the baseline.
    wait_for(lambda: not per_job_left(rclient, keys), timeout_s=30)
    baseline = census(rclient, keys)

    refs = [client.submit(GOAL, key=f"job-{i}") for i in range(40)]
    wait_for(lambda: executed() == 41, timeout_s=120)
    assert counter(rclient, keys.stats, "dead_lettered") == 0
    # The write that ended each job gave its record and trace a TTL (some may be gone already).
    ttls = [rclient.pttl(keys.job(refs[-1].id)), rclient.pttl(keys.trace(refs[-1].id))]
    assert all(0 < t <= RETENTION_S * 1000 or t == -2 for t in ttls), ttls

    wait_for(lambda: not per_job_left(rclient, keys), timeout_s=30)
    after = census(rclient, keys)
    # Queue wake-up lists come and go with traffic (each capped at 64 tokens), and the sweep's and the
    # timers' locks while one runs (each with a TTL of its own); nothing else differs.
    wake = [k for k in {*after, *baseline} if k.endswith((".wake", ".lock"))]
    assert {k for k in after if k not in wake} == {k for k in baseline if k not in wake}
    # Counters grow in value, not in number: well under one job's ~10 KB for all forty.
    assert sum(after.values()) <= sum(baseline.values()) + 4096, (sum(after.values()), sum(baseline.values()))
    assert counter(rclient, keys.stats, "swept_jobs") == 41
    assert counter(rclient, keys.stats, "swept_notes") == 41

    # The dedup window holds: every key of every job (plan, research, action) is still done ...
    claim_keys = list(rclient.scan_iter(match=keys.claim("job-*"), count=1000))
    assert len(claim_keys) == 40 * 3
    assert all(claims.read(rclient, c.decode()).state == "done" for c in claim_keys)
    # ... so a re-send of a done key is a duplicate, not a second run: the re-sent job (a run of the
    # built-in pipeline) takes each step's output from its done key, runs nothing, and ends.
    agents = ("planner", "researcher", "executor")
    duplicates = {a: counter(rclient, keys.outcomes, f"{a}:duplicate") for a in agents}
    again = client.submit(GOAL, key="job-7")
    assert again.id == refs[7].id
    wait_for(lambda: all(counter(rclient, keys.outcomes, f"{a}:duplicate") == duplicates[a] + 1 for a in agents),
             timeout_s=30)
    assert all(counter(rclient, keys.outcomes, f"{a}:succeeded") == 41 for a in agents)
    # The re-sent job's record expires like any ended job's.
    wait_for(lambda: not per_job_left(rclient, keys), timeout_s=30)
    assert counter(rclient, keys.stats, "swept_jobs") == 42


def test_a_running_job_is_never_swept_and_expires_only_after_it_ends(make_settings, start_worker, rclient):
    with RecordingServer(hold=True) as server:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=60, job_retention_s=1,
                                 sweep_interval_s=0.1)
        client = MeshClient(settings, client=rclient)
        keys = client.keys
        start_worker(settings, ("executor",), threads=1)
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url(), "json": {}}})
        wait_for(lambda: len(server.requests) == 1, timeout_s=30)  # running, held in its call
        member = running_member(ref.id, "executor")
        created = client.status(ref.id).created_at

        # Sweeps go on well past the job's creation plus its retention ...
        sweeps = counter(rclient, keys.stats, "sweeps")
        wait_for(lambda: (counter(rclient, keys.stats, "sweeps") >= sweeps + 3
                          and time.time() > created + 2 * settings.job_retention_s), timeout_s=30)
        # ... and remove nothing of it: no TTL, still indexed as a job and as a running step.
        assert client.status(ref.id).state is State.RUNNING
        assert rclient.pttl(keys.job(ref.id)) == -1 and rclient.pttl(keys.trace(ref.id)) == -1
        assert rclient.zscore(keys.jobs, ref.id) is not None and rclient.zscore(keys.running, member) is not None
        assert counter(rclient, keys.stats, "swept_jobs") == 0

        server.release()
        wait_for(lambda: rclient.get(keys.job(ref.id)) is None, timeout_s=30)
    wait_for(lambda: rclient.zscore(keys.jobs, ref.id) is None, timeout_s=10)
    assert not rclient.exists(keys.trace(ref.id))
    assert rclient.zscore(keys.running, member) is None
    assert expired(rclient, keys, ref.id)
    assert counter(rclient, keys.stats, "swept_jobs") == 1


def record(job_id: str, key: str, state: State, *, at: float) -> JobRecord:
    step = StepRecord(step_id="s", agent="executor", key=key, created_at=at, updated_at=at)
    job = JobRecord(job_id=job_id, key=key, trace_id="0" * 32, steps={"s": step}, created_at=at, updated_at=at)
    if state is not State.QUEUED:
        job = transition(transition(job, State.RUNNING, now=at), state, now=at, error="x")
        job = job.with_step(transition(transition(step, State.RUNNING, now=at), state, now=at, error="x"))
    return job


def write(r: redis.Redis, keys: Keys, job: JobRecord) -> None:
    """A record as written before retention existed: no TTL, indexed, with a trace."""
    r.set(keys.job(job.job_id), dumps(job))
    r.zadd(keys.jobs, {job.job_id: job.created_at})
    trace.emit(r, keys, trace.event("enqueued", {"job_id": job.job_id}))


def test_the_sweep_expires_records_from_before_retention_but_no_active_job(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    long_ago = time.time() - 30 * 24 * 3600
    ended = record("job-ended", "k-ended", State.DEAD_LETTERED, at=long_ago)
    waiting = record("job-waiting", "k-waiting", State.QUEUED, at=long_ago)
    running = record("job-running", "k-running", State.RUNNING, at=long_ago)
    resent = record("job-resent", "k-resent", State.QUEUED, at=long_ago)
    for job in (ended, waiting, running, resent):
        write(rclient, keys, job)
    rclient.hset(keys.claim("k-resent"), mapping={"state": "done", "token": 1})  # it ran, long ago
    rclient.hset(keys.claim("k-waiting"), mapping={"state": "free", "token": 1})  # it failed, awaits a retry
    rclient.zadd(keys.running, {running_member("job-running", "s"): long_ago,
                                running_member("job-gone", "s"): long_ago})
    rclient.set(keys.note("n-old"), b"{}")
    rclient.zadd(keys.notes, {"n-old": long_ago})
    retention = Retention(rclient, settings)

    def now() -> float:
        seconds, micros = rclient.time()
        return float(seconds + micros / 1e6)

    # The first sweep removes the running entry of a job whose record is gone, and gives what ended
    # (or only looks queued because it was re-sent after it ran) a TTL that has run out already.
    assert retention.sweep(now()).running == 1
    assert rclient.zscore(keys.running, running_member("job-running", "s")) is not None
    wait_for(lambda: not rclient.exists(keys.job("job-ended"), keys.job("job-resent"), keys.note("n-old")))
    assert not rclient.exists(keys.trace("job-ended"), keys.trace("job-resent"))
    swept = retention.sweep(now())
    assert (swept.jobs, swept.notes) == (2, 1)
    assert [m.decode() for m in rclient.zrange(keys.jobs, 0, -1)] == sorted(["job-running", "job-waiting"])
    for job_id in ("job-running", "job-waiting"):
        assert rclient.pttl(keys.job(job_id)) == -1 and rclient.pttl(keys.trace(job_id)) == -1
    assert expired(rclient, keys, "job-ended") and not expired(rclient, keys, "job-never")
    assert int(rclient.hget(keys.stats, "swept_jobs") or 0) == 2


def test_a_replayed_job_active_again_loses_its_ttl_and_ending_again_restores_it(settings, rclient):
    """The job store's TTL follows the state: set when a job ends, kept by later writes to the ended
    job, removed when the job is active again (as a DLQ replay makes it)."""
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = record("job-1", "k-1", State.RUNNING, at=time.time())
    pipe = rclient.pipeline(transaction=True)
    jobs.stage_create(pipe, job)
    pipe.execute()
    trace.emit(rclient, keys, trace.event("picked_up", {"job_id": "job-1"}))

    def moved(state: State) -> Any:
        return lambda r: (transition(r, state, error="x"), [])

    jobs.update("job-1", moved(State.DEAD_LETTERED))
    assert 0 < rclient.pttl(keys.job("job-1")) <= 3600_000
    assert 0 < rclient.pttl(keys.trace("job-1")) <= 3600_000
    rclient.pexpire(keys.job("job-1"), 500_000)
    jobs.update("job-1", lambda r: (r.model_copy(update={"goal": "later write"}), []))
    assert 0 < rclient.pttl(keys.job("job-1")) <= 500_000  # the clock was not restarted
    jobs.update("job-1", moved(State.QUEUED))
    assert rclient.pttl(keys.job("job-1")) == -1 and rclient.pttl(keys.trace("job-1")) == -1


def test_a_dlq_replay_makes_an_ended_job_active_again_without_a_ttl(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    env = Envelope(key="k-r", job_id="job-r", step_id="s", agent="executor", trace_id="1" * 32,
                   deadline=time.time() + 600, payload={"tool": "note", "args": {"title": "t"}})
    job = record("job-r", "k-r", State.RUNNING, at=time.time())
    pipe = rclient.pipeline(transaction=True)
    jobs.stage_create(pipe, job)
    pipe.execute()
    jobs.update("job-r", fail_step("s", State.DEAD_LETTERED, "400", "permanent", token=0),
                events=[trace.event("dead_lettered", env.model_dump(mode="json"))])
    assert client_state(rclient, keys, "job-r") is State.DEAD_LETTERED
    assert rclient.pttl(keys.job("job-r")) > 0 and rclient.pttl(keys.trace("job-r")) > 0
    store = DeadLetterStore(rclient, keys)
    assert store.put(DeadLetter(entry_id="e-1", queue="executor", agent="executor", failure_class="permanent",
                                error="400", worker="w", envelope=env.model_dump(mode="json"), key=env.key,
                                job_id=env.job_id), encode(build_message(env)))

    replayer = Replayer(store, settings)
    assert replayer.replay(replayer.entries(ids=["e-1"])).replayed == ["e-1"]
    assert client_state(rclient, keys, "job-r") is State.QUEUED
    assert rclient.pttl(keys.job("job-r")) == -1 and rclient.pttl(keys.trace("job-r")) == -1


def client_state(r: redis.Redis, keys: Keys, job_id: str) -> State:
    job = JobStore(r, keys).get(job_id)
    assert job is not None
    return job.state
