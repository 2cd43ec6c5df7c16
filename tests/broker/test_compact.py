"""Compaction of finished jobs (broker/compact.py): the sweep moves an ended job's trace into its record
and rewrites the record without its defaults; every reader tells the same story, and says what was
summarised. Count retention (MESH_JOB_RETENTION_COUNT) keeps exactly the newest N finished jobs of each
agent or pipeline, tombstoned as the age retention does."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
import redis
from conftest import wait_for

from mesh.broker import MeshClient, trace
from mesh.broker.compact import CALL_BYTES, KIND_MAX, VALUE_MAX, VERSION, Compacted, Compaction, compacted, encode
from mesh.broker.connection import node_client
from mesh.broker.jobs import JobStore
from mesh.broker.keys import Keys
from mesh.broker.retention import Retention, expired
from mesh.broker.trace import TRACE_MAXLEN
from mesh.contracts import JobRecord, State, StepRecord, dumps, loads, transition

GOAL = "Find out how retries work, then write a note"


def now(r: redis.Redis) -> float:
    seconds, micros = r.time()  # type: ignore[misc]
    return float(seconds + micros / 1e6)


def same_events(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal events, times to the microsecond (the history keeps them as microsecond offsets)."""
    def strip(ev: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in ev.items() if k != "at"}
    return len(a) == len(b) and all(strip(x) == strip(y) and abs(x["at"] - y["at"]) < 2e-6
                                    for x, y in zip(a, b, strict=True))


def lines(text: str) -> list[str]:
    """``mesh trace`` lines without the tree's connectors and offsets (kept to the microsecond, they may
    print a millisecond apart)."""
    return [re.sub(r"\d+\.\d+s", "", re.sub(r"^[\s│├└─]+", "", line)) for line in text.splitlines()]


def started(jobs: JobStore, r: redis.Redis, job_id: str, agent: str = "executor", *,
            pipeline: str | None = None) -> JobRecord:
    """A running one-step job of ``agent`` with its first event."""
    step = StepRecord(step_id="s", agent=agent, key=f"{job_id}-key")
    job = JobRecord(job_id=job_id, key=f"{job_id}-key", trace_id="a" * 32, steps={"s": step}, pipeline=pipeline)
    job = transition(job, State.RUNNING).with_step(transition(step, State.RUNNING))
    pipe = r.pipeline(transaction=True)
    jobs.stage_create(pipe, job)
    pipe.execute()
    trace.emit(r, jobs.keys, trace.event("picked_up", envelope(job), worker="w:1", token=1))
    return job


def envelope(job: JobRecord) -> dict[str, Any]:
    return {"trace_id": job.trace_id, "job_id": job.job_id, "key": job.steps["s"].key, "step_id": "s",
            "agent": job.steps["s"].agent, "attempt": 1}


def end(jobs: JobStore, job: JobRecord, state: State = State.SUCCEEDED, **fields: Any) -> None:
    def change(record: JobRecord) -> tuple[JobRecord, list[Any]]:
        step = transition(record.steps["s"], state, result={"ok": True} if state is State.SUCCEEDED else None,
                          error=None if state is State.SUCCEEDED else "boom")
        ended = record.with_step(step)
        return transition(ended, state, result={"s": {"ok": True}} if state is State.SUCCEEDED else None,
                          error=None if state is State.SUCCEEDED else "boom"), []

    jobs.update(job.job_id, change, events=[trace.event(str(state), envelope(job), worker="w:1", **fields)])


@pytest.mark.slow
def test_a_finished_job_is_compacted_and_mesh_trace_and_status_tell_the_same_story(
        make_settings, start_worker, rclient, cli):
    settings = make_settings(sweep_interval_s=3600)  # the boot sweep only: this test compacts
    client = MeshClient(settings, client=rclient)
    keys = client.keys
    start_worker(settings)
    ref = client.submit(GOAL, key="compact-me")
    wait_for(lambda: (r := client.status(ref.id)) is not None and r.state is State.SUCCEEDED, timeout_s=60)
    before = trace.read(rclient, keys, ref.id)
    shown = cli("trace", ref.id)
    record_before = client.status(ref.id)
    assert rclient.zscore(keys.jobs_compact, ref.id) is not None  # the end write queued it
    ttl = rclient.pttl(keys.job(ref.id))

    done = Compaction(rclient, settings).run(now(rclient))

    assert done.jobs == 1 and rclient.zcard(keys.jobs_compact) == 0
    assert not rclient.exists(keys.trace(ref.id))  # the stream is gone ...
    raw = rclient.get(keys.job(ref.id))
    assert raw is not None and "history" in loads(raw)  # ... the record holds it, its defaults left out
    assert not {"error", "failed_at"} & set(loads(raw))
    assert all(not {"error", "failed_at"} & set(step) for step in loads(raw)["steps"].values())
    assert 0 < rclient.pttl(keys.job(ref.id)) <= ttl  # its retention clock kept
    assert client.status(ref.id) == record_before.model_copy(update={"history": loads(raw)["history"]})
    after = trace.read(rclient, keys, ref.id)
    assert same_events(after[:-1], before)
    assert after[-1]["event"] == "compacted" and after[-1]["kept"] == len(before) and after[-1]["summarised"] == {}
    shown_after = cli("trace", ref.id)
    assert shown_after.returncode == 0 and "compacted" in shown_after.stdout
    assert "events kept whole, none summarised" in shown_after.stdout
    assert set(lines(shown.stdout)) <= set(lines(shown_after.stdout))  # every line it showed, it shows
    status = cli("status", ref.id)
    assert status.returncode == 0 and "succeeded" in status.stdout


def test_a_chatty_step_is_summarised_and_long_values_are_cut_and_mesh_trace_says_so(settings, rclient, cli):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-chatty")
    for n in range(100):
        trace.emit(rclient, keys, trace.event("progress", envelope(job), worker="w:1", progress=n + 1, note=f"#{n}"))
    long_error = "e" * (VALUE_MAX * 10)
    trace.emit(rclient, keys, trace.event("failed", envelope(job), worker="w:1", error=long_error,
                                          output={"blob": "x" * VALUE_MAX * 4}))
    end(jobs, job)

    assert Compaction(rclient, settings).run(now(rclient)).jobs == 1
    events = trace.read(rclient, keys, job.job_id)
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert progress == [*range(1, KIND_MAX // 2 + 1), *range(101 - KIND_MAX // 2, 101)]  # the first and last
    (failed,) = [e for e in events if e["event"] == "failed"]
    assert failed["error"].startswith("e" * VALUE_MAX) and "cut when the job was compacted" in failed["error"]
    assert failed["output"]["compacted"] is True and failed["output"]["bytes"] > VALUE_MAX
    note = events[-1]
    assert note["event"] == "compacted" and note["summarised"] == {"s": {"progress": 100 - KIND_MAX}}
    assert note["cut_values"] == 2
    shown = cli("trace", job.job_id)
    assert shown.returncode == 0
    assert f"summarised (counted, not kept): {100 - KIND_MAX} progress of s" in shown.stdout
    assert "2 long values cut" in shown.stdout


def test_events_after_compaction_are_read_merged_on_the_next_one_and_go_with_the_record(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-late")
    end(jobs, job)
    compaction = Compaction(rclient, settings)
    compaction.run(now(rclient))
    # a late event (a duplicate delivery of its done key) starts a stream of its own
    trace.emit(rclient, keys, trace.event("duplicate", envelope(job), worker="w:2", state="succeeded"))
    kinds = [e["event"] for e in trace.read(rclient, keys, job.job_id)]
    assert kinds == ["picked_up", "succeeded", "compacted", "duplicate"]
    # a write to the ended job queues it again, and the next pass merges both
    jobs.update(job.job_id, lambda r: (r.model_copy(update={"goal": "again"}), []))
    assert rclient.zscore(keys.jobs_compact, job.job_id) is not None
    assert compaction.run(now(rclient)).jobs == 1
    assert not rclient.exists(keys.trace(job.job_id))
    assert [e["event"] for e in trace.read(rclient, keys, job.job_id)] == [
        "picked_up", "succeeded", "duplicate", "compacted"]
    # what came after the last compaction has no TTL of its own: the age sweep takes it with the record
    trace.emit(rclient, keys, trace.event("duplicate", envelope(job), worker="w:2", state="succeeded"))
    rclient.delete(keys.job(job.job_id))  # expired
    Retention(rclient, settings).sweep(now(rclient) + settings.job_retention_s + 60)
    assert not rclient.exists(keys.trace(job.job_id)) and expired(rclient, keys, job.job_id)


def test_a_record_changed_since_the_pass_read_it_is_left_for_the_next_pass(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-raced")
    end(jobs, job)
    compaction = Compaction(rclient, settings)
    data, rows = rclient.get(keys.job(job.job_id)), rclient.xrange(keys.trace(job.job_id))
    args = compaction._one(job.job_id, data, rows, now(rclient))  # read, then a writer comes first
    trace.emit(rclient, keys, trace.event("duplicate", envelope(job), worker="w:2"))
    jobs.update(job.job_id, lambda r: (r.model_copy(update={"goal": "meanwhile"}), []))
    written = rclient.get(keys.job(job.job_id))
    out, done = compaction._script(keys=[keys.prefix], args=["compact", now(rclient), "0", *args])
    assert (out, done) == (0, 0)
    assert rclient.get(keys.job(job.job_id)) == written and rclient.xlen(keys.trace(job.job_id)) == 3
    assert rclient.zscore(keys.jobs_compact, job.job_id) is not None
    assert compaction.run(now(rclient)).jobs == 1  # the next pass takes it, with the event written meanwhile
    assert [e["event"] for e in trace.read(rclient, keys, job.job_id)][-2:] == ["duplicate", "compacted"]


def test_a_stream_grown_between_read_and_write_keeps_what_came_after(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-grown")
    end(jobs, job)
    compaction = Compaction(rclient, settings)
    data, rows = rclient.get(keys.job(job.job_id)), rclient.xrange(keys.trace(job.job_id))
    args = compaction._one(job.job_id, data, rows, now(rclient))
    trace.emit(rclient, keys, trace.event("duplicate", envelope(job), worker="w:2"))  # no record write
    assert compaction._script(keys=[keys.prefix], args=["compact", now(rclient), "0", *args]) == [1, 1]
    assert [e["event"] for e in trace.read(rclient, keys, job.job_id)] == [
        "picked_up", "succeeded", "compacted", "duplicate"]


def test_the_compact_encoding_reads_back_as_the_same_record_and_keeps_every_state():
    step = StepRecord(step_id="s", agent="executor", key="k")
    job = JobRecord(job_id="job-1", key="k", trace_id="a" * 32, steps={"s": step}, extra_field={"newer": 1})
    data = encode(job)
    assert JobRecord.model_validate(loads(data)) == job
    raw = loads(data)
    assert raw["state"] == "queued" and raw["steps"]["s"]["state"] == "queued" and "error" not in raw
    assert len(data) < len(orjson.dumps(job.model_dump(mode="json"))) / 2  # the record with its nulls
    assert len(data) < len(dumps(job))  # and less than it is stored with, its nulls left out


def test_a_history_made_from_the_stored_json_is_the_one_made_from_the_records_dump():
    """The sweep hands ``compacted`` the record's JSON as it read it (null fields left out, or every
    default left out once compacted before) rather than dumping the record again: the same history
    comes of either, for a pipeline with a step not sent yet, events of several steps and kinds, more
    than KIND_MAX of one kind, and a history already kept."""
    sent = StepRecord(step_id="a", agent="executor", key="job-p/a", sent_at=1.0)
    unsent = StepRecord(step_id="b", agent="researcher", key="job-p/b")
    job = JobRecord(job_id="job-p", key="job-p", trace_id="b" * 32, pipeline="p", steps={"a": sent, "b": unsent},
                    created_at=1.0)
    env = {"trace_id": job.trace_id, "job_id": job.job_id, "attempt": 1}
    events = [{"event": "picked_up", "at": 2.0, **env, "key": "job-p/a", "step_id": "a", "agent": "executor",
               "worker": "w:1", "token": 3},
              *({"event": "tool_called", "at": 2.0 + i / 100, **env, "key": "job-p/a", "step_id": "a",
                 "agent": "executor", "worker": "w:2", "text": "x" * (VALUE_MAX + i)} for i in range(KIND_MAX + 3)),
              {"event": "dead_lettered", "at": 3.0, **env, "key": "job-p/b", "step_id": "b", "agent": "researcher",
               "worker": None, "error": {"why": "no input"}},
              {"event": "halted", "at": 4.0, **env, "key": None, "step_id": None, "agent": None, "worker": None}]
    once = compacted(job, events[:5], 5.0)
    for record, later in ((job, events), (once, events[5:])):  # the second: compacted, then more events
        for stored in (dumps(record), encode(record)):
            assert compacted(record, later, 6.0, loads(stored)) == compacted(record, later, 6.0)
    assert compacted(once, events[5:], 6.0).history["cut"]["a"]["tool_called"] > 0


def test_count_retention_keeps_exactly_the_newest_n_finished_jobs_of_each_agent(make_settings, rclient, cli):
    settings = make_settings(job_retention_count=3)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600, keep_s=7200)
    held = started(jobs, rclient, "job-dead")
    end(jobs, held, State.DEAD_LETTERED)  # the oldest, holding a dead letter: only age takes it
    executor = []
    for i in range(5):
        job = started(jobs, rclient, f"job-x{i}")
        end(jobs, job)
        executor.append(job.job_id)
    planner = []
    for i in range(2):
        job = started(jobs, rclient, f"job-p{i}", agent="planner")
        end(jobs, job)
        planner.append(job.job_id)

    done = Compaction(rclient, settings).run(now(rclient))

    assert (done.jobs, done.count) == (8, 2)
    kept = [j for j in executor if rclient.exists(keys.job(j))]
    assert kept == executor[-3:]
    assert rclient.exists(keys.job("job-dead")) and all(rclient.exists(keys.job(j)) for j in planner)
    assert [m.decode() for m in rclient.zrange(keys.jobs_kept("executor"), 0, -1)] == executor[-3:]
    for gone in executor[:2]:
        assert not rclient.exists(keys.trace(gone)) and rclient.zscore(keys.jobs, gone) is None
        assert expired(rclient, keys, gone)
        status = cli("status", gone)
        assert status.returncode == 2 and "expired" in status.stderr
    assert int(rclient.hget(keys.stats, "swept_count") or 0) == 2
    # a newer job pushes out the oldest kept one, and only it
    job = started(jobs, rclient, "job-x5")
    end(jobs, job)
    assert Compaction(rclient, settings).run(now(rclient)).count == 1
    assert [j for j in [*executor, "job-x5"] if rclient.exists(keys.job(j))] == [*executor[-2:], "job-x5"]


def test_with_count_retention_off_no_index_is_kept_and_nothing_is_removed(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    for i in range(3):
        end(jobs, started(jobs, rclient, f"job-{i}"))
    assert Compaction(rclient, settings).run(now(rclient)).count == 0
    assert not rclient.exists(keys.jobs_kept("executor"), keys.jobs_kept_names)
    assert all(rclient.exists(keys.job(f"job-{i}")) for i in range(3))


def test_an_unreadable_record_is_left_as_it_is_and_does_not_stop_the_others(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    rclient.set(keys.job("job-bad"), b"{not json")
    rclient.zadd(keys.jobs_compact, {"job-bad": 1.0})
    end(jobs, started(jobs, rclient, "job-good"))
    odd = started(jobs, rclient, "job-odd")
    rclient.xadd(keys.trace("job-odd"), {"x": b"not an event"})
    end(jobs, odd)
    assert Compaction(rclient, settings).run(now(rclient)).jobs == 1
    assert rclient.xlen(keys.trace("job-odd")) == 3 and loads(rclient.get(keys.job("job-odd"))).get("history") is None
    assert rclient.get(keys.job("job-bad")) == b"{not json" and rclient.zcard(keys.jobs_compact) == 0
    assert "history" in loads(rclient.get(keys.job("job-good")))


@pytest.mark.slow
def test_a_dead_lettered_job_is_compacted_and_its_replay_goes_on_with_its_story(
        client, settings, start_worker, rclient, cli):
    from mesh.dlq import DeadLetterStore, Replayer

    keys = client.keys
    url = "http://127.0.0.1:9/hook"  # not in MESH_HTTP_ALLOW: refused, permanently
    ref = client.send("executor", {"tool": "http_post", "args": {"url": url, "json": {}}})
    start_worker(settings, ("executor",))
    assert client.wait(ref.id, timeout_s=20).state is State.DEAD_LETTERED
    # the settle script queued it; the worker's own sweep may have compacted it since
    wait_for(lambda: rclient.zscore(keys.jobs_compact, ref.id) is not None
             or b'"history":{' in (rclient.get(keys.job(ref.id)) or b""))
    before = [e for e in trace.read(rclient, keys, ref.id) if e["event"] != "compacted"]
    assert [e["event"] for e in before][-1] == "dead_lettered"
    Compaction(rclient, settings).run(now(rclient))  # the worker's own sweep may have done it first
    assert rclient.zscore(keys.jobs_compact, ref.id) is None and b'"history":{' in rclient.get(keys.job(ref.id))
    assert not rclient.exists(keys.trace(ref.id))

    store = DeadLetterStore(rclient, keys)
    replayer = Replayer(store, settings)
    assert len(replayer.replay(replayer.entries()).replayed) == 1
    wait_for(lambda: len([e for e in trace.read(rclient, keys, ref.id) if e["event"] == "dead_lettered"]) == 2,
             timeout_s=20)
    wait_for(lambda: rclient.zscore(keys.jobs_compact, ref.id) is not None)
    Compaction(rclient, settings).run(now(rclient))  # the worker's own sweep may have done it first
    assert rclient.zscore(keys.jobs_compact, ref.id) is None and b'"history":{' in rclient.get(keys.job(ref.id))
    kinds = [e["event"] for e in trace.read(rclient, keys, ref.id)]
    assert kinds[:len(before)] == [e["event"] for e in before]
    assert kinds[len(before)] == "replayed" and "picked_up" in kinds[len(before):]  # its story goes on ...
    assert kinds.count("replayed") == 1 and kinds[-2:] == ["dead_lettered", "compacted"]  # ... in one history
    shown = cli("trace", ref.id)
    assert shown.returncode == 0 and "replayed" in shown.stdout and "compacted" in shown.stdout


def test_a_pass_out_of_time_leaves_the_queue_for_the_next(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    end(jobs, started(jobs, rclient, "job-later"))
    compaction = Compaction(rclient, settings)
    assert compaction.run(now(rclient), budget_s=0).jobs == 0
    assert rclient.zscore(keys.jobs_compact, "job-later") is not None and rclient.exists(keys.trace("job-later"))
    assert compaction.run(now(rclient), budget_s=60).jobs == 1


def test_a_compacted_jobs_events_are_followed_and_resumed_by_their_kept_ids(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-followed")
    end(jobs, job)
    Compaction(rclient, settings).run(now(rclient))
    trace.emit(rclient, keys, trace.event("duplicate", envelope(job), worker="w:2", state="succeeded"))
    client = MeshClient(settings, client=rclient)
    events = list(client.events(job.job_id))
    assert [e["event"] for e in events] == ["picked_up", "succeeded", "compacted", "duplicate"]
    assert [e["id"] for e in events[:3]] == ["0-1", "0-2", "0-3"]  # kept events: ids before any real one
    # a reader that stopped after the first kept event goes on from the second
    assert [e["event"] for e in client.events(job.job_id, last_id="0-1")] == ["succeeded", "compacted", "duplicate"]
    # one that had read past them (a real id) reads only the stream
    assert [e["event"] for e in client.events(job.job_id, last_id=events[2]["id"])] == ["duplicate"]
    assert [e["event"] for e in client.events(job.job_id, last_id=events[3]["id"])] == []


class Paused(redis.Redis):
    """A sweeper's Redis connection that runs ``meanwhile`` once, just after the sweeper's first
    ``after`` command (``zcard``: it read an index's size; ``zrange``: the jobs it takes): as if the
    sweeper was stopped (SIGSTOP) there while others went on, then resumed."""

    def __init__(self, after: str, meanwhile: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.after, self.meanwhile = after, meanwhile

    def _then(self, command: str, answer: Any) -> Any:
        if command == self.after and self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return answer

    def zcard(self, name: Any) -> Any:
        return self._then("zcard", super().zcard(name))

    def zrange(self, name: Any, start: int, end: int, *args: Any, **kwargs: Any) -> Any:
        return self._then("zrange", super().zrange(name, start, end, *args, **kwargs))


def pool(rclient: redis.Redis, keys: Keys) -> Any:
    """The connection pool of the Redis that holds the namespace's keys (on a cluster, its slot's primary)."""
    return node_client(rclient, keys.prefix).connection_pool


def paused(rclient: redis.Redis, keys: Keys, after: str, meanwhile: Any) -> Paused:
    return Paused(after, meanwhile, connection_pool=pool(rclient, keys))


def test_two_sweeps_applying_the_count_at_once_keep_the_newest_n_not_fewer(make_settings, rclient):
    settings = make_settings(job_retention_count=2)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    ids = [f"job-c{i}" for i in range(3)]
    for job_id in ids:
        end(jobs, started(jobs, rclient, job_id))
    first = Compaction(rclient, settings)
    first.compact(now(rclient))
    at = now(rclient)
    # the second sweep read 3 kept (1 too many); the first removes that one before it goes on
    second = Compaction(paused(rclient, keys, "zcard", lambda: first.by_count(at)), settings)

    second.by_count(at)

    assert [j for j in ids if rclient.exists(keys.job(j))] == ids[1:]
    assert rclient.zcard(keys.jobs_kept("executor")) == 2


def test_a_stale_sweep_does_not_remove_a_job_that_ended_again_since_it_read_the_index(make_settings, rclient):
    settings = make_settings(job_retention_count=1)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    old = started(jobs, rclient, "job-again")
    end(jobs, old, State.HALTED)
    end(jobs, started(jobs, rclient, "job-newer"))
    compaction = Compaction(rclient, settings)
    compaction.compact(now(rclient))

    def ends_again() -> None:  # re-opened (an operator's replay) and ended again, compacted: the newest now
        def reopen(r: JobRecord) -> tuple[JobRecord, list[Any]]:
            step = transition(transition(r.steps["s"], State.QUEUED), State.RUNNING)
            return transition(transition(r, State.QUEUED), State.RUNNING).with_step(step), []
        jobs.update(old.job_id, reopen)
        end(jobs, old)
        compaction.compact(now(rclient))

    stale = Compaction(paused(rclient, keys, "zrange", ends_again), settings)
    stale.by_count(now(rclient))

    assert rclient.exists(keys.job(old.job_id)) and not rclient.exists(keys.job("job-newer"))
    assert [m.decode() for m in rclient.zrange(keys.jobs_kept("executor"), 0, -1)] == [old.job_id]


def test_a_job_compacted_again_keeps_what_its_cut_values_said_and_counts_them_once(settings, rclient, cli):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-twice")
    trace.emit(rclient, keys, trace.event("progress", envelope(job), worker="w:1", note="é\x00" * 500_000))
    end(jobs, job)
    compaction = Compaction(rclient, settings)
    compaction.run(now(rclient))
    first = trace.read(rclient, keys, job.job_id)
    # a later write to the ended job (mesh rerun linking its rerun, a late approval's audit) queues it again
    jobs.update(job.job_id, lambda r: (r.model_copy(update={"reruns": ["job-next"]}), []))
    assert compaction.run(now(rclient)).jobs == 1

    again = trace.read(rclient, keys, job.job_id)
    (note,) = [e["note"] for e in again if e["event"] == "progress"]
    assert note == next(e["note"] for e in first if e["event"] == "progress")
    assert "(1,000,000 characters, cut when the job was compacted)" in note
    assert again[-1]["cut_values"] == 1
    assert "1 long value cut" in cli("trace", job.job_id).stdout


def test_a_history_in_a_newer_layout_is_left_as_it_is(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-newer-layout")
    end(jobs, job)
    newer = {"v": VERSION + 1, "events": ["what a newer release kept"]}
    jobs.update(job.job_id, lambda r: (r.model_copy(update={"history": newer}), []))  # a newer release compacted it
    trace.emit(rclient, keys, trace.event("duplicate", envelope(job), worker="w:2"))  # then a late event came

    Compaction(rclient, settings).run(now(rclient))

    assert loads(rclient.get(keys.job(job.job_id)))["history"] == newer
    assert rclient.xlen(keys.trace(job.job_id)) == 3 and rclient.zcard(keys.jobs_compact) == 0


def test_a_late_duplicate_of_a_job_no_longer_kept_leaves_no_trace_that_never_expires(make_settings, rclient):
    from dramatiq.broker import MessageProxy
    from dramatiq.middleware import SkipMessage

    from mesh.broker.idempotency import Idempotency
    from mesh.broker.mesh_broker import MeshBroker
    from mesh.broker.outbox import build_message
    from mesh.contracts import Envelope

    settings = make_settings(job_retention_count=1)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-gone")
    end(jobs, job)
    end(jobs, started(jobs, rclient, "job-after"))
    mw, broker = Idempotency(settings, rclient), MeshBroker(settings)
    try:
        claim_key = keys.claim(job.steps["s"].key)
        mw._call("claim", claim_key, "w:1")
        mw._call("done", claim_key, "w:1", dumps({"ok": True}))
        assert Compaction(rclient, settings).run(now(rclient)).count == 1  # the count took it
        assert expired(rclient, keys, job.job_id)
        # a redelivery of its done message (a worker died before its ack) comes after that
        message = MessageProxy(build_message(Envelope(**envelope(job), deadline=now(rclient) + 60, payload={})))
        with pytest.raises(SkipMessage):
            mw.before_process_message(broker, message)
    finally:
        broker.close()
    Retention(rclient, settings).sweep(now(rclient) + 2 * settings.job_retention_s)

    assert [e["event"] for e in trace.read(rclient, keys, job.job_id)] in ([], ["duplicate"])
    assert rclient.pttl(keys.trace(job.job_id)) != -1  # gone, or on its way out: never kept for good


@pytest.mark.parametrize("odd", [b"[1, 2]", b"null", b'{"event": "progress", "at": 1e308}'])
def test_an_event_of_an_odd_shape_leaves_its_job_uncompacted_and_the_pass_goes_on(settings, rclient, odd):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-odd-shape")
    rclient.xadd(keys.trace(job.job_id), {"e": odd})
    end(jobs, job)
    end(jobs, started(jobs, rclient, "job-fine"))

    assert Compaction(rclient, settings).run(now(rclient)).jobs == 1

    assert rclient.xlen(keys.trace(job.job_id)) == 3 and loads(rclient.get(keys.job(job.job_id))).get("history") is None
    assert "history" in loads(rclient.get(keys.job("job-fine"))) and rclient.zcard(keys.jobs_compact) == 0


def test_a_job_that_ends_again_between_the_read_and_the_write_stays_queued_for_the_next_pass(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-reopened")
    end(jobs, job, State.HALTED)

    def reopen(r: JobRecord) -> tuple[JobRecord, list[Any]]:  # an operator's replay: active again
        step = transition(transition(r.steps["s"], State.QUEUED), State.RUNNING)
        return transition(transition(r, State.QUEUED), State.RUNNING).with_step(step), []

    jobs.update(job.job_id, reopen)
    compaction = Compaction(rclient, settings)
    data, rows = rclient.get(keys.job(job.job_id)), rclient.xrange(keys.trace(job.job_id))
    args = compaction._one(job.job_id, data, rows, now(rclient))  # read while it runs ...
    end(jobs, job)  # ... and it ends (queued again) before the pass writes

    compaction._script(keys=[keys.prefix], args=["compact", now(rclient), "0", *args])

    assert rclient.zscore(keys.jobs_compact, job.job_id) is not None
    assert compaction.run(now(rclient)).jobs == 1 and not rclient.exists(keys.trace(job.job_id))


def test_a_history_merged_again_and_again_stays_within_what_a_stream_keeps(settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-long-story")
    end(jobs, job)
    compaction = Compaction(rclient, settings)
    written = 2  # picked_up, succeeded
    for round_ in range(3):  # three later rounds of events (compensation items, late duplicates), each merged
        pipe = rclient.pipeline(transaction=False)
        for n in range(1_000):
            ev = trace.event("progress", {**envelope(job), "step_id": f"item[{round_}-{n // 10}]"}, progress=n)
            trace.stage(pipe, keys, ev)
        pipe.execute()
        written += 1_000
        jobs.update(job.job_id, lambda r, g=f"round {round_}": (r.model_copy(update={"goal": g}), []))
        assert compaction.run(now(rclient)).jobs == 1

    events = trace.read(rclient, keys, job.job_id)
    note = events[-1]
    assert len(events) - 1 == note["kept"] <= TRACE_MAXLEN
    assert note["kept"] + sum(n for kinds in note["summarised"].values() for n in kinds.values()) == written
    assert [e["event"] for e in events[-3:-1]] == ["progress", "progress"]  # the newest are the ones kept
    assert events[-2]["step_id"] == "item[2-99]"


def test_mesh_status_json_of_a_compacted_job_is_what_it_was_before(settings, rclient, cli):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-status-json")
    end(jobs, job)
    before = cli("status", job.job_id, "--json")

    Compaction(rclient, settings).run(now(rclient))

    after = cli("status", job.job_id, "--json")
    assert after.returncode == 0 and loads(after.stdout) == loads(before.stdout)  # the trace is mesh trace's
    assert "history" not in loads(after.stdout)


def test_a_job_the_count_removed_is_said_to_be_removed_by_the_count_not_missing(make_settings, rclient, cli):
    from mesh.broker import JobNotFound

    settings = make_settings(job_retention_count=1)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    end(jobs, started(jobs, rclient, "job-counted-out"))
    end(jobs, started(jobs, rclient, "job-kept"))
    assert Compaction(rclient, settings).run(now(rclient)).count == 1

    status = cli("status", "job-counted-out")
    assert status.returncode == 2 and "MESH_JOB_RETENTION_COUNT" in status.stderr
    client = MeshClient(settings, client=rclient)
    with pytest.raises(JobNotFound) as waited:  # a caller still waiting on it is told it ended and was removed
        client.wait("job-counted-out", timeout_s=1)
    assert waited.value.expired and "removed by retention" in str(waited.value)
    with pytest.raises(JobNotFound) as never:
        client.status("job-never-sent")
    assert not never.value.expired


class Counting(redis.Redis):
    """A sweeper's Redis connection that notes the bytes of each script call's arguments."""

    calls: list[int]
    evicts: list[int]

    def evalsha(self, sha: Any, numkeys: int, *keys_and_args: Any) -> Any:  # type: ignore[override]
        if keys_and_args[numkeys] == "evict":
            answer = super().evalsha(sha, numkeys, *keys_and_args)
            self.evicts.append(int(answer[1]))  # the jobs it looked at
            return answer
        else:
            self.calls.append(sum(len(a) if isinstance(a, bytes | str) else 8 for a in keys_and_args))
        return super().evalsha(sha, numkeys, *keys_and_args)


def test_large_records_are_compacted_and_removed_by_count_in_script_calls_of_bounded_size(make_settings, rclient):
    settings = make_settings(job_retention_count=1)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    for i in range(12):  # a research result, a document: records of 200 KB
        job = started(jobs, rclient, f"job-big-{i}")
        jobs.update(job.job_id, lambda r: (r.model_copy(update={"goal": "g" * 200_000}), []))
        end(jobs, job)
    counting = Counting(connection_pool=pool(rclient, keys))
    counting.calls, counting.evicts = [], []

    assert Compaction(counting, settings).run(now(rclient)) == Compacted(jobs=12, count=11)

    # one call holds Redis while it hashes and writes (or reads) what it was given: never all 2.4 MB at once
    assert len(counting.calls) > 1 and max(counting.calls) <= CALL_BYTES + 2 * 200_000 + 4096
    assert sum(counting.evicts) == 11 and max(counting.evicts) <= CALL_BYTES // 200_000 + 1


def test_a_pipeline_named_as_an_agent_is_counted_apart_from_that_agents_jobs(make_settings, rclient):
    settings = make_settings(job_retention_count=1)
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    end(jobs, started(jobs, rclient, "job-of-agent"))  # a job of the executor agent
    end(jobs, started(jobs, rclient, "job-of-pipeline", pipeline="executor"))  # a run of pipeline "executor"

    assert Compaction(rclient, settings).run(now(rclient)).count == 0

    assert rclient.exists(keys.job("job-of-agent"), keys.job("job-of-pipeline")) == 2


def test_a_duplicate_of_a_compacted_job_queues_it_so_its_event_does_not_keep_a_stream(settings, rclient):
    from dramatiq.broker import MessageProxy
    from dramatiq.middleware import SkipMessage

    from mesh.broker.idempotency import Idempotency
    from mesh.broker.mesh_broker import MeshBroker
    from mesh.broker.outbox import build_message
    from mesh.contracts import Envelope

    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-resent")
    end(jobs, job)
    compaction = Compaction(rclient, settings)
    assert compaction.run(now(rclient)).jobs == 1
    mw, broker = Idempotency(settings, rclient), MeshBroker(settings)
    try:
        claim_key = keys.claim(job.steps["s"].key)
        mw._call("claim", claim_key, "w:1")
        mw._call("done", claim_key, "w:1", dumps({"ok": True}))
        # the key sent again (a producer's retry): acked as a duplicate, its event in a stream of its own
        message = MessageProxy(build_message(Envelope(**envelope(job), deadline=now(rclient) + 60, payload={})))
        with pytest.raises(SkipMessage):
            mw.before_process_message(broker, message)
    finally:
        broker.close()
    assert rclient.exists(keys.trace(job.job_id))

    assert compaction.run(now(rclient)).jobs == 1  # queued by the duplicate: its event joins the history
    assert not rclient.exists(keys.trace(job.job_id))
    assert [e["event"] for e in trace.read(rclient, keys, job.job_id)][-2:] == ["duplicate", "compacted"]


def test_an_event_of_a_step_not_sent_yet_keeps_its_key_when_the_step_is_sent_later_under_another(
        settings, rclient):
    keys = Keys(settings.namespace, settings.shard)
    jobs = JobStore(rclient, keys, retention_s=3600)
    job = started(jobs, rclient, "job-rekeyed", pipeline="p")
    # its input could not be built: refused before it was ever sent, under the key it was created with
    trace.emit(rclient, keys, trace.event("dead_lettered", envelope(job), error="no input"))
    end(jobs, job, State.HALTED)
    Compaction(rclient, settings).run(now(rclient))

    def sent(r: JobRecord) -> tuple[JobRecord, list[Any]]:  # replayed: sent under its idempotency_key
        step = transition(r.steps["s"], State.QUEUED).model_copy(update={"key": "order-7", "sent_at": now(rclient)})
        return transition(r, State.QUEUED).with_step(step), []

    jobs.update(job.job_id, sent)

    (refused,) = [e for e in trace.read(rclient, keys, job.job_id) if e["event"] == "dead_lettered"]
    assert refused["key"] == job.steps["s"].key  # not order-7: that message did not exist then
    jobs.update(job.job_id, lambda r: (transition(r, State.RUNNING).with_step(
        transition(r.steps["s"], State.RUNNING)), []))
    trace.emit(rclient, keys, trace.event("picked_up", {**envelope(job), "key": "order-7"}, worker="w:1"))
    end(jobs, job)
    Compaction(rclient, settings).run(now(rclient))  # and once merged with what came after
    events = trace.read(rclient, keys, job.job_id)
    assert [e["key"] for e in events if e["event"] == "dead_lettered"] == [job.steps["s"].key]
    assert [e["key"] for e in events if e["event"] == "picked_up"][-1] == "order-7"
