"""Job control meeting a compensation in flight, with real worker processes: a rerun of a job still
undoing its effects never reuses the outputs of steps about to be undone, and a compensation of a
cancelled job is not told to stop (``ctx.cancelled`` is for the job's own steps)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from mesh.broker import claims, trace
from mesh.broker.keys import prefix
from mesh.contracts import ConfigError, State
from tests.conftest import wait_for
from tests.httpserver import RecordingServer
from tests.pipelines.saga import PINS, TRIP
from tests.pipelines.test_compensation_e2e import HEARTBEAT_TIMEOUT_S, Ledger, _start


def _held_compensation(make_settings: Any, rclient: Any, worker_process: Any, server: RecordingServer,
                       key: str, *, cancel: bool) -> tuple[Any, Any]:
    """A TRIP job whose first compensation (undo:hotel) is running, held after its effect."""
    mesh, _ = _start(make_settings, rclient, worker_process, server)
    ns = mesh.settings.namespace
    rclient.set(f"{prefix(ns)}:test.hold", 1)
    if cancel:
        rclient.sadd(f"{prefix(ns)}:test.hold_book", "car")  # car runs until the cancel
    else:
        rclient.sadd(f"{prefix(ns)}:test.fail", "car")
    ref = mesh.run(TRIP, {"url": server.url("")}, key=key)
    if cancel:
        wait_for(lambda: rclient.get(f"{prefix(ns)}:test.book_holder"), timeout_s=60)
        mesh.cancel(ref.id, reason="wrong dates")
    wait_for(lambda: rclient.get(f"{prefix(ns)}:test.holder"), timeout_s=60)
    held = mesh.status(ref.id)
    assert held.state is State.COMPENSATING and held.steps["undo:hotel"].state is State.RUNNING
    return mesh, held


@pytest.mark.slow
def test_a_rerun_of_a_job_still_compensating_does_not_reuse_steps_about_to_be_undone(
        make_settings, rclient, worker_process):
    with RecordingServer(Ledger()) as server:
        mesh, held = _held_compensation(make_settings, rclient, worker_process, server, "trip-rerun", cancel=False)
        # flight and hotel succeeded, and their compensations are under way (hotel's) or queued
        # (flight's): their outputs describe bookings that are being cancelled.
        with pytest.raises(ConfigError, match="compensat"):
            mesh.rerun(held.job_id, "car")
        rclient.set(f"{prefix(mesh.settings.namespace)}:test.release", 1)
        assert mesh.wait(held.job_id, timeout_s=60).state is State.COMPENSATED
        assert mesh.status(held.job_id).reruns == []


@pytest.mark.slow
def test_a_compensation_of_a_cancelled_job_is_not_told_to_stop(make_settings, rclient, worker_process):
    with RecordingServer(Ledger()) as server:
        mesh, held = _held_compensation(make_settings, rclient, worker_process, server, "trip-cancel", cancel=True)
        ns = mesh.settings.namespace
        assert rclient.exists(mesh.keys.cancel(held.job_id))
        claim_key = mesh.keys.claim(held.steps["undo:hotel"].key)
        first = claims.read(rclient, claim_key).expires_ms
        # Two lease renewals of the compensation (each also reads whether its job was cancelled),
        # then the handler's loop went round again after them.
        wait_for(lambda: claims.read(rclient, claim_key).expires_ms > first, timeout_s=HEARTBEAT_TIMEOUT_S * 3)
        second = claims.read(rclient, claim_key).expires_ms
        wait_for(lambda: claims.read(rclient, claim_key).expires_ms > second, timeout_s=HEARTBEAT_TIMEOUT_S * 3)
        loops = int(rclient.hget(f"{prefix(ns)}:test.undo_saw", "loops") or 0)
        wait_for(lambda: int(rclient.hget(f"{prefix(ns)}:test.undo_saw", "loops") or 0) > loops + 1, timeout_s=10)
        saw = rclient.hget(f"{prefix(ns)}:test.undo_saw", "cancelled")
        rclient.set(f"{prefix(ns)}:test.release", 1)
        record = mesh.wait(held.job_id, timeout_s=60)
    assert saw == b"0", "the compensation was told the job was cancelled: an undo that obeys stops half done"
    assert record.state is State.COMPENSATED, (record.state, record.error)


@pytest.mark.slow
def test_two_cancels_at_once_from_two_processes_cancel_once(make_settings, rclient, worker_process, cli_process):
    with RecordingServer(Ledger()) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.hold_book", "car")
        ref = mesh.run(TRIP, {"url": server.url("")}, key="trip-twice")
        wait_for(lambda: rclient.get(f"{prefix(ns)}:test.book_holder"), timeout_s=60)
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda why: cli_process("cancel", ref.id, "--reason", why, "--json"),
                                 ["one", "two"]))
        record = mesh.wait(ref.id, timeout_s=60)

    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert sorted(json.loads(r.stdout)["cancelled"] for r in runs) == [False, True]
    assert record.state is State.COMPENSATED, (record.state, record.error)
    events = [e for e in trace.read(rclient, mesh.keys, ref.id) if not e.get("step_id")]
    assert [e["event"] for e in events].count("cancelled") == 1
    assert [e["event"] for e in events].count("compensating") == 0
    undos = [r["json"]["ref"] for r in server.requests if r["path"] == "/undo"]
    assert undos == ["hotel", "flight"]  # each compensation sent once (car declares none)


@pytest.mark.slow
def test_a_tool_call_with_aliased_args_is_undone_with_the_args_it_had(make_settings, rclient, worker_process):
    with RecordingServer(Ledger()) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        rclient.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "car")
        ref = mesh.run(PINS, {"url": server.url("")}, key="pins-1")
        record = mesh.wait(ref.id, timeout_s=60)

    assert record.state is State.COMPENSATED, (record.state, record.error, record.steps["undo:pin"].error)
    assert [(r["path"], r["json"]) for r in server.requests if r["path"] != "/do"] == [
        ("/pin", {"ref": "pin"}), ("/unpin", {"ref": "pin"})]
