"""Size and depth limits over real Redis: the client refuses what is too big before anything is
written, and a worker dead-letters what was pushed past the client, keeping the rest of its batch."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import push_raw, wait_for

from mesh.broker import MeshClient
from mesh.broker.consumer import OVERSIZED_PREFIX_BYTES
from mesh.broker.outbox import build_message, encode
from mesh.contracts import Envelope, LimitExceeded, State
from mesh.dlq import DeadLetterStore

EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


def nothing_written(client: MeshClient) -> bool:
    """No key of the test's namespace exists: no job record, no message, no trace."""
    return not list(client.redis.scan_iter(match=f"{client.keys.prefix}:*"))


def note(title: str, body: str = "") -> dict:
    return {"tool": "note", "args": {"title": title, "body": body}}


def post(body: dict) -> dict:
    return {"tool": "http_post", "args": {"url": "http://127.0.0.1:9/x", "json": body}}


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"k": [value]} if _ % 2 else [value]
    return value


def raw_message(client: MeshClient, payload: dict, agent: str = "executor") -> tuple[str, bytes]:
    """An encoded message for ``agent`` with a job record, as the client would write it, but not sent."""
    ref = client.send(agent, note("probe"))  # a real job record to attach to
    client.redis.delete(client.keys.queue(agent), client.keys.messages(agent))
    env = Envelope(key=ref.key, job_id=ref.id, step_id=agent, agent=agent, trace_id=ref.trace_id,
                   deadline=9e9, payload=payload)
    return ref.id, encode(build_message(env))


def test_client_send_refuses_a_message_over_the_size_limit_and_writes_nothing(make_settings, rclient):
    small = MeshClient(make_settings(max_message_bytes=2048), client=rclient)
    with pytest.raises(LimitExceeded) as caught:
        small.send("executor", note("big", "x" * 4000))
    assert "MESH_MAX_MESSAGE_BYTES" in str(caught.value) and "2048" in str(caught.value)
    assert caught.value.context["limit"] == 2048 and caught.value.context["size"] > 4000
    assert nothing_written(small)


def test_client_send_many_refuses_the_whole_batch_when_one_item_is_too_big(make_settings, rclient):
    small = MeshClient(make_settings(max_message_bytes=2048), client=rclient)
    items = [(note(f"n{i}"), None) for i in range(5)] + [(note("big", "x" * 4000), None)]
    with pytest.raises(LimitExceeded) as caught:
        small.send_many("executor", items, chunk=2)  # the big one is in the last chunk
    assert caught.value.context["index"] == 5 and str(caught.value).startswith("item 5:")
    assert nothing_written(small)


def test_client_refuses_a_payload_nested_deeper_than_the_limit(make_settings, rclient):
    client = MeshClient(make_settings(max_json_depth=16), client=rclient)
    with pytest.raises(LimitExceeded) as caught:
        client.send("executor", post({"extra": nested(20)}))
    assert "MESH_MAX_JSON_DEPTH" in str(caught.value)
    assert nothing_written(client)


def test_cli_submit_and_send_refuse_an_oversized_message_with_a_clear_error(cli, client):
    result = cli("send", "executor", "--payload", json.dumps(note("big", "x" * 3000)),
                 MESH_MAX_MESSAGE_BYTES="2048")
    assert result.returncode != 0
    assert "MESH_MAX_MESSAGE_BYTES" in result.stderr and "nothing was sent" in result.stderr
    result = cli("submit", "y" * 3000, MESH_MAX_MESSAGE_BYTES="2048")
    assert result.returncode != 0 and "MESH_MAX_MESSAGE_BYTES" in result.stderr
    assert nothing_written(client)


def test_worker_dead_letters_an_oversized_message_with_a_prefix_and_hash_and_runs_the_rest(
        make_settings, rclient, start_worker):
    settings = make_settings(max_message_bytes=8192)
    client = MeshClient(settings, client=rclient)
    job_id, big = raw_message(client, note("big", "x" * 20_000))
    before = client.send("executor", note("before"))
    rid = push_raw(client, "executor", big)
    after = client.send("executor", note("after"))

    start_worker(settings, ("executor",))

    assert client.wait(before.id, timeout_s=20).state is State.SUCCEEDED
    assert client.wait(after.id, timeout_s=20).state is State.SUCCEEDED
    store = DeadLetterStore(client.redis, client.keys)
    entry = wait_for(lambda: store.get(rid))
    assert entry.failure_class == "invalid_input"
    assert "MESH_MAX_MESSAGE_BYTES" in entry.error and str(len(big)) in entry.error
    assert entry.raw_bytes == len(big) and entry.raw_sha256 == hashlib.sha256(big).hexdigest()
    assert store.raw(rid) == big[:OVERSIZED_PREFIX_BYTES]
    wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY)
    assert client.status(job_id).state is not State.SUCCEEDED


@pytest.mark.parametrize("depth", [40, 300, 2000])
def test_worker_dead_letters_a_message_nested_deeper_than_the_limit_as_invalid_input(
        make_settings, rclient, start_worker, depth):
    # 300: decodes, but orjson cannot encode it again (records, DLQ entries); 2000: orjson cannot decode it.
    settings = make_settings(max_json_depth=32)
    client = MeshClient(settings, client=rclient)
    _, deep = raw_message(client, post({"extra": "@@"}))
    deep = deep.replace(b'"@@"', b"[" * depth + b"1" + b"]" * depth)
    rid = push_raw(client, "executor", deep)
    after = client.send("executor", note("after"))

    start_worker(settings, ("executor",))

    assert client.wait(after.id, timeout_s=20).state is State.SUCCEEDED
    store = DeadLetterStore(client.redis, client.keys)
    entry = wait_for(lambda: store.get(rid))
    assert entry.failure_class == "invalid_input"
    assert ("MESH_MAX_JSON_DEPTH" if depth < 1024 else "depth limit exceeded") in entry.error
    assert store.raw(rid) == deep
    wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY)
