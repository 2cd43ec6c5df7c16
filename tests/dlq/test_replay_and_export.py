"""Replay, drain and load end to end: real workers, real Redis, real loopback HTTP, the CLI as a
subprocess. Dead letters are produced the way production makes them (an HTTP dependency answering
400, a host outside the allow-list, garbage bytes in a queue), then brought back or taken out."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from conftest import ROOT, flat, mesh_env, push_raw, stat, wait_for

from mesh.broker import MeshClient
from mesh.contracts import JobRecord, State
from mesh.dlq import Audit, DeadLetter, DeadLetterStore, Filter, Replayer, Stored
from mesh.dlq.export import line_of
from mesh.dlq.store import DeadLetterShards
from tests.dlq.bulk import AGENTS, CLASSES, agent_of, class_of, generate, nth_id
from tests.httpserver import RecordingServer

EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}
REFUSED_URL = "http://127.0.0.1:9/hook"  # never in MESH_HTTP_ALLOW in these tests: refused, permanently


class Switch:
    """A responder that answers 400 until the cause is fixed, then 200."""

    def __init__(self) -> None:
        self.fixed = False

    def __call__(self, n: int, request: dict[str, Any]) -> tuple[int, Any]:
        return (200, {"ok": True}) if self.fixed else (400, {"error": "rejected"})


def http_call(url: str, n: int) -> dict[str, Any]:
    return {"tool": "http_post", "args": {"url": url, "json": {"order": n, "note": f"order {n}"}}}


def store_of(client: MeshClient) -> DeadLetterShards:
    """The DLQ of every shard (MESH_SHARDS): a job's dead letter is kept in its job's shard."""
    return DeadLetterShards.of(client.redis, client.settings)


def home_store(client: MeshClient) -> DeadLetterStore:
    """The first shard's DLQ, where the tests put entries of their own making (``generate``, ``put``)."""
    return DeadLetterStore(client.redis, client.shards.home)


class ShardsAudit:
    """The DLQ's audit log of every shard (each shard's entries are audited in that shard)."""

    def __init__(self, client: MeshClient) -> None:
        self.audits = [Audit(client.redis, keys) for keys in client.shards.keys]

    def records(self, entry_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return [r for audit in self.audits for r in audit.records(entry_id, limit=limit)]


def all_entries(store: DeadLetterStore | DeadLetterShards) -> dict[str, DeadLetter]:
    return {e.entry_id: e for e in store.entries(Filter(), limit=10_000)}


def ok_posts(server: RecordingServer) -> Counter[str]:
    """Successful POSTs per Idempotency-Key."""
    return Counter(r["headers"]["idempotency-key"] for r in list(server.requests) if r.get("status") == 200)


def settled(client: MeshClient, queue: str = "executor") -> bool:
    return client.queues([queue])[queue] == EMPTY


def assert_dlq_indexes_empty(client: MeshClient) -> None:
    r = client.redis
    for keys in client.shards.keys:
        assert r.zcard(keys.dlq) == 0
        for agent in ("planner", "researcher", "executor", "-"):
            assert r.zcard(keys.dlq_by_agent(agent)) == 0
        for failure_class in ("permanent", "invalid_input", "timeout", "brownout", "deadline", "cycle"):
            assert r.zcard(keys.dlq_by_class(failure_class)) == 0
        assert list(r.scan_iter(match=keys.dead_letter("*"), count=1000)) == []


def dead_letter_all(client: MeshClient, refs: list[Any], timeout_s: float = 30) -> dict[str, Any]:
    """Wait until every job is dead-lettered and its entry is in the DLQ; the records by job id."""
    records = {ref.id: client.wait(ref.id, timeout_s=timeout_s) for ref in refs}
    assert {r.state for r in records.values()} == {State.DEAD_LETTERED}
    store = store_of(client)
    wait_for(lambda: store.count() == len(refs), timeout_s=timeout_s)
    return records


def unstoried(record: JobRecord) -> JobRecord:
    """``record`` without the history a compaction keeps in it."""
    return record.model_copy(update={"history": None})


# -- replay ------------------------------------------------------------------------------------

def test_replay_after_the_cause_is_fixed_brings_every_entry_back_once_with_its_original_idempotency_key(
        client, make_settings, start_worker, cli):
    switch = Switch()
    with RecordingServer(switch) as server:
        settings = make_settings(http_allow=server.host_port)
        refs = [client.send("executor", http_call(server.url(), i), key=f"order-{i}") for i in range(5)]
        start_worker(settings, ("executor",))
        records = dead_letter_all(client, refs)
        store = store_of(client)
        entries = all_entries(store)
        assert {e.key for e in entries.values()} == {ref.key for ref in refs}
        assert {e.failure_class for e in entries.values()} == {"permanent"}
        assert [r["status"] for r in server.requests] == [400] * 5
        wait_for(lambda: settled(client))

        switch.fixed = True  # the cause is fixed

        dry = cli("dlq", "replay", "--class", "permanent", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        report = json.loads(dry.stdout)
        assert report["dry_run"] is True and report["replayed"] == 5 and report["skipped"] == {}
        assert sorted(report["ids"]) == sorted(entries)
        assert report["by_class"] == {"permanent": 5} and report["by_agent"] == {"executor": 5}
        # a dry run changes nothing
        assert all_entries(store) == entries
        assert settled(client)
        # (the worker's compaction sweep may move a record's trace into it meanwhile: not a change of state)
        assert {ref.id: unstoried(client.status(ref.id)) for ref in refs} == \
            {job_id: unstoried(record) for job_id, record in records.items()}
        assert len(server.requests) == 5
        assert ShardsAudit(client).records() == []
        assert stat(client.redis, client.settings, "replayed") == 0

        res = cli("dlq", "replay", "--class", "permanent", "--yes", "--json")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["dry_run"] is False and report["replayed"] == 5 and report["skipped"] == {}
        assert sorted(report["ids"]) == sorted(entries)

        for ref in refs:
            record = client.wait(ref.id, timeout_s=20)
            step = record.steps["executor"]
            assert record.state is State.SUCCEEDED and step.state is State.SUCCEEDED, record
            assert record.error is None and step.error is None and step.failure_class is None
        wait_for(lambda: settled(client))
        requests = list(server.requests)

    # exactly one successful POST per key, carrying the original key and payload
    assert ok_posts(server) == Counter({ref.key: 1 for ref in refs})
    assert len(requests) == 10
    for request in requests:
        n = int(request["headers"]["idempotency-key"].removeprefix("order-"))
        assert request["json"] == http_call(server.url(), n)["args"]["json"]

    assert store.count() == 0
    assert_dlq_indexes_empty(client)
    audit = ShardsAudit(client)
    for entry_id, entry in entries.items():
        records_of = audit.records(entry_id)
        assert [r["op"] for r in records_of] == ["replay"], records_of
        detail = records_of[0]["detail"]
        assert detail["key"] == entry.key and detail["queue"] == "executor" and detail["replay_count"] == 1
        assert records_of[0]["who"]
    assert stat(client.redis, client.settings, "replayed") == 5


def test_a_replayed_message_that_fails_again_comes_back_as_a_new_entry_with_replay_count_and_replay_of(
        client, make_settings, start_worker, cli):
    with RecordingServer(lambda n, request: (400, {"error": "still bad"})) as server:
        settings = make_settings(http_allow=server.host_port)
        ref = client.send("executor", http_call(server.url(), 1), key="again-1")
        start_worker(settings, ("executor",))
        dead_letter_all(client, [ref])
        store = store_of(client)
        (old,) = all_entries(store).values()
        assert old.replay_count == 0 and old.replay_of is None

        def new_entry(previous: DeadLetter) -> DeadLetter:
            found = wait_for(lambda: [e for e in store.entries(Filter(), limit=10) if e.entry_id != previous.entry_id],
                             timeout_s=20)
            assert len(found) == 1 and store.count() == 1
            return found[0]

        res = cli("dlq", "replay", old.entry_id, "--yes", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["ids"] == [old.entry_id]
        first = new_entry(old)

        res = cli("dlq", "replay", first.entry_id, "--yes", "--json")
        assert res.returncode == 0, res.stderr
        second = new_entry(first)
        wait_for(lambda: settled(client))
        record = client.wait(ref.id, timeout_s=20)
        requests = list(server.requests)

    assert store.get(old.entry_id) is None and store.get(first.entry_id) is None
    for entry, previous, count in ((first, old, 1), (second, first, 2)):
        assert entry.replay_count == count and entry.replay_of == previous.entry_id
        assert (entry.key, entry.job_id, entry.trace_id) == (old.key, old.job_id, old.trace_id)
        assert entry.failure_class == "permanent" and entry.agent == "executor"
        assert entry.envelope is not None and entry.envelope["replay_of"] == previous.entry_id
        assert entry.envelope["payload"] == old.envelope["payload"]  # type: ignore[index]
        assert entry.envelope["deadline"] > previous.envelope["deadline"]  # type: ignore[index]
        assert [(a.attempt, a.outcome) for a in entry.attempts] == [(1, "dead_lettered")]
    assert record.state is State.DEAD_LETTERED
    assert [r["headers"]["idempotency-key"] for r in requests] == ["again-1"] * 3
    audit = ShardsAudit(client)
    assert [r["op"] for r in audit.records(old.entry_id)] == ["replay"]
    assert [r["op"] for r in audit.records(first.entry_id)] == ["replay"]
    assert audit.records(second.entry_id) == []


def test_replay_all_while_the_cause_persists_replays_each_entry_once_and_ends(
        client, make_settings, start_worker, settings, tmp_path):
    with RecordingServer(lambda n, request: (400, {"error": "still bad"})) as server:
        work = make_settings(http_allow=server.host_port)
        refs = [client.send("executor", http_call(server.url(), i), key=f"loop-{i}") for i in range(3)]
        start_worker(work, ("executor",))
        dead_letter_all(client, refs)
        store = store_of(client)
        originals = set(all_entries(store))

        log = tmp_path / "replay.log"
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "dlq", "replay", "--all", "--yes", "--json",
                                     "--rate", "2"], env=mesh_env(settings), cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=err)
        try:
            # 3 entries at 2/s: a second of pacing, after the process's start (seconds on a loaded machine);
            # a replay that goes on replaying what it dead-letters again never ends.
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"replay of 3 entries still running after 60s; the server saw {len(server.requests)} "
                        f"POSTs (3 originals + 3 replays expected)")
        report = json.loads(out)
        assert proc.returncode == 0, log.read_text()
        assert report["replayed"] == 3 and set(report["ids"]) == originals
        wait_for(lambda: store.count() == 3 and settled(client))
        assert len(server.requests) == 6


def test_replay_killed_with_sigkill_halfway_and_run_again_loses_no_entry_and_posts_each_key_once(
        client, make_settings, worker_process, cli, tmp_path):
    n = 60
    switch = Switch()
    with RecordingServer(switch) as server:
        settings = make_settings(http_allow=server.host_port)
        keys = [f"crash-{i}" for i in range(n)]
        refs = client.send_many("executor", [(http_call(server.url(), i), key) for i, key in enumerate(keys)])
        worker_process("--agents", "executor", MESH_HTTP_ALLOW=server.host_port)
        dead_letter_all(client, refs, timeout_s=60)
        store = store_of(client)
        originals = set(all_entries(store))
        assert len(originals) == n and ok_posts(server) == Counter()
        wait_for(lambda: settled(client))

        switch.fixed = True
        log = tmp_path / "replay-killed.log"
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "dlq", "replay", "--all", "--yes", "--rate",
                                     "20"], env=mesh_env(settings), cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: store.count() <= n - 15 or proc.poll() is not None, timeout_s=60)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        left = store.count()
        assert 0 < left < n - 10, left

        # nothing lost, nothing twice: every entry is either still in the DLQ or was replayed, once
        audit = ShardsAudit(client)
        replayed = Counter(r["entry_id"] for r in audit.records(limit=10_000) if r["op"] == "replay")
        in_dlq = set(all_entries(store))
        assert set(replayed) | in_dlq == originals and not set(replayed) & in_dlq
        assert set(replayed.values()) == {1}

        res = cli("dlq", "replay", "--all", "--yes", "--json")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["replayed"] == left and report["skipped"] == {} and set(report["ids"]) == in_dlq

        for ref in refs:
            assert client.wait(ref.id, timeout_s=60).state is State.SUCCEEDED
        wait_for(lambda: client.queues() == {a: EMPTY for a in ("planner", "researcher", "executor")}, timeout_s=30)
        requests = list(server.requests)

    assert ok_posts(server) == Counter({key: 1 for key in keys})
    assert Counter(r["headers"]["idempotency-key"] for r in requests) == Counter({key: 2 for key in keys})
    assert store.count() == 0
    assert_dlq_indexes_empty(client)
    replayed = Counter(r["entry_id"] for r in ShardsAudit(client).records(limit=10_000) if r["op"] == "replay")
    assert replayed == Counter({entry_id: 1 for entry_id in originals})
    assert stat(client.redis, client.settings, "replayed") == n
    assert all(client.redis.llen(f"{keys.queue('executor')}.XQ") == 0 for keys in client.shards.keys)


# -- drain and load -----------------------------------------------------------------------------

def test_drain_writes_every_entry_to_a_file_and_empties_the_dlq_and_load_puts_them_back_once(
        client, settings, start_worker, cli, tmp_path):
    refs = [client.send("executor", http_call(REFUSED_URL, i)) for i in range(4)]
    garbage = [b"\xff\xfe not a message", b'{"not": "a message"}']
    poison_ids = [push_raw(client, "executor", data) for data in garbage]
    start_worker(settings, ("executor",))
    for ref in refs:
        assert client.wait(ref.id, timeout_s=20).state is State.DEAD_LETTERED
    store = store_of(client)
    wait_for(lambda: store.count() == 6)
    wait_for(lambda: settled(client))
    before = all_entries(store)
    raws = {entry_id: store.store_of(entry_id).raw(entry_id) for entry_id in before}
    assert {raws[rid] for rid in poison_ids} == set(garbage)
    stats_before = store.stats()
    assert stats_before["by_class"] == {"permanent": 4, "invalid_input": 2}

    path = tmp_path / "dead.jsonl"
    res = cli("dlq", "drain", "--to", str(path))  # no --yes, no terminal to ask on
    assert res.returncode == 2 and "--yes" in flat(res.stderr), res.stderr
    assert not path.exists() and all_entries(store) == before

    res = cli("dlq", "drain", "--to", str(path), "--yes", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"drained": 6, "file": str(path)}
    lines = path.read_bytes().splitlines()
    assert len(lines) == 6
    exported = {}
    for line in lines:
        item = json.loads(line)
        assert set(item) == {"entry", "raw_b64"}
        exported[item["entry"]["entry_id"]] = item
    assert set(exported) == set(before)
    for entry_id, item in exported.items():
        assert item["entry"] == before[entry_id].model_dump(mode="json")
        assert base64.b64decode(item["raw_b64"]) == raws[entry_id]
    assert store.count() == 0
    assert_dlq_indexes_empty(client)
    audit = ShardsAudit(client)
    for entry_id in before:
        (record,) = audit.records(entry_id)
        assert record["op"] == "drain" and record["detail"] == {"file": str(path.resolve())} and record["who"]
    assert stat(client.redis, client.settings, "dlq_drained") == 6

    res = cli("dlq", "load", str(path), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"loaded": 6, "already_present": 0}
    assert all_entries(store) == before  # ids preserved, every field equal
    assert {entry_id: store.store_of(entry_id).raw(entry_id) for entry_id in before} == raws
    stats_after = store.stats()
    assert {k: stats_after[k] for k in ("total", "by_agent", "by_class")} == {
        k: stats_before[k] for k in ("total", "by_agent", "by_class")}
    assert stats_after["oldest_at"] == pytest.approx(min(e.dead_lettered_at for e in before.values()), abs=1e-3)
    for entry_id in before:
        assert [r["op"] for r in audit.records(entry_id)] == ["load", "drain"]

    res = cli("dlq", "load", str(path), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"loaded": 0, "already_present": 6}
    assert all_entries(store) == before and store.count() == 6
    for entry_id in before:
        assert [r["op"] for r in audit.records(entry_id)] == ["load", "drain"]

    # a loaded entry reads like the original, its message bytes included
    poison = cli("dlq", "show", poison_ids[1], "--json")
    assert json.loads(poison.stdout)["message"] == {"not": "a message"}


def exported_line() -> bytes:
    entry = DeadLetter(entry_id=str(uuid.uuid4()), queue="executor", agent="executor", failure_class="permanent",
                       error="answered 400", worker="w", dead_lettered_at=time.time())
    return line_of(Stored(entry, b'{"queue_name": "executor"}'))


@pytest.mark.parametrize("bad", [
    b"{oops\n",
    b'{"entry": {"entry_id": "x", "queue": "executor"}, "raw_b64": ""}\n',
    b'{"raw_b64": ""}\n',
    exported_line().replace(b'"raw_b64":"', b'"raw_b64":"!!'),
    exported_line().replace(b'"failure_class":"permanent"', b'"failure_class":7'),
], ids=["not-json", "entry-missing-fields", "no-entry", "raw-not-base64", "class-not-a-string"])
def test_load_of_a_file_with_a_bad_line_exits_2_naming_the_file_and_line_and_loads_nothing(
        cli, client, tmp_path, bad):
    path = tmp_path / "export.jsonl"
    good = [exported_line() for _ in range(3)]
    path.write_bytes(good[0] + good[1] + bad + good[2])
    res = cli("dlq", "load", str(path), "--json")
    assert res.returncode == 2, (res.stdout, res.stderr)
    message = flat(res.stderr)
    assert f"{path}:3" in message and "nothing was loaded" in message, message
    assert res.stdout == ""
    assert store_of(client).count() == 0
    assert ShardsAudit(client).records() == []


def test_load_of_a_missing_file_exits_2(cli, client, tmp_path):
    res = cli("dlq", "load", str(tmp_path / "nope.jsonl"))
    assert res.returncode == 2 and "no file" in flat(res.stderr)
    assert store_of(client).count() == 0


def put_synthetic(store: DeadLetterStore, n: int, *, agent: str, failure_class: str, t0: float) -> list[DeadLetter]:
    made = []
    for i in range(n):
        entry = DeadLetter(entry_id=str(uuid.uuid4()), queue=agent, agent=agent, failure_class=failure_class,
                           error="x", worker="w", dead_lettered_at=t0 + i / 1000)
        assert store.put(entry, b'{"not": "replayable"}')
        made.append(entry)
    return made


def test_drain_and_purge_with_agent_and_class_together_take_only_matching_entries_past_a_batch_of_others(
        client, tmp_path):
    from mesh.dlq import drain, load, purge

    store = home_store(client)
    t0 = 1_700_000_000.0
    # matching entries interleaved with (and mostly behind) more than a batch of the same class
    others = put_synthetic(store, 700, agent="executor", failure_class="permanent", t0=t0)
    drained = put_synthetic(store, 7, agent="planner", failure_class="permanent", t0=t0 + 0.3005)
    purged = put_synthetic(store, 6, agent="researcher", failure_class="permanent", t0=t0 + 0.0005)
    keep = put_synthetic(store, 4, agent="planner", failure_class="timeout", t0=t0)

    path = tmp_path / "planner.jsonl"
    assert drain(store, path, Filter(agent="planner", failure_class="permanent")) == 7
    assert sorted(json.loads(line)["entry"]["entry_id"] for line in path.read_bytes().splitlines()) == sorted(
        e.entry_id for e in drained)
    assert purge(store, Filter(agent="researcher", failure_class="permanent")) == 6
    assert not any(store.get(e.entry_id) for e in purged)
    left = all_entries(store)
    assert set(left) == {e.entry_id for e in others + keep}
    assert store.count(Filter(failure_class="permanent")) == 700
    assert store.count(Filter(agent="planner")) == 4

    assert load(store, path).loaded == 7
    assert set(all_entries(store)) == {e.entry_id for e in others + keep + drained}


def test_two_replays_at_once_replay_each_entry_exactly_once(client, make_settings, start_worker, settings, tmp_path):
    n = 40
    switch = Switch()
    with RecordingServer(switch) as server:
        work = make_settings(http_allow=server.host_port)
        keys = [f"race-{i}" for i in range(n)]
        refs = client.send_many("executor", [(http_call(server.url(), i), key) for i, key in enumerate(keys)])
        start_worker(work, ("executor",))
        dead_letter_all(client, refs)
        store = store_of(client)
        originals = set(all_entries(store))
        switch.fixed = True

        procs = []
        for i in range(2):
            err = (tmp_path / f"replay-{i}.log").open("wb")
            procs.append(subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "dlq", "replay", "--all", "--yes",
                                           "--json"], env=mesh_env(settings), cwd=ROOT, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=err))
            err.close()
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode in (0, 1), (tmp_path / "replay-0.log").read_text()
            reports.append(json.loads(out))
        for ref in refs:
            assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
        wait_for(lambda: settled(client))

    replayed = [i for report in reports for i in report["ids"]]
    assert sorted(replayed) == sorted(originals)  # each entry by exactly one of the two
    for report in reports:
        assert set(report["skipped"]) <= originals
        assert all("no longer in the DLQ" in reason for reason in report["skipped"].values())
    assert ok_posts(server) == Counter({key: 1 for key in keys})
    assert store.count() == 0
    assert Counter(r["entry_id"] for r in ShardsAudit(client).records(limit=1000)
                   if r["op"] == "replay") == Counter({i: 1 for i in originals})


# -- every entry, whatever the batch sizes -----------------------------------------------------

BULK_CASES = [(1_201, Filter()), (10_007, Filter()), (10_007, Filter(agent="planner")),
              (1_201, Filter(failure_class="timeout")), (10_007, Filter(agent="researcher", failure_class="deadline"))]


def bulk(client: MeshClient, n: int, flt: Filter) -> tuple[set[str], set[str]]:
    """``n`` generated entries in the DLQ; the ids ``flt`` selects and the others."""
    generate(client.redis, client.shards.home, n, 1_700_000_000.0, per_ms=3)  # in the first shard
    chosen = {nth_id(i) for i in range(n)
              if flt.agent in (None, agent_of(i)) and flt.failure_class in (None, class_of(i))}
    return chosen, {nth_id(i) for i in range(n)} - chosen


def assert_dlq_holds_exactly(client: MeshClient, ids: set[str]) -> None:
    """The DLQ, its agent and class indexes and its entry hashes hold exactly ``ids``."""
    r, keys = client.redis, client.shards.home
    assert {i.decode() for i in r.zrange(keys.dlq, 0, -1)} == ids
    assert sum(r.zcard(keys.dlq_by_agent(a)) for a in AGENTS) == len(ids)
    assert sum(r.zcard(keys.dlq_by_class(c)) for c in CLASSES) == len(ids)
    assert sum(1 for _ in r.scan_iter(match=keys.dead_letter("*"), count=5000)) == len(ids)


@pytest.mark.parametrize(("n", "flt"), BULK_CASES, ids=repr)
def test_replay_takes_every_matching_entry_once_and_its_counts_add_up_to_what_was_in_the_dlq(client, settings, n, flt):
    chosen, others = bulk(client, n, flt)
    store = home_store(client)
    replayer = Replayer(store, settings)

    dry = replayer.replay(replayer.entries(flt=flt), dry_run=True)
    assert sorted(dry.replayed) == sorted(chosen) and dry.skipped == {}

    report = replayer.replay(replayer.entries(flt=flt))
    kept = store.count()
    assert len(report.replayed) + len(report.skipped) + kept == n
    assert sorted(report.replayed) == sorted(chosen) and report.skipped == {}
    assert_dlq_holds_exactly(client, others)
    queued = client.queues(AGENTS)
    assert sum(q["ready"] for q in queued.values()) == len(chosen)  # each replayed message enqueued once
    assert int(client.redis.hget(store.keys.stats, "replayed")) == len(chosen)


@pytest.mark.parametrize(("n", "flt"), BULK_CASES, ids=repr)
def test_drain_and_purge_take_every_matching_entry_once(client, tmp_path, n, flt):
    from mesh.dlq import drain, purge

    chosen, others = bulk(client, n, flt)
    store = home_store(client)
    path = tmp_path / "dead.jsonl"
    assert drain(store, path, flt) == len(chosen)
    lines = [json.loads(line)["entry"]["entry_id"] for line in path.read_bytes().splitlines()]
    assert len(lines) == len(chosen) and set(lines) == chosen
    assert_dlq_holds_exactly(client, others)

    rest = Filter(agent="executor")  # of what is left, purge one agent's entries
    purged = {i for i in others if client.redis.hget(store.keys.dead_letter(i), "agent") == b"executor"}
    assert purge(store, rest) == len(purged)
    assert_dlq_holds_exactly(client, others - purged)
