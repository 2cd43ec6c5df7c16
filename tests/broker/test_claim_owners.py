"""Claims hold whatever ids and keys producers choose: a '|' in a message id or a Redis message id
(the claim string's separator) or an escaped quote in a key (which the fetch cannot read in the raw
bytes, so the message claims for itself) still runs once, records its success and stores ``done``."""

from __future__ import annotations

from conftest import stat, wait_for

from mesh.broker import MeshClient, claims
from mesh.broker.keys import Keys
from mesh.contracts import State, dumps, loads

NOTE = {"tool": "note", "args": {"title": "owners"}}


def _rename(client: MeshClient, keys: Keys, queue: str, rid: str, new_rid: str, message_id: str) -> None:
    """Give the message ``rid`` queued in the shard of ``keys`` the Redis id ``new_rid`` and the message
    id ``message_id``."""
    r = client.redis
    data = loads(r.hget(keys.messages(queue), rid))
    data["message_id"] = message_id
    data["options"]["redis_message_id"] = new_rid
    pipe = r.pipeline()
    pipe.hdel(keys.messages(queue), rid)
    pipe.lrem(keys.queue(queue), 1, rid)
    pipe.hset(keys.messages(queue), new_rid, dumps(data))
    pipe.rpush(keys.queue(queue), new_rid)
    pipe.execute()


def test_ids_with_the_claim_separator_and_keys_with_escapes_run_once_and_are_stored_done(
        client: MeshClient, settings, start_worker) -> None:
    refs = []
    for i, key in enumerate(["plain-key", 'quoted"key', "bar|key"]):
        ref = client.send("executor", {**NOTE, "args": {"title": f"owners {i}"}}, key=key)
        keys = client.keys_of(ref.id)  # the job's shard
        [rid] = [x.decode() for x in client.redis.lrange(keys.queue("executor"), -1, -1)]
        _rename(client, keys, "executor", rid, f"rid|{i}", f"mid|{i}")
        refs.append(ref)
    start_worker(settings, ("executor",))
    for ref in refs:
        record = wait_for(lambda r=ref: (rec := client.status(r.id)).state in (State.SUCCEEDED, State.DEAD_LETTERED)
                          and rec, timeout_s=30)
        assert record.state is State.SUCCEEDED, record.error
        assert record.steps["executor"].picked_up == 1
        # the key is marked done by the message's ack, a write after the record's success
        claim_key = client.keys_of(ref.id).claim(ref.key)
        wait_for(lambda k=claim_key: claims.read(client.redis, k).state == "done", timeout_s=10)
    assert stat(client.redis, settings, "superseded") == 0
