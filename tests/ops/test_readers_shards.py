"""Readers of many jobs with a namespace spread over three shards (MESH_SHARDS=3): ``mesh jobs``, ``mesh
dlq``, ``mesh stats``, ``mesh status``, ``mesh approvals``, ``mesh waits``, the metrics, /readyz and the
console's pages read every shard and add them up; ``--limit N`` is the N newest of all shards.

The data is written into each shard as its own writers write it (job records through the job store
with the shard's keys, dead letters through the shard's DLQ store, counters in the shard's hashes),
each job's on the shard its id places it in."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.broker import MeshClient
from mesh.broker.client import job_id_for, trace_id_of
from mesh.broker.jobs import JobStore
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.broker.shards import Shards
from mesh.contracts import JobRecord, State, StepRecord
from mesh.contracts.approvals import Approval
from mesh.contracts.waits import Wait, WaitKind
from mesh.dlq import DeadLetter, DeadLetterStore

SHARDS = 3


@pytest.fixture
def sharded(make_settings: Callable[..., MeshSettings]) -> MeshSettings:
    return make_settings(shards=SHARDS)


def key_on(settings: MeshSettings, shard_index: int, stem: str) -> str:
    """A job key whose job lives in the ``shard_index``-th shard of ``settings``' shards."""
    shards = Shards.of(settings)
    for i in range(10_000):
        key = f"{stem}-{i}"
        if shards.shard_of(job_id_for(key)) == shards.keys[shard_index].shard:
            return key
    raise AssertionError("no key found")


def keys_of(settings: MeshSettings, shard_index: int) -> Keys:
    return Shards.of(settings).keys[shard_index]


def put_job(rclient: redis.Redis, settings: MeshSettings, shard_index: int, stem: str, created_at: float,
            step: StepRecord | None = None) -> JobRecord:
    """A job record of one step written into its shard as a client writes it (record, index, approvals, waits)."""
    key = key_on(settings, shard_index, stem)
    job_id = job_id_for(key)
    step = step or StepRecord(step_id="executor", agent="executor", key=key, created_at=created_at,
                              updated_at=created_at)
    record = JobRecord(job_id=job_id, key=key, trace_id=trace_id_of(job_id),
                       created_at=created_at, updated_at=created_at, state=State.QUEUED,
                       steps={step.step_id: step})
    pipe = rclient.pipeline(transaction=False)
    JobStore(rclient, keys_of(settings, shard_index)).stage_create(pipe, record)
    pipe.execute()
    return record


def put_dead_letter(rclient: redis.Redis, settings: MeshSettings, shard_index: int, stem: str, at: float,
                    failure_class: str = "permanent") -> DeadLetter:
    """A dead letter of a one-message job (as ``mesh send`` makes them) in its job's shard."""
    key = key_on(settings, shard_index, stem)
    job_id = job_id_for(key)
    envelope = {"key": key, "job_id": job_id, "step_id": "executor", "agent": "executor",
                "trace_id": "ab" * 16, "deadline": at + 600, "hops": [], "attempt": 1, "schema_version": 1,
                "replay_of": None, "payload": {"tool": "note", "args": {"title": stem}}}
    entry_id = f"{stem}-{job_id[4:12]}"
    entry = DeadLetter.model_validate({
        "entry_id": entry_id, "queue": "executor", "agent": "executor", "failure_class": failure_class,
        "error": f"failed {stem}", "envelope": envelope, "key": key, "job_id": job_id, "trace_id": "ab" * 16,
        "attempts": [], "worker": "w", "host": "h", "dead_lettered_at": at, "replay_count": 0, "replay_of": None})
    raw = orjson.dumps({"queue_name": "executor", "actor_name": "executor", "args": [envelope], "kwargs": {},
                        "options": {}, "message_id": entry_id, "message_timestamp": int(at * 1000)})
    assert DeadLetterStore(rclient, keys_of(settings, shard_index)).put(entry, raw)
    return entry


def dlq_sizes(rclient: redis.Redis, settings: MeshSettings) -> list[int]:
    return [int(rclient.zcard(k.dlq)) for k in Shards.of(settings).keys]


# -- mesh jobs, mesh trace, mesh status ----------------------------------------------------------------------


def test_jobs_lists_every_shard_newest_first_and_limit_is_of_all(rclient: redis.Redis, sharded: MeshSettings,
                                                                  cli: Any) -> None:
    t0 = time.time() - 100
    made = [put_job(rclient, sharded, i % SHARDS, f"job{i}", t0 + i) for i in range(7)]  # every shard
    newest = [r.job_id for r in reversed(made)]

    listed = json.loads(cli("jobs", "--json", "--limit", "50", MESH_SHARDS=str(SHARDS)).stdout)
    assert [j["job_id"] for j in listed] == newest

    three = json.loads(cli("jobs", "--json", "--limit", "3", MESH_SHARDS=str(SHARDS)).stdout)
    assert [j["job_id"] for j in three] == newest[:3]  # the 3 newest of all shards, not 3 of each

    assert [j["job_id"] for j in json.loads(cli("jobs", "--json", "--key", "job5-*",
                                                MESH_SHARDS=str(SHARDS)).stdout)] == [made[5].job_id]


def test_jobs_listing_budget_counts_records_of_every_shard(rclient: redis.Redis, sharded: MeshSettings) -> None:
    from mesh.broker.joblist import JobQuery, list_jobs

    t0 = time.time() - 100
    made = [put_job(rclient, sharded, i % SHARDS, f"b{i}", t0 + i) for i in range(9)]
    page = list_jobs(rclient, Shards.of(sharded).keys, JobQuery(state=State.SUCCEEDED, limit=5), budget=4, batch=2)
    assert page.read == 4 and page.cut_by_budget and not page.jobs
    page = list_jobs(rclient, Shards.of(sharded).keys, JobQuery(limit=4), batch=2)
    assert [r.job_id for r in page.jobs] == [r.job_id for r in reversed(made)][:4]


def test_trace_and_status_find_a_job_by_the_start_of_its_id_in_any_shard(rclient: redis.Redis, sharded: MeshSettings,
                                                                        cli: Any) -> None:
    record = put_job(rclient, sharded, 2, "far", time.time())
    start = record.job_id[:12]
    traced = cli("trace", start, "--json", MESH_SHARDS=str(SHARDS))
    assert traced.returncode == 0, traced.stderr
    assert json.loads(traced.stdout)["job_id"] == record.job_id


def test_status_without_a_job_counts_every_shards_workers_and_dead_letters(rclient: redis.Redis,
                                                                           sharded: MeshSettings, cli: Any) -> None:
    now_ms = int(time.time() * 1000)
    put_dead_letter(rclient, sharded, 1, "one", time.time())
    put_dead_letter(rclient, sharded, 2, "two", time.time())
    rclient.zadd(keys_of(sharded, 1).heartbeats, {"w1": now_ms})
    rclient.zadd(keys_of(sharded, 2).heartbeats, {"w1": now_ms, "w2": now_ms})  # w1 beats in both: one worker
    shown = json.loads(cli("status", "--json", MESH_SHARDS=str(SHARDS)).stdout)
    assert shown["dlq"] == 2 and shown["workers"] == 2


def test_stats_and_queues_add_up_every_shard(rclient: redis.Redis, sharded: MeshSettings, cli: Any) -> None:
    for i in range(SHARDS):
        k = keys_of(sharded, i)
        rclient.hincrby(k.stats, "retried", i + 1)
        rclient.hincrby(k.routes, "transient:retry", 10 * (i + 1))
        rclient.hset(k.messages("executor"), f"m{i}", b"{}")  # stored, not ready: in flight
    put_dead_letter(rclient, sharded, 0, "zero", time.time())
    put_dead_letter(rclient, sharded, 2, "two", time.time())
    stats = json.loads(cli("stats", "--json", MESH_SHARDS=str(SHARDS)).stdout)
    assert stats["retried"] == 6 and stats["dlq_size"] == 2 and stats["routes"] == {"transient:retry": 60}
    queues = json.loads(cli("queues", "--json", "--lanes", MESH_SHARDS=str(SHARDS)).stdout)
    assert queues["executor"]["in_flight"] == 3


# -- mesh dlq ---------------------------------------------------------------------------------------------


def test_dlq_list_stats_and_show_read_every_shard(rclient: redis.Redis, sharded: MeshSettings, cli: Any) -> None:
    t0 = time.time() - 100
    entries = [put_dead_letter(rclient, sharded, i % SHARDS, f"d{i}", t0 + i,
                               "permanent" if i % 2 else "timeout") for i in range(5)]
    newest = [e.entry_id for e in reversed(entries)]
    env = {"MESH_SHARDS": str(SHARDS)}

    assert [e["entry_id"] for e in json.loads(cli("dlq", "list", "--json", **env).stdout)] == newest
    two = json.loads(cli("dlq", "list", "--json", "--limit", "2", **env).stdout)
    assert [e["entry_id"] for e in two] == newest[:2]
    timeouts = json.loads(cli("dlq", "list", "--json", "--class", "timeout", **env).stdout)
    assert [e["entry_id"] for e in timeouts] == [e.entry_id for e in reversed(entries) if e.failure_class == "timeout"]

    stats = json.loads(cli("dlq", "stats", "--json", **env).stdout)
    assert stats["total"] == 5 and stats["by_class"] == {"permanent": 2, "timeout": 3}
    assert stats["by_agent"] == {"executor": 5}
    assert stats["oldest_at"] == pytest.approx(t0) and stats["newest_at"] == pytest.approx(t0 + 4)

    far = entries[2]  # in the third shard
    shown = cli("dlq", "show", far.entry_id[:6], "--json", **env)  # a unique start, found in its shard
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["entry_id"] == far.entry_id

    assert cli("dlq", "list", "--agent", "executor", "--json", **env).returncode == 0  # known from any shard


def test_dlq_replay_all_replays_each_shards_entries_onto_its_own_queues(rclient: redis.Redis, sharded: MeshSettings,
                                                                        cli: Any) -> None:
    t0 = time.time() - 10
    entries = [put_dead_letter(rclient, sharded, i, f"r{i}", t0 + i) for i in (1, 2)]
    env = {"MESH_SHARDS": str(SHARDS)}

    dry = json.loads(cli("dlq", "replay", "--all", "--dry-run", "--json", **env).stdout)
    assert sorted(dry["ids"]) == sorted(e.entry_id for e in entries)

    done = cli("dlq", "replay", "--all", "--yes", "--json", **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(json.loads(done.stdout)["ids"]) == sorted(e.entry_id for e in entries)
    assert dlq_sizes(rclient, sharded) == [0, 0, 0]
    for i, entry in zip((1, 2), entries, strict=True):
        k = keys_of(sharded, i)
        assert rclient.hlen(k.messages("executor")) == 1  # onto the queue of the entry's (its job's) shard
        assert entry.job_id is not None and rclient.exists(k.job(entry.job_id))  # its expired job recreated there
        assert int(rclient.hget(k.stats, "replayed") or 0) == 1
        shown = json.loads(cli("dlq", "show", entry.entry_id, "--json", **env).stdout)  # its tombstone, found
        assert shown["state"] == "replayed" and [a["op"] for a in shown["audit"]] == ["replay"]
    assert rclient.hlen(keys_of(sharded, 0).messages("executor")) == 0


def test_dlq_replay_and_purge_by_id_find_the_entry_in_its_shard(rclient: redis.Redis, sharded: MeshSettings,
                                                                cli: Any) -> None:
    one = put_dead_letter(rclient, sharded, 1, "byid", time.time())
    two = put_dead_letter(rclient, sharded, 2, "gone", time.time())
    env = {"MESH_SHARDS": str(SHARDS)}
    replayed = cli("dlq", "replay", one.entry_id, "--json", **env)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert json.loads(replayed.stdout)["ids"] == [one.entry_id]
    purged = cli("dlq", "purge", two.entry_id, "--yes", "--json", **env)
    assert json.loads(purged.stdout) == {"purged": 1}
    assert dlq_sizes(rclient, sharded) == [0, 0, 0]


def test_dlq_drain_load_and_purge_cover_every_shard(rclient: redis.Redis, sharded: MeshSettings, cli: Any,
                                                    tmp_path: Path) -> None:
    t0 = time.time() - 10
    entries = [put_dead_letter(rclient, sharded, i % SHARDS, f"x{i}", t0 + i) for i in range(4)]
    env = {"MESH_SHARDS": str(SHARDS)}
    out = tmp_path / "dlq.jsonl"
    drained = cli("dlq", "drain", "--to", str(out), "--yes", "--json", **env)
    assert json.loads(drained.stdout)["drained"] == 4
    assert dlq_sizes(rclient, sharded) == [0, 0, 0]
    assert sorted(json.loads(line)["entry"]["entry_id"] for line in out.read_text().splitlines()) == \
        sorted(e.entry_id for e in entries)

    loaded = cli("dlq", "load", str(out), "--json", **env)
    assert json.loads(loaded.stdout) == {"loaded": 4, "already_present": 0}
    assert dlq_sizes(rclient, sharded) == [2, 1, 1]  # each back in its job's shard

    assert json.loads(cli("dlq", "purge", "--all", "--yes", "--json", **env).stdout) == {"purged": 4}
    assert dlq_sizes(rclient, sharded) == [0, 0, 0]


# -- approvals, waits -------------------------------------------------------------------------------------


def test_approvals_and_waits_list_every_shard_oldest_first(rclient: redis.Redis, sharded: MeshSettings,
                                                            cli: Any) -> None:
    now = time.time()
    asked = []
    for n, i in enumerate((2, 1)):
        gate = StepRecord(step_id="gate", agent="executor", key=f"k{i}/gate", state=State.AWAITING_APPROVAL,
                          approval=Approval(hash="h", asked_at=now - 100 + n, timeout_s=600, warn_before_s=60))
        asked.append(put_job(rclient, sharded, i, f"gate{i}", now - 100, gate).job_id)
    slept = []
    for n, i in enumerate((0, 2)):
        nap = StepRecord(step_id="nap", agent="executor", key=f"k{i}/nap", state=State.WAITING,
                         wait=Wait(kind=WaitKind.SLEEP, started_at=now - 50 + n, duration_s=600))
        slept.append(put_job(rclient, sharded, i, f"nap{i}", now - 50, nap).job_id)
    env = {"MESH_SHARDS": str(SHARDS)}
    assert [p["job_id"] for p in json.loads(cli("approvals", "--json", **env).stdout)] == asked
    assert [w["job_id"] for w in json.loads(cli("waits", "--json", **env).stdout)] == slept


# -- metrics ---------------------------------------------------------------------------------------------


def _metrics(client: MeshClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from mesh.ops.metrics import MeshCollector

    registry = CollectorRegistry()
    registry.register(MeshCollector(client))
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples}


def test_metrics_sum_every_shard(rclient: redis.Redis, sharded: MeshSettings) -> None:
    now = time.time()
    for i in range(SHARDS):
        k = keys_of(sharded, i)
        rclient.hincrby(k.stats, "dead_lettered", 1)
        rclient.hincrby(k.outcomes, "executor:succeeded", 2)
        rclient.zadd(k.running, {f"job-{i}/executor": now})
        rclient.hset(k.messages("executor"), f"m{i}", b"{}")
    for i in (1, 2):
        put_dead_letter(rclient, sharded, i, f"m{i}", now)
    m = _metrics(MeshClient(sharded, client=rclient))
    assert m[("mesh_dead_lettered_total", frozenset())] == 3
    assert m[("mesh_messages_total", frozenset({("agent", "executor"), ("outcome", "succeeded")}))] == 6
    assert m[("mesh_dlq_size", frozenset())] == 2
    assert m[("mesh_dlq_entries_by_class", frozenset({("failure_class", "permanent")}))] == 2
    assert m[("mesh_steps_running", frozenset())] == 3
    assert m[("mesh_queue_in_flight", frozenset({("queue", "executor")}))] == 3


# -- the console ------------------------------------------------------------------------------------------


def test_console_pages_read_every_shard(rclient: redis.Redis, sharded: MeshSettings) -> None:
    from mesh.dlq import Filter
    from mesh.ops.web import views

    t0 = time.time() - 100
    jobs = [put_job(rclient, sharded, i % SHARDS, f"c{i}", t0 + i) for i in range(4)]
    letters = [put_dead_letter(rclient, sharded, i, f"cd{i}", t0 + n) for n, i in enumerate((1, 2, 0))]
    c = MeshClient(sharded, client=rclient)

    assert [r.job_id for r in views.recent_jobs(c, None)["jobs"]] == [r.job_id for r in reversed(jobs)]
    page = views.dlq(c, Filter())
    assert [e.entry_id for e in page["entries"]] == [e.entry_id for e in reversed(letters)]
    assert page["total"] == 3 and page["agents"] == ["executor"]
    later = views.dlq(c, Filter(), offset=1)
    assert [e.entry_id for e in later["entries"]] == [e.entry_id for e in reversed(letters)][1:]
    shown = views.dlq_entry(c, letters[1].entry_id)
    assert shown is not None and shown["entry"].entry_id == letters[1].entry_id
    far = jobs[2]  # on the third shard
    page_of_job = views.job(c, far.job_id)
    assert page_of_job is not None and page_of_job["record"].job_id == far.job_id
    assert views.find(c, far.key).job_id == far.job_id
    assert views.find(c, far.job_id[4:14]).job_id == far.job_id
    overview = views.overview(c)
    assert overview["dlq"]["total"] == 3


def test_the_console_follows_jobs_of_several_shards_at_once(rclient: redis.Redis, sharded: MeshSettings) -> None:
    import asyncio

    from mesh.broker import trace
    from mesh.ops.web.live import END, Follower, TraceHub
    from tests.conftest import wait_for

    jobs = [put_job(rclient, sharded, i, f"live{i}", time.time()) for i in (1, 2)]
    loop = asyncio.new_event_loop()
    hub = TraceHub(MeshClient(sharded, client=rclient))
    try:
        followers = [Follower(r.job_id, "0", loop) for r in jobs]
        for f in followers:
            hub.follow(f)
        wait_for(lambda: len(hub.jobs) == 2)
        for i, r in zip((1, 2), jobs, strict=True):
            envelope = {"job_id": r.job_id, "step_id": "executor", "agent": "executor", "key": r.key}
            trace.emit(rclient, keys_of(sharded, i), trace.event("progress", envelope, message=f"on {i}"))
            ended = r.model_copy(update={"state": State.SUCCEEDED})  # the job ends: its followers get the end
            rclient.set(keys_of(sharded, i).job(r.job_id), ended.model_dump_json())

        def got(f: Follower) -> list[Any]:
            loop.run_until_complete(asyncio.sleep(0))
            return list(f.queue._queue)  # type: ignore[attr-defined]

        wait_for(lambda: all(any(item[1] is END for item in got(f)) for f in followers), timeout_s=15)
        for i, f in zip((1, 2), followers, strict=True):
            events = [ev for _, ev in got(f) if ev is not END]
            assert [ev.get("message") for ev in events] == [f"on {i}"]
    finally:
        hub.stop()
        loop.close()


# -- mesh soak's readers ----------------------------------------------------------------------------------


def test_the_soak_reads_its_jobs_workers_and_queues_in_every_shard(rclient: redis.Redis, sharded: MeshSettings) -> None:
    from mesh.broker.clock import server_ms
    from mesh.ops.soak import Traffic, ended, queued, serving

    client = MeshClient(sharded, client=rclient)
    traffic = Traffic()
    done = [put_job(rclient, sharded, i, f"soak{i}", time.time()) for i in (1, 2)]
    waiting = put_job(rclient, sharded, 0, "soak-open", time.time())
    for record in done:
        ended_record = record.model_copy(update={"state": State.SUCCEEDED})
        rclient.set(Shards.of(sharded).of_job(record.job_id).job(record.job_id), ended_record.model_dump_json())
    for record in (*done, waiting):
        traffic.jobs[record.job_id] = "note"
        traffic.open.add(record.job_id)
    assert ended(client, traffic) == {"sent": 3, "ended": 2}  # one MGET per shard (a cluster refuses one of many)
    assert traffic.open == {waiting.job_id}

    rclient.zadd(keys_of(sharded, 1).heartbeats, {"w1": server_ms(rclient)})
    rclient.zadd(keys_of(sharded, 2).heartbeats, {"w2": server_ms(rclient)})
    assert serving(rclient, Shards.of(sharded).keys, 60) == 2
    rclient.hset(keys_of(sharded, 2).messages("executor"), "m", b"{}")
    assert queued(client) == 1


def test_the_bench_waits_for_jobs_in_their_shards(rclient: redis.Redis, sharded: MeshSettings) -> None:
    from mesh.ops.bench import _succeeded, job_keys

    made = [put_job(rclient, sharded, i, f"bench{i}", time.time()) for i in range(SHARDS)]
    for record in made:
        ended = record.model_copy(update={"state": State.SUCCEEDED})
        rclient.set(Shards.of(sharded).of_job(record.job_id).job(record.job_id), ended.model_dump_json())
    found = _succeeded(rclient, job_keys(MeshClient(sharded, client=rclient), [r.job_id for r in made]), timeout_s=5)
    assert [r["job_id"] for r in found] == [r.job_id for r in made]  # one MGET per shard, in the order asked


@pytest.mark.slow
def test_dead_letters_a_worker_of_every_shard_writes_are_listed_counted_and_replayed(
        rclient: redis.Redis, sharded: MeshSettings, start_worker: Any, cli: Any) -> None:
    """End to end: one job sent on each of two shards (a client of that shard), dead-lettered by a worker
    serving every shard (a URL outside MESH_HTTP_ALLOW is a permanent failure); every reader shows both."""
    from tests.conftest import wait_for

    start_worker(sharded, ("executor",), threads=2)
    sent = []
    for i in (1, 2):
        shard = Shards.of(sharded).keys[i].shard
        client = MeshClient(sharded.on_shard(shard), client=rclient)
        sent.append(client.send("executor", {"tool": "http_post", "args": {"url": "http://127.0.0.1:9/x", "json": {}}},
                                key=key_on(sharded, i, "e2e")).id)
    env = {"MESH_SHARDS": str(SHARDS)}
    wait_for(lambda: len(json.loads(cli("dlq", "list", "--json", **env).stdout)) == 2, timeout_s=30)
    assert sorted(e["job_id"] for e in json.loads(cli("dlq", "list", "--json", **env).stdout)) == sorted(sent)
    dead = json.loads(cli("jobs", "--state", "dead_lettered", "--json", **env).stdout)
    assert sorted(j["job_id"] for j in dead) == sorted(sent)
    assert json.loads(cli("stats", "--json", **env).stdout)["dlq_size"] == 2
    replayed = json.loads(cli("dlq", "replay", "--all", "--yes", "--json", **env).stdout)
    assert replayed["replayed"] == 2  # each in its shard; the worker dead-letters them again
    wait_for(lambda: json.loads(cli("dlq", "stats", "--json", **env).stdout)["total"] == 2, timeout_s=30)
