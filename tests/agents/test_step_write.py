"""A step's bookkeeping folded into the scripts that run anyway (mesh.broker.step_write): its fetch reads
the job record, its pick-up is one fenced compare-and-set, and its success writes the record, stores
the key as done and settles the message in one script, so the consumer has nothing left to ack. A
record another writer changed meanwhile is read back and the change computed again; an owner whose
claim was taken over writes nothing and settles nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from mesh import App, Context, ToolContext
from mesh.agents.runtime import AgentRuntime, declare_app
from mesh.broker import MeshClient
from mesh.broker.idempotency import Idempotency, Lease, current_lease
from mesh.broker.jobs import JobStore
from mesh.broker.mesh_broker import MeshBroker, build_broker
from mesh.contracts import LeaseLost, State, add_tokens, loads

app = App("step-write")


class Text(BaseModel):
    text: str


#: What the handler does while it runs (set per test): e.g. another writer changes the record.
during: list[Any] = []


@app.agent(time_limit_s=30)
def echo(ctx: Context, message: Text) -> Text:
    for act in during:
        act()
    return message


#: The step's record state each call of the ``look`` tool found in Redis.
looked: list[str] = []


@app.tool(effect=False)
def look(ctx: ToolContext, args: Text) -> Text:
    data = ctx.redis.get(f"{args.text}")
    looked.append(loads(data)["steps"]["caller"]["state"] if data else "")
    return args


@app.agent(time_limit_s=30, tools=["look"])
def caller(ctx: Context, message: Text) -> Text:
    return ctx.call("look", message)


@pytest.fixture
def worker(settings) -> Iterator[tuple[MeshBroker, AgentRuntime, MeshClient]]:
    during.clear()
    broker = build_broker(settings)
    runtime = AgentRuntime.from_settings(settings, broker.records, app)
    declare_app(broker, runtime)
    client = MeshClient(settings, client=broker.records, app=app)
    yield broker, runtime, client
    broker.close()


def fetched(broker: MeshBroker, queue: str = "echo") -> Any:
    """The next message of the queue as the worker's consumer hands it out (claimed by the fetch),
    taken up by the Idempotency middleware as before the actor runs."""
    consumer = broker.consume(queue, prefetch=4, timeout=100)
    message = next(consumer)
    assert message is not None
    idem = next(m for m in broker.middleware if isinstance(m, Idempotency))
    idem.before_process_message(broker, message)
    return consumer, message


def claim_state(broker: MeshBroker, claim_key: str) -> bytes:
    return bytes(broker.records.get(claim_key) or b"").split(b"|")[0]


def test_a_success_records_its_step_stores_its_key_done_and_settles_its_message_in_one_write(worker):
    broker, runtime, client = worker
    ref = client.send("echo", {"text": "hi"})
    consumer, message = fetched(broker)
    lease = message.mesh_lease
    rid = message.options["redis_message_id"]
    assert lease.record is not None and loads(lease.record)["job_id"] == ref.id  # read by the fetch

    runtime.handle(app.agents["echo"], message.args[0])

    # Before any ack: the record, the claim and the message are all settled by the step's write.
    assert lease.settled
    record = client.status(ref.id)
    [step] = record.steps.values()
    assert record.state is State.SUCCEEDED and step.result == {"text": "hi"} and step.token == lease.token
    assert claim_state(broker, lease.claim_key) == b"done"
    assert not broker.records.sismember(broker.keys.acks(broker.broker_id, "echo"), rid)
    assert not broker.records.hexists(broker.keys.messages("echo"), rid)
    assert broker.records.zscore(broker.keys.running, f"{ref.id}/{step.step_id}") is None
    consumer.ack(message)  # nothing left to settle: a no-op, and the message leaves the worker's hands
    assert consumer.outstanding_message_count == 0


def test_a_record_changed_while_the_step_ran_is_read_back_and_both_changes_stand(worker, settings):
    broker, runtime, client = worker
    ref = client.send("echo", {"text": "hi"})
    jobs = JobStore(broker.records, broker.keys)
    during.append(lambda: jobs.update(ref.id, lambda r: (add_tokens(r, 5, 0), [])))
    _consumer, message = fetched(broker)

    runtime.handle(app.agents["echo"], message.args[0])

    record = client.status(ref.id)
    assert record.state is State.SUCCEEDED and record.tokens_in == 5
    assert message.mesh_lease.settled


def test_a_record_changed_between_the_fetch_and_the_pick_up_is_read_back(worker):
    broker, runtime, client = worker
    ref = client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    JobStore(broker.records, broker.keys).update(ref.id, lambda r: (add_tokens(r, 0, 7), []))
    assert loads(message.mesh_lease.record)["tokens_out"] == 0  # what the fetch read is stale now

    runtime.handle(app.agents["echo"], message.args[0])

    record = client.status(ref.id)
    assert record.state is State.SUCCEEDED and record.tokens_out == 7


def test_an_owner_whose_claim_was_taken_over_while_it_ran_writes_and_settles_nothing(worker):
    broker, runtime, client = worker
    ref = client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    lease = message.mesh_lease
    rid = message.options["redis_message_id"]

    def taken_over() -> None:  # what a paused owner misses: its lease ran out, another owner claimed
        current = current_lease()
        assert current is lease
        broker.records.set(lease.claim_key, f"claimed|{lease.token + 1}|99999999999999|next|".encode())

    during.append(taken_over)
    with pytest.raises(LeaseLost):
        runtime.handle(app.agents["echo"], message.args[0])

    record = client.status(ref.id)
    step = next(iter(record.steps.values()))
    # A short step's pick-up goes with its success: neither was written (as a pause before the pick-up).
    assert step.state is State.QUEUED and not step.token
    assert not lease.settled
    assert claim_state(broker, lease.claim_key) == b"claimed"  # the new owner's, untouched
    assert broker.records.sismember(broker.keys.acks(broker.broker_id, "echo"), rid)  # still to settle


def test_a_success_sent_again_after_it_landed_is_known_as_its_own_not_as_a_lost_lease(worker):
    # A write whose answer was lost (or whose group Redis refused after it ran) is sent again: the
    # claim it stored as done at its own token is its own, and nothing more is written.
    broker, runtime, client = worker
    ref = client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    lease = message.mesh_lease
    runtime.handle(app.agents["echo"], message.args[0])
    before = broker.records.get(broker.keys.job(ref.id))

    again = runtime.steps.write(ref.id, lambda r: (r, []), fence=lease, done=b'{"text":"hi"}', settle=True)

    assert again.record.state is State.SUCCEEDED and broker.records.get(broker.keys.job(ref.id)) == before
    assert claim_state(broker, lease.claim_key) == b"done"


def test_a_write_redis_refuses_fails_alone_not_the_others_of_its_group(worker):
    broker, runtime, client = worker
    refs = [client.send("echo", {"text": t}) for t in ("a", "b")]
    idem = next(m for m in broker.middleware if isinstance(m, Idempotency))
    items, news = [], []
    for n, ref in enumerate(refs):
        key, owner = f"group-{ref.id}", f"owner-{n}"
        verdict = idem._call("claim", idem.keys.claim(key), owner)
        lease = Lease(key=key, claim_key=idem.keys.claim(key), owner=owner, token=int(verdict[1]))
        job, trace = broker.keys.job(ref.id), broker.keys.trace(ref.id)
        data = broker.records.get(job)
        news.append(data.replace(b'"queued"', b'"running"', 1))
        commands = [(("XADD", trace, "*", "e", "{}"), {}), (("SET", job, news[-1]), {})]
        items.append(runtime.steps._item(job, data, commands, lease, None, False))
    broker.records.delete(broker.keys.trace(refs[1].id))
    broker.records.set(broker.keys.trace(refs[1].id), "not a stream")  # its XADD is refused

    first, second = runtime.steps._flush(items)

    assert isinstance(second, redis.ResponseError)
    assert broker.records.get(broker.keys.job(refs[1].id)) != news[1]  # nothing of it written
    # The first landed (with the group, before the refusal): sent alone again, it finds its own write.
    assert first == news[0] == broker.records.get(broker.keys.job(refs[0].id))


def events_of(broker: MeshBroker, job_id: str) -> list[str]:
    from mesh.broker import trace

    return [e["event"] for e in trace.read(broker.records, broker.keys, job_id)]


def test_a_short_step_writes_its_pick_up_with_its_success_in_one_write(worker):
    broker, runtime, client = worker
    runtime.pickups.after_s = 30.0  # the handler ends within the bound
    ref = client.send("echo", {"text": "hi"})
    seen: list[Any] = []
    during.append(lambda: seen.append((client.status(ref.id), broker.records.zscore(
        broker.keys.running, f"{ref.id}/{next(iter(client.status(ref.id).steps))}"))))
    _consumer, message = fetched(broker)
    lease = message.mesh_lease

    runtime.handle(app.agents["echo"], message.args[0])

    [(meanwhile, indexed)] = seen
    assert next(iter(meanwhile.steps.values())).state is State.QUEUED and indexed is None  # nothing written yet
    record = client.status(ref.id)
    [step] = record.steps.values()
    assert record.state is State.SUCCEEDED and step.token == lease.token and step.picked_up == 1
    assert step.started_at is not None and step.attempt == message.args[0].get("attempt", 0)
    assert events_of(broker, ref.id) == ["enqueued", "picked_up", "succeeded"]
    assert lease.settled


def test_a_step_still_running_at_the_bound_has_its_pick_up_written_then(worker):
    broker, runtime, client = worker
    runtime.pickups.after_s = 0.05
    ref = client.send("echo", {"text": "hi"})
    seen: list[Any] = []

    def running() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            step = next(iter(client.status(ref.id).steps.values()))
            if step.state is State.RUNNING:
                seen.append((step, broker.records.zscore(broker.keys.running, f"{ref.id}/{step.step_id}")))
                return
            time.sleep(0.01)

    during.append(running)
    _consumer, message = fetched(broker)
    lease = message.mesh_lease

    runtime.handle(app.agents["echo"], message.args[0])

    [(step, indexed)] = seen
    assert step.token == lease.token and indexed is not None  # the record says running while it runs
    record = client.status(ref.id)
    assert record.state is State.SUCCEEDED and next(iter(record.steps.values())).picked_up == 1
    assert events_of(broker, ref.id) == ["enqueued", "picked_up", "succeeded"]
    assert broker.records.zscore(broker.keys.running, f"{ref.id}/{step.step_id}") is None


def test_a_cancel_while_a_short_step_runs_ends_it_as_one_landing_just_after_its_pick_up(worker):
    broker, runtime, client = worker
    runtime.pickups.after_s = 30.0
    ref = client.send("echo", {"text": "hi"})
    seen: list[Any] = []
    during.append(lambda: seen.append(client.cancel(ref.id, reason="stop")))
    _consumer, message = fetched(broker)

    runtime.handle(app.agents["echo"], message.args[0])

    [cancelled] = seen  # its key is claimed: the cancel leaves it to end, as a running step
    assert next(iter(cancelled.steps.values())).state is State.QUEUED  # not "not run"
    record = client.status(ref.id)
    [step] = record.steps.values()
    assert step.state is State.CANCELLED and step.result == {"text": "hi"}  # kept for its compensation
    assert step.error is not None and step.error.startswith("ended after the job was cancelled")
    assert record.state is State.CANCELLED
    assert events_of(broker, ref.id)[-2:] == ["picked_up", "cancelled"]


def test_a_short_step_that_fails_has_its_pick_up_written_before_its_failure_is_recorded(worker):
    broker, runtime, client = worker
    runtime.pickups.after_s = 30.0
    ref = client.send("echo", {"text": "hi"})

    def fail() -> None:
        raise RuntimeError("boom")

    during.append(fail)
    _consumer, message = fetched(broker)
    lease = message.mesh_lease

    with pytest.raises(RuntimeError):
        runtime.handle(app.agents["echo"], message.args[0])

    step = next(iter(client.status(ref.id).steps.values()))
    assert step.state is State.RUNNING and step.token == lease.token and step.picked_up == 1
    assert broker.records.zscore(broker.keys.running, f"{ref.id}/{step.step_id}") is not None


def test_a_tool_call_within_the_bound_writes_the_pick_up_first(worker):
    broker, runtime, client = worker
    runtime.pickups.after_s = 30.0
    looked.clear()
    ref = client.send("caller", {"text": "-"}, key="calls-a-tool")
    _consumer, message = fetched(broker, "caller")
    message.args[0]["payload"]["text"] = broker.keys.job(ref.id)  # what the tool reads

    runtime.handle(app.agents["caller"], message.args[0])

    assert looked == ["running"]  # the call saw a step its record says is running
    record = client.status(ref.id)
    assert record.state is State.SUCCEEDED and record.steps["caller"].picked_up == 1
    assert events_of(broker, ref.id).count("picked_up") == 1
