"""``mesh dlq`` as a real subprocess against real Redis: list and show every field of real dead
letters, filters and stats, purge, the confirmations, and poison bytes."""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import flat, push_raw, stat, wait_for

from mesh.broker import MeshClient
from mesh.broker.outbox import encode
from mesh.contracts import State
from mesh.dlq import Audit, DeadLetter, DeadLetterShards, Filter
from mesh.dlq.entry import Attempt
from tests.dlq.bulk import agent_of, class_of, generate, nth_id
from tests.httpserver import RecordingServer

EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}
AGENTS = ("planner", "researcher", "executor")
FIELDS = {"entry_id", "queue", "agent", "failure_class", "error", "traceback", "envelope", "key", "job_id",
          "trace_id", "attempts", "worker", "host", "dead_lettered_at", "replay_count", "replay_of", "dependency",
          "raw_bytes", "raw_sha256"}
REFUSED_URL = "http://127.0.0.1:9/hook"  # never in MESH_HTTP_ALLOW here: refused, permanently


def store_of(client: MeshClient) -> DeadLetterShards:
    """The DLQ of every shard (MESH_SHARDS): a dead letter is kept in its job's shard."""
    return DeadLetterShards.of(client.redis, client.settings)


def all_entries(store: DeadLetterShards) -> dict[str, DeadLetter]:
    return {e.entry_id: e for e in store.entries(Filter(), limit=10_000)}


def audit_records(client: MeshClient, entry_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The DLQ's audit records of every shard (an entry is audited in the shard that keeps it)."""
    return [r for keys in client.shards.keys for r in Audit(client.redis, keys).records(entry_id, limit=limit)]


def never_counted(client: MeshClient, name: str) -> bool:
    """Whether no shard's ``stats`` has the counter ``name`` at all (not even at 0)."""
    return all(client.redis.hget(keys.stats, name) is None for keys in client.shards.keys)


def newest_first(client: MeshClient) -> list[str]:
    """The DLQ's entry ids, newest first, over every shard (as its own index orders them)."""
    scored = [(score, member.decode()) for keys in client.shards.keys
              for member, score in client.redis.zrange(keys.dlq, 0, -1, withscores=True)]
    return [member for _, member in sorted(scored, reverse=True)]


def run_json(cli: Any, *args: str) -> Any:
    res = cli(*args, "--json")
    assert res.returncode == 0, (args, res.stderr)
    return json.loads(res.stdout)


def put(store: DeadLetterShards, name: str, agent: str | None, failure_class: str, at: float) -> DeadLetter:
    """An entry in the layout the settle script writes (``name`` is its key, to tell them apart)."""
    from dramatiq.message import Message

    envelope = {"key": name, "job_id": f"job-{name}", "step_id": agent or "executor", "agent": agent or "executor",
                "trace_id": uuid.uuid4().hex, "deadline": at + 600, "hops": [], "attempt": 1, "schema_version": 1,
                "replay_of": None, "payload": {"tool": "note", "args": {"title": name}}}
    entry = DeadLetter(entry_id=str(uuid.uuid4()), queue=agent or "executor", agent=agent,
                       failure_class=failure_class, error=f"{name} failed", envelope=envelope, key=name,
                       job_id=envelope["job_id"], trace_id=envelope["trace_id"],
                       attempts=(Attempt(attempt=1, outcome="dead_lettered", at=at),), worker="w", dead_lettered_at=at)
    raw = encode(Message(queue_name=entry.queue, actor_name=agent or "executor", args=(envelope,), kwargs={},
                         options={}, message_id=entry.entry_id))
    assert store.put(entry, raw)
    return entry


# -- list and show -------------------------------------------------------------------------------

def test_permanent_failures_are_listed_with_every_field_and_show_gives_the_payload_exactly_as_sent(
        client, make_settings, start_worker, cli, tmp_path):
    order = {"order": 7, "name": "Zoë ✓ 東京", "items": [{"sku": "a-1", "qty": 2, "price": 9.99}],
             "flags": {"gift": True, "note": None}, "big": 12345678901234, "ratio": 0.1}
    with RecordingServer(lambda n, request: (400, {"error": "bad order"})) as server, \
            RecordingServer() as elsewhere:
        settings = make_settings(http_allow=server.host_port)
        rejected = {"tool": "http_post", "args": {"url": server.url("/orders"), "json": order}}
        refused = {"tool": "http_post", "args": {"url": elsewhere.url("/orders"), "json": {"order": 8}}}
        started = time.time()
        ref_rejected = client.send("executor", rejected, key="order-7")
        ref_refused = client.send("executor", refused, key="order-8")
        start_worker(settings, ("executor",))
        for ref in (ref_rejected, ref_refused):
            assert client.wait(ref.id, timeout_s=20).state is State.DEAD_LETTERED
        wait_for(lambda: store_of(client).count() == 2)
        finished = time.time()
        assert [r["headers"]["idempotency-key"] for r in server.requests] == ["order-7"]
        assert elsewhere.requests == []

    listed = run_json(cli, "dlq", "list")
    assert len(listed) == 2
    assert [e["entry_id"] for e in listed] == newest_first(client)
    by_key = {e["key"]: e for e in listed}
    expected = {ref_rejected.key: (ref_rejected, rejected, "PermanentFailure", f"{server.host_port} answered 400"),
                ref_refused.key: (ref_refused, refused, "ToolRefused", "not in MESH_HTTP_ALLOW")}
    assert set(by_key) == set(expected)
    for key, (ref, payload, exc_name, error) in expected.items():
        e = by_key[key]
        assert set(e) == FIELDS
        uuid.UUID(e["entry_id"])
        assert (e["queue"], e["agent"], e["failure_class"]) == ("executor", "executor", "permanent")
        assert error in e["error"]
        assert e["traceback"].startswith("Traceback (most recent call last)") and exc_name in e["traceback"]
        assert (e["key"], e["job_id"], e["trace_id"]) == (ref.key, ref.id, ref.trace_id)
        env = e["envelope"]
        assert (env["key"], env["job_id"], env["trace_id"]) == (ref.key, ref.id, ref.trace_id)
        assert env["hops"] == [] and env["agent"] == "executor" and env["attempt"] == 1
        assert started + settings.job_deadline_s - 1 <= env["deadline"] <= finished + settings.job_deadline_s
        assert env["payload"] == payload
        assert len(e["attempts"]) == 1
        attempt = e["attempts"][0]
        assert (attempt["attempt"], attempt["outcome"], attempt["failure_class"]) == (1, "dead_lettered", "permanent")
        assert started <= attempt["at"] <= finished and error in attempt["error"]
        assert e["worker"] and attempt["worker"] == e["worker"]
        assert e["host"] == socket.gethostname()
        assert started <= e["dead_lettered_at"] <= finished
        assert e["replay_count"] == 0 and e["replay_of"] is None

    entry_id = by_key["order-7"]["entry_id"]
    shown = run_json(cli, "dlq", "show", entry_id)
    assert {k: shown[k] for k in FIELDS} == by_key["order-7"]
    assert shown["message"]["args"][0]["payload"] == rejected  # the bytes as sent, decoded
    assert shown["envelope"]["payload"] == rejected
    assert shown["message"]["args"][0] == shown["envelope"]
    assert shown["raw"] is None and shown["audit"] == []

    # drained and loaded back, it shows both operations in its audit, newest first
    path = tmp_path / "dead.jsonl"
    assert run_json(cli, "dlq", "drain", "--to", str(path), "--yes")["drained"] == 2
    assert run_json(cli, "dlq", "load", str(path)) == {"loaded": 2, "already_present": 0}
    shown = run_json(cli, "dlq", "show", entry_id)
    assert [(a["op"], a["entry_id"]) for a in shown["audit"]] == [("load", entry_id), ("drain", entry_id)]
    assert all(a["who"] and started <= a["at"] for a in shown["audit"])
    assert shown["envelope"]["payload"] == rejected and shown["message"]["args"][0]["payload"] == rejected

    # the human forms print the same entry
    text = cli("dlq", "show", entry_id)
    assert text.returncode == 0 and "order-7" in text.stdout and "Zoë ✓ 東京" in text.stdout
    table = cli("dlq", "list")
    assert table.returncode == 0 and "permanent" in table.stdout, table.stderr


def test_show_of_an_unknown_entry_exits_2(cli, client):
    res = cli("dlq", "show", "no-such-entry", "--json")
    assert res.returncode == 2 and "no dead letter 'no-such-entry'" in flat(res.stderr)


# -- filters and stats -----------------------------------------------------------------------------

def test_list_filters_by_agent_class_since_until_and_limit_and_stats_counts_with_oldest_and_newest(cli, client):
    store = store_of(client)
    now = time.time()
    layout = {"d3": ("planner", "invalid_input", now - 3 * 86400), "h5": ("executor", "permanent", now - 5 * 3600),
              "m90": ("researcher", "deadline", now - 90 * 60), "m10": ("executor", "timeout", now - 600),
              "m1": ("executor", "permanent", now - 60)}
    for name, (agent, failure_class, at) in layout.items():
        put(store, name, agent, failure_class, at)

    def listed(*args: str) -> list[str]:
        return [e["key"] for e in run_json(cli, "dlq", "list", *args)]

    def iso(dt: datetime, fmt: str = "%Y-%m-%dT%H:%M:%S") -> str:
        return dt.strftime(fmt)

    two_hours_ago = datetime.fromtimestamp(now - 2 * 3600, tz=UTC)
    cases: list[tuple[tuple[str, ...], list[str]]] = [
        ((), ["m1", "m10", "m90", "h5", "d3"]),
        (("--agent", "executor"), ["m1", "m10", "h5"]),
        (("--agent", "planner"), ["d3"]),
        (("--class", "permanent"), ["m1", "h5"]),
        (("--class", "cycle"), []),
        (("--agent", "executor", "--class", "permanent"), ["m1", "h5"]),
        (("--agent", "researcher", "--class", "permanent"), []),
        (("--since", "1h"), ["m1", "m10"]),
        (("--since", "2h", "--until", "1h"), ["m90"]),
        (("--since", "4d", "--until", "1d"), ["d3"]),
        (("--since", "30s"), []),
        (("--until", "2h"), ["h5", "d3"]),
        (("--since", "45m", "--agent", "executor"), ["m1", "m10"]),
        (("--since", "1.5d", "--class", "permanent"), ["m1", "h5"]),
        (("--since", iso(two_hours_ago) + "Z"), ["m1", "m10", "m90"]),
        (("--since", iso(two_hours_ago)), ["m1", "m10", "m90"]),  # no zone: UTC
        (("--since", iso(two_hours_ago.astimezone(timezone(timedelta(hours=2))), "%Y-%m-%dT%H:%M:%S%z")),
         ["m1", "m10", "m90"]),
        (("--since", str(int(now - 6 * 3600)), "--until", f"{now - 2 * 3600:.3f}"), ["h5"]),
        (("--until", str(int(now - 86400))), ["d3"]),
        (("--limit", "2"), ["m1", "m10"]),
        (("--agent", "executor", "--limit", "1"), ["m1"]),
        (("--class", "permanent", "--since", "1d", "--limit", "1"), ["m1"]),
    ]
    for args, expected in cases:
        assert listed(*args) == expected, args

    res = cli("dlq", "list", "--class", "bogus")
    assert res.returncode == 2 and "unknown failure class 'bogus'" in flat(res.stderr)
    assert "permanent" in res.stderr and "invalid_input" in res.stderr
    res = cli("dlq", "list", "--since", "yesterday")
    assert res.returncode == 2 and "yesterday" in res.stderr
    res = cli("dlq", "list", "--limit", "0")
    assert res.returncode == 2

    stats = run_json(cli, "dlq", "stats")
    assert {k: stats[k] for k in ("total", "by_agent", "by_class")} == {
        "total": 5, "by_agent": {"planner": 1, "executor": 3, "researcher": 1},
        "by_class": {"invalid_input": 1, "permanent": 2, "deadline": 1, "timeout": 1}}
    assert stats["oldest_at"] == pytest.approx(now - 3 * 86400, abs=1e-3)
    assert stats["newest_at"] == pytest.approx(now - 60, abs=1e-3)
    human = cli("dlq", "stats")
    assert human.returncode == 0 and "5 dead letters" in human.stdout


# -- confirmations, purge ---------------------------------------------------------------------------

def test_replay_without_yes_and_without_a_terminal_exits_2_and_changes_nothing(client, settings, start_worker, cli):
    refs = [client.send("executor", {"tool": "http_post", "args": {"url": REFUSED_URL, "json": {"n": i}}})
            for i in range(2)]
    worker = start_worker(settings, ("executor",))
    assert {client.wait(ref.id, timeout_s=20).state for ref in refs} == {State.DEAD_LETTERED}
    store = store_of(client)
    wait_for(lambda: store.count() == 2)
    wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY)
    # Stopped before the records are read: its retention sweep compacts ended jobs' records, a change
    # of their own that the comparison below would take for one the refused replays made.
    worker.stop(timeout=10_000)
    records = {ref.id: client.status(ref.id) for ref in refs}
    before = all_entries(store)

    for args in (("--all",), ("--class", "permanent"), ("--agent", "executor", "--since", "1h")):
        res = cli("dlq", "replay", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "--yes" in flat(res.stderr) and "replay 2 dead letter(s)" in flat(res.stderr), res.stderr
    for args in ((), ("--all", "--class", "permanent"), ("--all", next(iter(before)))):
        res = cli("dlq", "replay", *args, "--yes")
        assert res.returncode == 2 and "give entry ids, or --all, or filters" in flat(res.stderr), args

    assert all_entries(store) == before
    assert client.queues() == {a: EMPTY for a in AGENTS}
    assert {ref.id: client.status(ref.id) for ref in refs} == records
    assert audit_records(client) == []
    assert never_counted(client, "replayed")


def test_purge_refuses_without_yes_and_with_yes_deletes_only_the_matching_entries_with_audit(cli, client):
    store = store_of(client)
    now = time.time()
    layout = [("p1", "executor", "permanent", 50), ("p2", "executor", "permanent", 40),
              ("p3", "planner", "permanent", 30), ("i1", "planner", "invalid_input", 20),
              ("t1", "executor", "timeout", 10), ("t2", "researcher", "timeout", 5)]
    made = {name: put(store, name, agent, failure_class, now - age) for name, agent, failure_class, age in layout}
    before = all_entries(store)
    for args in (("--all",), ("--class", "permanent"), (made["p1"].entry_id,), ("--all", "--json")):
        res = cli("dlq", "purge", *args)
        assert res.returncode == 2 and "--yes" in flat(res.stderr), (args, res.stderr)
    res = cli("dlq", "purge", "--yes")
    assert res.returncode == 2 and "give entry ids, or --all, or filters" in flat(res.stderr)
    assert all_entries(store) == before
    assert audit_records(client) == []

    assert run_json(cli, "dlq", "purge", "--agent", "executor", "--class", "permanent", "--yes") == {"purged": 2}
    assert set(all_entries(store)) == {made[n].entry_id for n in ("p3", "i1", "t1", "t2")}
    assert run_json(cli, "dlq", "purge", "--class", "timeout", "--since", str(now - 7), "--yes") == {"purged": 1}
    assert set(all_entries(store)) == {made[n].entry_id for n in ("p3", "i1", "t1")}
    assert run_json(cli, "dlq", "purge", made["i1"].entry_id, "no-such-id", "--yes") == {"purged": 1}
    assert set(all_entries(store)) == {made[n].entry_id for n in ("p3", "t1")}

    for name in ("p1", "p2", "t2", "i1"):
        (record,) = audit_records(client, made[name].entry_id)
        assert record["op"] == "purge" and record["who"]
        assert record["detail"] == {"failure_class": made[name].failure_class, "agent": made[name].agent}
    for name in ("p3", "t1"):
        assert audit_records(client, made[name].entry_id) == []
        assert store.get(made[name].entry_id) == made[name]
    stats = store.stats()
    assert stats["total"] == 2 and stats["by_class"] == {"permanent": 1, "timeout": 1}
    assert stats["by_agent"] == {"planner": 1, "executor": 1}
    assert stat(client.redis, client.settings, "dlq_purged") == 4

    assert run_json(cli, "dlq", "purge", "--all", "--yes") == {"purged": 2}
    assert store.count() == 0 and store.stats()["by_class"] == {}


# -- every entry, whatever the batch sizes ---------------------------------------------------------

@pytest.mark.parametrize(("command", "n", "selection"), [
    ("replay", 1_201, ("--all",)),
    ("replay", 10_007, ("--agent", "planner")),
    ("drain", 10_007, ("--class", "timeout")),
    ("purge", 1_201, ("--agent", "executor", "--class", "permanent")),
], ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else " ".join(v))
def test_bulk_commands_take_every_selected_entry_and_leave_exactly_the_others(cli, client, tmp_path, command, n,
                                                                             selection):
    """Sizes that are no multiple of any batch: the report counts every entry that was selected, and the
    DLQ afterwards holds exactly the entries that were not."""
    home = client.shards.home  # the first shard's DLQ (the only one, with one shard) holds them all
    generate(client.redis, home, n, 1_700_000_000.0, per_ms=3)
    flags = dict(zip(selection[::2], selection[1::2], strict=False))
    chosen = {nth_id(i) for i in range(n) if flags.get("--agent") in (None, agent_of(i))
              and flags.get("--class") in (None, class_of(i))}
    extra = ("--to", str(tmp_path / "dead.jsonl")) if command == "drain" else ()

    res = cli("dlq", command, *selection, *extra, "--yes", "--json", timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    if command == "replay":
        assert report["replayed"] == len(chosen) and report["skipped"] == {} and set(report["ids"]) == chosen
        assert sum(q["ready"] for q in client.queues(AGENTS).values()) == len(chosen)
    elif command == "drain":
        assert report["drained"] == len(chosen)
        lines = (tmp_path / "dead.jsonl").read_bytes().splitlines()
        assert len(lines) == len(chosen) and {json.loads(line)["entry"]["entry_id"] for line in lines} == chosen
    else:
        assert report == {"purged": len(chosen)}
    left = {i.decode() for i in client.redis.zrange(home.dlq, 0, -1)}
    assert left == {nth_id(i) for i in range(n)} - chosen
    assert store_of(client).count() + len(chosen) == n


# -- poison ---------------------------------------------------------------------------------------

def test_garbage_in_an_agent_queue_is_one_invalid_input_entry_keeping_its_bytes_and_replay_refuses_it(
        client, settings, start_worker, cli):
    data = b"\x00\x01garbage: {not json at all \xc3\xa9 [1, 2"  # valid UTF-8, not a message
    goal = "Find out how retries work, then write a note"
    refs = [client.submit(goal, key=f"goal-{i}") for i in range(2)]
    rid = push_raw(client, "planner", data)
    refs += [client.submit(goal, key=f"goal-{i}") for i in range(2, 4)]
    start_worker(settings)

    for ref in refs:  # the valid messages behind the garbage complete
        assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
    store = store_of(client)
    wait_for(lambda: store.count() == 1)
    wait_for(lambda: client.queues() == {a: EMPTY for a in AGENTS})
    (entry,) = all_entries(store).values()
    assert entry.entry_id == rid
    assert (entry.failure_class, entry.agent, entry.queue) == ("invalid_input", "planner", "planner")
    assert entry.error.startswith("undecodable message")
    assert entry.envelope is None and entry.key is None and entry.job_id is None
    assert store.store_of(rid).raw(rid) == data
    assert stat(client.redis, client.settings, "poison") == 1

    listed = run_json(cli, "dlq", "list", "--class", "invalid_input", "--agent", "planner")
    assert [e["entry_id"] for e in listed] == [rid]
    shown = run_json(cli, "dlq", "show", rid)
    assert shown["message"] is None and shown["raw"] == data.decode()
    assert shown["agent"] == "planner" and shown["failure_class"] == "invalid_input"
    stats = run_json(cli, "dlq", "stats")
    assert stats["by_agent"] == {"planner": 1} and stats["by_class"] == {"invalid_input": 1}

    for args in ((rid,), ("--class", "invalid_input"), ("--all",)):
        res = cli("dlq", "replay", *args, "--yes", "--json")
        assert res.returncode == 1, (args, res.stderr)
        report = json.loads(res.stdout)
        assert report["replayed"] == 0 and report["ids"] == [] and list(report["skipped"]) == [rid], report
        assert "drain or purge" in report["skipped"][rid]
    res = cli("dlq", "replay", rid, "--yes")  # the human form names the entry and the reason
    assert res.returncode == 1 and f"skipped {rid}" in flat(res.stderr) and "drain or purge" in flat(res.stderr)

    assert all_entries(store) == {rid: entry} and store.store_of(rid).raw(rid) == data
    assert audit_records(client, rid) == []
    assert client.queues() == {a: EMPTY for a in AGENTS}
    assert never_counted(client, "replayed")


def test_show_json_gives_back_poison_bytes_that_are_not_utf8_exactly(client, settings, start_worker, cli):
    data = b"\xff\xfe\x00garbage \x80\x81 end"
    rid = push_raw(client, "executor", data)
    start_worker(settings, ("executor",))
    store = store_of(client)
    wait_for(lambda: store.count() == 1)
    assert store.store_of(rid).raw(rid) == data  # the DLQ keeps them

    shown = run_json(cli, "dlq", "show", rid)
    given = []
    for name in ("raw_b64", "raw_base64"):
        if isinstance(shown.get(name), str):
            given.append(base64.b64decode(shown[name]))
    if isinstance(shown.get("raw"), str):
        given += [shown["raw"].encode("utf-8", "surrogateescape"), shown["raw"].encode("latin-1", "replace")]
    assert data in given, shown


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_time_that_is_not_finite_is_bad_input_exit_2(cli, client, value):
    res = cli("dlq", "list", "--since", value, "--json")
    assert res.returncode == 2, res.stderr
    assert value in res.stderr and "Traceback" not in res.stderr


def test_drain_to_a_file_that_cannot_be_created_exits_2_and_removes_nothing(cli, client, tmp_path):
    store = store_of(client)
    entry = put(store, "k", "executor", "permanent", time.time())
    target = tmp_path / "no-such-dir" / "dead.jsonl"
    res = cli("dlq", "drain", "--to", str(target), "--yes")
    assert store.get(entry.entry_id) == entry and store.count() == 1
    assert res.returncode == 2 and str(target) in flat(res.stderr) and "Traceback" not in res.stderr, res.stderr
