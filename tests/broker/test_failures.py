"""Failure paths over real Redis, a real worker and real loopback HTTP: poison, bad envelopes,
refused and failing tools, deadlines, cycles and unknown actors all end in the mesh DLQ."""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import pytest
from conftest import push_raw, wait_for
from dramatiq.message import Message

from mesh.broker.outbox import encode, stage
from mesh.contracts import State, dumps, loads
from mesh.dlq import DeadLetterStore
from tests.httpserver import RecordingServer

EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


def rewrite_envelopes(client, queue: str, change) -> None:
    """Edit the envelope of every message waiting on ``queue`` in any shard (before any worker runs)."""
    for keys in client.shards.keys:
        for rid, data in client.redis.hgetall(keys.messages(queue)).items():
            message = loads(data)
            message["args"] = [change(dict(message["args"][0]))]
            client.redis.hset(keys.messages(queue), rid, dumps(message))


def dlq_of(client, job_id: str | None = None) -> DeadLetterStore:
    """The DLQ of job ``job_id``'s shard, or of the first shard (where ``push_raw`` queues) without one."""
    return DeadLetterStore(client.redis, client.keys_of(job_id) if job_id else client.shards.home)


def http_call(url: str) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"n": 1}}}


def settled(client, queue: str = "executor") -> bool:
    return client.queues([queue])[queue] == EMPTY


def entries(store: DeadLetterStore) -> list:
    """Every DLQ entry, oldest first (read by id, through the store's stable ``get``)."""
    return [store.get(i.decode()) for i in store.client.zrange(store.keys.dlq, 0, -1)]


def only_entry(store: DeadLetterStore):
    found = wait_for(lambda: entries(store))
    assert len(found) == 1
    return found[0]


def test_poison_in_a_prefetched_batch_is_dead_lettered_byte_exact_and_valid_jobs_succeed(
        client, settings, start_worker):
    garbage = [b"\xff not json", b'{"hello": "world"}', b"[1, 2, 3]",
               # decodes into a dramatiq Message, but with options null: must not crash the consumer
               b'{"queue_name": "executor", "actor_name": "executor", "args": [], "kwargs": {}, "options": null}']
    refs, rids = [], []
    for i, data in enumerate(garbage):
        refs.append(client.send("executor", {"tool": "note", "args": {"title": f"v{i}"}}))
        rids.append(push_raw(client, "executor", data))
    refs.append(client.send("executor", {"tool": "note", "args": {"title": "last"}}))

    start_worker(settings, ("executor",))

    assert all(client.wait(r.id, timeout_s=20).state is State.SUCCEEDED for r in refs)
    store = dlq_of(client)  # push_raw's shard
    wait_for(lambda: store.count() == len(garbage))
    for rid, data in zip(rids, garbage, strict=True):
        entry = store.get(rid)
        assert entry is not None and entry.failure_class == "invalid_input"
        assert store.raw(rid) == data
    wait_for(lambda: settled(client))
    for keys in client.shards.keys:
        assert client.redis.llen(f"{keys.queue('executor')}.XQ") == 0
        assert not list(client.redis.scan_iter(match=keys.acks_pattern))
    assert int(client.redis.hget(client.shards.home.stats, "poison")) == len(garbage)


def test_envelope_without_trace_id_is_dead_lettered_as_invalid_input_and_the_worker_goes_on(
        client, settings, start_worker):
    bad = client.send("executor", {"tool": "note", "args": {"title": "bad"}})
    rewrite_envelopes(client, "executor", lambda env: {k: v for k, v in env.items() if k != "trace_id"})
    good = client.send("executor", {"tool": "note", "args": {"title": "good"}})
    start_worker(settings, ("executor",))

    assert client.wait(good.id, timeout_s=20).state is State.SUCCEEDED
    record = client.wait(bad.id, timeout_s=20)
    assert record.state is State.DEAD_LETTERED
    entry = only_entry(dlq_of(client, bad.id))
    assert entry.failure_class == "invalid_input" and entry.job_id == bad.id
    assert "invalid envelope" in entry.error
    wait_for(lambda: settled(client))


def test_http_post_to_a_host_not_allowed_is_refused_and_dead_lettered_with_full_context(
        client, settings, start_worker):
    with RecordingServer() as server:
        ref = client.send("executor", http_call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)
        assert server.requests == []

    step = record.steps["executor"]
    assert record.state is State.DEAD_LETTERED and step.state is State.DEAD_LETTERED
    assert "refused" in step.error
    entry = only_entry(dlq_of(client, ref.id))
    assert entry.failure_class == "permanent"
    assert (entry.key, entry.job_id, entry.trace_id) == (ref.key, ref.id, ref.trace_id)
    assert entry.envelope["key"] == ref.key and entry.envelope["payload"] == http_call(server.url())
    assert [(a.attempt, a.outcome) for a in entry.attempts] == [(1, "dead_lettered")]
    assert "ToolRefused" in entry.traceback
    assert entry.worker and entry.host == socket.gethostname()


def test_server_failing_500_is_retried_with_one_idempotency_key_then_dead_lettered_as_brownout(
        client, make_settings, start_worker):
    with RecordingServer(lambda n, req: (500, {"error": "down"})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=2)
        ref = client.send("executor", http_call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    assert record.state is State.DEAD_LETTERED and record.failure_class == "brownout"
    assert len(server.requests) == 3
    assert {r["headers"]["idempotency-key"] for r in server.requests} == {ref.key}
    assert [r["headers"]["x-mesh-fencing-token"] for r in server.requests] == ["1", "2", "3"]
    entry = only_entry(dlq_of(client, ref.id))
    assert entry.failure_class == "brownout"
    assert [(a.attempt, a.outcome) for a in entry.attempts] == [
        (1, "retried"), (2, "retried"), (3, "dead_lettered")]
    wait_for(lambda: settled(client))


def test_server_failing_twice_then_succeeding_gives_success_on_attempt_3_with_error_scrubbed(
        client, make_settings, start_worker):
    with RecordingServer(lambda n, req: (500, {}) if n <= 2 else (200, {"ok": True})) as server:
        settings = make_settings(http_allow=server.host_port, max_retries=3)
        ref = client.send("executor", http_call(server.url()))
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)

    step = record.steps["executor"]
    assert record.state is State.SUCCEEDED and step.state is State.SUCCEEDED
    assert step.attempt == 3 and step.picked_up == 3
    assert step.error is None and step.failure_class is None and record.error is None
    assert len(server.requests) == 3
    assert dlq_of(client, ref.id).count() == 0


@pytest.mark.parametrize(("rewrite", "failure_class"), [
    (lambda env: {**env, "deadline": time.time() - 1}, "deadline"),
    (lambda env: {**env, "hops": ["planner", "executor"]}, "cycle"),
    (lambda env: {**env, "hops": [f"agent{i}" for i in range(8)]}, "cycle"),
], ids=["deadline-passed", "hops-contain-the-agent", "hop-limit-reached"])
def test_message_past_its_deadline_or_re_entering_its_agent_is_dead_lettered_without_running(
        client, make_settings, start_worker, rewrite, failure_class):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        ref = client.send("executor", http_call(server.url()))
        rewrite_envelopes(client, "executor", rewrite)
        start_worker(settings, ("executor",))
        record = client.wait(ref.id, timeout_s=20)
        assert server.requests == []

    assert record.state is State.DEAD_LETTERED and record.failure_class == failure_class
    assert only_entry(dlq_of(client, ref.id)).failure_class == failure_class


def test_message_for_an_unknown_actor_lands_in_the_mesh_dlq_not_in_dramatiqs_xq(
        client, settings, start_worker):
    rid = str(uuid.uuid4())
    message = Message(queue_name="executor", actor_name="nope", args=({"x": 1},), kwargs={},
                      options={"redis_message_id": rid})
    keys = client.shards.home  # a shard workers consume (with several, MESH_SHARDS, not shard 0)
    pipe = client.redis.pipeline(transaction=True)
    stage(pipe, keys, message)
    pipe.execute()
    after = client.send("executor", {"tool": "note", "args": {"title": "after"}})
    start_worker(settings, ("executor",))

    assert client.wait(after.id, timeout_s=20).state is State.SUCCEEDED
    store = DeadLetterStore(client.redis, keys)
    entry = only_entry(store)
    assert entry.agent == "nope" and entry.entry_id == message.message_id
    # The invented name is kept in the entry but makes no index key (those would grow without bound).
    assert not client.redis.exists(keys.dlq_by_agent("nope"))
    assert client.redis.zscore(keys.dlq_by_agent("-"), entry.entry_id) is not None
    assert entry.failure_class == "permanent"
    assert store.raw(entry.entry_id) == encode(message)
    wait_for(lambda: settled(client))
    assert client.redis.llen(f"{keys.queue('executor')}.XQ") == 0
    assert client.redis.hlen(f"{keys.queue('executor')}.XQ.msgs") == 0


def test_message_without_exactly_one_envelope_argument_is_dead_lettered_as_invalid_input(
        client, settings, start_worker):
    shapes = [((), {}), ((), {"envelope": {}}), (({}, {}), {})]
    for args, kwargs in shapes:
        message = Message(queue_name="executor", actor_name="executor", args=args, kwargs=kwargs,
                          options={})
        push_raw(client, "executor", encode(message))
    start_worker(settings, ("executor",))

    store = dlq_of(client)  # push_raw's shard
    found = wait_for(lambda: len(entries(store)) == len(shapes) and entries(store))
    assert {e.failure_class for e in found} == {"invalid_input"}
    assert all("exactly one envelope" in e.error for e in found)
    wait_for(lambda: settled(client))


def test_settling_a_retry_twice_pushes_the_copy_once(client, settings):
    from mesh.broker.mesh_broker import MeshBroker

    keys = client.shards.home  # push_raw's shard
    broker = MeshBroker(settings.on_shard(keys.shard), client=client.redis)
    rid = push_raw(client, "executor", b"{}")
    assert broker.settle("fetch", "executor", 1)[0].decode() == rid
    for _ in range(2):  # as a client retry after a lost reply would
        broker.settle("retry", "executor", rid, "copy-1", b"copy", "retried", "unknown:retry")
    assert client.redis.lrange(keys.delayed("executor"), 0, -1) == [b"copy-1"]
    assert client.redis.hlen(keys.messages("executor")) == 0


def test_a_retry_settled_again_after_its_copy_moved_on_pushes_nothing_more(client, settings):
    from mesh.broker.mesh_broker import MeshBroker

    keys = client.shards.home  # push_raw's shard
    broker = MeshBroker(settings.on_shard(keys.shard), client=client.redis)
    rid = push_raw(client, "executor", b"{}")
    broker.settle("fetch", "executor", 1)
    broker.settle("retry", "executor", rid, "copy-1", b"copy", "retried", "unknown:retry")
    # The delay queue's consumer moves the copy on before a re-sent ack arrives.
    client.redis.delete(keys.delayed("executor"), keys.delayed_messages("executor"))
    broker.settle("retry", "executor", rid, "copy-1", b"copy", "retried", "unknown:retry")
    assert client.redis.llen(keys.delayed("executor")) == 0
    assert int(client.redis.hget(keys.stats, "retried")) == 1


def test_a_worker_back_from_a_redis_outage_does_not_reap_the_others_until_they_could_beat_again(
        client, settings):
    from mesh.broker.mesh_broker import MeshBroker

    # The script reads the Redis server's clock, so the outage is a real (short) silence.
    timeout = 500
    keys = client.shards.home  # push_raw's shard
    script = MeshBroker(settings.on_shard(keys.shard), client=client.redis).scripts["settle"]

    def settle(command: str, worker: str, *args: Any) -> Any:
        return script(keys=[keys.prefix],
                      args=[command, 0, "executor", worker, timeout, *args])

    def server_ms() -> int:
        secs, micros = client.redis.time()
        return secs * 1000 + micros // 1000

    rid = push_raw(client, "executor", b"{}")
    settle("heartbeat", "survivor")
    assert settle("fetch", "holder", 1)[0].decode() == rid
    t0 = server_ms()
    # Redis was unreachable longer than the timeout; the first worker back must not take the
    # holder's message.
    wait_for(lambda: server_ms() > t0 + timeout + 50, timeout_s=5)
    settle("fetch", "survivor", 1)
    back = server_ms()
    assert client.redis.llen(keys.queue("executor")) == 0
    assert int(client.redis.hget(keys.stats, "recovered") or 0) == 0
    # The survivor beats on; the holder never does: one more timeout later it is dead, and its
    # message goes back.
    wait_for(lambda: settle("heartbeat", "survivor") and server_ms() > back + timeout, timeout_s=5)
    assert settle("fetch", "survivor", 1)[0].decode() == rid
    assert int(client.redis.hget(keys.stats, "recovered")) == 1


def test_two_messages_a_producer_gave_one_id_both_land_in_the_dlq(client, settings, start_worker):
    """The DLQ keys entries by message id; a second dead letter under a taken id keeps an id of its
    own instead of being dropped with its message."""
    raws = []
    for shape in ((), ({}, {})):
        message = Message(queue_name="executor", actor_name="executor", args=shape, kwargs={}, options={},
                          message_id="shared-id")
        raws.append(encode(message))
        push_raw(client, "executor", raws[-1])
    start_worker(settings, ("executor",))

    store = dlq_of(client)  # push_raw's shard
    found = wait_for(lambda: len(entries(store)) == 2 and entries(store))
    assert sorted(store.raw(e.entry_id) for e in found) == sorted(raws)
    assert {e.entry_id.split(".")[0] for e in found} == {"shared-id"}
    assert int(client.redis.hget(client.shards.home.stats, "poison") or 0) == 2  # both counted, once each
    wait_for(lambda: settled(client))


def test_a_fetch_asking_for_more_than_a_script_can_unpack_takes_a_bounded_batch_and_loses_nothing(client, settings):
    """Redis's Lua unpacks at most ~8,000 values: a fetch for more (a huge MESH_PREFETCH) once popped
    them all, failed on the unpack, and left every popped id in no queue and no worker's hand."""
    from mesh.broker.mesh_broker import MeshBroker

    broker = MeshBroker(settings, client=client.redis)
    keys, r = client.keys, client.redis
    pipe = r.pipeline()
    for i in range(9_000):
        pipe.hset(keys.messages("executor"), f"m{i}", b"{}")
        pipe.rpush(keys.queue("executor"), f"m{i}")
    pipe.execute()
    got = broker.settle("fetch", "executor", 9_000)
    held = r.scard(f"{keys.prefix}:__acks__.{broker.broker_id}.executor")
    assert 0 < len(got) // 2 == held < 9_000
    assert r.llen(keys.queue("executor")) + held == 9_000  # every id is queued or in hand
