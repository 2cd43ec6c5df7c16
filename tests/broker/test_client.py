"""MeshClient: refuses bad payloads before Redis, names jobs by key, and waits honestly."""

from __future__ import annotations

import re
import uuid

import pytest
from conftest import wait_for
from pydantic import ValidationError

from mesh.broker import MeshClient, WaitTimeout, job_id_for
from mesh.broker.client import payload_hash
from mesh.contracts import ContractError, JobRecord, KeyConflict, State, UnknownAgent, dumps, loads

NOTE = {"tool": "note", "args": {"title": "t"}}


def keyed(client: MeshClient, key: str) -> JobRecord | None:
    """The record of the job ``key`` names, read in its shard."""
    job = job_id_for(key)
    return client.jobs_of(job).get(job)


def nothing_in_redis(client: MeshClient) -> bool:
    return not list(client.redis.scan_iter(match=f"{client.keys.prefix}:*"))


def test_invalid_payload_is_refused_naming_the_field_and_nothing_reaches_redis(client):
    with pytest.raises(ContractError) as caught:
        client.send("executor", {"tool": "note", "args": {}})
    assert caught.value.fields == ["args.title"]
    with pytest.raises(ContractError, match="goal"):
        client.submit("")
    assert nothing_in_redis(client)


def test_send_many_checks_every_payload_before_sending_any(client):
    items = [(NOTE, "a"), ({"tool": "note", "args": {"title": ""}}, "b"), (NOTE, "c")]
    with pytest.raises(ContractError, match="item 1") as caught:
        client.send_many("executor", items)
    assert caught.value.context["index"] == 1
    assert nothing_in_redis(client)


def test_unknown_agent_is_refused(client):
    with pytest.raises(UnknownAgent):
        client.send("nobody", {})
    assert nothing_in_redis(client)


def test_the_same_key_names_the_same_job_and_the_record_is_not_reset(client):
    first = client.send("executor", NOTE, key="same")
    second = client.send("executor", NOTE, key="same")
    assert first.id == second.id == job_id_for("same")
    assert client.queues()["executor"]["ready"] == 2  # delivered twice; receivers deduplicate
    assert client.status(first.id).trace_id == first.trace_id


def test_submit_records_a_queued_job_with_its_planner_step_and_envelope_fields(client):
    ref = client.submit("what is a brownout", key="k")
    record = client.status(ref.id)
    assert record.state is State.QUEUED and record.goal == "what is a brownout"
    # The built-in pipeline's steps are recorded at once; only the planner's is sent.
    assert list(record.steps) == ["plan", "researcher", "executor"] and record.steps["plan"].sent_at is not None
    assert all(record.steps[s].state is State.QUEUED and record.steps[s].sent_at is None
               for s in ("researcher", "executor"))
    assert record.pipeline == "mesh" and record.pipeline_input == {"goal": "what is a brownout"}
    keys = client.keys_of(ref.id)  # the job's shard (MESH_SHARDS)
    assert sum(len(client.redis.hvals(keys.messages(q))) for q in ("researcher", "executor")) == 0
    raw = client.redis.hvals(keys.messages("planner"))
    assert len(raw) == 1 and ref.trace_id.encode() in raw[0]


def test_wait_raises_with_the_current_record_when_the_job_does_not_end_in_time(client):
    ref = client.send("executor", NOTE)
    with pytest.raises(WaitTimeout) as caught:
        client.wait(ref.id, timeout_s=0.2)
    assert caught.value.record.state is State.QUEUED


def test_duplicate_delivery_of_a_done_step_is_acked_with_the_stored_result(client, settings, start_worker):
    ref = client.send("executor", NOTE, key="dup")
    start_worker(settings, ("executor",))
    done = client.wait(ref.id, timeout_s=30)
    client.send("executor", NOTE, key="dup")
    wait_for(lambda: client.redis.hget(client.keys.stats, "duplicates") == b"1")
    again = client.status(ref.id)
    assert again.result == done.result and again.steps["executor"].picked_up == 1
    assert client.redis.zcard(client.keys.notes) == 1


# -- the lean enqueue (broker/outbox.py NewJobs + scripts/enqueue.lua) ------------------------------------


def test_a_sent_job_is_written_in_the_exact_bytes_its_models_encode(client):
    """The record, message and trace event are built from dicts dumped once per batch; each is what
    the models would encode, so nothing downstream can tell the lean path from the model path."""
    from dramatiq.message import Message

    from mesh.broker import trace
    from mesh.contracts import Envelope, JobRecord

    other = {"tool": "note", "args": {"title": "é", "findings": [{"n": 1.5}]}}
    refs = client.send_many("executor", [(NOTE, "lean-1"), (other, None)], token_budget=500)
    for ref in refs:
        raw = client.redis.get(client.keys_of(ref.id).job(ref.id))
        record = JobRecord.model_validate(loads(raw))
        assert dumps(record) == raw and record.key == ref.key and record.trace_id == ref.trace_id
        assert record.state is State.QUEUED and record.steps["executor"].sent_at == record.created_at
        assert record.payload_hash == payload_hash("executor", record.steps["executor"].input)
        assert client.redis.zscore(client.keys_of(ref.id).jobs, ref.id) == record.created_at
        [event] = trace.read(client.redis, client.keys_of(ref.id), ref.id)
        assert event["event"] == "enqueued" and event["by"] == "client" and event["queue"] == "executor"
    bodies = [Message.decode(b) for b in client.redis.hvals(client.keys.messages("executor"))]
    ids = client.redis.lrange(client.keys.queue("executor"), 0, -1)
    assert sorted(m.options["redis_message_id"].encode() for m in bodies) == sorted(ids)
    for message in bodies:
        env = Envelope.model_validate(message.args[0])
        assert env.model_dump(mode="json") == message.args[0] and env.token_budget == 500
        assert message.queue_name == message.actor_name == "executor" and uuid.UUID(message.message_id).version == 4
        assert dumps(message.asdict()) == client.redis.hget(client.keys.messages("executor"),
                                                           message.options["redis_message_id"])
        [event] = trace.read(client.redis, client.keys, env.job_id)
        assert event == trace.event("enqueued", message.args[0], at=event["at"], queue="executor", by="client")
    assert {env["key"] for env in (m.args[0] for m in bodies)} == {r.key for r in refs}
    assert client.redis.llen(client.keys.wake("executor")) == 2


def test_job_ids_are_the_uuid5_of_the_key(client):
    for key in ("a", "x" * 600, "é/ü k"):
        assert job_id_for(key) == "job-" + uuid.uuid5(uuid.NAMESPACE_URL, f"mesh-key:{key}").hex


def test_every_job_the_mesh_creates_has_its_ids_hex_for_trace_id_a_w3c_one_its_envelopes_carry(client):
    """Keyed and keyless sends, a batch, a pipeline run, the built-in pipeline, a rerun: one rule, so a
    trace id names its job (``job-`` + it) without an index."""
    from mesh.agents.pipelines import Pipeline
    from mesh.broker.client import trace_id_for, trace_id_of
    from mesh.contracts import Envelope

    spec = Pipeline("traced").step("researcher").build()
    run = client.run(spec, {"question": "q"}, key="traced-run")
    refs = [client.send("executor", NOTE, key="traced-1"), client.send("executor", NOTE),
            *client.send_many("executor", [(NOTE, "traced-2"), (NOTE, None)]), run,
            client.run(spec, {"question": "q"}), client.submit("a goal"), client.rerun(run.id, "researcher")]
    for ref in refs:
        record = client.status(ref.id)
        assert ref.trace_id == record.trace_id == trace_id_of(ref.id) == ref.id.removeprefix("job-"), ref
        assert trace_id_for(ref.key) == ref.trace_id
        assert re.fullmatch(r"[0-9a-f]{32}", ref.trace_id) and set(ref.trace_id) != {"0"}
    sent = [loads(m)["args"][0] for keys in client.shards.keys for m in client.redis.hvals(keys.messages("executor"))]
    assert sent and all(env["trace_id"] == trace_id_of(env["job_id"]) for env in sent)
    assert all(Envelope.model_validate(env) for env in sent)  # the envelope's W3C check takes them


def test_a_key_the_envelope_refuses_is_refused_and_nothing_reaches_redis(client):
    with pytest.raises(ValidationError, match="key"):
        client.send_many("executor", [(NOTE, "fine"), (NOTE, "k" * 513)])
    assert nothing_in_redis(client)


def test_a_conflict_in_a_later_chunk_leaves_the_earlier_chunks_sent_and_the_rest_unsent(client):
    """Chunks are built while the one before is written, but written only after it: the chunk after
    the conflicting one, already built, is not sent either."""
    client.send("executor", NOTE, key="taken")
    other = {"tool": "note", "args": {"title": "other"}}
    items = [(NOTE, f"c-{i}") for i in range(4)] + [(other, "taken")] + [(NOTE, f"c-{i}") for i in range(5, 9)]
    with pytest.raises(KeyConflict) as caught:
        client.send_many("executor", items, chunk=3)
    assert caught.value.context["key"] == "taken"
    assert [keyed(client, f"c-{i}") is not None for i in range(9) if i != 4] == [True] * 3 + [False] * 5
    assert client.queues(["executor"])["executor"]["ready"] == 1 + 3


def test_a_re_sent_key_with_its_own_payload_is_sent_again_and_its_record_kept(client):
    first = client.send_many("executor", [(NOTE, "again"), (NOTE, "again")])
    assert first[0] == first[1]
    record = client.status(first[0].id)
    client.send_many("executor", [(NOTE, "again")])
    assert client.status(first[0].id) == record  # SET NX: never reset
    assert client.queues(["executor"])["executor"]["ready"] == 3  # each send delivers; receivers deduplicate
    assert len(client.redis.xrange(client.keys.trace(first[0].id))) == 3


def test_a_record_without_a_payload_hash_binds_nothing(client):
    """Records written before keys were bound accept any payload under their key (as before)."""
    ref = client.send("executor", NOTE, key="old")
    stored = loads(client.redis.get(client.keys_of(ref.id).job(ref.id)))
    client.redis.set(client.keys_of(ref.id).job(ref.id), dumps({**stored, "payload_hash": None}))
    other = {"tool": "note", "args": {"title": "other"}}
    client.send_many("executor", [(other, "old"), (NOTE, "old")])
    assert client.queues(["executor"])["executor"]["ready"] == 3


def test_a_chunk_larger_than_the_scripts_slice_is_written_whole(client):
    items = [({"tool": "note", "args": {"title": f"n{i}"}}, f"big-{i}") for i in range(2_100)]
    refs = client.send_many("executor", items, chunk=2_100)
    assert client.queues(["executor"])["executor"]["ready"] == 2_100
    assert sum(client.redis.zcard(keys.jobs) for keys in client.shards.keys) == 2_100
    assert all(client.redis.mget([client.keys_of(r.id).job(r.id) for r in refs]))
    assert client.redis.llen(client.keys.wake("executor")) == 64  # capped


def test_a_conflict_writes_nothing_of_its_batch_not_even_the_fresh_keys_before_it(client):
    """The records are created first (SET NX) and a conflict found at a later item removes the ones
    the batch created: no record, trace, index entry or message of the batch is left."""
    client.send("executor", NOTE, key="held")
    other = {"tool": "note", "args": {"title": "other"}}
    for items, key in (([(NOTE, "fresh-1"), (NOTE, "fresh-2"), (other, "held")], "held"),
                       ([(NOTE, "fresh-3"), (NOTE, "twice"), (other, "twice")], "twice")):
        with pytest.raises(KeyConflict) as caught:
            client.send_many("executor", items)
        assert caught.value.context["key"] == key
        for _payload, sent in items:
            if sent != "held":
                job = job_id_for(sent)
                assert client.jobs_of(job).get(job) is None and not client.redis.exists(client.keys_of(job).trace(job))
                assert client.redis.zscore(client.keys_of(job).jobs, job) is None
    assert client.queues(["executor"])["executor"]["ready"] == 1


@pytest.mark.slow
def test_a_fresh_key_is_checked_by_the_write_of_its_record_alone(tmp_path, make_settings):
    """A key given by the sender was read (GET) before its record was written (SET NX): the SET NX
    alone tells a fresh key, and only a key already taken is read for the payload it is bound to."""
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)  # started: PrivateRedis starts its server itself
    try:
        client = MeshClient(make_settings(redis_url=server.url))
        client.send("executor", NOTE, key="warm")  # the script loaded

        def gets() -> int:
            return int(client.redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0))

        before = gets()
        client.send_many("executor", [(NOTE, f"new-{i}") for i in range(3)])
        assert gets() - before == 0
        client.send_many("executor", [(NOTE, "warm"), (NOTE, "new-4")])
        assert gets() - before == 1  # the key taken already
        assert client.queues(["executor"])["executor"]["ready"] == 6
        client.redis.close()
    finally:
        server.stop()


def test_a_key_whose_record_cannot_be_read_fails_its_batch_with_nothing_written(client):
    """A checked key whose record is of another type fails the call; the records the batch created
    before reaching it (SET NX first) are removed, as when every key was read before any write."""
    client.redis.hset(client.keys_of(job_id_for("broken")).job(job_id_for("broken")), "x", "y")
    with pytest.raises(Exception, match="WRONGTYPE"):
        client.send_many("executor", [(NOTE, "before-1"), (NOTE, "before-2"), (NOTE, "broken")])
    assert keyed(client, "before-1") is None and keyed(client, "before-2") is None
    assert client.queues(["executor"])["executor"]["ready"] == 0


@pytest.mark.parametrize("stored", [b"5", b"true", b"null", b'"text"', b"[1]"])
def test_a_key_whose_record_is_json_but_no_object_leaves_nothing_of_its_batch(client, stored):
    """A record that is JSON but not an object: a number, true or null fails the call (its payload_hash
    cannot be read) with the records the batch created before it removed; a string or an array binds
    nothing, as a record without a payload_hash (as when every key was read before any write)."""
    client.redis.set(client.keys_of(job_id_for("odd")).job(job_id_for("odd")), stored)
    items = [(NOTE, "before-1"), (NOTE, "before-2"), (NOTE, "odd")]
    if stored in (b'"text"', b"[1]"):
        client.send_many("executor", items)
        assert client.queues(["executor"])["executor"]["ready"] == 3
        return
    with pytest.raises(Exception, match="attempt to index"):
        client.send_many("executor", items)
    assert keyed(client, "before-1") is None and keyed(client, "before-2") is None
    assert client.queues(["executor"])["executor"]["ready"] == 0
    assert client.redis.get(client.keys_of(job_id_for("odd")).job(job_id_for("odd"))) == stored


@pytest.mark.parametrize("stored", [None, b"5", b"true", b"null", b'"text"', b"[1]", b"hash", b"unbound", b"bound"])
def test_a_single_send_checks_its_key_as_a_batch_does(client, stored):
    """A send of one job takes the script's path for one job: its key is checked as a batch's are. A
    record bound to another payload is a KeyConflict, one of another type or a JSON number, true or
    null fails the call, each with nothing written; a string, an array or a record bound to nothing
    binds nothing; the same payload is the same job, its message sent again."""
    key, job = "single", job_id_for("single")
    other = {"tool": "note", "args": {"title": "other"}}
    if stored == b"hash":
        client.redis.hset(client.keys_of(job).job(job), "x", "y")
    elif stored in (b"unbound", b"bound"):
        client.send("executor", other if stored == b"bound" else NOTE, key=key)
        if stored == b"unbound":
            record = loads(client.redis.get(client.keys_of(job).job(job)))
            client.redis.set(client.keys_of(job).job(job), dumps({**record, "payload_hash": None}))
    elif stored is not None:
        client.redis.set(client.keys_of(job).job(job), stored)
    before = client.redis.get(client.keys_of(job).job(job)) if stored != b"hash" else None
    ready = client.queues(["executor"])["executor"]["ready"]
    if stored in (b"hash", b"5", b"true", b"null", b"bound"):
        with pytest.raises(KeyConflict if stored == b"bound" else Exception,
                           match={b"hash": "WRONGTYPE", b"bound": "single"}.get(stored, "attempt to index")):
            client.send("executor", NOTE, key=key)
        assert client.queues(["executor"])["executor"]["ready"] == ready
        assert len(client.redis.xrange(client.keys_of(job).trace(job))) == (1 if stored == b"bound" else 0)
    else:
        ref = client.send("executor", NOTE, key=key)
        assert ref.id == job and client.queues(["executor"])["executor"]["ready"] == ready + 1
        assert client.redis.zscore(client.keys_of(job).jobs, job) is not None
    if stored is None:
        assert client.status(job).payload_hash == payload_hash("executor", NOTE)
    elif stored != b"hash":
        assert client.redis.get(client.keys_of(job).job(job)) == before  # SET NX: never replaced


def test_sends_keep_the_wake_up_tokens_within_the_cap_one_a_message(client):
    """One token a message, up to WAKE_CAP (64) waiting: a single send onto a full list adds none, onto
    a list a consumer took from adds one; a batch fills what is left."""
    wake = client.keys.wake("executor")
    for i in range(70):
        client.send("executor", NOTE, key=f"w-{i}")
    assert client.redis.llen(wake) == 64
    client.redis.lpop(wake, 10)
    for i in range(3):
        client.send("executor", NOTE, key=f"w2-{i}")
    assert client.redis.llen(wake) == 57
    client.send_many("executor", [(NOTE, f"w3-{i}") for i in range(5)])
    assert client.redis.llen(wake) == 62
    client.send_many("executor", [(NOTE, f"w4-{i}") for i in range(5)])
    assert client.redis.llen(wake) == 64
    assert client.redis.lrange(wake, 0, -1) == [b"1"] * 64


@pytest.mark.slow
def test_a_send_onto_a_full_wake_up_list_reads_its_length_and_writes_nothing_to_it(tmp_path, make_settings):
    """The cap is kept by reading the list's length before pushing (LLEN), not by pushing and trimming
    back (RPUSH, LTRIM): with the consumers busy and the list full, one command a send, not two."""
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)  # started: PrivateRedis starts its server itself
    try:
        client = MeshClient(make_settings(redis_url=server.url))
        for i in range(64):
            client.send("executor", NOTE, key=f"fill-{i}")

        def calls() -> dict[str, int]:
            stats = client.redis.info("commandstats")
            return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("llen", "ltrim", "rpush")}

        before = calls()
        for i in range(5):
            client.send("executor", NOTE, key=f"full-{i}")
        client.send_many("executor", [(NOTE, f"full-many-{i}") for i in range(3)])
        after = calls()
        assert after["ltrim"] - before["ltrim"] == 0
        assert after["llen"] - before["llen"] == 6
        assert after["rpush"] - before["rpush"] == 6  # the messages' ids on the queue alone
        assert client.redis.llen(client.keys.wake("executor")) == 64
        client.redis.close()
    finally:
        server.stop()
