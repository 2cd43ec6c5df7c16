"""A job sent again after its record expired (MESH_JOB_RETENTION_S) but inside the dedup window:
its key is still done, so nothing runs again, and the re-created record ends from the claim's stored
output instead of staying ``queued`` for good; when the claim kept only a digest of a large output
and the record holding it is gone, the job says so plainly."""

from __future__ import annotations

import pytest
from conftest import wait_for

from mesh.broker import MeshClient
from mesh.contracts import TERMINAL, State

NOTE = {"tool": "note", "args": {"title": "once"}}


def counter(client: MeshClient, field: str) -> int:
    return int(client.redis.hget(client.keys.outcomes, field) or 0)


def resend_after_expiry(client: MeshClient, start_worker, key: str):  # type: ignore[no-untyped-def]
    start_worker(client.settings, ("executor",))
    first = client.wait(client.send("executor", NOTE, key=key).id, timeout_s=30)
    assert first.state is State.SUCCEEDED
    wait_for(lambda: not client.redis.exists(client.keys.job(first.job_id)), timeout_s=30)
    again = client.send("executor", NOTE, key=key)
    assert again.id == first.job_id
    ended = wait_for(lambda: (r := client.jobs.get(again.id)) is not None and r.state in TERMINAL and r,
                     timeout_s=30)
    return first, ended


@pytest.mark.slow
def test_a_job_sent_again_after_its_record_expired_ends_from_its_claim_and_runs_nothing(
        make_settings, start_worker, rclient):
    client = MeshClient(make_settings(job_retention_s=1), client=rclient)
    first, again = resend_after_expiry(client, start_worker, "resend-1")

    assert again.state is State.SUCCEEDED
    assert again.steps["executor"].result == first.steps["executor"].result
    # It ended, so it expires like any ended job (no record left that never expires): read before the
    # wait for the counters below, which may outlast its second of retention.
    assert 0 < rclient.pttl(client.keys.job(again.job_id)) <= 1000
    # counted by the worker once per MESH_COUNTER_FLUSH_S
    wait_for(lambda: counter(client, "executor:duplicate") >= 1)
    assert counter(client, "executor:succeeded") == 1 and counter(client, "executor:duplicate") == 1


@pytest.mark.slow
def test_a_job_sent_again_whose_large_output_is_no_longer_kept_says_so_and_runs_nothing(
        make_settings, start_worker, rclient):
    client = MeshClient(make_settings(job_retention_s=1, claim_result_bytes=16), client=rclient)
    _, again = resend_after_expiry(client, start_worker, "resend-2")

    assert again.state is State.DEAD_LETTERED
    assert "resend-2 is done (its effect happened) but its output is no longer kept" in (again.error or "")
    assert counter(client, "executor:succeeded") == 1
