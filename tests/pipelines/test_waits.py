"""Durable waits (``sleep:``, ``wait_for:``) against a real Redis, their timers fired by the timer
machinery a worker runs (:class:`mesh.broker.timers.Timers`), ticked here: a sleep ends on its timer
and releases its dependents; an event emitted before the wait starts is kept and taken once; of
several events emitted at once, exactly one resumes the step; the timeout wins when nothing comes
(``fail`` and ``continue``); a signal reaches one job and an emit every job whose match holds; a
cancelled job's wait is withdrawn and its index and timers go; bad ``sleep:`` / ``wait_for:`` are
refused at load as FILE:LINE; the CLI delivers and lists."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest

from mesh import MeshClient
from mesh.agents.pipelines import Pipeline, PipelineError, parse
from mesh.agents.pipelines.jobctl import _routes
from mesh.agents.pipelines.waits import Waits
from mesh.broker import redact, trace
from mesh.broker.timers import Timers
from mesh.broker.waits import InvalidEvent, NotWaiting
from mesh.contracts import State
from tests.conftest import wait_for
from tests.pipelines.agents import app

PAY = {"event": "payment.settled", "match": "event.order == input.order", "timeout": "1h"}


class EveryShard:
    """A worker's timer loop of every shard (MESH_SHARDS: each shard's timers fire its jobs' waits)."""

    def __init__(self, mesh: MeshClient) -> None:
        self.each = [Timers(mesh.redis, keys, "test", Waits(mesh.jobs_on(keys), mesh.pipelines, _routes(mesh),
                                                            mesh.settings, mesh.clock).timer_handlers())
                     for keys in mesh.shards.keys]

    def tick(self) -> int:
        return sum(t.tick() for t in self.each)  # how many fired, in every shard


def timers(mesh: MeshClient) -> EveryShard:
    """What a worker's timer loop runs, with the waits' handlers."""
    return EveryShard(mesh)


def settle(mesh: MeshClient, job_id: str, step: str, timeout_s: float = 10) -> Any:
    """Tick the timers until ``step`` of the job stops waiting; its record."""
    t = timers(mesh)

    def ended() -> Any:
        t.tick()
        rec = mesh.status(job_id).steps[step]
        return rec if rec.state not in (State.WAITING, State.QUEUED) else None

    return wait_for(ended, timeout_s=timeout_s, interval_s=0.05)


def sent(mesh: MeshClient, queue: str = "researcher") -> int:
    return sum(int(mesh.redis.llen(keys.queue(queue))) for keys in mesh.shards.keys)


def pay_flow(name: str = "pay", **wait: Any) -> Any:
    return (Pipeline(name).step("pay", wait_for={**PAY, **wait})
            .step("researcher", depends_on=["pay"], input={"goal": "input.goal"}).build())


def test_a_sleep_parks_the_step_on_a_timer_and_its_end_releases_the_dependents(mesh):
    spec = (Pipeline("nap").step("nap", sleep="1s")
            .step("researcher", depends_on=["nap"], input={"goal": "input.goal"}).build())
    ref = mesh.run(spec, {"goal": "g"})
    record = mesh.status(ref.id)
    assert record.state is State.WAITING and record.steps["nap"].state is State.WAITING
    assert [w.step.step_id for w in mesh.waits()] == ["nap"] and sent(mesh) == 0
    rec = settle(mesh, ref.id, "nap")
    assert rec.state is State.SUCCEEDED and rec.result == {"slept_s": 1.0}
    assert rec.finished_at - rec.wait.started_at >= 1.0
    assert sent(mesh) == 1 and mesh.waits() == [] and not any(mesh.redis.zcard(k.timers) for k in mesh.shards.keys)
    from mesh.ops.metrics import MeshCollector

    seen = {s.name: s.value for family in MeshCollector(mesh).collect() for s in family.samples}
    assert seen["mesh_waits_pending"] == 0 and seen["mesh_waits_slept_total"] == 1


def test_an_event_emitted_before_the_wait_starts_is_kept_and_taken_once_per_job(mesh):
    mesh.emit("payment.settled", {"order": 9})  # another order's: its match does not hold
    early = mesh.emit("payment.settled", {"order": 7, "amount": 30})
    assert early.resumed == []
    spec = (Pipeline("twice").step("pay", wait_for=PAY)
            .step("again", depends_on=["pay"], wait_for={**PAY, "timeout": "1s", "on_timeout": "continue"}).build())
    ref = mesh.run(spec, {"goal": "g", "order": 7})
    rec = settle(mesh, ref.id, "pay")
    assert rec.state is State.SUCCEEDED and rec.result == {"order": 7, "amount": 30}
    assert rec.wait.event_id == early.id and rec.wait.via == "emit"
    # the same job's next wait does not take that event again: it times out
    assert settle(mesh, ref.id, "again").result == {"timed_out": True}


def test_a_signal_sent_before_the_wait_starts_is_kept_and_taken(mesh):
    spec = (Pipeline("later").step("nap", sleep="300ms").step("pay", depends_on=["nap"], wait_for=PAY).build())
    ref = mesh.run(spec, {"goal": "g", "order": 1})
    kept = mesh.signal(ref.id, "payment.settled", {"order": 99})  # a signal names its job: no match
    assert kept.resumed == []
    settle(mesh, ref.id, "nap")
    rec = settle(mesh, ref.id, "pay")
    assert rec.state is State.SUCCEEDED and rec.result == {"order": 99} and rec.wait.via == "signal"
    assert mesh.redis.xlen(mesh.keys_of(ref.id).signals(ref.id)) == 0  # taken: not kept any more


def test_of_several_events_emitted_at_once_exactly_one_resumes_the_step(mesh):
    refs = [mesh.run(pay_flow(), {"goal": "g", "order": 7}, key=f"race-{i}") for i in range(3)]
    results: list[Any] = []
    start = threading.Barrier(8)

    def emitter(n: int) -> None:
        client = MeshClient(mesh.settings, app=app)
        start.wait()
        results.append(client.emit("payment.settled", {"order": 7, "n": n}))

    threads = [threading.Thread(target=emitter, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    resumed = [r for d in results for r in d.resumed]
    assert sorted(resumed) == sorted((ref.id, "pay") for ref in refs)  # each job once, by one event
    for ref in refs:
        record = mesh.status(ref.id)
        assert [e["event"] for e in trace.read(mesh.redis, mesh.keys_of(ref.id), ref.id)].count("resumed") == 1
        assert record.steps["pay"].result is not None
        winner = [d for d in results if (ref.id, "pay") in d.resumed]
        assert len(winner) == 1 and record.steps["pay"].wait.event_id == winner[0].id
    assert sent(mesh) == 3  # one researcher message per job, never two
    # the kept events are offered to the check too: a wait already ended takes none of them
    timers(mesh).tick()
    assert sent(mesh) == 3


def test_the_timeout_wins_when_no_event_comes(mesh):
    failing = mesh.run(pay_flow("strict", timeout="500ms"), {"goal": "g", "order": 1})
    going = mesh.run(pay_flow("lenient", timeout="500ms", on_timeout="continue"), {"goal": "g", "order": 1})
    rec = settle(mesh, failing.id, "pay")
    assert rec.state is State.DEAD_LETTERED and rec.failure_class == "wait_timeout"
    assert "no event payment.settled where event.order == input.order came within" in rec.error
    assert mesh.status(failing.id).state is State.DEAD_LETTERED
    rec = settle(mesh, going.id, "pay")
    assert rec.state is State.SUCCEEDED and rec.result == {"timed_out": True}
    assert sent(mesh) == 1  # the lenient job's researcher only
    late = mesh.emit("payment.settled", {"order": 1})
    assert late.resumed == [] and sent(mesh) == 1


def _race(mesh: MeshClient, name: str) -> list[str]:
    """Two emitters and two timer loops racing a wait_for whose timeout is 200 ms, until it ended and
    the racers ran on past its end; the ends its trace records."""
    ref = mesh.run(pay_flow(name, timeout="200ms", on_timeout="continue"), {"goal": "g", "order": 5})
    stop = threading.Event()
    rounds = [0]

    def emitter() -> None:
        client = MeshClient(mesh.settings, app=app)
        while not stop.is_set():
            client.emit("payment.settled", {"order": 5})
            rounds[0] += 1

    def ticker() -> None:
        t = timers(mesh)
        while not stop.is_set():
            t.tick()
            rounds[0] += 1

    threads = [threading.Thread(target=f) for f in (emitter, emitter, ticker, ticker)]
    for th in threads:
        th.start()
    wait_for(lambda: mesh.status(ref.id).steps["pay"].state is State.SUCCEEDED)
    mark = rounds[0]
    wait_for(lambda: rounds[0] >= mark + 40)  # the racers run on past the end: none may end it again
    stop.set()
    for th in threads:
        th.join()
    kinds = [e["event"] for e in trace.read(mesh.redis, mesh.keys_of(ref.id), ref.id)]
    return [k for k in kinds if k in ("resumed", "wait_timed_out")]


def test_the_timeout_and_events_racing_end_the_wait_exactly_once(mesh):
    for round_ in range(5):
        ends = _race(mesh, f"race{round_}")
        assert len(ends) == 1, ends
    assert sent(mesh) == 5


def test_event_data_that_is_no_object_too_deep_or_too_large_is_refused(mesh):
    with pytest.raises(InvalidEvent):
        mesh.emit("payment.settled", [1])  # type: ignore[arg-type]
    deep: dict[str, Any] = {}
    for _ in range(100):
        deep = {"a": deep}
    with pytest.raises(InvalidEvent, match="MESH_MAX_JSON_DEPTH"):
        mesh.emit("payment.settled", deep)
    with pytest.raises(InvalidEvent, match="MESH_MAX_OUTPUT_BYTES"):
        mesh.emit("payment.settled", {"x": "y" * (mesh.settings.max_output_bytes + 1)})
    with pytest.raises(InvalidEvent, match="event name"):
        mesh.emit("pay settled", {})
    assert mesh.redis.exists(mesh.keys.events("payment.settled")) == 0  # nothing kept


def test_a_signal_reaches_one_job_and_an_emit_every_job_whose_match_holds(mesh):
    refs = {n: mesh.run(pay_flow(), {"goal": "g", "order": n}, key=f"order-{n}") for n in (1, 2, 3)}
    emitted = mesh.emit("payment.settled", {"order": 2})
    assert emitted.resumed == [(refs[2].id, "pay")]
    signalled = mesh.signal("order-1", "payment.settled", {"order": 5})  # by its key; match not checked
    assert signalled.resumed == [(refs[1].id, "pay")]
    assert mesh.status(refs[1].id).steps["pay"].result == {"order": 5}
    assert mesh.status(refs[3].id).steps["pay"].state is State.WAITING
    assert [w.job_id for w in mesh.waits("payment.settled")] == [refs[3].id]
    done = mesh.run(Pipeline("plain").step("researcher").build(), {"goal": "g"})
    mesh.cancel(done.id)
    with pytest.raises(NotWaiting):
        mesh.signal(done.id, "payment.settled", {})


def test_a_signals_data_holding_a_model_is_the_steps_output_as_kept_nulls_and_all(mesh):
    """Event data is JSON as it is kept (a model in it written as its JSON, nulls and all): the signaller's
    own delivery records the step's output as the kept event says, as a worker delivering the kept copy
    would. Job records are stored without their null fields; the model's ``note: None`` is data, not one."""
    logged = (Pipeline("pay-logged").tracing(log_outputs=True).step("pay", wait_for=PAY)
              .step("researcher", depends_on=["pay"], input={"goal": "input.goal"}).build())
    for spec in (logged, pay_flow()):  # an output traced as it is, or by its hash
        signalled_with_a_model(mesh, spec)
    # Masking writes what is no plain data as its text, and masks only while the process holds a secret
    # (registered for good by a tool's read of it): the model is its JSON then too, not "ref='r-1' ...".
    redact.register(f"secret-{uuid.uuid4().hex}")
    for spec in (logged, pay_flow()):
        signalled_with_a_model(mesh, spec)


def signalled_with_a_model(mesh: MeshClient, spec: Any) -> None:
    from pydantic import BaseModel

    class Receipt(BaseModel):
        ref: str
        note: str | None = None

    ref = mesh.run(spec, {"goal": "g", "order": 7})
    delivered = mesh.signal(ref.id, "payment.settled", {"order": 7, "receipt": Receipt(ref="r-1")})
    assert delivered.resumed == [(ref.id, "pay")]
    output = {"order": 7, "receipt": {"ref": "r-1", "note": None}}
    assert mesh.status(ref.id).steps["pay"].result == output


def test_a_cancelled_jobs_wait_is_withdrawn_and_its_index_and_timers_go(mesh):
    ref = mesh.run(pay_flow(), {"goal": "g", "order": 4})
    assert mesh.redis.zcard(mesh.keys_of(ref.id).waits_for("payment.settled")) == 1
    assert mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 2  # its timeout, and the look for kept events
    record = mesh.cancel(ref.id)
    assert record.state is State.CANCELLED and record.steps["pay"].state is State.CANCELLED
    assert "withdrawn from its wait" in (record.steps["pay"].error or "")
    assert mesh.redis.zcard(mesh.keys_of(ref.id).waits_for("payment.settled")) == 0
    assert mesh.redis.zcard(mesh.keys_of(ref.id).waits) == 0 and mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 0
    assert mesh.emit("payment.settled", {"order": 4}).resumed == []


def test_a_halted_jobs_waiting_step_is_not_run(mesh):
    spec = (Pipeline("halts").step("pay", wait_for=PAY)
            .step("researcher", input={"goal": "input.goal"})
            .step("coder", depends_on=["researcher"]).step("reviewer", depends_on=["coder"], gate="false").build())
    ref = mesh.run(spec, {"goal": "g", "order": 3})
    assert mesh.status(ref.id).steps["pay"].state is State.WAITING
    from mesh.agents.pipelines import engine, progress
    from mesh.contracts import Envelope

    def finish(step: str, output: Any) -> None:
        rec = mesh.status(ref.id).steps[step]
        env = Envelope(key=rec.key, job_id=ref.id, step_id=step, agent=step, trace_id="1" * 32,
                       deadline=time.time() + 60, payload=rec.input)
        mesh.jobs_of(ref.id).update(ref.id, progress.start(env, 1))
        mesh.jobs_of(ref.id).update(ref.id, progress.complete(env, output, spec=spec, routes=engine.Routes()))

    from tests.pipelines.agents import CodeDiff, ResearchResult
    finish("researcher", ResearchResult(summary="s"))
    finish("coder", CodeDiff(diff="d", confidence=0.9))
    record = mesh.status(ref.id)
    assert record.state is State.HALTED and record.steps["pay"].state is State.NOT_RUN
    assert mesh.redis.zcard(mesh.keys_of(ref.id).waits) == 0 and mesh.redis.zcard(mesh.keys_of(ref.id).timers) == 0


BAD = {
    "sleep: soon": "sleep: a duration is written 30s, 10m or 24h, not 'soon'",
    "sleep: 10m\n    agent: researcher": "a sleep step runs no agent: agent do(es) not apply to it",
    "wait_for: {event: 'pay settled'}": "wait_for.event: String should match pattern",
    "wait_for: {event: paid, timeout: forever}": "wait_for.timeout: a duration is written",
    "wait_for: {event: paid, match: 'event.x =='}": "wait_for.match: condition 'event.x ==' does not compile",
    "wait_for: {event: paid, match: 'nope.x == 1'}": "reads nope.x, but 'nope' is neither an upstream step nor the "
                                                       "job; it may read event,",
    "wait_for: {event: paid, on_timeout: wait}": "wait_for.on_timeout: Input should be 'fail' or 'continue'",
    "sleep: 1s\n    wait_for: {event: paid}": "give a step sleep: or wait_for:, not both",
}


@pytest.mark.parametrize("given", BAD)
def test_a_bad_sleep_or_wait_for_is_refused_at_load_at_its_line(given):
    text = f"name: bad\nsteps:\n  - id: researcher\n  - id: pause\n    {given}\n"
    with pytest.raises(PipelineError) as caught:
        parse(text, app, "bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml:4: ") or message.startswith("bad.yaml:5: "), message
    assert BAD[given] in message, message


def test_the_builder_and_yaml_give_the_same_spec():
    text = ("name: same\nsteps:\n  - id: nap\n    sleep: 10m\n  - id: pay\n    depends_on: [nap]\n"
            "    wait_for:\n      event: payment.settled\n      match: event.order == input.order\n"
            "      timeout: 1h\n")
    built = Pipeline("same").step("nap", sleep="10m").step("pay", depends_on=["nap"], wait_for=PAY).build()
    assert parse(text, app).digest() == built.digest()


def test_the_cli_signals_emits_and_lists_the_waits(mesh, cli):
    ref = mesh.run(pay_flow(), {"goal": "g", "order": 8}, key="order-8")
    listed = cli("waits", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(w["job_id"], w["step_id"], w["event"]) for w in json.loads(listed.stdout)] == [
        (ref.id, "pay", "payment.settled")]
    table = cli("waits")
    assert "event payment.settled where" in table.stdout and max(map(len, table.stdout.splitlines())) <= 80
    status = cli("status", ref.id)
    assert "waits for event payment.settled" in " ".join(status.stdout.split())
    missed = cli("emit", "payment.settled", "--data", '{"order": 9}', "--json")
    assert missed.returncode == 0 and json.loads(missed.stdout)["resumed"] == []
    bad = cli("signal", "order-8", "payment.settled", "--data", "[1]")
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    hit = cli("signal", "order-8", "payment.settled", "--data", '{"order": 9}', "--json")
    assert hit.returncode == 0, hit.stderr
    assert json.loads(hit.stdout)["resumed"] == [{"job_id": ref.id, "step_id": "pay"}]
    timeline = " ".join(cli("trace", ref.id).stdout.split())
    assert "waiting waits for event payment.settled where event.order == input.order until" in timeline
    assert "resumed payment.settled came by signal" in timeline
    assert cli("signal", "no-such-job", "x").returncode == 2


def test_an_index_entry_whose_job_record_expired_is_removed_when_read(mesh):
    ref = mesh.run(pay_flow(), {"goal": "g", "order": 6})
    mesh.redis.delete(mesh.keys_of(ref.id).job(ref.id))  # as retention would, once its job ended by another branch
    assert mesh.emit("payment.settled", {"order": 6}).resumed == []
    assert mesh.redis.zcard(mesh.keys_of(ref.id).waits_for("payment.settled")) == 0
    assert mesh.waits() == [] and mesh.redis.zcard(mesh.keys_of(ref.id).waits) == 0


def test_a_false_when_skips_a_waiting_step_before_it_waits(mesh):
    spec = (Pipeline("maybe").step("pay", wait_for=PAY, when="input.order > 10")
            .step("researcher", depends_on=["pay"], input={"goal": "input.goal"}).build())
    ref = mesh.run(spec, {"goal": "g", "order": 1})
    record = mesh.status(ref.id)
    assert record.steps["pay"].state is State.SKIPPED and record.steps["pay"].wait is None
    assert sent(mesh) == 1 and mesh.waits() == [] and not any(mesh.redis.zcard(k.timers) for k in mesh.shards.keys)


def test_a_signal_resumes_the_step_waiting_longest_and_reaches_a_job_another_branch_ended(mesh):
    from mesh.broker.jobs import fail_step

    spec = (Pipeline("two").step("first", wait_for=PAY).step("nap", sleep="200ms")
            .step("second", depends_on=["nap"], wait_for=PAY).step("researcher", input={"goal": "input.goal"}).build())
    ref = mesh.run(spec, {"goal": "g", "order": 2})
    settle(mesh, ref.id, "nap")
    assert mesh.status(ref.id).steps["second"].state is State.WAITING
    mesh.jobs_of(ref.id).update(ref.id, fail_step("researcher", State.DEAD_LETTERED, "boom", "permanent"))
    assert mesh.status(ref.id).state is State.DEAD_LETTERED  # ended by another branch; two steps still wait
    assert mesh.signal(ref.id, "payment.settled", {"n": 1}).resumed == [(ref.id, "first")]
    assert mesh.signal(ref.id, "payment.settled", {"n": 2}).resumed == [(ref.id, "second")]
    record = mesh.status(ref.id)
    assert (record.steps["first"].result, record.steps["second"].result) == ({"n": 1}, {"n": 2})
    with pytest.raises(NotWaiting):
        mesh.signal(ref.id, "payment.settled", {"n": 3})
