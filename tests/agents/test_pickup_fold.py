"""What tests/agents/test_pickup.py pins for a step's pick-up holds as well for a pick-up written by the
success of the step before it (mesh.broker.step_write: the success's eager fetch takes its job's next
step and writes its pick-up in the same call), with real workers: a ``mesh cancel`` as the handed step
starts finds it running, a worker SIGKILLed or SIGSTOPped as it starts leaves its pick-up, recovery takes
the step over with a higher token, and a woken worker writes nothing; a placeholder's digits in the
step's input are kept as they are."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import wait_for, wait_stopped

from mesh.agents.runtime import AgentRuntime
from mesh.broker import MeshClient, trace
from mesh.broker.observe import running_member
from mesh.broker.step_write import SENTINEL, padded_token
from mesh.contracts import Envelope, State
from tests.apps.pickup import app, arrived_key, release_key, runs_key, seen_key

pytestmark = pytest.mark.slow  # every test here starts a worker

APP = "tests.apps.pickup:app"
HEARTBEAT_TIMEOUT_S = 3


def events(client: MeshClient, job_id: str) -> list[dict[str, Any]]:
    return [e for e in trace.read(client.redis, client.keys, job_id) if e["event"] != "compacted"]


def tokens(client: MeshClient, job: str, step_id: str = "second") -> list[int]:
    return [int(e["token"]) for e in events(client, job) if e["event"] == "picked_up" and e["step_id"] == step_id]


@pytest.fixture
def folds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The steps whose pick-up a success wrote with it in this process (the fold happened)."""
    seen: list[str] = []
    real = AgentRuntime.pick_up

    def pick_up(self: AgentRuntime, record: Any, data: bytes, message: Any) -> Any:
        out = real(self, record, data, message)
        if out is not None and out.check():  # what step_write folds
            seen.append(f"{record.job_id}:{out.step_id}")
        return out

    monkeypatch.setattr(AgentRuntime, "pick_up", pick_up)
    return seen


@pytest.fixture
def serve(make_settings: Callable[..., Any]) -> Iterator[Callable[..., tuple[MeshClient, list[str]]]]:
    from mesh.ops.worker import start_worker

    workers = []

    def run(pipeline: str, payloads: list[dict[str, Any]], threads: int = 1,
            **overrides: Any) -> tuple[MeshClient, list[str]]:
        settings = make_settings(**overrides)
        client = MeshClient(settings, app=app)
        workers.append(start_worker(settings, None, threads, app=app))
        # Once it has served a job, its consumers are idle ("drained"): what a success's eager fetch needs.
        warm = client.run("then_noted", {"text": "warm-up"}).id
        assert client.wait(warm, timeout_s=30).state is State.SUCCEEDED
        jobs = [client.run(pipeline, p).id for p in payloads]
        return client, jobs

    yield run
    for worker in workers:
        worker.stop(timeout=10_000)
        worker.broker.close()


def test_a_cancel_as_a_handed_step_starts_finds_it_running_and_it_ends_as_one_that_ran(
        serve: Any, folds: list[str]) -> None:
    client, [job] = serve("then_cancels", [{"text": "x"}])
    # The cancel ends the job at once and leaves the running step to end: wait for the step, not the job.
    wait_for(lambda: client.status(job).steps["second"].state not in (State.QUEUED, State.RUNNING), timeout_s=30)
    record = client.status(job)
    assert f"{job}:second" in folds  # its pick-up was written by the first step's success
    assert client.redis.get(seen_key(client.settings.namespace, job)) == State.RUNNING.value.encode()
    assert record.state is State.CANCELLED, (record.state, record.error)
    step = record.steps["second"]
    assert step.state is State.CANCELLED and "ended after the job was cancelled" in (step.error or ""), step.error
    assert step.picked_up == 1 and tokens(client, job) == [step.token]
    assert client.redis.zscore(client.keys.running, running_member(job, "second")) is None


def test_a_handed_step_that_runs_on_shows_running_with_its_token_in_the_running_index(
        serve: Any, folds: list[str]) -> None:
    client, [job] = serve("then_held", [{"text": "x"}])
    ns = client.settings.namespace
    wait_for(lambda: client.redis.get(arrived_key(ns, job)), timeout_s=30)
    assert f"{job}:second" in folds
    step = client.status(job).steps["second"]
    assert step.state is State.RUNNING and step.picked_up == 1 and tokens(client, job) == [step.token], step
    assert client.redis.zscore(client.keys.running, running_member(job, "second")) is not None
    client.redis.set(release_key(ns, job), 1)
    record = client.wait(job, timeout_s=30)
    assert record.state is State.SUCCEEDED, (record.state, record.error)
    assert client.redis.zscore(client.keys.running, running_member(job, "second")) is None


def test_a_folded_pick_up_writes_its_token_in_place_of_the_sentinels_digits_padded_to_their_width(
        serve: Any, folds: list[str]) -> None:
    client, [job] = serve("then_held", [{"text": "x"}])
    ns = client.settings.namespace
    wait_for(lambda: client.redis.get(arrived_key(ns, job)), timeout_s=30)
    assert f"{job}:second" in folds
    data = client.redis.get(client.keys.job(job))
    step = client.status(job).steps["second"]
    assert step.state is State.RUNNING and tokens(client, job) == [step.token], step
    # Written over the sentinel's digits by SETRANGE: the token, then spaces (JSON whitespace) to their width.
    padded = padded_token(step.token)
    assert len(padded) == len(str(SENTINEL)) and padded.rstrip() == str(step.token).encode()
    assert b'"token":' + padded in data and str(SENTINEL).encode() not in data, data
    client.redis.set(release_key(ns, job), 1)
    record = client.wait(job, timeout_s=30)
    assert record.state is State.SUCCEEDED and record.steps["second"].token == step.token, (record.state, record.error)
    assert b'"token":' + padded not in client.redis.get(client.keys.job(job))  # the success wrote it anew


def test_a_handed_step_takes_its_envelope_and_input_as_its_folded_pick_up_validated_them(
        serve: Any, folds: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import mesh.agents.runtime as runtime

    envelopes: list[tuple[str, str]] = []
    inputs: list[Any] = []
    real_envelope, real_input = Envelope.model_validate, runtime.validate_model

    def envelope(raw: Any, *args: Any, **kwargs: Any) -> Any:
        envelopes.append((raw.get("job_id"), raw.get("step_id")))
        return real_envelope(raw, *args, **kwargs)

    def validate_input(agent: str, model: Any, payload: Any) -> Any:
        inputs.append(payload)
        return real_input(agent, model, payload)

    monkeypatch.setattr(Envelope, "model_validate", envelope)
    monkeypatch.setattr(runtime, "validate_model", validate_input)
    client, [job] = serve("then_noted", [{"text": "once"}])
    record = client.wait(job, timeout_s=30)
    assert record.state is State.SUCCEEDED, (record.state, record.error)
    assert f"{job}:second" in folds
    # The first step's: its own attempt's; the second's: its pick-up's, folded in the first's success. Its
    # attempt, handed the message that pick-up was computed from, validates neither again.
    assert envelopes.count((job, "first")) == 1 and envelopes.count((job, "second")) == 1, envelopes
    assert record.output("second") == {"text": "once"} and len(inputs) == 2 + 2, inputs  # the warm-up job's too


@pytest.mark.parametrize("value", [SENTINEL, str(SENTINEL), f"a{SENTINEL}b"])
def test_a_placeholders_digits_in_a_steps_data_are_kept_and_the_pick_up_is_not_folded(
        serve: Any, folds: list[str], value: Any) -> None:
    text = value if isinstance(value, str) else str(value)
    client, [job] = serve("then_noted", [{"text": text}])
    record = client.wait(job, timeout_s=30)
    assert record.state is State.SUCCEEDED, (record.state, record.error)
    assert record.output("first") == {"text": text} and record.output("second") == {"text": text}
    assert record.steps["second"].input == {"text": text}
    assert f"{job}:second" not in folds
    assert tokens(client, job) == [record.steps["second"].token]


def _one_worker(make_settings: Callable[..., Any], worker_process: Any) -> tuple[Any, MeshClient, dict[str, str], Any]:
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    proc = worker_process("--app", APP, "--threads", "1", **env)
    return settings, MeshClient(settings, app=app), env, proc


def test_a_worker_killed_as_a_handed_step_starts_leaves_its_pick_up_and_the_step_is_recovered(
        make_settings: Callable[..., Any], worker_process: Any) -> None:
    settings, client, env, victim = _one_worker(make_settings, worker_process)
    job = client.run("then_dies_once", {"text": "x"}).id
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    step = client.status(job).steps["second"]
    assert step.state is State.RUNNING and step.picked_up == 1, step
    first = step.token
    assert tokens(client, job) == [first]
    assert client.redis.zscore(client.keys.running, running_member(job, "second")) is not None

    worker_process("--app", APP, "--threads", "1", **env)
    record = client.wait(job, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
    assert record.state is State.SUCCEEDED, (record.state, record.error)
    step = record.steps["second"]
    assert step.picked_up == 2 and first is not None and step.token is not None and step.token > first
    assert tokens(client, job) == [first, step.token]
    assert client.redis.get(runs_key(settings.namespace, job)) == b"2"


def test_a_worker_stopped_as_a_handed_step_starts_writes_nothing_once_woken(
        make_settings: Callable[..., Any], worker_process: Any) -> None:
    """The handed step's handler stops its worker (its own thread first: ``stops_once``) past the lease;
    another worker takes the step over, and the woken one's success is refused."""
    settings, client, env, paused = _one_worker(make_settings, worker_process)
    job = client.run("then_stops_once", {"text": "x"}).id
    wait_for(lambda: client.redis.get(runs_key(settings.namespace, job)) == b"1", timeout_s=60)
    try:
        wait_stopped(paused.pid)
        step = client.status(job).steps["second"]
        assert step.state is State.RUNNING and step.picked_up == 1, step
        first = step.token
        worker_process("--app", APP, "--threads", "1", **env)
        record = client.wait(job, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
        assert record.state is State.SUCCEEDED, (record.state, record.error)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    wait_for(lambda: "lease lost before the attempt settled" in paused.log_path.read_text(), timeout_s=60)
    paused.kill()
    after = client.status(job)
    assert after.state is State.SUCCEEDED and after.updated_at == record.updated_at
    step = after.steps["second"]
    assert step.picked_up == 2 and first is not None and step.token is not None and step.token > first
    assert tokens(client, job) == [first, step.token]
    assert [e["event"] for e in events(client, job) if e.get("step_id") == "second"].count("succeeded") == 1


def test_a_handed_step_waiting_behind_other_work_is_not_running_and_a_cancel_meanwhile_keeps_it_from_running(
        serve: Any, folds: list[str]) -> None:
    """A success hands the next step to its worker's work queue, shared by all its agents: when other
    messages wait there, the step waits behind them (a long step each, maybe), and has not started. Its
    record must say so (queued, not running), and a ``mesh cancel`` meanwhile must keep it from running,
    as for any step not picked up yet."""
    client, _ = serve("then_noted", [], threads=2)
    ns = client.settings.namespace
    busy = client.send("held", {"text": "one"}).id  # takes one thread
    wait_for(lambda: client.redis.get(arrived_key(ns, busy)), timeout_s=30)
    job = client.run("held_then_noted", {"text": "x"}).id  # its first step takes the other
    wait_for(lambda: client.redis.get(arrived_key(ns, job)), timeout_s=30)
    behind = client.send("held", {"text": "two"}).id  # fetched, waits in the work queue for a thread
    wait_for(lambda: client.redis.llen(client.keys.queue("held")) == 0, timeout_s=30)
    client.redis.set(release_key(ns, job), 1)  # the first step succeeds; its thread takes the waiting one
    wait_for(lambda: client.redis.get(arrived_key(ns, behind)), timeout_s=30)
    assert client.status(job).steps["first"].state is State.SUCCEEDED
    try:
        # The second step waits in the work queue behind nothing now but the held steps' threads.
        waiting = client.status(job).steps["second"].state
        client.cancel(job, reason="changed plans")
    finally:
        client.redis.set(release_key(ns, busy), 1)
        client.redis.set(release_key(ns, behind), 1)
    record = client.wait(job, timeout_s=30)
    assert record.state is State.CANCELLED, (record.state, record.error)
    step = record.steps["second"]
    assert (waiting, step.state, step.error) == (State.QUEUED, State.CANCELLED, "not run: the job was cancelled")
    assert [e["event"] for e in events(client, job) if e.get("step_id") == "second"].count("succeeded") == 0
