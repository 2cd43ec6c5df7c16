"""What a done key's claim keeps for the dedup window: a small output itself, a large one as its
digest and the step whose record holds it (MESH_CLAIM_RESULT_BYTES). A job sharing the key still gets
the output through the record; once that record has expired too, the step says so plainly and
nothing runs again."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check
from mesh.broker import claims
from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.agents import app

GOAL = "g" * 6000  # the researcher's and the coder's outputs carry it: over 4 KB each


def shared() -> Any:
    return check(Pipeline("big")
                 .step("researcher")
                 .step("coder", depends_on=["researcher"], idempotent=True, idempotency_key="big:{{input.count}}")
                 .step("reviewer", depends_on=["coder"])
                 .build(), app)


def runs(mesh: MeshClient) -> dict[str, int]:
    raw = mesh.redis.hgetall(f"{prefix(mesh.settings.namespace)}:test.runs")
    return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_large_output_is_kept_as_a_digest_in_its_claim_and_a_job_sharing_the_key_still_gets_it(
        mesh, run_workers):
    run_workers()
    first = mesh.wait(mesh.run(shared(), {"goal": GOAL, "count": 7}, key="job-a").id, timeout_s=30)
    assert first.state is State.SUCCEEDED, first.error

    raw = mesh.redis.get(mesh.keys.claim("big:7"))
    assert raw is not None and len(raw) < 400, len(raw or b"")  # not the 6 KB output
    claim = claims.parse(raw)
    assert claim.state == "done" and claim.owner == "" and claim.result.startswith(b"@")
    assert b'"step_id":"coder"' in claim.result and first.job_id.encode() in claim.result

    second = mesh.wait(mesh.run(shared(), {"goal": GOAL, "count": 7}, key="job-b").id, timeout_s=30)
    assert second.state is State.SUCCEEDED, second.error
    assert second.steps["coder"].result == first.steps["coder"].result
    assert runs(mesh)["big:7"] == 1


@pytest.mark.slow
def test_a_job_sharing_a_key_whose_output_expired_with_its_record_says_so_and_runs_nothing(
        make_settings, rclient):
    from mesh.ops.worker import start_worker

    settings = make_settings(job_retention_s=1, claim_result_bytes=8)
    mesh = MeshClient(settings, client=rclient, app=app)
    worker = start_worker(settings, None, 4, app=app)
    try:
        first = mesh.wait(mesh.run(shared(), {"goal": "cache", "count": 7}, key="job-a").id, timeout_s=30)
        assert first.state is State.SUCCEEDED, first.error
        wait_for(lambda: not rclient.exists(mesh.keys.job(first.job_id)), timeout_s=30)

        second = mesh.wait(mesh.run(shared(), {"goal": "cache", "count": 7}, key="job-b").id, timeout_s=30)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
    assert second.state is State.DEAD_LETTERED
    error = second.steps["coder"].error or ""
    assert "big:7 is done (its effect happened) but its output is no longer kept" in error
    assert f"job {first.job_id}'s record" in error and "has expired" in error
    assert second.steps["reviewer"].state is not State.SUCCEEDED
    assert runs(mesh)["big:7"] == 1
