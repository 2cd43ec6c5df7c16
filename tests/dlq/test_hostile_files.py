"""Hostile export files and the entries they leave: `mesh dlq load` refuses them, and replay, for an
entry already in the DLQ, leaves it there with the reason instead of writing where its bytes say.

A replay writes to the keys its message names, so a queue name from a file is a key name: these
tests aim it at the mesh's own keys (the counters hash, a claim), at another agent's label, and at
keys of the right name but the wrong type, over a real Redis."""

from __future__ import annotations

import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from mesh.broker import MeshClient, job_id_for
from mesh.dlq import Audit, DeadLetter, DeadLetterStore, ExportFileError, Filter, Replayer, Stored, load
from mesh.dlq.export import line_of


def envelope(key: str, agent: str = "executor", **extra: Any) -> dict[str, Any]:
    """A one-message job's envelope (its job id derives from its key: a replay may recreate its record)."""
    return {"key": key, "job_id": job_id_for(key), "step_id": agent, "agent": agent,
            "trace_id": uuid.uuid4().hex, "deadline": time.time() + 600,
            "payload": {"tool": "note", "args": {"title": "t", "body": "b"}}, **extra}


def hostile(queue: str = "executor", actor: str = "executor", agent: str | None = "executor",
            env: dict[str, Any] | None = None, **fields: Any) -> Stored:
    """An entry whose message names ``queue`` and ``actor``, labelled ``agent``."""
    eid = f"hostile-{uuid.uuid4().hex[:12]}"
    env = env or envelope(f"key-{eid}", actor)
    raw = orjson.dumps({"queue_name": queue, "actor_name": actor, "args": [env], "kwargs": {}, "options": {},
                        "message_id": eid, "message_timestamp": 0})
    entry = DeadLetter(entry_id=eid, queue="executor", agent=agent, failure_class="permanent", error="answered 400",
                       worker="w", envelope=env, key=env["key"], **fields)
    return Stored(entry, raw)


def export(path: Path, *stored: Stored) -> Path:
    path.write_bytes(b"".join(line_of(s) for s in stored))
    return path


def audited(client: MeshClient, entry_id: str) -> list[str]:
    return [r["op"] for r in Audit(client.redis, client.keys).records(entry_id)]


@pytest.fixture
def store(client: MeshClient) -> DeadLetterStore:
    return DeadLetterStore(client.redis, client.keys)


HOSTILE = {
    "a queue that is the counters hash": dict(queue="stats"),
    "a queue that is a claim": dict(queue="claim:victim-key"),
    "a queue of another agent": dict(queue="planner"),
    "an agent no one serves": dict(queue="ghost", actor="ghost", agent="ghost"),
    "a label of another agent": dict(agent="sink"),
    "an envelope of another agent": dict(env=envelope("k-env", "planner")),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_load_refuses_a_file_whose_entry_would_replay_anywhere_but_its_own_agents_queue(
        case, client, store, tmp_path):
    good = hostile()
    path = export(tmp_path / "dlq.jsonl", good, hostile(**HOSTILE[case]))
    with pytest.raises(ExportFileError, match=r"dlq.jsonl:2 is refused: entry 'hostile-\w+': it(s| is) "):
        load(store, path)
    assert store.count() == 0, "a refused file loads nothing"


@pytest.mark.parametrize("case", HOSTILE)
def test_replay_leaves_an_entry_addressed_elsewhere_in_the_dlq_with_the_reason_and_writes_nothing(
        case, client, store, settings):
    # An entry a load from before these checks put in the DLQ: replay checks it again.
    client.redis.hset(client.keys.stats, "dead_lettered", 7)
    bad = hostile(**HOSTILE[case])
    assert store.put(bad.entry, bad.raw)
    keys_before = set(client.redis.scan_iter(match=f"{client.keys.prefix}:*"))

    replayer = Replayer(store, settings)
    report = replayer.replay(replayer.entries([bad.entry.entry_id]))

    assert report.replayed == [] and report.skipped[bad.entry.entry_id].startswith("it")
    assert store.get(bad.entry.entry_id) == bad.entry
    assert audited(client, bad.entry.entry_id) == []
    assert client.redis.hgetall(client.keys.stats) == {b"dead_lettered": b"7"}
    assert client.redis.type(client.keys.claim("victim-key")) == b"none"
    assert set(client.redis.scan_iter(match=f"{client.keys.prefix}:*")) == keys_before


def test_a_queue_whose_keys_hold_other_types_gets_no_replay_and_its_entries_stay(client, store, settings):
    entries = [hostile() for _ in range(3)]
    for s in entries:
        store.put(s.entry, s.raw)
    client.redis.set(client.keys.messages("executor"), "not a hash")  # an enqueue's HSET fails inside the MULTI

    replayer = Replayer(store, settings)
    report = replayer.replay(replayer.entries(flt=Filter()))

    assert report.replayed == []
    for s in entries:
        assert "executor.msgs holds a string" in report.skipped[s.entry.entry_id]
        assert store.get(s.entry.entry_id) == s.entry and audited(client, s.entry.entry_id) == []
    assert client.redis.llen(client.keys.queue("executor")) == 0  # no id without its message


def test_an_enqueue_redis_refuses_inside_the_transaction_puts_the_entry_back(client, store, settings):
    # The reply check behind the type check: the transaction is staged as if the queue were fine.
    stored = hostile()
    store.put(stored.entry, stored.raw)
    client.redis.set(client.keys.messages("executor"), "not a hash")
    replayer = Replayer(store, settings)
    from mesh.dlq.replay import ReplayReport, execute

    batch = [(stored, replayer._message(stored, replayer_routes(client)))]
    report = ReplayReport(dry_run=False)
    with client.redis.pipeline(transaction=True) as pipe:
        _, spans = replayer._stage_batch(pipe, batch, [None], {})
        problems = replayer._settle(batch, [None], spans, execute(pipe), report)

    assert problems[0] is not None and "WRONGTYPE" in problems[0] and "back in the DLQ" in problems[0]
    assert store.get(stored.entry.entry_id) == stored.entry
    assert audited(client, stored.entry.entry_id)[0] == "replay_failed"
    # Not replayed after all: no tombstone says it was (`mesh dlq show` shows the entry itself).
    assert client.redis.exists(client.keys.dlq_replayed(stored.entry.entry_id)) == 0


def replayer_routes(client: MeshClient) -> Any:
    from mesh.dlq.checks import Routes

    return Routes.read(client.redis, client.keys)


def test_a_counter_redis_refuses_is_reported_and_the_entries_still_count_as_replayed(client, store, settings):
    entries = [hostile() for _ in range(2)]
    for s in entries:
        store.put(s.entry, s.raw)
    client.redis.hset(client.keys.stats, "replayed", "not a number")  # HINCRBY fails inside the MULTI

    replayer = Replayer(store, settings)
    report = replayer.replay(replayer.entries(flt=Filter()))

    assert sorted(report.replayed) == sorted(s.entry.entry_id for s in entries)
    assert len(report.errors) == 1 and "HINCRBY" in report.errors[0] and "not an integer" in report.errors[0]
    assert client.redis.llen(client.keys.queue("executor")) == 2 and store.count() == 0


def test_replay_refuses_a_message_over_the_message_limit_and_keeps_it(client, store, make_settings):
    settings = make_settings(max_message_bytes=2048)
    big = hostile(env={**envelope("big"), "payload": {"tool": "note", "args": {"title": "t", "body": "x" * 4000}}})
    store.put(big.entry, big.raw)
    replayer = Replayer(store, settings)
    report = replayer.replay(replayer.entries([big.entry.entry_id]))
    assert "MESH_MAX_MESSAGE_BYTES" in report.skipped[big.entry.entry_id]
    assert store.get(big.entry.entry_id) == big.entry and client.redis.llen(client.keys.queue("executor")) == 0


def test_replay_refuses_a_message_whose_job_step_is_another_agents(client, store, settings):
    ref = client.send("planner", {"goal": "plan something"}, key=f"k-{uuid.uuid4().hex}")
    record = client.status(ref.id)
    step = next(iter(record.steps.values()))
    env = envelope("k-step", "executor", job_id=ref.id, step_id=step.step_id)
    stored = hostile(env=env)
    store.put(stored.entry, stored.raw)
    replayer = Replayer(store, settings)
    report = replayer.replay(replayer.entries([stored.entry.entry_id]))
    assert report.skipped[stored.entry.entry_id] == f"step {step.step_id} of job {ref.id} is agent planner's, " \
                                                   "not executor's"
    assert store.get(stored.entry.entry_id) == stored.entry


def test_a_line_over_the_line_cap_is_refused_without_being_read_whole(client, store, tmp_path):
    path = tmp_path / "dlq.jsonl"
    line = b"x" * (20 * 1024 * 1024)  # 20 MB on one line, five times the default cap
    path.write_bytes(line_of(hostile()) + line + b"\n")
    del line
    tracemalloc.start()
    try:
        with pytest.raises(ExportFileError, match=r"dlq.jsonl:2 is refused: the line is over "
                                                  r"MESH_DLQ_MAX_LINE_BYTES \(4194304 bytes\)"):
            load(store, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * 1024 * 1024, f"peak {peak} bytes: the line was read whole"
    assert store.count() == 0


@pytest.mark.parametrize(("what", "field", "size"), [("line", "error", 4_300_000), ("raw", "raw", 1_100_000)])
def test_an_entry_over_the_default_caps_is_refused_and_nothing_loads(client, store, tmp_path, what, field, size):
    stored = hostile()
    if field == "raw":
        stored = Stored(stored.entry, stored.raw[:-1] + b',"pad":"' + b"x" * size + b'"}')
    else:
        stored = Stored(stored.entry.model_copy(update={"error": "x" * size}), stored.raw)
    path = export(tmp_path / "dlq.jsonl", hostile(), stored)
    with pytest.raises(ExportFileError, match=f"dlq.jsonl:2 is refused: .*over MESH_DLQ_MAX_{what.upper()}_BYTES"):
        load(store, path)
    assert store.count() == 0


def test_a_poison_entry_whose_bytes_are_no_message_still_round_trips(client, store, tmp_path):
    poison = Stored(DeadLetter(entry_id="poison-1", queue="executor", agent="executor",
                               failure_class="invalid_input", error="undecodable message", worker="w"),
                    b"\xff\xfe not json")
    path = export(tmp_path / "dlq.jsonl", poison)
    assert load(store, path).loaded == 1
    assert store.load("poison-1") == poison


def test_mesh_dlq_load_names_the_line_and_shows_a_hostile_label_escaped(cli, client, store, tmp_path):
    path = export(tmp_path / "dlq.jsonl", hostile(agent="sink\x1b[2J"))
    result = cli("dlq", "load", str(path))
    assert result.returncode == 2, result.stderr
    assert "dlq.jsonl:1 is refused" in result.stderr and "'sink\\x1b[2J' is not an agent name" in result.stderr
    assert "\x1b" not in result.stderr and store.count() == 0


def test_mesh_dlq_load_takes_its_caps_from_the_settings(cli, client, store, tmp_path):
    path = export(tmp_path / "dlq.jsonl", hostile(), hostile())
    result = cli("dlq", "load", str(path), "--json", MESH_DLQ_MAX_LINE_BYTES="1024")
    assert result.returncode == 2 and "dlq.jsonl:1 is refused: the line is over MESH_DLQ_MAX_LINE_BYTES (1024" \
        in result.stderr.replace("\n", "")
    result = cli("dlq", "load", str(path), "--json")
    assert result.returncode == 0 and orjson.loads(result.stdout) == {"loaded": 2, "already_present": 0}


def test_a_raw_cap_over_the_message_limit_is_a_settings_error(cli):
    result = cli("dlq", "stats", MESH_DLQ_MAX_RAW_BYTES="4096", MESH_MAX_MESSAGE_BYTES="2048")
    assert result.returncode != 0 and "MESH_DLQ_MAX_RAW_BYTES (4096) must not be over" in result.stderr
