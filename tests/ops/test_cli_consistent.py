"""Issue 24, the CLI consistent: commands that name the same things take them the same way, and
say the same thing about them."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from conftest import flat

from mesh.broker import MeshClient
from mesh.broker.client import job_id_for
from mesh.broker.outbox import encode
from mesh.dlq import DeadLetter, DeadLetterStore, Filter
from mesh.dlq.entry import Attempt


def sent(cli, key: str) -> str:
    res = cli("send", "researcher", "--payload", '{"question": "what is a DLQ?"}', "--key", key, "--json")
    assert res.returncode == 0, res.stderr
    job_id: str = json.loads(res.stdout)[0]["job_id"]
    return job_id


def test_trace_takes_a_job_key_an_id_and_its_start_as_status_does(cli):
    job_id = sent(cli, "order-7")
    for given in ("order-7", job_id, job_id[:10], job_id[4:12]):
        status, trace = cli("status", given, "--json"), cli("trace", given, "--json")
        assert status.returncode == trace.returncode == 0, (given, status.stderr, trace.stderr)
        assert json.loads(status.stdout)["job_id"] == json.loads(trace.stdout)["job_id"] == job_id


@pytest.mark.parametrize("given", ["key", "id"])
def test_trace_of_an_expired_job_says_it_expired_as_status_does(cli, settings, rclient, given):
    job_id = sent(cli, "order-8")
    keys = MeshClient(settings, client=rclient).keys
    rclient.delete(keys.job(job_id), keys.trace(job_id))  # what retention removes; the index still names it
    name = "order-8" if given == "key" else job_id
    said = f"job {job_id} expired: records are kept MESH_JOB_RETENTION_S="
    for cmd in ("status", "trace"):
        res = cli(cmd, name)
        assert res.returncode == 2 and said in flat(res.stderr), (cmd, res.stderr)
    for cmd in ("status", "trace"):
        res = cli(cmd, "order-never-sent")
        assert res.returncode == 2
        assert "no job order-never-sent (nor a job of key 'order-never-sent')" in flat(res.stderr), (cmd, res.stderr)


def dead_letter(client: MeshClient, key: str) -> DeadLetter:
    """A dead letter of a one-message job (``mesh send``) of the executor, as the settle script writes it:
    a replay recreates its job, so it needs no worker to move."""
    from dramatiq.message import Message

    now = time.time()
    envelope = {"key": key, "job_id": job_id_for(key), "step_id": "executor", "agent": "executor",
                "trace_id": uuid.uuid4().hex, "deadline": now + 600, "hops": [], "attempt": 1, "schema_version": 1,
                "replay_of": None, "payload": {"tool": "note", "args": {"title": key}}}
    entry = DeadLetter(entry_id=str(uuid.uuid4()), queue="executor", agent="executor", failure_class="permanent",
                       error=f"{key} failed", envelope=envelope, key=key, job_id=envelope["job_id"],
                       trace_id=envelope["trace_id"], attempts=(Attempt(attempt=1, outcome="dead_lettered", at=now),),
                       worker="w", dead_lettered_at=now)
    raw = encode(Message(queue_name="executor", actor_name="executor", args=(envelope,), kwargs={}, options={},
                         message_id=entry.entry_id))
    assert DeadLetterStore(client.redis, client.keys).put(entry, raw)
    return entry


def test_dlq_replay_of_entries_named_by_id_needs_no_yes_but_all_and_filters_still_do(cli, client):
    store = DeadLetterStore(client.redis, client.keys)
    one, two, other = (dead_letter(client, f"order-{n}") for n in (1, 2, 3))
    res = cli("dlq", "replay", one.entry_id, "--json")  # stdin is no terminal here: nothing to ask on
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ids"] == [one.entry_id]
    res = cli("dlq", "replay", two.entry_id[:13])  # a unique start names it too
    assert res.returncode == 0 and "replayed 1 dead letter(s)" in res.stdout, res.stderr
    assert {e.entry_id for e in store.entries(Filter())} == {other.entry_id}
    assert client.queues(["executor"])["executor"]["ready"] == 2
    for args in (("--all",), ("--class", "permanent")):
        res = cli("dlq", "replay", *args)
        assert res.returncode == 2 and "replay 1 dead letter(s): add --yes to confirm" in flat(res.stderr), res.stderr
    assert {e.entry_id for e in store.entries(Filter())} == {other.entry_id}


def test_the_no_worker_hint_repeats_the_app_it_was_given_and_names_the_published_app_without_one(
        cli, settings, rclient):
    from examples.quickstart.app import app as quickstart
    from mesh.broker.registry import Registry
    from mesh.ops.worker import published

    args = ("--input", '{"topic": "otters"}', "--wait", "--timeout", "0.5")
    for given in ("examples.quickstart.app", "examples.quickstart.app:app"):
        res = cli("run", "article", "--app", given, *args)
        assert res.returncode == 4
        assert f"no live worker serves writer (start one: mesh worker --app {given}; see" in flat(res.stderr)
    # A run by name without --app: the app its workers published (they are gone, the record stays).
    keys = MeshClient(settings, client=rclient).keys
    Registry(rclient, keys, settings.heartbeat_timeout_s).publish(
        "w-gone", "host:1", [published(a, quickstart.name) for a in quickstart.agents.values()], app=quickstart.name)
    rclient.zrem(keys.heartbeats, "w-gone")  # its publish's heartbeat reaped
    res = cli("run", "article", *args)
    assert res.returncode == 4
    assert ("start one: mesh worker --app MODULE:APP (the import path of app 'quickstart'); see mesh agents"
            in flat(res.stderr)), res.stderr


def test_dlq_show_of_a_replayed_entry_shows_it_as_replayed_when_by_whom_and_as_which_message(cli, client):
    from mesh.broker import trace
    from mesh.broker.trace import operator

    entry = dead_letter(client, "order-9")
    res = cli("dlq", "replay", entry.entry_id, "--json", MESH_DLQ_RETENTION_S="3600")
    assert res.returncode == 0 and json.loads(res.stdout)["ids"] == [entry.entry_id], res.stderr
    (event,) = [e for e in trace.read(client.redis, client.keys, entry.job_id) if e["event"] == "replayed"]

    shown = cli("dlq", "show", entry.entry_id, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "replayed" and data["entry_id"] == entry.entry_id
    assert (data["agent"], data["failure_class"], data["error"], data["key"]) == (
        "executor", "permanent", "order-9 failed", "order-9")
    assert data["message_id"] == event["message_id"] and data["queue"] == "executor"
    assert data["job_id"] == entry.job_id and data["replayed_by"] == operator() == event["by"]
    assert data["replay_count"] == 1 and abs(data["replayed_at"] - time.time()) < 60
    assert [r["op"] for r in data["audit"]] == ["replay"]
    assert data["audit"][0]["detail"]["message_id"] == event["message_id"]
    # Kept as long as the entry could have stayed in the DLQ: MESH_DLQ_RETENTION_S.
    assert 3500 < client.redis.ttl(client.keys.dlq_replayed(entry.entry_id)) <= 3600

    human = cli("dlq", "show", entry.entry_id)
    text = flat(human.stdout)
    assert human.returncode == 0, human.stderr
    assert f"entry_id: {entry.entry_id}\nstate: replayed (no longer in the DLQ)" in human.stdout
    assert f"by {operator()}" in text and f"message_id: {event['message_id']}" in text
    assert "queue: executor (replay 1)" in text and f"job_id: {entry.job_id}" in text
    assert all(len(line) <= 80 for line in human.stdout.splitlines()), human.stdout
    missing = cli("dlq", "show", str(uuid.uuid4()))
    assert missing.returncode == 2 and "no dead letter" in flat(missing.stderr)


def test_a_replayed_entrys_tombstone_lives_for_the_dedup_ttl_when_dlq_retention_is_off(cli, client):
    entry = dead_letter(client, "order-10")
    assert cli("dlq", "replay", entry.entry_id, MESH_DEDUP_TTL_S="7200").returncode == 0
    assert 7100 < client.redis.ttl(client.keys.dlq_replayed(entry.entry_id)) <= 7200
