"""Sagas with real worker processes and a real loopback server that applies each effect once per
Idempotency-Key (as a booking API does): a permanent failure of step 3 under ``halt_pipeline``
compensates steps 2 then 1, each once — also when the worker running a compensation is SIGKILLed,
and when step 3's dead letter is replayed afterwards."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

from mesh import MeshClient
from mesh.broker.keys import prefix
from mesh.broker.shard_readers import summed_hash
from mesh.contracts import State
from mesh.dlq import DeadLetterShards, DeadLetterStore, Replayer
from tests.conftest import wait_for
from tests.httpserver import RecordingServer
from tests.pipelines.saga import SHOW, TRIP, app

HEARTBEAT_TIMEOUT_S = 3.0


class Ledger:
    """A booking API's responder: each Idempotency-Key's effect (on one item) applied once, in arrival order."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, str]] = []
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, _n: int, request: dict[str, Any]) -> tuple[int, Any]:
        body = request["json"] or {}
        what = body.get("ref") or body.get("step")
        # One key per request, and per item of a request that names several (a step's seats).
        key = f"{request['headers'].get('idempotency-key')}#{request['path']}#{what}"
        with self._lock:
            if key not in self._keys:
                self._keys.add(key)
                self.applied.append((request["path"], what))
        return 200, {"ok": True}


def _start(make_settings: Any, rclient: Any, worker_process: Any, server: RecordingServer,
           workers: int = 1) -> tuple[MeshClient, list[Any]]:
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, http_allow=server.host_port)
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S), "MESH_HTTP_ALLOW": server.host_port,
           "MESH_RETRY_MIN_BACKOFF_MS": "20", "MESH_RETRY_MAX_BACKOFF_MS": "100"}
    procs = [worker_process("--app", "tests.pipelines.saga:app", "--threads", "2", **env) for _ in range(workers)]
    return MeshClient(settings, client=rclient, app=app), procs


def test_a_permanent_failure_compensates_the_succeeded_steps_in_reverse_once_and_a_replay_does_not_again(
        make_settings: Any, rclient: Any, worker_process: Any, cli: Any) -> None:
    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.fail", "car")
        ref = mesh.run(TRIP, {"url": server.url("")}, key="trip-1")
        record = mesh.wait(ref.id, timeout_s=60)

        assert record.state is State.COMPENSATED, (record.state, record.error)
        assert ledger.applied == [("/do", "flight"), ("/do", "hotel"), ("/undo", "hotel"), ("/undo", "flight")]
        assert record.failure_class == "failed" and "step car" in (record.error or "")
        assert record.steps["car"].state is State.DEAD_LETTERED
        undo = record.steps["undo:hotel"]
        assert undo.state is State.SUCCEEDED and undo.key == record.steps["hotel"].key + "/undo"
        assert undo.compensates == "hotel" and record.steps["undo:flight"].state is State.SUCCEEDED
        assert "undo:car" not in record.steps  # car declares no compensation (and never succeeded)
        kinds = [e["event"] for e in _trace(mesh, ref.id)]
        assert kinds.count("compensating") == 1 and kinds.count("compensation_sent") == 2

        # The DLQ replay of car's dead letter: refused (the job was undone), never a second compensation.
        store = dlq_of(mesh, ref.id)
        [entry] = store.newest()
        replayer = Replayer(store, mesh.settings)
        report = replayer.replay(replayer.entries([entry.entry_id]))
        assert report.replayed == [] and "mesh rerun" in report.skipped[entry.entry_id]
        after = mesh.status(ref.id)
        assert after.state is State.COMPENSATED and after.steps["car"].state is State.DEAD_LETTERED
        assert [a for a in ledger.applied if a[0] == "/undo"] == [("/undo", "hotel"), ("/undo", "flight")]
        # (the worker writes its success counts once per MESH_COUNTER_FLUSH_S)
        wait_for(lambda: _outcome(mesh, "unbook:succeeded") >= 2)
        assert _outcome(mesh, "unbook:succeeded") == 2

        # Every view shows the new states with their cause.
        status = cli("status", "trip-1")
        assert status.returncode == 0, status.stderr
        flat = " ".join(status.stdout.split())
        assert "compensated" in flat and "failed: step car" in flat and "compensations 2 of 2 done" in flat
        assert "undo:hotel succeeded agent unbook" in flat and "compensation undo:flight: succeeded" in flat
        trace = " ".join(cli("trace", ref.id).stdout.split())
        assert "(failed: step car" in trace and "compensating failed: step car" in trace
        assert "compensation_sent undoes hotel" in trace
        listed = cli("jobs", "--state", "compensated", "--json")
        assert [j["job_id"] for j in json.loads(listed.stdout)] == [ref.id]
        samples = _metrics(mesh)
        assert samples[("mesh_jobs_unwound_total", ("failed",))] == 1
        assert samples[("mesh_compensations_sent_total", ())] == 2
        assert samples[("mesh_jobs_compensated_total", ())] == 1
        assert samples[("mesh_compensations_failed_total", ())] == 0


def dlq_of(mesh: MeshClient, job_id: str) -> DeadLetterStore:
    """The DLQ of the job's shard (MESH_SHARDS): a job's dead letters are kept there."""
    return DeadLetterShards.of(mesh.redis, mesh.settings).of_job(job_id)


def _outcome(mesh: MeshClient, field: str) -> int:
    """The step counter ``field`` (``{agent}:{outcome}``), added up over the shards (each counts its own steps)."""
    return int(summed_hash(mesh.redis, mesh.shards.keys, lambda k: k.outcomes).get(field, 0))


def _metrics(mesh: MeshClient) -> dict[tuple[str, tuple[str, ...]], float]:
    from mesh.ops.metrics import MeshCollector

    return {(s.name, tuple(s.labels.values())): s.value
            for family in MeshCollector(mesh).collect() for s in family.samples}


def test_a_worker_sigkilled_mid_compensation_leaves_each_compensation_applied_once_in_order(
        make_settings: Any, rclient: Any, worker_process: Any) -> None:
    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, procs = _start(make_settings, rclient, worker_process, server, workers=2)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.fail", "car")
        rclient.set(f"{prefix(ns)}:test.hold", 1)
        ref = mesh.run(TRIP, {"url": server.url("")}, key="trip-kill")

        holder = int(wait_for(lambda: rclient.get(f"{prefix(ns)}:test.holder"), timeout_s=60))
        [victim] = [p for p in procs if p.pid == holder]
        held = mesh.status(ref.id)
        assert held.state is State.COMPENSATING and held.steps["undo:hotel"].state is State.RUNNING
        assert held.steps["undo:flight"].sent_at is None  # one at a time: flight's waits for hotel's
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        rclient.set(f"{prefix(ns)}:test.release", 1)
        record = mesh.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)

        assert record.state is State.COMPENSATED, (record.state, record.error)
        assert ledger.applied == [("/do", "flight"), ("/do", "hotel"), ("/undo", "hotel"), ("/undo", "flight")]
        assert record.steps["undo:hotel"].picked_up == 2  # the survivor ran it again, under the same key
        undo_keys = [r["headers"]["idempotency-key"] for r in server.requests if r["path"] == "/undo"]
        hotel_undo = record.steps["hotel"].key + "/undo"
        # The killed attempt had sent its request: the survivor's repeat carries the same key, so the
        # endpoint applied it once (a key made per attempt would have undone the booking twice).
        assert undo_keys == [hotel_undo, hotel_undo, record.steps["flight"].key + "/undo"]


def _trace(mesh: MeshClient, job_id: str) -> list[dict[str, Any]]:
    from mesh.broker import trace

    return trace.read(mesh.redis, mesh.keys_of(job_id), job_id)


def test_a_tool_declared_with_compensate_is_undone_by_its_compensating_tool_last_call_first(
        make_settings: Any, rclient: Any, worker_process: Any) -> None:
    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        rclient.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "car")
        ref = mesh.run(SHOW, {"url": server.url("")}, key="show-1")
        record = mesh.wait(ref.id, timeout_s=60)

        assert record.state is State.COMPENSATED, (record.state, record.error)
        assert ledger.applied == [("/reserve", "1A"), ("/reserve", "1B"), ("/release", "1B"), ("/release", "1A")]
        undo = record.steps["undo:seat"]
        assert undo.agent == "seats" and undo.state is State.SUCCEEDED and undo.result == {"undone": 2}
        assert [c["tool"] for c in record.steps["seat"].undo_calls or []] == ["release", "release"]


def test_a_compensation_failing_for_good_is_dead_lettered_compensation_failed_and_its_replay_finishes_the_job(
        make_settings: Any, rclient: Any, worker_process: Any) -> None:
    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.fail", "car")
        rclient.sadd(f"{prefix(ns)}:test.fail_undo", "hotel")
        ref = mesh.run(TRIP, {"url": server.url("")}, key="trip-undo-fails")
        record = mesh.wait(ref.id, timeout_s=60)

        assert record.state is State.UNKNOWN and record.failure_class == "compensation_failed", record.error
        assert record.error.startswith("compensation undo:hotel failed: permanent: ")
        assert record.steps["undo:flight"].sent_at is None  # the rest wait: flight stays booked
        store = dlq_of(mesh, ref.id)
        [entry] = [e for e in store.newest() if e.envelope and e.envelope["step_id"] == "undo:hotel"]
        assert entry.failure_class == "compensation_failed"
        assert ledger.applied == [("/do", "flight"), ("/do", "hotel")]
        assert _metrics(mesh)[("mesh_compensations_failed_total", ())] == 1

        rclient.srem(f"{prefix(ns)}:test.fail_undo", "hotel")
        replayer = Replayer(store, mesh.settings)
        assert replayer.replay(replayer.entries([entry.entry_id])).replayed == [entry.entry_id]
        record = wait_for(lambda: (r := mesh.status(ref.id)).state is State.COMPENSATED and r, timeout_s=60)
        assert ledger.applied == [("/do", "flight"), ("/do", "hotel"), ("/undo", "hotel"), ("/undo", "flight")]


def test_a_step_failing_after_a_compensable_tool_call_returned_has_that_call_undone(
        make_settings: Any, rclient: Any, worker_process: Any) -> None:
    # Before: the calls a step made before it failed were kept only on success, so the job ended
    # dead_lettered with seat 1A reserved and nothing to undo it.
    ledger = Ledger()

    def refuse_1b(n: int, request: dict[str, Any]) -> tuple[int, Any]:
        if request["path"] == "/reserve" and (request["json"] or {}).get("ref") == "1B":
            return 422, {"error": "no seat 1B"}
        return ledger(n, request)

    with RecordingServer(refuse_1b) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ref = mesh.run(SHOW, {"url": server.url("")}, key="show-partial")
        record = mesh.wait(ref.id, timeout_s=60)

        assert record.state is State.COMPENSATED, (record.state, record.error)
        assert record.unwind is not None and record.unwind.cause == "failed"
        assert record.steps["seat"].state is State.DEAD_LETTERED
        assert ledger.applied == [("/reserve", "1A"), ("/release", "1A")]
        assert record.steps["undo:seat"].result == {"undone": 1}
        assert record.steps["car"].sent_at is None


def test_a_step_compensated_by_a_tool_named_in_the_pipeline_has_it_called_once(
        make_settings: Any, rclient: Any, worker_process: Any) -> None:
    from tests.pipelines.saga import RELEASED

    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        rclient.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "car")
        ref = mesh.run(RELEASED, {"url": server.url("")}, key="released-1")
        record = mesh.wait(ref.id, timeout_s=60)

        assert record.state is State.COMPENSATED, (record.state, record.error)
        assert ledger.applied == [("/do", "flight"), ("/release", "flight")]
        undo = record.steps["undo:flight"]
        assert undo.agent == "book" and undo.result == {"undone": 1}
