"""The retention sweep in the worker: its own schedule, one sweep per interval across the fleet, the
DLQ retention applied whether or not anything fails (counted and audited), and `mesh status` of a
job it removed saying that the job expired."""

from __future__ import annotations

import time

from conftest import flat, wait_for

from mesh.broker import MeshClient
from mesh.dlq import Audit, DeadLetter, DeadLetterStore
from mesh.ops.sweeper import Sweeper


def entry(entry_id: str, at: float) -> DeadLetter:
    return DeadLetter(entry_id=entry_id, queue="executor", agent="executor", failure_class="permanent",
                      error="400", worker="w", dead_lettered_at=at)


def test_dead_letters_past_their_retention_leave_on_the_sweeps_schedule_counted_and_audited(
        make_settings, start_worker, rclient):
    settings = make_settings(dlq_retention_s=600, sweep_interval_s=0.2)
    client = MeshClient(settings, client=rclient)
    store = DeadLetterStore(rclient, client.keys)
    now = time.time()
    for entry_id, at in (("old-1", now - 3600), ("old-2", now - 700), ("old-3", now - 601), ("new", now - 60)):
        assert store.put(entry(entry_id, at), b"raw")
    start_worker(settings, ("executor",))  # no message ever fails: the sweep runs on its own

    wait_for(lambda: store.count() == 1, timeout_s=15)
    assert store.get("new") is not None
    assert int(rclient.hget(client.keys.stats, "dlq_expired") or 0) == 3
    assert int(rclient.hget(client.keys.stats, "dead_lettered") or 0) == 0
    records = Audit(rclient, client.keys).records()
    assert sorted(r["entry_id"] for r in records if r["op"] == "expire") == ["old-1", "old-2", "old-3"]
    assert all(r["detail"]["retention_s"] == 600 and r["who"].startswith("retention@") for r in records)
    assert store.stats()["by_agent"] == {"executor": 1} and store.stats()["by_class"] == {"permanent": 1}


def test_one_sweep_runs_per_interval_across_the_fleet(make_settings, rclient):
    settings = make_settings(sweep_interval_s=0.5)
    keys = MeshClient(settings, client=rclient).keys
    first, second = Sweeper(settings, rclient), Sweeper(settings, rclient)
    second.owner = "another-host:1"
    assert first.sweep() is not None
    assert second.sweep() is None  # the interval's sweep has run, on another worker
    wait_for(lambda: not rclient.exists(keys.sweep_lock), timeout_s=5)
    assert second.sweep() is not None
    assert int(rclient.hget(keys.stats, "sweeps") or 0) == 2


def test_status_of_a_job_removed_by_retention_says_it_expired(make_settings, start_worker, rclient, cli):
    settings = make_settings(job_retention_s=3, sweep_interval_s=0.2)
    client = MeshClient(settings, client=rclient)
    worker = start_worker(settings, ("executor",))
    ref = client.send("executor", {"tool": "note", "args": {"title": "t"}})
    wait_for(lambda: rclient.zscore(client.keys.jobs_expired, ref.id) is not None, timeout_s=30)
    # Its sweeper stopped with it: the tombstone lives MESH_JOB_RETENTION_S, and a later sweep would
    # trim it while a slow `mesh status` starts (a loaded machine), making the job unknown, not expired.
    worker.stop(timeout=10_000)

    res = cli("status", ref.id, MESH_JOB_RETENTION_S="3")
    assert res.returncode == 2
    assert f"job {ref.id} expired: records are kept MESH_JOB_RETENTION_S=3s after a job ends" in flat(res.stderr)
    res = cli("status", "job-never-made")
    assert res.returncode == 2 and "no job job-never-made" in flat(res.stderr)
