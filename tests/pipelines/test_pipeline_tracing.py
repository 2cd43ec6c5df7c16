"""A declared pipeline's ``tracing`` and ``checkpointing`` over real workers and Redis: step inputs
and outputs kept in the trace events, or their size and hash only; a finished job's record and trace
kept for ``checkpointing.ttl_minutes``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, check, load_pipeline
from mesh.broker import trace
from mesh.contracts import State
from tests.pipelines.agents import app

FILE = Path(__file__).with_name("multi-agent-orchestration.skill.yaml")


def events(mesh: MeshClient, job_id: str, kind: str) -> dict[str, dict[str, Any]]:
    """The job's ``kind`` events by step."""
    return {e["step_id"]: e for e in trace.read(mesh.redis, mesh.keys, job_id) if e["event"] == kind}


def digest(value: Any) -> tuple[int, str]:
    data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return len(data), hashlib.sha256(data).hexdigest()


def test_log_inputs_and_outputs_keep_them_in_the_trace_events(mesh, run_workers):
    run_workers()
    record = mesh.wait(mesh.run(load_pipeline(FILE, app), {"goal": "g"}).id, timeout_s=30)
    assert record.state is State.SUCCEEDED, record.error

    picked, done = events(mesh, record.job_id, "picked_up"), events(mesh, record.job_id, "succeeded")
    for sid, step in record.steps.items():
        assert picked[sid]["input"] == step.input and "input_sha256" not in picked[sid]
        assert done[sid]["output"] == step.result and "output_sha256" not in done[sid]


def test_without_them_the_events_keep_size_and_hash_only(mesh, run_workers):
    spec = check(Pipeline("quiet").step("researcher").step("coder", depends_on=["researcher"])
                 .tracing(provider="langfuse", log_inputs=False).build(), app)
    run_workers()
    record = mesh.wait(mesh.run(spec, {"goal": "secret"}).id, timeout_s=30)
    assert record.state is State.SUCCEEDED, record.error

    picked, done = events(mesh, record.job_id, "picked_up"), events(mesh, record.job_id, "succeeded")
    for sid, step in record.steps.items():
        assert "input" not in picked[sid] and "output" not in done[sid]
        assert (picked[sid]["input_bytes"], picked[sid]["input_sha256"]) == digest(step.input)
        assert (done[sid]["output_bytes"], done[sid]["output_sha256"]) == digest(step.result)
    assert "secret" not in orjson.dumps(trace.read(mesh.redis, mesh.keys, record.job_id)).decode()


def test_a_finished_jobs_record_and_trace_stay_for_checkpointing_ttl_minutes(mesh, run_workers):
    spec = check(Pipeline("kept").step("researcher").checkpointing(ttl_minutes=2).build(), app)
    plain = check(Pipeline("plain").step("researcher").build(), app)
    run_workers()
    kept = mesh.wait(mesh.run(spec, {"goal": "g"}).id, timeout_s=30)
    other = mesh.wait(mesh.run(plain, {"goal": "g"}).id, timeout_s=30)
    assert kept.state is other.state is State.SUCCEEDED

    for key in (mesh.keys.job(kept.job_id), mesh.keys.trace(kept.job_id)):
        assert 60_000 < mesh.redis.pttl(key) <= 120_000
    assert mesh.redis.pttl(mesh.keys.job(other.job_id)) > 120_000  # MESH_JOB_RETENTION_S
