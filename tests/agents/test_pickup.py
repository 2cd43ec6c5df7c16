"""What a step's pick-up guarantees while its handler runs, however short the step: the record says
``running`` (with the attempt's token) before the handler does anything, so

- every event the step writes while it runs (a progress note) follows its ``picked_up`` in the
  trace, in time order;
- a ``mesh cancel`` landing as the handler starts (sync or async) finds the step running: it is
  left to end, and ends ``cancelled`` as a step that ran, never ``not run``;
- a step that runs on shows ``running`` and is in the running index (stuck detection);
- a worker SIGKILLed or SIGSTOPped as its handler starts leaves the attempt's pick-up in the record
  and the trace: recovery takes the step over with a higher token, and the record counts both
  attempts.

Each handler (tests/apps/pickup.py) acts at its very start, so a pick-up written only later (with
the success, or after a bound) is caught whatever the timing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_for, wait_stopped

from mesh.broker import MeshClient, trace
from mesh.broker.observe import running_member
from mesh.contracts import State
from tests.apps.pickup import app, arrived_key, release_key, runs_key, seen_key

pytestmark = pytest.mark.slow  # every test here starts a worker

APP = "tests.apps.pickup:app"
#: Short, so a takeover comes soon; the lease is as long by default.
HEARTBEAT_TIMEOUT_S = 3


def events(client: MeshClient, job_id: str) -> list[dict[str, Any]]:
    """The job's events, without the marker of a compaction (the worker's sweep may compact an ended job)."""
    return [e for e in trace.read(client.redis, client.keys, job_id) if e["event"] != "compacted"]


@pytest.fixture
def serve(make_settings: Callable[..., Any]) -> Iterator[Callable[..., tuple[MeshClient, list[str]]]]:
    """Send ``n`` messages to ``agent``, then start a worker of ``threads`` threads for ``app`` in this
    process (its fetches find them waiting, as a busy worker's do); the client and the jobs."""
    from mesh.ops.worker import start_worker

    workers = []

    def run(agent: str, n: int = 1, threads: int = 1, **overrides: Any) -> tuple[MeshClient, list[str]]:
        settings = make_settings(**overrides)
        client = MeshClient(settings, app=app)
        jobs = [client.send(agent, {"text": str(i)}).id for i in range(n)]
        workers.append(start_worker(settings, None, threads, app=app))
        return client, jobs

    yield run
    for worker in workers:
        worker.stop(timeout=10_000)
        worker.broker.close()


def test_notes_written_by_short_steps_follow_their_picked_up_in_time_order(serve: Any) -> None:
    client, jobs = serve("noted", n=8)
    for job in jobs:
        record = client.wait(job, timeout_s=30)
        assert record.state is State.SUCCEEDED, (record.state, record.error)
        evs = events(client, job)
        assert [e["event"] for e in evs] == ["enqueued", "picked_up", "progress", "succeeded"], job
        ats = [e["at"] for e in evs]
        assert ats == sorted(ats), ats
        assert evs[2]["note"].startswith("noted ")


@pytest.mark.parametrize("agent", ["cancels", "cancels_async"])
def test_a_cancel_as_the_handler_starts_finds_the_step_running_and_it_ends_as_one_that_ran(
        serve: Any, agent: str) -> None:
    client, jobs = serve(agent, n=3, threads=3, lease_s=3)
    for job in jobs:
        wait_for(lambda job=job: next(iter(client.status(job).steps.values())).state
                 not in (State.QUEUED, State.RUNNING), timeout_s=30)
        record = client.status(job)

        # The record said running as the handler started, so the cancel left the step to end.
        assert client.redis.get(seen_key(client.settings.namespace, job)) == State.RUNNING.value.encode()
        assert record.state is State.CANCELLED, (record.state, record.error)
        step = next(iter(record.steps.values()))
        assert step.state is State.CANCELLED, (step.state, step.error)
        assert "not run" not in (step.error or ""), step.error
        assert step.picked_up == 1 and step.token is not None
        if agent == "cancels_async":
            assert "stopped: the job was cancelled (mesh cancel) while its handler awaited" in (step.error or "")
        else:
            assert "ended after the job was cancelled" in (step.error or ""), step.error
        kinds = [e["event"] for e in events(client, job) if e.get("step_id") == step.step_id]
        assert kinds[:2] == ["enqueued", "picked_up"], kinds


def test_a_step_that_runs_on_shows_running_and_is_in_the_running_index_as_its_handler_starts(serve: Any) -> None:
    client, (job,) = serve("held")
    ns = client.settings.namespace
    wait_for(lambda: client.redis.get(arrived_key(ns, job)), timeout_s=30)

    assert client.redis.get(seen_key(ns, job)) == State.RUNNING.value.encode()  # as its handler started
    # Read once, as the handler has started: no waiting for a bound.
    step = next(iter(client.status(job).steps.values()))
    assert step.state is State.RUNNING and step.picked_up == 1 and step.token is not None, step
    assert client.redis.zscore(client.keys.running, running_member(job, step.step_id)) is not None
    assert [e["event"] for e in events(client, job)] == ["enqueued", "picked_up"]

    client.redis.set(release_key(ns, job), 1)
    record = client.wait(job, timeout_s=30)
    assert record.state is State.SUCCEEDED, (record.state, record.error)
    assert client.redis.zscore(client.keys.running, running_member(job, step.step_id)) is None


def _one_worker(make_settings: Callable[..., Any], worker_process: Any,
                agent: str) -> tuple[Any, MeshClient, dict[str, str], Any]:
    """Settings and a client with a short heartbeat timeout, the worker environment that carries it, and
    one worker process of ``agent`` on one thread."""
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    proc = worker_process("--app", APP, "--agents", agent, "--threads", "1", **env)
    return settings, MeshClient(settings, app=app), env, proc


def _picked_up_tokens(client: MeshClient, job: str) -> list[int]:
    return [int(e["token"]) for e in events(client, job) if e["event"] == "picked_up"]


def test_a_worker_killed_as_a_handler_starts_leaves_its_pick_up_and_the_step_is_recovered(
        make_settings: Callable[..., Any], worker_process: Any) -> None:
    settings, client, env, victim = _one_worker(make_settings, worker_process, "dies_once")
    job = client.send("dies_once", {"text": "x"}).id
    victim.wait(timeout=60)  # it killed itself as its handler started
    assert victim.returncode == -signal.SIGKILL

    # What recovery starts from: the killed attempt's pick-up is in the record and the trace.
    step = next(iter(client.status(job).steps.values()))
    assert step.state is State.RUNNING and step.picked_up == 1, step
    first = step.token

    worker_process("--app", APP, "--agents", "dies_once", "--threads", "1", **env)
    record = client.wait(job, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
    assert record.state is State.SUCCEEDED, (record.state, record.error)
    step = next(iter(record.steps.values()))
    assert step.picked_up == 2 and step.token is not None and first is not None and step.token > first
    assert _picked_up_tokens(client, job) == [first, step.token]
    assert client.redis.get(runs_key(settings.namespace, job)) == b"2"


def test_a_worker_stopped_as_a_handler_starts_leaves_its_pick_up_and_writes_nothing_once_woken(
        make_settings: Callable[..., Any], worker_process: Any) -> None:
    settings, client, env, paused = _one_worker(make_settings, worker_process, "stops_once")
    job = client.send("stops_once", {"text": "x"}).id
    wait_for(lambda: client.redis.get(runs_key(settings.namespace, job)) == b"1", timeout_s=60)
    try:
        # Stopped as its handler started: its pick-up is in the record already.
        wait_stopped(paused.pid)
        step = next(iter(client.status(job).steps.values()))
        assert step.state is State.RUNNING and step.picked_up == 1, step
        first = step.token

        worker_process("--app", APP, "--agents", "stops_once", "--threads", "1", **env)
        record = client.wait(job, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
        assert record.state is State.SUCCEEDED, (record.state, record.error)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    # Woken, the paused attempt ends its handler, and its success is refused: the claim is the new owner's.
    wait_for(lambda: "lease lost before the attempt settled" in paused.log_path.read_text(), timeout_s=60)
    paused.kill()
    after = client.status(job)
    assert after.state is State.SUCCEEDED and after.updated_at == record.updated_at
    step = next(iter(after.steps.values()))
    assert step.picked_up == 2 and first is not None and step.token is not None and step.token > first
    assert _picked_up_tokens(client, job) == [first, step.token]
    assert [e["event"] for e in events(client, job)].count("succeeded") == 1
