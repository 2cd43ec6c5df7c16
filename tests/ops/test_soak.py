"""``mesh soak --json`` runs a short soak end to end: mixed traffic, a worker SIGKILLed and replaced,
every job ended and every poison message in the DLQ (nothing lost), memory sampled, namespace gone."""

from __future__ import annotations

import json
import time

import pytest
from conftest import close_client, redis_client


@pytest.mark.slow
@pytest.mark.timeout(300)  # the soak waits up to 180 s for open jobs: a job that never ends shows in not_ended
def test_a_short_soak_with_a_killed_worker_loses_nothing_reports_memory_and_cleans_up(cli, settings, redis_url):
    # The mesh's retention reaches the soak's workers: records expire during the run, and a job whose
    # record expired counts as ended, not lost. So does its heartbeat timeout: the messages a killed
    # worker held are taken over after 2 s, not the soak's default 5 s.
    res = cli("soak", "--seconds", "8", "--interval", "2", "--kill-every", "3", "--rate", "4", "--json",
              timeout=420, MESH_JOB_RETENTION_S="2", MESH_SWEEP_INTERVAL_S="1", MESH_HEARTBEAT_TIMEOUT_S="2")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert {"config", "duration_s", "sent", "jobs", "dead_letters", "poison_dead_lettered", "lost", "not_ended",
            "workers", "worker_rss_mb", "redis_used_memory_mb", "namespace_memory_mb", "samples"} <= set(out)
    assert out["lost"] == 0 and out["not_ended"] == []
    assert out["worker_settings"]["MESH_JOB_RETENTION_S"] == "2.0" and "MESH_REDIS_URL" not in out["worker_settings"]
    assert "missing" not in out["jobs"]["by_state"]
    assert out["sent"]["jobs"] > 0 and out["jobs"]["succeeded"] > 0
    assert out["poison_dead_lettered"] == out["sent"]["poison"]
    assert sum(out["jobs"]["by_state"].values()) == out["sent"]["jobs"]
    assert out["workers"]["killed"] >= 1 and out["workers"]["started"] == 2 + out["workers"]["killed"]
    assert len(out["samples"]) >= 3 and all(len(s["rss_mb"]) == 2 for s in out["samples"])
    # Who serves is sampled: a frozen `ended` with no worker up is a replacement still starting, not a stall.
    assert all(s["serving"] >= 0 for s in out["samples"]) and max(s["serving"] for s in out["samples"]) >= 1
    for figure in ("worker_rss_mb", "redis_used_memory_mb", "namespace_memory_mb"):
        assert out[figure]["max"] > 0 and out[figure]["max"] >= out[figure]["end"]
    assert "worker RSS" in res.stderr  # the sample table, on stderr with --json
    assert all(len(line) <= 80 for line in res.stderr.splitlines() if "worker RSS" in line)
    client = redis_client(redis_url)  # SCAN on every primary of a cluster
    soaked = f"{settings.namespace}-soak-*"  # the soak's namespace's keys: {ns}:..., and any of the older layout
    assert not [key for pattern in ("{" + soaked, soaked) for key in client.scan_iter(match=pattern, count=1000)]
    close_client(client)


def test_soak_workers_get_the_mesh_settings_and_its_own_defaults_only_where_those_are_unset(make_settings):
    from mesh.broker import MeshSettings
    from mesh.ops.soak import SOAK_DEFAULTS, shown_settings, worker_env

    settings = MeshSettings.from_env({"MESH_REDIS_URL": make_settings().redis_url, "MESH_JOB_RETENTION_S": "60",
                                      "MESH_NOTE_RETENTION_S": "90", "MESH_HTTP_TIMEOUT_S": "7"})
    env = worker_env(settings, "soak-ns", "127.0.0.1:9", environ={"PATH": "/bin", "MESH_NAMESPACE": "prod"})
    assert env["PATH"] == "/bin" and env["MESH_NAMESPACE"] == "soak-ns" and env["MESH_HTTP_ALLOW"] == "127.0.0.1:9"
    assert env["MESH_JOB_RETENTION_S"] == "60.0" and env["MESH_NOTE_RETENTION_S"] == "90.0"
    assert env["MESH_HTTP_TIMEOUT_S"] == "7.0"  # the mesh's own, not the soak's 2
    assert env["MESH_HEARTBEAT_TIMEOUT_S"] == SOAK_DEFAULTS["MESH_HEARTBEAT_TIMEOUT_S"]
    workers = MeshSettings.from_env({k: v for k, v in env.items() if k.startswith("MESH_")})
    assert (workers.job_retention_s, workers.note_retention_s, workers.namespace) == (60, 90, "soak-ns")
    assert "MESH_REDIS_URL" not in shown_settings(env) and shown_settings(env)["MESH_JOB_RETENTION_S"] == "60.0"


def test_the_soaks_wait_covers_the_longest_a_job_may_be_deferred_under_its_workers_settings():
    from mesh.ops.soak import SETTLE_MARGIN_S, SOAK_DEFAULTS, settle_wait_s

    # Its own defaults: 5 deferrals of up to 15 s and a killed probe's 10 s fit in 3 minutes.
    assert settle_wait_s(dict(SOAK_DEFAULTS), 180) == 180
    # The mesh's 20 deferrals, given to the soak: 20 x 15 s, plus the probe's 10 s and the margin.
    assert settle_wait_s({**SOAK_DEFAULTS, "MESH_MAX_DEFERS": "20"}, 180) == 20 * 15 + 10 + SETTLE_MARGIN_S
    # Nothing waits past its job's deadline (600 s), which dead-letters what would.
    assert settle_wait_s({}, 180) == 600 + SETTLE_MARGIN_S


def test_a_job_whose_record_expired_counts_as_ended_not_lost(client, rclient):
    from mesh.broker.retention import Retention
    from mesh.ops.soak import Traffic, ended

    ref = client.send("executor", {"tool": "note", "args": {"title": "gone"}})
    traffic = Traffic(jobs={ref.id: "note"}, open={ref.id})
    rclient.delete(client.keys.job(ref.id))  # its record expired (MESH_JOB_RETENTION_S) ...
    Retention(rclient, client.settings).sweep(now=4e9)  # ... and the sweep took it from the index
    assert ended(client, traffic) == {"sent": 1, "ended": 1}
    assert traffic.open == set() and traffic.final == {ref.id: "expired"}
    never = "job-" + "0" * 32  # never sent: its missing record is not taken for an expired one
    traffic = Traffic(jobs={never: "note"}, open={never})
    assert ended(client, traffic) == {"sent": 1, "ended": 0}


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_calls_to_a_dependency_that_only_answers_503_all_end_within_the_soaks_wait(
        settings, rclient, worker_process):
    """The soak's loopback answers 503 on one path, so its breaker keeps opening, and every call to it
    waits on the delay queue for the reopen; a call that only ever fails ends, dead-lettered, once its
    deferrals are spent. The soak waits for that: with the mesh's 20 deferrals (each up to the capped
    cool-down and half again) its 3-minute wait ended first, and such jobs were counted lost."""
    from mesh.broker import MeshClient
    from mesh.contracts import TERMINAL
    from mesh.ops.soak import SoakConfig, settle_wait_s, worker_env
    from tests.httpserver import RecordingServer

    with RecordingServer(lambda _n, _request: (503, {})) as server:
        env = worker_env(settings, settings.namespace, server.host_port)
        worker_process("--agents", "executor", "--threads", "4",
                       **{k: v for k, v in env.items() if k.startswith("MESH_")})
        client = MeshClient(settings.model_copy(update={"http_allow": server.host_port}), client=rclient)
        # More failures than open the breaker (MESH_BREAKER_FAILURES, 5), as the soak's traffic sends.
        refs = [client.send("executor", {"tool": "http_post", "args": {"url": server.url(f"/503/{i}"), "json": {}}})
                for i in range(12)]
        wait_s = settle_wait_s(env, SoakConfig(seconds=1).settle_s)
        deadline = time.monotonic() + wait_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline and len(states) < len(refs):
            for ref in refs:
                record = client.status(ref.id)
                if record.state in TERMINAL:
                    states[ref.id] = str(record.state)
            time.sleep(0.5)
        trips = int(rclient.hget(client.keys.breaker(server.host_port), "trips") or 0)
    assert trips >= 2, "the breaker opened and a probe failed: the calls waited on it"
    assert len(states) == len(refs), f"{len(refs) - len(states)} of {len(refs)} jobs still open after {wait_s:.0f}s"
    assert set(states.values()) == {"dead_lettered"}
