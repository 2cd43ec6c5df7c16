"""`mesh verify` and `mesh settle` (and the console's buttons, through the same functions) find the
dead letter of a step whose effect is unknown from the job's index in the DLQ: the Redis commands of
the lookup are the same with 500 dead letters as with 5,000, and an entry an older mesh wrote (not
in that index) is still found, with as few."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from mesh.broker import MeshClient, MeshSettings
from mesh.broker.keys import Keys
from mesh.broker.router import dead_letter_with_step
from mesh.broker.settle import decide
from mesh.broker.shards import job_id_for
from mesh.contracts import FailureClass, JobRecord
from mesh.dlq import DeadLetterStore
from mesh.dlq.entry import DeadLetter
from mesh.ops.effects_cli import _dead_letter
from mesh.ops.web.bench import Counting
from tests.broker.test_settlement import consume, fetch, note  # noqa: F401  (a fixture)
from tests.conftest import close_client, redis_client
from tests.dlq.bulk import generate


def unknown_step(c: MeshClient, store: DeadLetterStore, key: str, *, indexed: bool = True) -> tuple[JobRecord, str]:
    """A sent job (no worker needed) and the dead letter its step left, as a worker writes it (in its
    job's shard); not ``indexed``: as a worker of an older mesh wrote it (no entry in the job's index)."""
    ref = c.send("executor", {"tool": "http_post", "args": {"url": "http://127.0.0.1:1/hook", "json": {}}}, key=key)
    record = c.status(ref.id)
    [(step_id, step)] = record.steps.items()
    entry = DeadLetter(entry_id=f"entry-{key}", queue=step.agent, agent=step.agent, failure_class="unknown_effect",
                       error="the effect is unknown", key=step.key, job_id=record.job_id, worker="host:1:abcdef12")
    store = DeadLetterStore(store.client, c.keys_of(record.job_id))  # its job's shard keeps it
    assert store.put(entry, b"{}")
    if not indexed:
        store.client.zrem(store.keys.dlq_by_job(record.job_id), entry.entry_id)
    return record, step_id


def dlqs_of(c: MeshClient, *keys: str) -> list[Keys]:
    """The shards of the jobs sent with ``keys`` (one each, in shard order): the DLQs their lookups read."""
    shards = {k.shard: k for k in (c.keys_of(job_id_for(key)) for key in keys)}
    return [shards[n] for n in sorted(shards)]


def lookup(c: MeshClient, record: JobRecord, step_id: str) -> tuple[int, list[Any]]:
    before = Counting.commands
    found = _dead_letter(c, record, step_id)
    return Counting.commands - before, found


def test_an_unknown_steps_dead_letter_is_found_with_the_same_commands_whatever_the_size_of_the_dlq(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis) -> None:
    settings = make_settings()
    counted = redis_client(settings.redis_url, connection_class=Counting)  # a cluster's: each node's
    try:
        c = MeshClient(settings, client=counted)
        store = DeadLetterStore(rclient, c.keys)
        dlqs = dlqs_of(c, "effect-7", "effect-8")  # where the lookups look: the jobs' shards (MESH_SHARDS)
        for keys in dlqs:  # older dead letters of every agent, executor's too
            generate(rclient, keys, 500, time.time() - 7_200)
        record, step = unknown_step(c, store, "effect-7")
        legacy, legacy_step = unknown_step(c, store, "effect-8", indexed=False)
        lookup(c, legacy, legacy_step)  # the walk's script loaded where the Redis lacks it (each primary of a cluster)
        small = lookup(c, record, step), lookup(c, legacy, legacy_step)
        for keys in dlqs:
            generate(rclient, keys, 5_000, time.time() - 7_200)
        large = lookup(c, record, step), lookup(c, legacy, legacy_step)
    finally:
        close_client(counted)
    for (commands, found), key in zip(large, ("effect-7", "effect-8"), strict=True):
        assert [s.entry.entry_id for s in found] == [f"entry-{key}"]
        assert commands > 0
    assert [n for n, _ in large] == [n for n, _ in small], (small, large)


def test_a_worker_dead_letters_a_step_into_its_jobs_index_and_removing_the_entry_takes_it_out(
        client: MeshClient, consume: Any) -> None:  # noqa: F811
    """The worker's own path (settle.lua's ``dead``), as `mesh verify` then finds the entry; a purge,
    replay or expiry (DeadLetterStore.remove) leaves no id behind in the index."""
    ref = client.send("executor", note("dead-lettered"))
    broker, consumer = consume(job=ref.id)  # its shard's consumer (MESH_SHARDS)
    message = fetch(consumer)
    decide(message, dead_letter_with_step(broker, message, FailureClass.PERMANENT, "refused", None))
    consumer.ack(message)
    record = client.status(ref.id)
    store = DeadLetterStore(client.redis, client.keys_of(ref.id))  # its job's shard keeps its dead letters
    [found] = _dead_letter(client, record, "executor")
    assert [s.entry.entry_id for s in store.of_job(ref.id)] == [found.entry.entry_id] == [message.message_id]
    assert store.indexed_since() is not None
    store.remove([found.entry])
    assert client.redis.exists(store.keys.dlq_by_job(ref.id)) == 0 and _dead_letter(client, record, "executor") == []
