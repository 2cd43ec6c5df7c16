"""Settlement faults, produced by driving the mesh's consumer through the interleaving at the
script level (as a worker would, one call at a time), on a real Redis: records a newer release
wrote, settlements that raise, superseded owners settling late, dead-letter ids taken twice."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import push_raw, wait_for
from dramatiq.broker import MessageProxy
from dramatiq.middleware import TimeLimitExceeded

from mesh.broker import MeshClient, MeshSettings, claims
from mesh.broker.consumer import MeshConsumer
from mesh.broker.idempotency import Idempotency
from mesh.broker.mesh_broker import MeshBroker
from mesh.broker.router import dead_letter_with_step
from mesh.broker.settle import DeadLetterIt, JobWrite, RetryLater, decide, delayed_copy
from mesh.broker.shards import Shards
from mesh.contracts import FailureClass, JobRecord, dumps, loads
from mesh.dlq import DeadLetterStore

Consume = Callable[..., tuple[MeshBroker, MeshConsumer]]


def note(title: str) -> dict[str, Any]:
    return {"tool": "note", "args": {"title": title}}


@pytest.fixture
def consume(settings: MeshSettings) -> Iterator[Consume]:
    """A broker (one worker id) and its consumer of a queue, on the shard of job ``job`` (with several
    shards, MESH_SHARDS, a worker runs one per shard; else the first shard's); closed at teardown."""
    made: list[MeshBroker] = []

    def make(queue: str = "executor", s: MeshSettings = settings,
             job: str | None = None) -> tuple[MeshBroker, MeshConsumer]:
        shards = Shards.of(s)
        broker = MeshBroker(s.on_shard(shards.shard_of(job) if job is not None else shards.start))
        made.append(broker)
        return broker, broker.consume(queue, prefetch=8, timeout=100)  # type: ignore[return-value]

    yield make
    for broker in made:
        broker.close()


def fetch(consumer: MeshConsumer) -> MessageProxy:
    """The next message the consumer fetches (polled: an idle fetch answers None)."""
    found: MessageProxy = wait_for(lambda: next(consumer))
    return found


def held(client: MeshClient, broker: MeshBroker, queue: str = "executor") -> set[bytes]:
    """The message ids ``broker``'s worker holds on ``queue`` (its acks set, in its shard)."""
    return client.redis.smembers(f"{broker.keys.prefix}:__acks__.{broker.broker_id}.{queue}")  # type: ignore[return-value]


def dlq(client: MeshClient) -> list[Any]:
    """The dead letters of every shard."""
    entries = []
    for keys in client.shards.keys:
        store = DeadLetterStore(client.redis, keys)
        entries += [store.get(i.decode()) for i in client.redis.zrange(keys.dlq, 0, -1)]
    return entries


def rewrite(client: MeshClient, job_id: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a job record as a newer release of the mesh might have written it."""
    key = client.keys_of(job_id).job(job_id)
    record = loads(client.redis.get(key))
    edit(record)
    client.redis.set(key, dumps(record))


# -- item 8: records from newer releases, settlements that raise -------------------------------------

def _newer_field(record: dict[str, Any]) -> None:
    record["compensation"] = {"order": ["executor"]}
    record["steps"]["executor"]["ledger"] = [{"intent": "x"}]


def _newer_step_state(record: dict[str, Any]) -> None:
    record["steps"]["other"] = {**record["steps"]["executor"], "step_id": "other", "state": "quarantined"}


def _newer_job_state(record: dict[str, Any]) -> None:
    record["state"] = "archived"


@pytest.mark.parametrize("edit", [_newer_field, _newer_step_state, _newer_job_state],
                         ids=["unknown-fields", "unknown-step-state", "unknown-job-state"])
def test_a_failure_settles_on_a_record_a_newer_release_wrote_and_keeps_what_it_added(
        client, consume, edit):
    ref = client.send("executor", note("newer record"))
    rewrite(client, ref.id, edit)
    broker, consumer = consume(job=ref.id)
    message = fetch(consumer)
    decide(message, dead_letter_with_step(broker, message, FailureClass.PERMANENT, "refused", None))

    consumer.ack(message)  # before: ValidationError out of the settlement, the message held

    assert held(client, broker) == set()
    (entry,) = dlq(client)
    assert entry.error == "refused"
    after = loads(client.redis.get(client.keys_of(ref.id).job(ref.id)))
    expected = loads(dumps(JobRecord.model_validate(after)))  # read and written back: nothing dropped
    assert expected == after
    assert after["steps"]["executor"]["state"] == "dead_lettered"
    if edit is _newer_field:
        assert after["compensation"] == {"order": ["executor"]}
        assert after["steps"]["executor"]["ledger"] == [{"intent": "x"}]
    if edit is _newer_step_state:
        assert after["steps"]["other"]["state"] == "quarantined"
    if edit is _newer_job_state:
        assert after["state"] == "archived"  # a newer release's state is that release's to move


def test_a_step_in_a_state_this_release_does_not_know_is_left_alone_by_a_failure(client, consume):
    ref = client.send("executor", note("rolled-back step"))
    rewrite(client, ref.id, lambda r: r["steps"]["executor"].update(state="rolled_back"))
    broker, consumer = consume(job=ref.id)
    message = fetch(consumer)
    decide(message, dead_letter_with_step(broker, message, FailureClass.PERMANENT, "refused", None))
    consumer.ack(message)
    assert held(client, broker) == set() and len(dlq(client)) == 1
    assert loads(client.redis.get(client.keys_of(ref.id).job(ref.id)))["steps"]["executor"]["state"] == "rolled_back"


def _broken(record: JobRecord) -> Any:
    raise ValueError("a change that cannot be computed")


@pytest.mark.parametrize("route", ["dead", "retry"])
def test_a_settlement_that_raises_dead_letters_the_message_instead_of_holding_it(client, consume, route):
    ref = client.send("executor", note("settlement breaks"))
    broker, consumer = consume(job=ref.id)
    message = fetch(consumer)
    job = JobWrite(ref.id, _broken, step_id="executor")
    if route == "dead":
        entry = broker.dead_letter_entry(message._message, FailureClass.PERMANENT, "refused", None)
        decide(message, DeadLetterIt(entry, job=job))
    else:
        decide(message, RetryLater(delayed_copy(message._message, 10, now_ms=int(time.time() * 1000)), 10, job=job))

    consumer.ack(message)  # before: the ValueError came out of ack, and the message stayed held

    assert held(client, broker) == set()
    assert client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}
    (entry,) = dlq(client)
    assert "could not settle this message (ValueError: a change that cannot be computed)" in entry.error
    assert consumer.outstanding_message_count == 0


# -- item 2: a superseded owner settling late leaves the new owner's message alone --------------------

def _pause_past_the_heartbeat_timeout(client: MeshClient, broker: MeshBroker, message: MessageProxy) -> None:
    """What a SIGSTOP longer than the heartbeat timeout and the lease looks like in Redis: the
    worker's last heartbeat is old, and its lease on the message's key has run out."""
    client.redis.zadd(f"{broker.keys.prefix}:__heartbeats__", {broker.broker_id: 0})
    claim = message.__dict__["mesh_claim"]
    state = claims.read(client.redis, claim.claim_key)
    client.redis.set(claim.claim_key, f"claimed|{state.token}|0|{state.owner}|", keepttl=True)


def _late(broker: MeshBroker, message: MessageProxy, how: str) -> None:
    """The paused worker wakes up and settles its copy of the message as ``how``."""
    if how == "ack":
        claim = message.__dict__.pop("mesh_claim")  # taken by the claim hook when the message ran
        message.mesh_done = (claim.claim_key, claim.owner, "{}")  # type: ignore[attr-defined]
    elif how == "retry":
        decide(message, RetryLater(delayed_copy(message._message, 10, now_ms=int(time.time() * 1000)), 10))
    else:
        entry = broker.dead_letter_entry(message._message, FailureClass.PERMANENT, "late", None)
        decide(message, DeadLetterIt(entry))


@pytest.mark.parametrize("how", ["ack", "retry", "dead"])
def test_a_superseded_owner_settling_late_leaves_the_message_to_its_new_owner(client, consume, how):
    ref = client.send("executor", note("paused owner"))
    old_broker, old = consume(job=ref.id)
    stale = fetch(old)
    _pause_past_the_heartbeat_timeout(client, old_broker, stale)
    new_broker, new = consume(job=ref.id)
    running = fetch(new)  # the reaper gave the message back; the new owner took its key over
    assert running.options["redis_message_id"] == stale.options["redis_message_id"]
    assert running.__dict__["mesh_claim"].verdict[0] == b"run"
    rid = running.options["redis_message_id"]

    _late(old_broker, stale, how)
    old.ack(stale)

    # The new owner still holds the message, its body is there, and nothing of the late one landed.
    assert client.redis.hexists(client.keys_of(ref.id).messages("executor"), rid)  # before: deleted by the late one
    assert held(client, new_broker) == {rid.encode()}
    assert dlq(client) == [] and client.queues(["executor"])["executor"]["delayed"] == 0
    assert claims.read(client.redis, client.keys_of(ref.id).claim(ref.key)).state == "claimed"
    # The new owner's own failure settles as it should: its retry lands on the delay queue.
    decide(running, RetryLater(delayed_copy(running._message, 10, now_ms=int(time.time() * 1000)), 10))
    new.ack(running)
    assert client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 1, "in_flight": 0}
    assert held(client, new_broker) == set() and held(client, old_broker) == set()


# -- item 11: a dead letter whose id and fallback id are both taken -----------------------------------

def test_a_dead_letter_whose_id_and_fallback_are_taken_is_kept_under_a_third_id(client, consume):
    rid = push_raw(client, "executor", b"{not json")  # on the first shard
    keys = client.shards.home
    for taken in (rid, f"{rid}.{rid}"):  # two earlier dead letters hold both ids this one would take
        client.redis.zadd(keys.dlq, {taken: 1})
    broker, consumer = consume()
    wait_for(lambda: next(consumer) is None and not client.redis.llen(keys.queue("executor")))

    assert held(client, broker) == set()  # before: held for good, no entry written
    assert not client.redis.hexists(keys.messages("executor"), rid)
    ids = [i.decode() for i in client.redis.zrange(keys.dlq, 0, -1)]
    (third,) = [i for i in ids if i not in (rid, f"{rid}.{rid}")]
    assert third.startswith(f"{rid}.{rid}.")
    store = DeadLetterStore(client.redis, keys)
    assert store.raw(third) == b"{not json" and store.get(third).entry_id == third


# -- item 9: a failure after the success was recorded marks the key done ------------------------------

def test_a_failure_after_the_success_was_recorded_stores_the_key_as_done_with_the_result(
        client, consume, settings):
    ref = client.send("executor", note("effect applied"))
    broker, consumer = consume(job=ref.id)
    message = fetch(consumer)
    lease = message.__dict__["mesh_claim"].lease
    message.mesh_lease = lease  # type: ignore[attr-defined]  # as the claim hook hands it on
    output = {"ok": True, "receipt": "r-1"}
    # The attempt's success reached the record (with its token)...
    rewrite(client, ref.id, lambda r: r["steps"]["executor"].update(
        state="succeeded", token=lease.token, result=output))
    # ... then a time limit struck: the claim hook freed the key, the router dead-lettered the attempt.
    assert Idempotency(broker.settings, client.redis)._call("release", lease.claim_key, lease.owner, lease.token) == 1
    decide(message, dead_letter_with_step(broker, message, FailureClass.TIMEOUT, "TimeLimitExceeded", None))

    consumer.ack(message)

    claim = claims.read(client.redis, client.keys_of(ref.id).claim(ref.key))
    assert claim.state == "done" and claim.token == lease.token  # before: "free", so it runs again
    assert loads(claim.result) == output
    assert held(client, broker) == set() and dlq(client) == []
    # Another message under the same key (a shared idempotency_key) is now a duplicate, not a second run.
    push_raw(client, "executor", message._message.encode(), client.keys_of(ref.id))
    again = fetch(consumer)
    assert again.__dict__["mesh_claim"].verdict[0] == b"done"


# -- item 7: an interruption raised into the thread that acks ------------------------------------------

def test_an_interruption_after_redis_answered_the_ack_leaves_the_message_settled_and_let_go(client, consume):
    ref = client.send("executor", note("interrupted ack"))
    broker, consumer = consume(job=ref.id)
    message = fetch(consumer)
    claim = message.__dict__.pop("mesh_claim")  # taken by the claim hook when the message ran
    message.mesh_done = (claim.claim_key, claim.owner, "{}")  # type: ignore[attr-defined]
    caller, send, fired = threading.current_thread(), consumer.acks._flush, []

    def flush(group: Any) -> Any:
        answer = send(group)
        if not fired:  # Redis has applied the ack: now dramatiq's time limit fires into the acking thread
            fired.append(ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(caller.ident), ctypes.py_object(TimeLimitExceeded)))
        return answer

    consumer.acks._flush = flush  # type: ignore[method-assign]

    consumer.ack(message)  # before: TimeLimitExceeded came out of ack, the message still counted in hand

    assert consumer.outstanding_message_count == 0 and consumer.in_hand == set()
    assert held(client, broker) == set()
    assert fired == [1] and claims.read(client.redis, client.keys_of(ref.id).claim(ref.key)).state == "done"
    assert client.queues(["executor"])["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}


def test_a_job_in_a_newer_release_state_keeps_the_ttl_that_release_gave_it(client):
    ref = client.send("executor", note("archived by a newer release"))
    rewrite(client, ref.id, lambda r: r.update(state="archived"))
    client.redis.expire(client.keys_of(ref.id).job(ref.id), 600)
    client.jobs_of(ref.id).update(ref.id, lambda r: (r.model_copy(update={"goal": "edited"}), []))
    assert loads(client.redis.get(client.keys_of(ref.id).job(ref.id)))["state"] == "archived"
    assert 0 < client.redis.ttl(client.keys_of(ref.id).job(ref.id)) <= 600  # before: a plain SET dropped it


def test_a_success_recorded_then_a_failure_keeps_only_a_bounded_result_in_the_claim(
        client, consume, make_settings):
    # The "done" settlement stores the step's recorded result in the claim: it must be bounded by
    # MESH_CLAIM_RESULT_BYTES like every other done claim, not kept whole for the dedup window.
    settings = make_settings(claim_result_bytes=16)
    ref = client.send("executor", note("big effect"))
    broker, consumer = consume(s=settings, job=ref.id)
    message = fetch(consumer)
    lease = message.__dict__["mesh_claim"].lease
    message.mesh_lease = lease  # type: ignore[attr-defined]
    output = {"ok": True, "receipt": "r" * 500}
    rewrite(client, ref.id, lambda r: r["steps"]["executor"].update(
        state="succeeded", token=lease.token, result=output))
    assert Idempotency(broker.settings, client.redis)._call("release", lease.claim_key, lease.owner, lease.token) == 1
    decide(message, dead_letter_with_step(broker, message, FailureClass.TIMEOUT, "TimeLimitExceeded", None))

    consumer.ack(message)

    claim = claims.read(client.redis, client.keys_of(ref.id).claim(ref.key))
    assert claim.state == "done"
    assert claim.result.startswith(b"@")  # before: the 500-byte output kept whole in the claim
    assert claim.owner == ""  # a done claim keeps no owner (before: the done settlement kept it)
    assert len(claim.result) < 200


def test_a_late_failure_settled_on_a_job_already_compacted_queues_it_to_be_compacted_again(client, consume):
    from mesh.broker import trace
    from mesh.broker.compact import Compaction
    from mesh.contracts import State, transition

    ref = client.send("executor", note("ended elsewhere"))
    keys = client.keys_of(ref.id)  # the job's shard
    broker, consumer = consume(job=ref.id)
    message = fetch(consumer)

    def ended(record: JobRecord) -> tuple[JobRecord, list[Any]]:  # another owner finished it meanwhile
        step = transition(transition(record.steps["executor"], State.RUNNING), State.SUCCEEDED, result={"ok": 1})
        return transition(transition(record, State.RUNNING), State.SUCCEEDED).with_step(step), []

    client.jobs_of(ref.id).update(ref.id, ended)
    compaction = Compaction(client.redis, client.settings.on_shard(keys.shard))
    assert compaction.run(client.clock.now_s()).jobs == 1
    decide(message, dead_letter_with_step(broker, message, FailureClass.PERMANENT, "refused", None))
    consumer.ack(message)
    assert client.redis.exists(keys.trace(ref.id))  # what it wrote started a stream of its own ...

    assert client.redis.zscore(keys.jobs_compact, ref.id) is not None  # ... and the write queued the job
    assert compaction.run(client.clock.now_s()).jobs == 1 and not client.redis.exists(keys.trace(ref.id))
    assert client.status(ref.id).state is State.SUCCEEDED
    assert [e["event"] for e in trace.read(client.redis, keys, ref.id)][-1] == "compacted"
