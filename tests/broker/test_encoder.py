"""The orjson encoder a mesh broker installs for its process: dramatiq's result backends still
store any JSON value, while a queue message that is not a JSON object is still poison."""

from __future__ import annotations

import uuid
from typing import Any

import dramatiq
import pytest
from conftest import push_raw, wait_for
from dramatiq import Worker
from dramatiq.message import Message
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from mesh.broker.keys import prefix
from mesh.broker.mesh_broker import build_broker
from mesh.dlq import DeadLetterStore

SCALARS: list[Any] = [42, "x", None, [1, 2], 1.5, True, {"a": [1, None]}]


@pytest.fixture
def backend(settings, rclient) -> RedisBackend:
    """A result backend created, as apps do, after the mesh broker (so on its global encoder)."""
    build_broker(settings).close()
    return RedisBackend(namespace=f"{prefix(settings.namespace)}:results", client=rclient,
                        use_namespace_prefix_keys=True)


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_a_result_backend_stores_and_reads_back_any_json_value_after_a_mesh_broker_was_built(
        backend: RedisBackend, value: Any) -> None:
    message = Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={})
    backend.store_result(message, value, ttl=60_000)
    assert backend.get_result(message) == value


@pytest.mark.slow
def test_an_actor_on_a_mesh_broker_returns_a_scalar_through_the_results_middleware(settings, backend) -> None:
    broker = build_broker(settings)
    broker.add_middleware(Results(backend=backend))
    actor = dramatiq.Actor(lambda n: n * 2, broker=broker, actor_name="double", queue_name="double", priority=0,
                           options={"store_results": True})
    worker = Worker(broker, queues={"double"}, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert actor.send(21).get_result(backend=backend, block=True, timeout=10_000) == 42
    finally:
        worker.stop(timeout=10_000)
        broker.close()


def test_a_queue_message_that_is_a_json_scalar_is_still_poison(settings, client, start_worker) -> None:
    garbage = [b"42", b'"text"', b"null", b"true", b"[1, 2]", b"1.5"]
    rids = [push_raw(client, "executor", data) for data in garbage]
    start_worker(settings, ("executor",))

    store = DeadLetterStore(client.redis, client.keys)
    wait_for(lambda: store.count() == len(garbage))
    for rid, data in zip(rids, garbage, strict=True):
        entry = store.get(rid)
        assert entry is not None and entry.failure_class == "invalid_input", data
        assert store.raw(rid) == data
    assert int(client.redis.hget(client.keys.stats, "poison")) == len(garbage)
    wait_for(lambda: client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0})


def test_the_encoder_still_refuses_pickle_for_results_too(backend: RedisBackend, rclient) -> None:
    import pickle

    message = Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={"x": str(uuid.uuid4())})
    rclient.lpush(backend.build_message_key(message), pickle.dumps({"result": 1}))
    with pytest.raises(dramatiq.DecodeError):
        backend.get_result(message)
