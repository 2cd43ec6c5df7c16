"""Any bytes pushed into a queue end as a DLQ entry or a processed message: a real worker serving
the built-in agents gets Hypothesis-made batches of random bytes, JSON of the wrong shape, and
dramatiq messages whose envelope, options or own fields are hostile, mixed with valid messages.
After each batch every queue is empty, every hostile message is in the DLQ (found by its Redis id
or its message id), every valid job succeeded, and the worker is alive and runs one more job."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import pytest
from conftest import push_raw, wait_for
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mesh.contracts import State, dumps, loads
from mesh.dlq import DeadLetterStore, Filter
from tests.fuzz.strategies import SCALE, hostile_messages, raw_bytes

QUEUES = ("planner", "researcher", "executor")
EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}

item = st.one_of(
    st.tuples(st.sampled_from(QUEUES), raw_bytes),
    st.sampled_from(QUEUES).flatmap(lambda q: st.tuples(st.just(q), hostile_messages(q).map(dumps))),
    st.just(("valid", b"")),
)


def unaccounted(store: DeadLetterStore, pushed: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Hostile messages not in the DLQ: each must have an entry keeping its bytes exactly (filed
    under its Redis id when poison, else under its message id, which dramatiq makes up when absent)."""
    kept = Counter(s.raw for batch in store.iter(Filter()) for s in batch)
    missing = []
    for rid, data in pushed:
        if kept[data]:
            kept[data] -= 1
        else:
            missing.append((rid, data))
    return missing


def alive(worker: Any) -> bool:
    threads = [*worker.consumers.values(), *worker.workers]
    return bool(threads) and all(t.is_alive() for t in threads)


def test_any_batch_of_hostile_messages_ends_in_the_dlq_and_the_worker_keeps_processing(
        client, settings, start_worker):
    store = DeadLetterStore(client.redis, client.keys)
    worker = start_worker(settings, QUEUES, threads=4)
    cases = {"batches": 0, "messages": 0, "hostile": 0}
    all_pushed: list[tuple[str, bytes]] = []

    @hsettings(max_examples=12 * SCALE)
    @given(batch=st.lists(item, min_size=1, max_size=25))
    def run(batch: list[tuple[str, bytes]]) -> None:
        pushed, refs = [], []
        for n, (queue, data) in enumerate(batch):
            if queue == "valid":
                refs.append(client.send("executor", {"tool": "note", "args": {"title": f"valid {n}"}}))
            else:
                pushed.append((push_raw(client, queue, data), data))
        before = store.count()
        deadline = time.monotonic() + 60
        while True:
            idle = all(v == EMPTY for v in client.queues(QUEUES).values())
            missing = unaccounted(store, pushed)
            if idle and not missing:
                break
            assert time.monotonic() < deadline, (
                f"after 60 s queues {client.queues(QUEUES)}; not in the DLQ: {missing[:3]}; "
                f"worker alive: {alive(worker)}")
            time.sleep(0.05)
        assert store.count() >= before
        for ref in refs:
            assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
        assert alive(worker)
        cases["batches"] += 1
        cases["messages"] += len(batch)
        cases["hostile"] += len(pushed)
        all_pushed.extend(pushed)

    run()
    assert store.count() == cases["hostile"]  # one entry per hostile message, no more
    assert not unaccounted(store, all_pushed)
    last = client.send("executor", {"tool": "note", "args": {"title": "after the fuzz"}})
    assert client.wait(last.id, timeout_s=30).state is State.SUCCEEDED
    assert alive(worker)
    assert not client.redis.llen(f"{client.keys.queue('executor')}.XQ")
    print(f"queue fuzz: {cases}")


def message_for(queue: str, **changes: Any) -> bytes:
    """A dramatiq message for ``queue`` carrying a well-formed envelope, with ``changes`` applied."""
    from tests.fuzz.strategies import valid_envelope

    message: dict[str, Any] = {"queue_name": queue, "actor_name": queue, "args": [valid_envelope(queue)],
                               "kwargs": {}, "options": {}, "message_id": str(uuid.uuid4()),
                               "message_timestamp": int(time.time() * 1000)}
    message.update(changes)
    return dumps(message)


@pytest.mark.parametrize("data", [
    pytest.param(message_for("executor", queue_name="elsewhere"), id="queue_name-of-no-consumer"),
    pytest.param(message_for("executor", queue_name="planner"), id="queue_name-of-another-queue"),
    pytest.param(message_for("executor", options={"eta": 10**18}), id="eta-in-a-ready-queue"),
    pytest.param(message_for("executor", options={"eta": "soon"}), id="eta-not-a-number"),
    pytest.param(message_for("executor", options={"throws": "ValueError"}), id="throws-option"),
])
def test_a_message_dramatiq_itself_would_strand_or_crash_on_is_dead_lettered_as_poison(
        client, settings, start_worker, data):
    rid = push_raw(client, "executor", data)
    worker = start_worker(settings, QUEUES, threads=2)
    store = DeadLetterStore(client.redis, client.keys)
    entry = wait_for(lambda: store.get(rid) or store.get(loads(data)["message_id"]), timeout_s=20)
    assert entry.failure_class == "invalid_input"
    wait_for(lambda: all(v == EMPTY for v in client.queues(QUEUES).values()))
    after = client.send("executor", {"tool": "note", "args": {"title": "after"}})
    assert client.wait(after.id, timeout_s=20).state is State.SUCCEEDED
    assert alive(worker)
