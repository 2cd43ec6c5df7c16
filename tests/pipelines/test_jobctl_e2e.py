"""Job control with real worker processes: ``mesh cancel`` of a job whose step is running (the handler
sees ``ctx.cancelled`` within one lease renewal; what it returns is recorded ``cancelled`` and its
effect compensated), cancel twice, and ``mesh rerun --from``."""

from __future__ import annotations

import json
from typing import Any

from mesh.broker.keys import prefix
from mesh.contracts import State
from tests.conftest import wait_for
from tests.httpserver import RecordingServer
from tests.pipelines.saga import TOUR, TRIP
from tests.pipelines.test_compensation_e2e import Ledger, _start


def test_cancel_of_a_job_with_a_running_step_stops_it_and_compensates_and_a_second_cancel_changes_nothing(
        make_settings: Any, rclient: Any, worker_process: Any, cli: Any) -> None:
    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.hold_book", "hotel")
        ref = mesh.run(TRIP, {"url": server.url("")}, key="trip-cancel")
        wait_for(lambda: rclient.get(f"{prefix(ns)}:test.book_holder"), timeout_s=60)
        assert mesh.status(ref.id).steps["hotel"].state is State.RUNNING

        record = mesh.cancel(ref.id, reason="wrong dates")
        assert record.unwind is not None and record.unwind.cause == "cancelled"
        assert record.steps["car"].state is State.CANCELLED  # never sent
        # The lease renewal (every claim_lease_s / 3) tells the running handler.
        wait_for(lambda: rclient.get(f"{prefix(ns)}:test.saw_cancel"), timeout_s=mesh.settings.claim_lease_s / 3 + 1.0)
        assert rclient.get(f"{prefix(ns)}:test.saw_cancel") == b"1"
        record = mesh.wait(ref.id, timeout_s=60)

        assert record.state is State.COMPENSATED, (record.state, record.error)
        assert record.error == "cancelled: wrong dates" and record.failure_class == "cancelled"
        hotel = record.steps["hotel"]
        assert hotel.state is State.CANCELLED and hotel.result == {"url": server.url(""), "ref": "hotel"}
        trace = " ".join(cli("trace", ref.id).stdout.split())
        assert "cancelled by an operator: wrong dates" in trace
        assert "cancelled ended after the job was cancelled" in trace  # hotel's attempt, not "succeeded"
        # hotel's effect happened before it stopped: undone first (it ended last), then flight's.
        assert ledger.applied == [("/do", "flight"), ("/do", "hotel"), ("/undo", "hotel"), ("/undo", "flight")]

        again = cli("cancel", ref.id[:12], "--json")
        assert again.returncode == 0, again.stderr
        answer = json.loads(again.stdout)
        assert answer["cancelled"] is False and answer["state"] == "compensated"
        assert mesh.status(ref.id).state is State.COMPENSATED and len(ledger.applied) == 4


def test_cancel_of_a_job_without_compensations_ends_it_cancelled_through_the_cli_by_key(
        make_settings: Any, rclient: Any, worker_process: Any, cli: Any) -> None:
    with RecordingServer(Ledger()) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.hold_book", "flight")
        ref = mesh.run(TOUR, {"url": server.url("")}, key="tour-cancel")
        wait_for(lambda: rclient.get(f"{prefix(ns)}:test.book_holder"), timeout_s=60)
        done = cli("cancel", "tour-cancel", "--reason", "not needed")
        assert done.returncode == 0, done.stderr
        assert "cancelled" in done.stdout
        wait_for(lambda: mesh.status(ref.id).steps["flight"].state is State.CANCELLED, timeout_s=30)
        record = mesh.status(ref.id)
        assert record.state is State.CANCELLED and record.error == "cancelled: not needed"
        assert [s.state for s in record.steps.values()] == [State.CANCELLED] * 3
        assert cli("cancel", "tour-cancel").stdout.startswith(f"job {ref.id} is cancelled")
        listed = json.loads(cli("jobs", "--state", "cancelled", "--json").stdout)
        assert [j["job_id"] for j in listed] == [ref.id] and listed[0]["error"] == "cancelled: not needed"
        shown = json.loads(cli("status", ref.id, "--json").stdout)
        assert [n["state"] for n in shown["dag"]] == ["cancelled"] * 3 and shown["unwind"]["cause"] == "cancelled"


def test_rerun_from_a_step_reuses_upstream_outputs_and_runs_the_rest_under_new_keys(
        make_settings: Any, rclient: Any, worker_process: Any, cli: Any) -> None:
    ledger = Ledger()
    with RecordingServer(ledger) as server:
        mesh, _ = _start(make_settings, rclient, worker_process, server)
        ns = mesh.settings.namespace
        rclient.sadd(f"{prefix(ns)}:test.fail", "car")
        ref = mesh.run(TOUR, {"url": server.url("")}, key="tour-1")
        old = mesh.wait(ref.id, timeout_s=60)
        assert old.state is State.DEAD_LETTERED
        rclient.srem(f"{prefix(ns)}:test.fail", "car")

        done = cli("rerun", "tour-1", "--from", "hotel", "--wait", "--json")
        assert done.returncode == 0, done.stderr
        new = mesh.status(json.loads(done.stdout)["job_id"])

        assert new.state is State.SUCCEEDED and new.rerun_of == old.job_id and new.rerun_from == "hotel"
        assert mesh.status(old.job_id).reruns == [new.job_id]
        assert new.pipeline_digest == old.pipeline_digest and new.pipeline_input == old.pipeline_input
        assert new.steps["flight"].key == old.steps["flight"].key  # reused, not run again
        assert new.steps["hotel"].key != old.steps["hotel"].key
        assert ledger.applied == [("/do", "flight"), ("/do", "hotel"), ("/do", "hotel"), ("/do", "car")]
        refused = cli("rerun", "tour-1", "--from", "nowhere")
        assert refused.returncode == 2 and "no step 'nowhere'" in refused.stderr


