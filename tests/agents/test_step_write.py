"""A step's bookkeeping folded into the scripts that run anyway (mesh.broker.step_write): its fetch reads
the job record, its pick-up is one fenced compare-and-set, and its success writes the record, stores
the key as done and settles the message in one script, so the consumer has nothing left to ack. A
record another writer changed meanwhile is read back and the change computed again; an owner whose
claim was taken over writes nothing and settles nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.runtime import AgentRuntime, declare_app
from mesh.broker import MeshClient
from mesh.broker.connection import node_client
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


def _worker_on(settings) -> Iterator[tuple[MeshBroker, AgentRuntime, MeshClient]]:
    during.clear()
    broker = build_broker(settings)
    runtime = AgentRuntime.from_settings(settings, broker.records, app)
    declare_app(broker, runtime)
    client = MeshClient(settings, client=broker.records, app=app)
    yield broker, runtime, client
    if runtime.counters is not None:
        runtime.counters.close()  # before the namespace's keys go: no worker stops here to write them
    broker.close()


@pytest.fixture
def worker(settings) -> Iterator[tuple[MeshBroker, AgentRuntime, MeshClient]]:
    yield from _worker_on(settings)


def fetched(broker: MeshBroker) -> Any:
    """The next message of the echo queue as the worker's consumer hands it out (claimed by the fetch),
    taken up by the Idempotency middleware as before the actor runs."""
    consumer = broker.consume("echo", prefetch=4, timeout=100)
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


def test_a_steps_writes_go_on_one_connection_the_sender_keeps_not_one_checked_out_per_call(worker, monkeypatch):
    # Each call checked a connection out of the pool and back (its lock, its checks, redis-py's events): a
    # measurable part of the sender's CPU per call. The sender keeps one, checked before each call.
    broker, runtime, client = worker
    refs = [client.send("echo", {"text": f"hi {i}"}) for i in range(3)]
    consumer = broker.consume("echo", prefetch=4, timeout=100)
    idem = next(m for m in broker.middleware if isinstance(m, Idempotency))
    node = node_client(runtime.steps.client, broker.keys.jobs)  # a cluster's: the primary of the namespace's slot
    node.script_load(runtime.steps.script.script)  # held there already, as after a worker's first call
    pool = node.connection_pool
    checked_out, check_out = [], pool.get_connection

    def noted(*args: Any, **kwargs: Any) -> Any:
        checked_out.append(threading.current_thread().name)  # the sender's thread is "mesh-step-writes"
        return check_out(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", noted)
    for _ in refs:
        message = next(consumer)
        idem.before_process_message(broker, message)
        runtime.handle(app.agents["echo"], message.args[0])  # its pick-up and its success: two calls
        consumer.ack(message)
    assert all(client.status(ref.id).state is State.SUCCEEDED for ref in refs)
    # Six calls (a pick-up and a success each): at most the kept connection taken at the first of them.
    assert checked_out.count("mesh-step-writes") <= 1


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
    assert step.state is State.RUNNING and step.token == lease.token  # its pick-up, nothing after
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


def group_items(broker: MeshBroker, runtime: AgentRuntime, client: MeshClient, n: int,
                extra: Any = lambda job, trace: [], *, done: bool = False,
                first: bool = False) -> tuple[list[Any], list[bytes]]:
    """``n`` pick-up-like writes of ``n`` new jobs, each under a claim of its own: an XADD to the job's
    trace, whatever ``extra(job, trace)`` adds (``first``: before the XADD), then the record's SET.
    (Their items and new records.)"""
    idem = next(m for m in broker.middleware if isinstance(m, Idempotency))
    items, news = [], []
    for k in range(n):
        ref = client.send("echo", {"text": str(k)})
        key, owner = f"group-{ref.id}", f"owner-{k}"
        verdict = idem._call("claim", idem.keys.claim(key), owner)
        lease = Lease(key=key, claim_key=idem.keys.claim(key), owner=owner, token=int(verdict[1]))
        job, trace = broker.keys.job(ref.id), broker.keys.trace(ref.id)
        data = broker.records.get(job)
        news.append(data.replace(b'"queued"', b'"running"', 1))
        more = [(command, {}) for command in extra(job, trace)]
        xadd = [(("XADD", trace, "*", "e", "{}"), {})]
        commands = [*(more + xadd if first else xadd + more), (("SET", job, news[-1]), {})]
        items.append(runtime.steps._item(job, data, commands, lease, b"{}" if done else None, False))
    return items, news


def refuse_xadd(broker: MeshBroker, item: Any) -> None:
    """The item's trace key made a string: Redis refuses its XADD (WRONGTYPE)."""
    trace = item.args[item.args.index("XADD") + 1]
    broker.records.delete(trace)
    broker.records.set(trace, "not a stream")


def test_a_write_redis_refuses_fails_alone_not_the_others_of_its_group(worker):
    broker, runtime, client = worker
    items, news = group_items(broker, runtime, client, 2, done=True)
    refuse_xadd(broker, items[1])

    first, second = runtime.steps._flush(items)

    assert isinstance(second, redis.ResponseError)
    assert claim_state(broker, items[1].lease.claim_key) == b"claimed"  # not stored as done: the caller fails
    assert first == 1 and broker.records.get(items[0].args[0]) == news[0]
    assert claim_state(broker, items[0].lease.claim_key) == b"done"


def test_a_refused_write_in_a_group_loses_none_of_the_others_counters(worker):
    # The group's counters are added up and written after its writes: a write refused midway (the
    # script stopped there) lost the counters of every write that had landed before it, for good.
    broker, runtime, client = worker
    stats = broker.keys.stats
    items, news = group_items(broker, runtime, client, 3,
                              lambda job, trace: [("HINCRBY", stats, "picked", 1), ("HINCRBYFLOAT", stats, "s", 0.5)])
    refuse_xadd(broker, items[1])

    answers = runtime.steps._flush(items)

    assert answers[0] == answers[2] == 1 and isinstance(answers[1], redis.ResponseError)
    assert [broker.records.get(item.args[0]) for item in items] == news  # the refused one's SET ran too
    # Each write's counters once, the refused one's too (its other commands ran, as a MULTI's would).
    assert broker.records.hget(stats, "picked") == b"3" and float(broker.records.hget(stats, "s")) == 1.5


def test_a_refused_command_leaves_the_rest_of_its_write_as_a_transaction_would(worker):
    # Not half a write: the script stopped at the refused command, after the next step's message was
    # pushed and before the record saying so was written; the step's retry pushed the message again.
    broker, runtime, client = worker
    queue, hash_ = broker.keys.queue("next"), broker.keys.messages("next")
    [item], [new] = group_items(broker, runtime, client, 1,
                                lambda job, trace: [("HSET", hash_, "m1", "{}"), ("RPUSH", queue, "m1")],
                                first=True)  # as a step's write: its messages, its trace, its record
    refuse_xadd(broker, item)

    [answer] = runtime.steps._flush([item])

    assert isinstance(answer, redis.ResponseError)
    assert broker.records.get(item.args[0]) == new and broker.records.lrange(queue, 0, -1) == [b"m1"]


def test_a_counter_redis_refuses_fails_no_write_that_landed(worker):
    # The counters go last, after every write of the group landed (records, done claims, acks): one
    # refused there failed them all, and their callers took steps that were recorded for failed ones.
    broker, runtime, client = worker
    broker.records.hset(broker.keys.stats, "bad", "not a number")
    items, news = group_items(broker, runtime, client, 2,
                              lambda job, trace: [("HINCRBY", broker.keys.stats, "bad", 1),
                                                  ("HINCRBY", broker.keys.stats, "good", 1)], done=True)

    assert runtime.steps._flush(items) == [1, 1]

    assert [broker.records.get(item.args[0]) for item in items] == news
    assert broker.records.hget(broker.keys.stats, "good") == b"2"
    assert all(claim_state(broker, item.lease.claim_key) == b"done" for item in items)


def resent(runtime: AgentRuntime) -> list[tuple[Any, Any]]:
    """The step writes ``runtime`` makes from now on, as (args, kwargs): a write sent again with the same
    arguments is what a client's retry of a call whose answer was lost sends."""
    calls: list[tuple[Any, Any]] = []
    write = runtime.steps.write

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return write(*args, **kwargs)

    runtime.steps.write = recording  # type: ignore[method-assign]
    return calls


def test_a_success_sent_again_after_it_landed_writes_nothing_more_whatever_its_change_does(worker):
    # The job was cancelled while the step ran: its success ends the step cancelled. Sent again (its
    # answer lost), the write found its record changed, computed the change again from it, and a
    # cancelled step cannot be ended twice: the step's attempt failed after its success had landed.
    broker, runtime, client = worker
    ref = client.send("echo", {"text": "hi"})
    during.append(lambda: client.cancel(ref.id))
    calls = resent(runtime)
    _consumer, message = fetched(broker)
    runtime.handle(app.agents["echo"], message.args[0])
    record = client.status(ref.id)
    assert next(iter(record.steps.values())).state is State.CANCELLED and message.mesh_lease.settled
    stats = broker.records.hgetall(broker.keys.stats)
    trace = broker.records.xlen(broker.keys.trace(ref.id))
    args, kwargs = calls[-1]
    assert kwargs["settle"]

    runtime.steps.write(*args, **kwargs)  # nothing raised: known as its own write

    assert client.status(ref.id) == record
    assert broker.records.hgetall(broker.keys.stats) == stats  # no counter twice
    assert broker.records.xlen(broker.keys.trace(ref.id)) == trace


def test_a_failure_raised_after_the_success_settled_counts_no_second_run(worker):
    # A time limit raised into the thread while its success's write was on the wire is raised once the
    # write landed (the group commit holds it): the router took it for a failure, counted the run's
    # duration a second time, and made a decision nothing would carry out.
    from dramatiq.middleware.time_limit import TimeLimitExceeded

    from mesh.broker.router import FailureRouter
    from mesh.broker.settle import decision_of

    broker, runtime, client = worker
    client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    runtime.handle(app.agents["echo"], message.args[0])
    assert message.mesh_lease.settled
    runtime.counters.flush()  # the success's counts, written now rather than at the interval's end
    histogram = broker.keys.histogram("echo")
    runs = sum(int(v) for f, v in broker.records.hgetall(histogram).items() if f != b"sum")
    assert runs == 1

    router = next(m for m in broker.middleware if isinstance(m, FailureRouter))
    router.after_process_message(broker, message, exception=TimeLimitExceeded())

    runtime.counters.flush()
    assert sum(int(v) for f, v in broker.records.hgetall(histogram).items() if f != b"sum") == 1
    assert decision_of(message) is None


@pytest.mark.slow
def test_a_group_of_large_writes_goes_in_calls_of_bounded_size(tmp_path):
    # 64 writes of a fan-out's messages each went as one call: Redis held all of them at once, twice
    # (the command's arguments and the script's ARGV).
    from mesh.broker.keys import Keys
    from mesh.broker.step_write import CALL_BYTES, STEP_LUA, StepWrites
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)  # started: PrivateRedis starts its server itself
    try:
        client = redis.Redis.from_url(server.url)
        steps = StepWrites(client, JobStore(client, Keys("bounded")), 60)
        big = b"x" * (CALL_BYTES // 2 + 1)
        items = []
        for n in range(3):
            client.set(f"job{n}", b"old")
            items.append(steps._item(f"job{n}", b"old", [(("SET", f"job{n}", big), {})],
                                     Lease(key="", claim_key="", owner="", token=0), None, False))
        small = [steps._item(f"small{n}", b"old", [], Lease(key="", claim_key="", owner="", token=0), None, False)
                 for n in range(3)]
        for n in range(3):
            client.set(f"small{n}", b"old")

        def calls() -> int:
            stats = client.info("commandstats").get("cmdstat_evalsha")
            return int(stats["calls"]) if stats else 0

        client.script_load(STEP_LUA)  # no NOSCRIPT answer to count
        before = calls()
        assert steps._flush(small) == [1, 1, 1]
        assert calls() - before == 1  # small writes still go together
        before = calls()
        assert steps._flush(items) == [1, 1, 1]
        assert calls() - before == 3
        assert all(client.get(f"job{n}") == big for n in range(3))
        client.close()
    finally:
        server.stop()


#: The commands a fetch could read a record with.
READS = ("get", "getrange", "mget")


@pytest.mark.slow
def test_a_fetch_reads_its_messages_records_with_one_command_each_record_once(tmp_path):
    # A fan-out's siblings fetched together each read the job's whole record into the fetch script
    # (a record of 2 MB, 200 siblings: 0.6 s with the server blocked), only to leave it out when over
    # RECORD_MAX. And messages of as many jobs read their records with one command, not one each.
    from mesh.broker.settings import MeshSettings
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)  # started: PrivateRedis starts its server itself
    try:
        broker = build_broker(MeshSettings(redis_url=server.url, namespace="siblings"))
        r = broker.records
        n = 20

        def reads(job: str, records: str, jobs: int = 1) -> int:
            for i in range(n):
                job_id = job if jobs == 1 else f"{job}{i}"
                body = json.dumps({"queue_name": "q", "actor_name": "a",
                                   "args": [{"key": f"k{job}{i}{records}", "job_id": job_id}]},
                                  separators=(",", ":"))
                r.hset("{siblings}:q.msgs", f"{job}{i}{records}", body)
                r.rpush("{siblings}:q", f"{job}{i}{records}")
            stats = r.info("commandstats")
            before = sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in READS)
            out = broker.settle("fetch", "q", n, "0", "nonce", 60000, 60, records)
            stats = r.info("commandstats")
            assert len(out) == 3 * n
            if records == "1":  # each claim's verdict: key, the record ("" over RECORD_MAX), "run", ...
                expected = [b"" if job == "large" else r.get(f"{{siblings}}:job:{job}" if jobs == 1 else
                                                             f"{{siblings}}:job:{job}{i}") or b"" for i in range(n)]
                assert [verdict[1] for verdict in out[2::3]] == expected
            return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in READS) - before

        r.set("{siblings}:job:small", b'{"job_id":"small"}')
        r.set("{siblings}:job:large", b"x" * 2_000_000)
        assert reads("small", "1") - reads("small", "0") == 1
        assert reads("large", "1") - reads("large", "0") == 1
        for i in range(n - 1):  # the last job has no record: answered "" as one over RECORD_MAX is
            r.set(f"{{siblings}}:job:many{i}", f'{{"job_id":"many{i}"}}')
        # one MGET per RECORDS_AT_ONCE (16) jobs
        assert reads("many", "1", jobs=n) - reads("many", "0", jobs=n) == 2
        out = broker.settle("fetch", "q", 1, "0", "nonce", 60000, 60, "1")
        assert out == []  # all fetched
        broker.close()
    finally:
        server.stop()


def _peak_rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))


@pytest.mark.slow
def test_a_fetch_of_many_jobs_with_large_records_reads_few_of_them_whole(tmp_path):
    # One MGET read every fetched job's record whole: a fetch of 64 messages of jobs with 2 MB records
    # (a pipeline's outputs) copied 128 MB into the script, twice (reply and Lua strings), only to hand
    # back "" for each; 200 of 5 MB blocked the server for six seconds, past the client's timeout. Now
    # once a record is over RECORD_MAX, the others are read as GETRANGE did, RECORD_MAX + 1 bytes each.
    from mesh.broker.settings import MeshSettings
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)  # started: PrivateRedis starts its server itself
    try:
        broker = build_broker(MeshSettings(redis_url=server.url, namespace="big"))
        r = broker.records
        n, size, small = 64, 2_000_000, 8
        blob = b"x" * size
        for i in range(n + small):  # the large records' jobs first, then some with small ones
            body = json.dumps({"queue_name": "q", "actor_name": "a", "args": [{"key": f"k{i}", "job_id": f"j{i}"}]},
                              separators=(",", ":"))
            r.set(f"{{big}}:job:j{i}", blob if i < n else f'{{"job_id":"j{i}"}}')
            r.hset("{big}:q.msgs", str(i), body)
            r.rpush("{big}:q", str(i))
        del blob
        r.delete(f"{{big}}:job:j{n + small - 1}")
        r.hset(f"{{big}}:job:j{n + small - 1}", "not", "a record")  # read as none, as MGET does: the fetch stands
        before = _peak_rss_mb(server.process.pid)
        out = broker.settle("fetch", "q", n + small, "0", "nonce", 60000, 60, "1")
        grown = _peak_rss_mb(server.process.pid) - before
        assert [verdict[1] for verdict in out[2::3]] == [b""] * n + [f'{{"job_id":"j{i}"}}'.encode()
                                                                     for i in range(n, n + small - 1)] + [b""]
        assert grown < n * size // 2**20  # far less than the records (about 35 MB: 16 of them whole)
        broker.close()
    finally:
        server.stop()


def test_a_renewal_answered_after_the_success_landed_does_not_call_the_lease_lost(worker):
    # The renewal read the lease as unsettled and went out; the success's write stored the key as done
    # before it arrived: the lease was reported lost while running (a warning, and a lost lease).
    broker, runtime, client = worker
    client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    lease = message.mesh_lease
    idem = next(m for m in broker.middleware if isinstance(m, Idempotency))
    runtime.handle(app.agents["echo"], message.args[0])
    assert claim_state(broker, lease.claim_key) == b"done"
    lease.settled = False  # as the renewal read it, before the write's answer came back
    idem._hold(lease)

    idem.renew()

    assert not lease.lost


@pytest.fixture
def private_worker(tmp_path, make_settings) -> Iterator[tuple[MeshBroker, AgentRuntime, MeshClient]]:
    """The ``worker`` fixture's broker, runtime and client on a private redis-server: its commands
    counted (INFO commandstats) are the test's alone."""
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)  # started: PrivateRedis starts its server itself
    try:
        yield from _worker_on(make_settings(redis_url=server.url))
    finally:
        server.stop()


def commands(r: redis.Redis, *names: str) -> dict[str, int]:
    """How many times Redis ran each of ``names`` so far (scripts' commands included)."""
    stats = r.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}


def ran(r: redis.Redis, since: dict[str, int]) -> dict[str, int]:
    now = commands(r, *since)
    return {name: now[name] - since[name] for name in since}


@pytest.mark.slow
def test_a_step_is_written_when_redis_no_longer_holds_the_step_script(private_worker):
    # A Redis restarted without the scripts (they are never persisted): SCRIPT FLUSH on a server of its
    # own, before the pick-up's write and again before the success's. Each is loaded and sent again.
    broker, runtime, client = private_worker
    ref = client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    broker.records.script_flush()
    during.append(broker.records.script_flush)

    runtime.handle(app.agents["echo"], message.args[0])

    assert message.mesh_lease.settled
    record = client.status(ref.id)
    assert record.state is State.SUCCEEDED and record.steps[next(iter(record.steps))].result == {"text": "hi"}
    assert broker.records.script_exists(runtime.steps.script.sha) == [True]


@pytest.mark.slow
def test_a_group_reads_its_claims_and_records_at_once(private_worker):
    # Each write read its claim and its record with a GET each: a group of 4 writes ran 8 GETs (7: the
    # write whose claim was taken over reads no record), now one MGET. That write still writes nothing.
    broker, runtime, client = private_worker
    running = broker.keys.running
    items, news = group_items(broker, runtime, client, 4,
                              lambda job, trace: [("ZADD", running, 1.5, job), ("ZREM", broker.keys.jobs, job)])
    lost = items[2].lease
    broker.records.set(lost.claim_key, f"claimed|{lost.token + 1}|99999999999999|next|".encode())
    before = broker.records.get(items[2].args[0])
    script = runtime.steps.script
    broker.records.script_load(script.script)  # no NOSCRIPT answer to count
    since = commands(broker.records, "get", "mget", "zadd", "zrem", "set", "xadd")

    answers = runtime.steps._flush(items)

    assert answers == [1, 1, 0, 1]
    assert ran(broker.records, since) == {"get": 0, "mget": 1, "zadd": 3, "zrem": 3, "set": 3, "xadd": 3}
    assert [broker.records.get(item.args[0]) for item in items] == [news[0], news[1], before, news[3]]
    members = {m.decode() for m in broker.records.zrange(running, 0, -1)}
    assert members == {items[k].args[0] for k in (0, 1, 3)}
    assert claim_state(broker, lost.claim_key) == b"claimed"


@pytest.mark.slow
def test_a_write_checks_what_an_earlier_write_of_its_group_wrote_not_what_the_group_read(private_worker):
    # The group's claims and records are read at once, before any write: a write that changes another
    # write's record (or claim) in the same group has that one read again, and it finds its record
    # changed (answered with the bytes now there: computed again), not the bytes read before.
    broker, runtime, client = private_worker
    items, news = group_items(broker, runtime, client, 2)
    second = items[1].args[0]
    changed = b'{"changed": true}'
    first, _ = group_items(broker, runtime, client, 1, lambda job, trace: [("SET", second, changed)])
    taken = items[1].lease
    broker.records.script_load(runtime.steps.script.script)
    since = commands(broker.records, "get", "mget")

    answers = runtime.steps._flush([first[0], items[1], items[0]])

    assert ran(broker.records, since) == {"get": 1, "mget": 1}  # the one key written since: read again
    assert answers[0] == 1 and answers[1] == changed and answers[2] == 1
    assert broker.records.get(second) == changed  # not overwritten by a write computed from the old bytes
    assert broker.records.get(items[0].args[0]) == news[0]
    assert claim_state(broker, taken.claim_key) == b"claimed"


@pytest.mark.parametrize("size", [40, 41, 4096, 4097])
def test_a_record_changed_since_is_found_whether_named_by_its_bytes_or_its_sha1(worker, size):
    # A record up to COMPARED_BYTES (over 40 bytes) is named by its bytes, compared whole; the others
    # by their sha1 (40 hex digits, which is how the script tells the two apart).
    broker, runtime, _client = worker
    key = broker.keys.job(f"compared-{size}")
    was, now = b"a" * size, b"b" * size
    nobody = Lease(key="", claim_key="", owner="", token=0)
    broker.records.set(key, now)

    stale = runtime.steps._item(key, was, [(("SET", key, b"stale"), {})], nobody, None, False)
    fresh = runtime.steps._item(key, now, [(("SET", key, b"fresh"), {})], nobody, None, False)

    assert runtime.steps._flush([stale]) == [now] and broker.records.get(key) == now
    assert runtime.steps._flush([fresh]) == [1] and broker.records.get(key) == b"fresh"


def test_a_write_under_a_claim_an_earlier_release_wrote_as_a_hash_still_lands(worker):
    # The group's MGET answers none for a claim hash: it is read as a hash, as before, not taken for
    # no claim at all (which would fence off its owner, or write under nobody's claim).
    broker, runtime, client = worker
    [item], [new] = group_items(broker, runtime, client, 1, done=True)
    lease = item.lease
    broker.records.delete(lease.claim_key)
    broker.records.hset(lease.claim_key, mapping={"state": "claimed", "owner": lease.owner, "token": lease.token,
                                                  "expires": 99999999999999})

    assert runtime.steps._flush([item]) == [1]

    assert broker.records.get(item.args[0]) == new
    assert claim_state(broker, lease.claim_key) == b"done"  # the string now, as at any claim's next write


def test_a_write_from_the_bytes_this_process_wrote_last_takes_that_record_and_validates_nothing(worker):
    # A pipeline's next step picked up where its last step succeeded reads back the bytes that write
    # left: the record kept with them is the one computed from, not the bytes validated again (a cost
    # that grows with the pipeline's size). Bytes another writer changed are validated: its change stands.
    from mesh.broker.step_write import Recent

    broker, runtime, client = worker
    runtime.steps.recent = Recent(steps=0)  # a one-step job's record kept too (by default, from 8 steps)
    ref = client.send("echo", {"text": "hi"})
    _consumer, message = fetched(broker)
    lease = message.mesh_lease
    seen: list[Any] = []

    def change(tokens: int) -> Any:
        def apply(record: Any) -> Any:
            seen.append(record)
            return add_tokens(record, tokens, 0), []
        return apply

    first = runtime.steps.write(ref.id, change(1), fence=lease, read=lease.record)
    assert broker.records.get(broker.keys.job(ref.id)) == first.data
    second = runtime.steps.write(ref.id, change(2), fence=lease, read=first.data)
    assert seen[-1] is first.record  # taken as it was left, not validated from its bytes
    assert second.record.tokens_in == 3

    JobStore(broker.records, broker.keys).update(ref.id, lambda r: (add_tokens(r, 0, 7), []))
    third = runtime.steps.write(ref.id, change(4), fence=lease, read=second.data)  # stale: read back
    assert seen[-1] is not second.record and seen[-1].tokens_out == 7
    assert third.record.tokens_in == 7 and third.record.tokens_out == 7
    assert client.status(ref.id).tokens_in == 7


def test_the_records_kept_of_the_last_writes_are_bounded_by_count_and_bytes():
    from mesh.broker.step_write import Recent, Written
    from mesh.contracts import JobRecord

    def written(job_id: str, size: int) -> Written:
        return Written(JobRecord(job_id=job_id, key=job_id, trace_id="ab" * 16), b"x" * size)

    recent = Recent(records=2, size=100, steps=0)
    a, b, c = written("a", 10), written("b", 10), written("c", 10)
    for job_id, w in (("a", a), ("b", b), ("c", c)):
        recent.keep(job_id, w)
    assert recent.record("a", a.data) is None  # the oldest went
    assert recent.record("b", b.data) is b.record and recent.record("c", c.data) is c.record
    assert recent.record("c", b"y" * 10) is None  # other bytes: not this record
    recent.keep("d", written("d", 95))  # past the bytes: the oldest go until it fits
    assert recent.record("b", b.data) is None and recent.record("c", c.data) is None
    recent.keep("e", written("e", 101))  # larger than the whole bound: not kept
    assert recent.record("e", b"x" * 101) is None and recent.record("d", b"x" * 95) is not None
    few = Recent(steps=1)  # a record of fewer steps than that: not kept (it costs little to validate)
    few.keep("a", a)
    assert few.record("a", a.data) is None
