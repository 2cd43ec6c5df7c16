"""Dead letters and their jobs' records: a job ended holding a dead letter keeps its record while
the dead letter may be replayed (not only MESH_JOB_RETENTION_S); one whose record is gone all the
same (an entry that waited past the dedup window, or was drained and loaded back later): the replay
of a one-message job recreates the record and runs, a pipeline step is skipped with the reason, in a
dry run as in a replay, and keeps its entry and error. Every replay leaves a ``replayed`` event in
the job's trace: who replayed which entry."""

from __future__ import annotations

import json

import orjson
import pytest
from conftest import wait_for

from mesh.broker import MeshClient, trace
from mesh.broker.client import job_id_for
from mesh.broker.keys import prefix
from mesh.contracts import State, child_key
from mesh.dlq import DeadLetterStore, Replayer
from tests.dlq.bulk import generate, nth_id
from tests.httpserver import RecordingServer


class Switch:
    """400 until fixed, then 200."""

    def __init__(self) -> None:
        self.fixed = False

    def __call__(self, n: int, request: dict) -> tuple[int, dict]:
        return (200, {"ok": True}) if self.fixed else (400, {"error": "rejected"})


def record_of(client: MeshClient, job_id: str):  # type: ignore[no-untyped-def]
    data = client.redis.get(client.keys.job(job_id))
    return None if data is None else client.jobs.get(job_id)


@pytest.mark.slow
def test_a_replay_of_a_job_whose_record_expired_recreates_it_runs_and_traces_the_replay(
        make_settings, start_worker, cli, rclient):
    switch = Switch()
    with RecordingServer(switch) as server:
        settings = make_settings(http_allow=server.host_port)
        client = MeshClient(settings, client=rclient)
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url(), "json": {"n": 1}}},
                          key="order-1")
        start_worker(settings, ("executor",))
        store = DeadLetterStore(client.redis, client.keys)
        wait_for(lambda: store.count() == 1, timeout_s=30)
        [entry] = store.newest()
        # The job ended dead-lettered, and its record is kept while the entry may be replayed; one that
        # waited longer (past the dedup window, or drained to a file and loaded back later) finds it gone.
        wait_for(lambda: client.jobs.get(ref.id).state is State.DEAD_LETTERED)  # type: ignore[union-attr]
        rclient.delete(client.keys.job(ref.id), client.keys.trace(ref.id))
        switch.fixed = True

        dry = cli("dlq", "replay", entry.entry_id, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout)["ids"] == [entry.entry_id]
        res = cli("dlq", "replay", entry.entry_id, "--yes", "--json")
        assert res.returncode == 0, res.stderr
        done = wait_for(lambda: (r := record_of(client, ref.id)) is not None and r.state in
                        {State.SUCCEEDED, State.DEAD_LETTERED} and r, timeout_s=30)
        assert done.state is State.SUCCEEDED, done
        assert store.count() == 0  # not dead-lettered again as "job has no record"
        events = trace.read(client.redis, client.keys, ref.id)

    replayed = [e for e in events if e["event"] == "replayed"]
    assert len(replayed) == 1
    assert replayed[0]["entry_id"] == entry.entry_id and replayed[0]["recreated_record"] is True
    assert "@" in replayed[0]["by"] and replayed[0]["failure_class"] == "permanent"
    kinds = [e["event"] for e in events]
    assert kinds.index("replayed") < kinds.index("picked_up") < kinds.index("succeeded")
    assert [r["headers"]["idempotency-key"] for r in server.requests] == ["order-1", "order-1"]


@pytest.mark.slow
def test_a_replay_leaves_a_replayed_event_between_dead_lettered_and_the_next_pickup(
        make_settings, start_worker, cli, client):
    switch = Switch()
    with RecordingServer(switch) as server:
        settings = make_settings(http_allow=server.host_port)
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url(), "json": {}}}, key="t-1")
        start_worker(settings, ("executor",))
        assert client.wait(ref.id, timeout_s=30).state is State.DEAD_LETTERED
        store = DeadLetterStore(client.redis, client.keys)
        wait_for(lambda: store.count() == 1)
        [entry] = store.newest()
        switch.fixed = True
        assert cli("dlq", "replay", "--all", "--yes").returncode == 0
        wait_for(lambda: client.status(ref.id).state is State.SUCCEEDED, timeout_s=30)

    # (the worker's sweep may have compacted the dead-lettered job before its replay: its marker says
    # what was summarised, and is not one of the job's events)
    kinds = [e["event"] for e in trace.read(client.redis, client.keys, ref.id) if e["event"] != "compacted"]
    at = kinds.index("dead_lettered")
    assert kinds[at + 1] == "replayed", kinds
    assert "picked_up" in kinds[at + 2:]
    shown = cli("trace", ref.id)
    assert shown.returncode == 0 and f"dead letter {entry.entry_id} replayed by" in " ".join(shown.stdout.split())


def test_a_pipeline_step_whose_job_expired_is_skipped_with_the_reason_by_a_dry_run_and_a_replay(client, settings):
    store = DeadLetterStore(client.redis, client.keys)
    generate(client.redis, client.keys, 1, 1_700_000_000.0)
    eid = nth_id(0)
    # The generated entry is a one-message job's; make it a step of a pipeline run (a derived key,
    # a step id of the spec's), as the engine sends them.
    data, raw = client.redis.hmget(client.keys.dead_letter(eid), "entry", "raw")
    entry, body = orjson.loads(data), orjson.loads(raw)
    env = body["args"][0]
    env.update(job_id=job_id_for("run-1"), key=child_key("run-1", env["agent"], "act"), step_id="act")
    entry.update(envelope=env, key=env["key"], job_id=env["job_id"])
    client.redis.hset(client.keys.dead_letter(eid), mapping={"entry": orjson.dumps(entry), "raw": orjson.dumps(body)})

    replayer = Replayer(store, settings)
    dry = replayer.replay(replayer.entries([eid]), dry_run=True)
    assert dry.replayed == [] and "record has expired" in dry.skipped[eid] and "pipeline" in dry.skipped[eid]
    report = replayer.replay(replayer.entries([eid]))
    assert report.replayed == [] and report.skipped == dry.skipped
    kept = store.get(eid)
    assert kept is not None and kept.error == entry["error"]  # the original error is not lost
    assert client.queues(["executor"])["executor"]["ready"] == 0


@pytest.mark.slow
def test_a_pipeline_job_that_ended_with_a_dead_letter_keeps_its_record_past_its_retention_and_replays(
        make_settings, rclient, cli):
    from mesh.agents.pipelines import Pipeline, check
    from mesh.ops.worker import start_worker
    from tests.pipelines.agents import app

    settings = make_settings(job_retention_s=1, dedup_ttl_s=120)
    mesh = MeshClient(settings, client=rclient, app=app)
    spec = check(Pipeline("kept").step("researcher").step("coder", depends_on=["researcher"]).build(), app)
    fail = f"{prefix(settings.namespace)}:test.fail"
    rclient.sadd(fail, "run-1/coder/coder")
    worker = start_worker(settings, None, 4, app=app)
    try:
        ref = mesh.run(spec, {"goal": "g"}, key="run-1")
        assert mesh.wait(ref.id, timeout_s=30).state is State.DEAD_LETTERED
        # Kept as long as its dead letter may be replayed (the dedup window here), not MESH_JOB_RETENTION_S.
        assert rclient.pttl(mesh.keys.job(ref.id)) > 60_000 and rclient.pttl(mesh.keys.trace(ref.id)) > 60_000
        rclient.srem(fail, "run-1/coder/coder")
        res = cli("dlq", "replay", "--all", "--yes", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert mesh.wait(ref.id, timeout_s=30).state is State.SUCCEEDED
        # Ended without a dead letter now: the ordinary retention applies again.
        assert 0 < rclient.pttl(mesh.keys.job(ref.id)) <= 1000
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
