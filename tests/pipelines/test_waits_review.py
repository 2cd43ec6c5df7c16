"""Durable waits under a hostile review: a job another branch ended keeps its record (no TTL, not
compacted away, not evicted by count) while one of its steps still waits, and takes its retention
once the last wait ends; event data that is no JSON is refused as such; an event name is matched
whole; an emit reports only the steps it resumed; an emitter that dies after keeping its event still
reaches the steps that waited for it (its delivery is a durable timer); an emit reads the waiting
steps in pages, however many."""

from __future__ import annotations

import time
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline
from mesh.broker import jobs
from mesh.broker.compact import Compaction
from mesh.broker.jobs import fail_step
from mesh.broker.keys import prefix
from mesh.broker.waits import InvalidEvent
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.test_waits import PAY, pay_flow, settle, timers


@pytest.fixture(autouse=True)
def _no_runtime_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fail_step`` below plays the worker's failure path with no worker of this namespace: a hook an
    earlier test's runtime registered in this process (for its own namespace) is not this one's."""
    monkeypatch.setattr(jobs, "_after_loss", None)


def _ended_by_another_branch(mesh: MeshClient, name: str) -> Any:
    """A job dead-lettered by one branch while its other branch's step sleeps an hour."""
    spec = (Pipeline(name).step("nap", sleep="1h").step("researcher", input={"goal": "input.goal"}).build())
    ref = mesh.run(spec, {"goal": "g"})
    mesh.jobs.update(ref.id, fail_step("researcher", State.DEAD_LETTERED, "boom", "permanent"))
    record = mesh.status(ref.id)
    assert record.state is State.DEAD_LETTERED and record.steps["nap"].state is State.WAITING
    return ref


def test_a_job_ended_by_another_branch_keeps_its_record_while_a_step_waits(mesh, make_settings):
    ref = _ended_by_another_branch(mesh, "ended")
    assert mesh.redis.pttl(mesh.keys.job(ref.id)) == -1  # no retention clock while a step waits
    assert mesh.redis.pttl(mesh.keys.trace(ref.id)) == -1
    # neither compaction nor count retention takes it while it waits
    settings = make_settings(job_retention_count=1)
    others = [mesh.run(Pipeline("ended").step("researcher").build(), {"goal": "g"}, key=f"o-{i}") for i in range(2)]
    for other in others:
        mesh.cancel(other.id)
    compaction = Compaction(mesh.redis, settings)
    compaction.run(mesh.redis.time()[0] + 1.0)
    compaction.run(mesh.redis.time()[0] + 1.0)
    assert mesh.redis.exists(mesh.keys.job(ref.id)) == 1
    # nor does the retention sweep give it the TTL a record written before retention existed takes
    from mesh.broker.retention import Retention

    Retention(mesh.redis, settings).sweep(mesh.redis.time()[0] + settings.job_retention_s + 60)
    assert mesh.redis.pttl(mesh.keys.job(ref.id)) == -1 and mesh.redis.pttl(mesh.keys.trace(ref.id)) == -1
    assert mesh.status(ref.id).steps["nap"].state is State.WAITING
    # its last wait ended: the retention clock starts
    mesh.redis.zadd(mesh.keys.timers, {f"wait|{ref.id}|nap|1": 0}, xx=True)
    rec = settle(mesh, ref.id, "nap")
    assert rec.state is State.SUCCEEDED
    assert mesh.redis.pttl(mesh.keys.job(ref.id)) > 0 and mesh.redis.pttl(mesh.keys.trace(ref.id)) > 0


@pytest.mark.parametrize("data", [{"n": 2**70}, {1: "a"}, {"x": b"raw"}, {"x": "\ud800"}, {"x": object()},
                                  {"x": float("nan")}, {"x": float("inf")}])
def test_event_data_that_is_no_json_is_refused_as_an_invalid_event(mesh, data):
    with pytest.raises(InvalidEvent, match="JSON"):
        mesh.emit("payment.settled", data)
    ref = mesh.run(pay_flow(), {"goal": "g", "order": 1})
    with pytest.raises(InvalidEvent, match="JSON"):
        mesh.signal(ref.id, "payment.settled", data)
    assert mesh.redis.exists(mesh.keys.events("payment.settled"), mesh.keys.signals(ref.id)) == 0


@pytest.mark.parametrize("name", ["payment.settled\n", "payment.settled\r\n"])
def test_an_event_name_is_matched_whole(mesh, name):
    with pytest.raises(InvalidEvent, match="event name"):
        mesh.emit(name, {})
    assert not list(mesh.redis.scan_iter(f"{mesh.keys.prefix}:events:*"))


def test_a_job_that_starts_undoing_its_effects_withdraws_its_waiting_steps_at_once():
    from tests.pipelines.test_compensation import UNDO, _job, _lost, _ok

    spec = (Pipeline("undo-wait").step("a", agent="book", compensate=UNDO)
            .step("c", agent="book", depends_on=["a"]).step("pay", wait_for={"event": "paid"}).build())
    record, _ = _job(spec)
    assert record.steps["pay"].state is State.WAITING
    record, _ = _ok(spec, record, "a", 2.0)
    record, sent = _lost(spec, record, "c", 3.0)
    assert sent == ["undo:a"] and record.state is State.COMPENSATING
    pay = record.steps["pay"]
    assert pay.state is State.CANCELLED and "withdrawn from its wait" in (pay.error or "")
    record, _ = _ok(spec, record, "undo:a", 4.0)
    assert record.state is State.COMPENSATED


def _unreadable_spec(mesh: MeshClient, job_id: str) -> None:
    """Point the job at a spec digest nothing stored (as a spec deleted by hand would leave it)."""
    def change(record: Any) -> Any:
        return record.model_copy(update={"pipeline_digest": "f" * 64}), []

    mesh.jobs.update(job_id, change)


def test_an_emit_goes_on_past_a_waiting_job_it_cannot_deliver_to_and_a_worker_tries_that_one_again(mesh):
    broken = mesh.run(pay_flow("broken"), {"goal": "g", "order": 7}, key="broken")
    _unreadable_spec(mesh, broken.id)
    good = [mesh.run(pay_flow(), {"goal": "g", "order": 7}, key=f"good-{i}") for i in range(3)]
    delivery = mesh.emit("payment.settled", {"order": 7})
    assert sorted(delivery.resumed) == sorted((r.id, "pay") for r in good)
    assert mesh.status(broken.id).steps["pay"].state is State.WAITING
    # its delivery's timer stays for a worker: once the spec is readable again, the event reaches it
    assert [m for m in mesh.redis.zrange(mesh.keys.timers, 0, -1) if m.startswith(b"wait.emit|")]
    spec = pay_flow("broken")
    mesh.jobs.update(broken.id, lambda r: (r.model_copy(update={"pipeline_digest": spec.digest()}), []))
    mesh.redis.zadd(mesh.keys.timers, {m: 0 for m in mesh.redis.zrange(mesh.keys.timers, 0, -1)
                                       if m.startswith(b"wait.emit|")}, xx=True)
    rec = settle(mesh, broken.id, "pay")
    assert rec.state is State.SUCCEEDED and rec.wait.event_id == delivery.id



@pytest.mark.slow
def test_an_emitter_killed_midway_still_reaches_every_step_that_waited_for_its_event(mesh, settings):
    """``mesh emit`` SIGKILLed after it kept the event and resumed some of the waiting steps: the rest
    are resumed by its delivery's durable timer (a worker's), each exactly once."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import ROOT, mesh_env, wait_for
    from tests.pipelines.test_waits import sent

    refs = [mesh.run(pay_flow(), {"goal": "g", "order": 5}, key=f"killed-{i}") for i in range(400)]
    index = mesh.keys.waits_for("payment.settled")
    proc = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "emit", "payment.settled", "--data",
                             '{"order": 5}'], env=mesh_env(settings), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: mesh.redis.zcard(index) < len(refs) or proc.poll() is not None, timeout_s=60,
                 interval_s=0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    left = mesh.redis.zcard(index)
    assert 0 < left < len(refs), f"the emitter was not killed midway ({left} left)"
    # its delivery's timer is due GRACE_MS later: moved to now, as that time passing would
    found = [m for m in mesh.redis.zrange(mesh.keys.timers, 0, -1) if m.startswith(b"wait.emit|")]
    assert len(found) == 1
    mesh.redis.zadd(mesh.keys.timers, {found[0]: 0}, xx=True)
    t = timers(mesh)
    wait_for(lambda: (t.tick(), mesh.redis.zcard(index) == 0)[1], timeout_s=60)
    records = [mesh.status(r.id) for r in refs]
    assert all(r.steps["pay"].state is State.SUCCEEDED for r in records)
    assert len({r.steps["pay"].wait.event_id for r in records}) == 1  # the one event, for each
    assert sent(mesh) == len(refs)  # one next step each, never two


def test_a_tick_takes_no_new_timer_past_half_its_locks_life(mesh):
    """A tick whose handlers are slow stops taking timers before its lock can expire under it (another
    worker would take the lock and fire the same timers alongside it); the next tick goes on."""
    import time as clock

    from mesh.broker.timers import Timers, stage_schedule

    fired: list[str] = []

    def slow(due: Any) -> bool:
        clock.sleep(0.1)  # a handler's work, not a wait for a condition
        fired.append(due.ref)
        return True

    for i in range(20):
        stage_schedule(mesh.redis, mesh.keys, "slow", f"t{i}", 0)
    t = Timers(mesh.redis, mesh.keys, "test", {"slow": slow}, lock_ms=1000)
    first = t.tick()
    assert 0 < first <= 6 and mesh.redis.exists(mesh.keys.timers_lock) == 0
    while len(fired) < 20:
        t.tick()
    assert sorted(fired) == sorted(f"t{i}" for i in range(20))  # each once


def test_a_sleep_is_not_held_behind_waits_looking_through_many_kept_events(mesh, monkeypatch):
    """Waits that start behind a thousand kept events whose match fails look through them a budget at
    a time: a sleep due meanwhile ends before they are through."""
    from mesh.agents.pipelines import waits as wait_runtime

    evaluate = wait_runtime.holds

    def slow_match(*args: Any) -> bool:  # a match that costs what a heavy one does, on any machine
        time.sleep(0.0005)
        return evaluate(*args)

    monkeypatch.setattr(wait_runtime, "holds", slow_match)
    for i in range(1000):
        mesh.emit("payment.settled", {"order": 10_000 + i})
    looking = [mesh.run(pay_flow(), {"goal": "g", "order": i}, key=f"look-{i}") for i in range(8)]
    nap = mesh.run(Pipeline("nap").step("nap", sleep="1ms").build(), {})
    t = timers(mesh)

    def more() -> int:
        return sum(1 for m in mesh.redis.zrange(mesh.keys.timers, 0, -1) if m.startswith(b"wait.check"))

    while mesh.status(nap.id).state is not State.SUCCEEDED:
        assert more(), "every look for kept events ended before the sleep"
        t.tick()
    assert more()  # the looks go on after it
    while more():
        t.tick()
    assert all(mesh.status(r.id).steps["pay"].state is State.WAITING for r in looking)


def test_a_signal_reaches_a_wait_that_began_and_looked_for_kept_events_while_it_was_sent(mesh):
    """The signal read the job (nothing waited yet); before it kept its event, the wait began and its
    look for kept events found none: the signal, once kept, still resumes that wait."""
    spec = Pipeline("between").step("nap", sleep="1h").step("pay", depends_on=["nap"], wait_for=PAY).build()
    ref = mesh.run(spec, {"goal": "g", "order": 1})

    class Between(MeshClient):
        """A client whose read of the job is followed, before anything else, by the wait beginning."""

        def status(self, job_id: str) -> Any:
            record = super().status(job_id)
            mesh.redis.zadd(mesh.keys.timers, {f"wait|{ref.id}|nap|1": 0}, xx=True)
            t = timers(mesh)
            while mesh.redis.zscore(mesh.keys.timers, f"wait.check|{ref.id}|pay|1") is not None \
                    or mesh.status(ref.id).steps["pay"].state is not State.WAITING:
                t.tick()
            return record

    client = Between(mesh.settings, client=mesh.redis, app=mesh.app)
    delivery = client.signal(ref.id, "payment.settled", {"order": 1})
    assert delivery.resumed == [(ref.id, "pay")]
    assert mesh.status(ref.id).steps["pay"].result == {"order": 1}


@pytest.mark.slow
def test_a_step_dead_lettered_by_a_worker_beside_a_sleeping_step_leaves_the_record_without_a_ttl(mesh, run_workers):
    """The consumer's settle script ends the job (a permanent failure) while another branch sleeps: the
    record and trace keep no TTL until the sleep ends."""
    from tests.conftest import wait_for

    spec = Pipeline("dead-beside").step("nap", sleep="1h").step("researcher", input={"goal": "input.goal"}).build()
    mesh.redis.sadd(f"{prefix(mesh.settings.namespace)}:test.fail", "db-1/researcher/researcher")
    run_workers()
    ref = mesh.run(spec, {"goal": "g"}, key="db-1")
    wait_for(lambda: mesh.status(ref.id).state is State.DEAD_LETTERED, timeout_s=30)
    wait_for(lambda: mesh.redis.pttl(mesh.keys.job(ref.id)) == -1)  # the repair after the script's write
    assert mesh.redis.pttl(mesh.keys.trace(ref.id)) == -1
    assert mesh.status(ref.id).steps["nap"].state is State.WAITING


def test_mesh_waits_says_when_it_lists_only_the_oldest_of_more_waiting_steps(mesh, cli):
    from mesh.ops.events_cli import LIMIT

    spec = Pipeline("many-naps").step("nap", sleep="1h").build()
    for i in range(LIMIT + 1):
        mesh.run(spec, {}, key=f"nap-{i}")
    listed = cli("waits")
    assert listed.returncode == 0 and f"the oldest {LIMIT} of about {LIMIT + 1} waiting steps" in listed.stderr
    assert max(map(len, listed.stderr.splitlines())) <= 80


def test_an_emit_and_mesh_waits_go_on_past_a_waiting_job_whose_record_is_unreadable(mesh):
    broken = mesh.run(pay_flow(), {"goal": "g", "order": 2}, key="garbled")
    mesh.redis.set(mesh.keys.job(broken.id), b"{not json")
    good = mesh.run(pay_flow(), {"goal": "g", "order": 2}, key="fine")
    assert [w.job_id for w in mesh.waits()] == [good.id]  # mesh waits lists the others too
    assert mesh.emit("payment.settled", {"order": 2}).resumed == [(good.id, "pay")]


def test_event_data_nested_past_what_json_encoders_take_is_refused_for_its_depth(mesh):
    """300 levels: past orjson's own limit (it said "Recursion limit reached", read as no JSON), the
    data is refused for its depth as 100 levels are."""
    for levels in (100, 300, 2000):
        deep: dict[str, Any] = {}
        for _ in range(levels):
            deep = {"a": deep}
        with pytest.raises(InvalidEvent, match="nests deeper than MESH_MAX_JSON_DEPTH"):
            mesh.emit("payment.settled", deep)
    assert mesh.redis.exists(mesh.keys.events("payment.settled")) == 0


def test_mesh_emit_says_what_a_data_file_is_when_it_holds_no_json(mesh, cli, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"a":' * 300 + "{}" + "}" * 300)
    empty = tmp_path / "empty.json"
    empty.write_text("")
    said = {}
    for name, given in (("deep", f"@{deep}"), ("null", "@/dev/null"), ("empty", f"@{empty}"),
                        ("dir", f"@{tmp_path}"), ("missing", f"@{tmp_path / 'nope.json'}")):
        res = cli("emit", "payment.settled", "--data", given)
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        said[name] = " ".join(res.stderr.split())
    assert "nests deeper than MESH_MAX_JSON_DEPTH" in said["deep"], said
    assert "empty" in said["null"] and "empty" in said["empty"], said
    assert "a directory" in said["dir"] and "no such file" not in said["dir"], said
    assert "no such file" in said["missing"], said
    assert mesh.redis.exists(mesh.keys.events("payment.settled")) == 0


def test_mesh_waits_refuses_an_event_name_as_emit_does(mesh, cli):
    mesh.run(pay_flow(), {"goal": "g", "order": 3})
    for args in (("--event", "bad name"), ("--event", "bad name", "--json"), ("--event", "payment.settled\n")):
        res = cli("waits", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "event name" in res.stdout + res.stderr and "nothing waits" not in res.stdout
    with pytest.raises(InvalidEvent, match="event name"):
        mesh.waits("bad name")
    assert [w.step.step_id for w in mesh.waits("payment.settled")] == ["pay"]


def _server_ms(mesh: MeshClient) -> int:
    seconds, micros = mesh.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_an_event_kept_longer_than_the_window_is_not_taken(make_settings, rclient):
    """MESH_EVENT_WINDOW_S=1: an event emitted before a wait starts is taken within the window; one
    older than the window (by the Redis clock) is not, and the wait times out."""
    from tests.pipelines.agents import app

    mesh = MeshClient(make_settings(event_window_s=1.0), client=rclient, app=app)
    flow = Pipeline("window").step("pay", wait_for={**PAY, "timeout": "2s", "on_timeout": "continue"}).build()
    old = mesh.emit("payment.settled", {"order": 1})
    emitted_ms = int(old.id.rsplit(":", 1)[1].split("-")[0])  # emit:NAME:MS-SEQ, its stream entry's server time
    fresh_ref = mesh.run(flow, {"order": 1}, key="fresh")  # within the window: taken
    assert settle(mesh, fresh_ref.id, "pay").result == {"order": 1}
    wait_for(lambda: _server_ms(mesh) > emitted_ms + 1000 + 5, timeout_s=5, interval_s=0.05)
    stale = mesh.run(flow, {"order": 1}, key="stale")
    rec = settle(mesh, stale.id, "pay")
    assert rec.result == {"timed_out": True}, rec.result


def test_of_keep_plus_one_events_the_oldest_is_dropped(make_settings, rclient):
    """MESH_EVENT_KEEP=2: three events for orders 2, 3 and 4 are emitted before any wait starts; the
    oldest (order 2) is no longer kept, the newest (order 4) is taken."""
    from tests.pipelines.agents import app

    mesh = MeshClient(make_settings(event_keep=2), client=rclient, app=app)
    flow = Pipeline("keep").step("pay", wait_for={**PAY, "timeout": "1s", "on_timeout": "continue"}).build()
    for order in (2, 3, 4):
        mesh.emit("payment.settled", {"order": order})
    assert mesh.redis.xlen(mesh.keys.events("payment.settled")) == 2
    dropped, newest = mesh.run(flow, {"order": 2}, key="o2"), mesh.run(flow, {"order": 4}, key="o4")
    assert settle(mesh, newest.id, "pay").result == {"order": 4}
    assert settle(mesh, dropped.id, "pay").result == {"timed_out": True}
