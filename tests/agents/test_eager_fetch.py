"""A step's success fetches its pipeline's next step for its own worker (mesh.broker.step_write, step.lua's
eager fetch): when the write sends a message to a queue this worker consumes with room in its window,
the same script call fetches that queue's next message in lane order and claims it, as the consumer's
fetch would, and the message is handed to dramatiq with no wake-up and no fetch of its own. What it
fetches is held as any fetched message is (the worker's acks set, its claim), it is the message a fetch
would have taken (not the write's own when another waits before it), a full window fetches nothing, and
a write sent again after its answer was lost has the consumer reclaim what its first call fetched.

The consumer thread is dramatiq's own, not started: the tests call the consumer and the runtime the way
its threads would, one step at a time."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from queue import Empty, PriorityQueue
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import sigstop, wait_for
from dramatiq.worker import ConsumerThread
from pydantic import BaseModel

from mesh import App, Context, Pipeline
from mesh.agents.runtime import AgentRuntime, declare_app
from mesh.broker import MeshClient, claims, trace
from mesh.broker.idempotency import Idempotency, Lease
from mesh.broker.mesh_broker import MeshBroker, build_broker
from mesh.broker.observe import running_member
from mesh.broker.step_write import SENTINEL
from mesh.contracts import JobRecord, State
from mesh.contracts.errors import OutcomeUnrecorded
from tests.apps.relay import app as relay
from tests.apps.relay import arrived_key, gate_key

app = App("eager-fetch")

#: Short, so the killed worker's messages come back soon (the lease is as long by default).
HEARTBEAT_TIMEOUT_S = 3


class Text(BaseModel):
    text: str


@app.agent(time_limit_s=30)
def echo(ctx: Context, message: Text) -> Text:
    return message


app.pipeline(Pipeline("pair").step("first", agent=echo).step("second", agent=echo, depends_on=["first"]))
app.pipeline(Pipeline("triple").step("first", agent=echo).step("second", agent=echo, depends_on=["first"])
             .step("third", agent=echo, depends_on=["second"]))
app.pipeline(Pipeline("fork").step("first", agent=echo).step("left", agent=echo, depends_on=["first"])
             .step("right", agent=echo, depends_on=["first"]))


class Worker(SimpleNamespace):
    broker: MeshBroker
    runtime: AgentRuntime
    client: MeshClient
    thread: ConsumerThread
    work: PriorityQueue[Any]


def _worker(settings: Any, prefetch: int) -> Iterator[Worker]:
    broker = build_broker(settings)
    runtime = AgentRuntime.from_settings(settings, broker.records, app)
    declare_app(broker, runtime)
    work: PriorityQueue[Any] = PriorityQueue()
    thread = ConsumerThread(broker=broker, queue_name="echo", prefetch=prefetch, work_queue=work, worker_timeout=100)
    thread.consumer = broker.consume("echo", prefetch=prefetch, timeout=100)
    thread.running = True
    broker.worker = SimpleNamespace(consumers={"echo": thread})  # what dramatiq's worker_boot gives the broker
    yield Worker(broker=broker, runtime=runtime, client=MeshClient(settings, client=broker.records, app=app),
                 thread=thread, work=work)
    broker.close()


@pytest.fixture
def worker(settings) -> Iterator[Worker]:
    yield from _worker(settings, prefetch=4)


def run(w: Worker, message: Any) -> None:
    """What a worker thread does with ``message``: the claim taken up, the actor run, the ack."""
    idem = next(m for m in w.broker.middleware if isinstance(m, Idempotency))
    idem.before_process_message(w.broker, message)
    w.runtime.handle(app.agents["echo"], message.args[0])
    w.thread.consumer.ack(message)


def handed(w: Worker) -> list[Any]:
    out = []
    while True:
        try:
            out.append(w.work.get_nowait().message)
        except Empty:
            return out


def test_a_success_fetches_its_next_step_for_its_own_worker_held_and_claimed_as_a_fetch_holds_it(worker):
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    keys, consumer = w.broker.keys, w.thread.consumer
    first = next(consumer)
    tokens = w.broker.records.llen(keys.wake("echo"))

    run(w, first)

    [second] = handed(w)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")
    rid = second.options["redis_message_id"]
    # Held as a fetched message is: in the worker's acks set (where a reaper looks), in hand, claimed.
    assert w.broker.records.sismember(keys.acks(w.broker.broker_id, "echo"), rid)
    assert w.broker.records.sismember(keys.held(w.broker.broker_id), "echo")
    assert rid in consumer.in_hand and second.message_id in consumer.queued_message_ids
    lease = second.mesh_claim.lease
    claim = bytes(w.broker.records.get(lease.claim_key) or b"").split(b"|")
    assert claim[0] == b"claimed" and int(claim[1]) == lease.token and claim[3].decode() == lease.owner
    # Not left in its lane, and no idle consumer is woken for it.
    assert w.broker.records.llen(keys.queue("echo")) == 0
    assert w.broker.records.llen(keys.wake("echo")) == tokens
    # Its pick-up starts from the record the success wrote, read by nobody.
    assert lease.record == w.broker.records.get(keys.job(ref.id))

    run(w, second)

    record = w.client.status(ref.id)
    assert record.state is State.SUCCEEDED and [s.state for s in record.steps.values()] == [State.SUCCEEDED] * 2
    assert not w.broker.records.sismember(keys.acks(w.broker.broker_id, "echo"), rid)
    assert consumer.outstanding_message_count == 0 and consumer.eager_reserved == 0


def test_the_eager_fetch_takes_the_message_a_fetch_would_take_not_the_writes_own(worker):
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    other = w.client.send("echo", {"text": "waiting"})  # in the lane before the second step

    run(w, first)

    [taken] = handed(w)
    assert taken.args[0]["job_id"] == other.id
    assert w.broker.records.llen(w.broker.keys.queue("echo")) == 1  # the second step waits its turn
    second = next(w.thread.consumer)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")


def picked_up(w: Worker, job_id: str, step_id: str) -> list[int]:
    """The tokens of the ``picked_up`` events of the job's step."""
    return [e["token"] for e in trace.read(w.broker.records, w.broker.keys, job_id)
            if e["event"] == "picked_up" and e["step_id"] == step_id]


def test_the_success_that_fetches_its_jobs_next_step_writes_that_steps_pick_up_with_the_claims_token(worker):
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    keys, records = w.broker.keys, w.broker.records

    run(w, next(w.thread.consumer))

    [second] = handed(w)
    lease = second.mesh_claim.lease
    # Before its attempt does anything: running with its claim's token, traced, in the running index.
    step = w.client.status(ref.id).steps["second"]
    assert step.state is State.RUNNING and step.token == lease.token and step.picked_up == 1
    assert picked_up(w, ref.id, "second") == [lease.token]
    assert records.zscore(keys.running, running_member(ref.id, "second")) is not None
    # What the attempt goes on from is the record as written, token and all.
    data = records.get(keys.job(ref.id))
    assert lease.picked.data == data == lease.record
    assert lease.picked.record == JobRecord.model_validate_json(data)

    run(w, second)

    record = w.client.status(ref.id)
    assert record.state is State.SUCCEEDED and record.steps["second"].picked_up == 1
    assert record.steps["second"].token == lease.token
    assert picked_up(w, ref.id, "second") == [lease.token]  # its attempt wrote no pick-up of its own
    kinds = [(e["event"], e.get("step_id")) for e in trace.read(records, keys, ref.id)]
    assert kinds.index(("succeeded", "first")) < kinds.index(("picked_up", "second")) \
        < kinds.index(("succeeded", "second"))
    assert records.zscore(keys.running, running_member(ref.id, "second")) is None


def test_a_fetch_that_takes_another_message_writes_nothing_of_the_next_steps_pick_up(worker):
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    other = w.client.send("echo", {"text": "waiting"})  # in the lane before the second step

    run(w, first)

    [taken] = handed(w)
    assert taken.args[0]["job_id"] == other.id and taken.mesh_claim.lease.picked is None
    assert w.client.status(ref.id).steps["second"].state is State.QUEUED
    assert picked_up(w, ref.id, "second") == []
    assert w.broker.records.zscore(w.broker.keys.running, running_member(ref.id, "second")) is None
    run(w, taken)
    second = next(w.thread.consumer)
    token = second.mesh_claim.lease.token
    run(w, second)
    assert picked_up(w, ref.id, "second") == [token]
    assert w.client.status(ref.id).state is State.SUCCEEDED


def test_a_next_step_whose_record_carries_the_placeholder_token_is_picked_up_by_its_own_attempt(worker):
    w = worker
    text = f"{SENTINEL} {SENTINEL}"  # the digits a folded pick-up is computed with, in the step's input
    ref = w.client.run("pair", {"text": text})

    run(w, next(w.thread.consumer))

    [second] = handed(w)
    lease = second.mesh_claim.lease
    assert lease.picked is None and w.client.status(ref.id).steps["second"].state is State.QUEUED
    run(w, second)
    record = w.client.status(ref.id)
    assert record.state is State.SUCCEEDED and record.output("second") == {"text": text}
    assert record.steps["second"].token == lease.token and picked_up(w, ref.id, "second") == [lease.token]


def test_a_step_its_success_settled_takes_no_room_while_its_thread_finishes(worker):
    """A step handed over by its last step's success can succeed before that last step's thread has let
    its message go (no pick-up round trip in between): the settled message holds no place, and the
    success fetches the next step all the same."""
    w = worker
    ref = w.client.run("triple", {"text": "hi"})
    idem = next(m for m in w.broker.middleware if isinstance(m, Idempotency))
    first = next(w.thread.consumer)
    idem.before_process_message(w.broker, first)
    w.runtime.handle(app.agents["echo"], first.args[0])  # settled by its success; not let go yet

    [second] = handed(w)
    run(w, second)

    [third] = handed(w)
    assert (third.args[0]["job_id"], third.args[0]["step_id"]) == (ref.id, "third")
    w.thread.consumer.ack(first)
    run(w, third)
    assert w.client.status(ref.id).state is State.SUCCEEDED
    consumer = w.thread.consumer
    assert consumer.outstanding_message_count == 0 and consumer.eager_reserved == 0 and not consumer.written_off


@pytest.fixture
def full_worker(settings) -> Iterator[Worker]:
    yield from _worker(settings, prefetch=1)


def test_a_full_window_fetches_nothing_and_the_next_step_waits_in_its_lane_with_its_token(full_worker):
    w = full_worker
    w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    tokens = w.broker.records.llen(w.broker.keys.wake("echo"))

    run(w, first)

    assert handed(w) == []
    assert w.broker.records.llen(w.broker.keys.queue("echo")) == 1
    assert w.broker.records.llen(w.broker.keys.wake("echo")) == tokens + 1
    assert w.thread.consumer.eager_reserved == 0


def test_a_write_sent_again_after_its_answer_was_lost_has_its_first_fetch_reclaimed_not_stranded(worker):
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    consumer, steps = w.thread.consumer, w.runtime.steps
    first = next(consumer)
    real = steps.evalsha

    def answer_lost_then_sent_again(args: list[Any]) -> Any:
        real(args)  # ran by Redis, its answer never read: what a cut connection leaves
        return real(args)  # what the client's retry sends

    steps.evalsha = answer_lost_then_sent_again  # type: ignore[method-assign]
    try:
        run(w, first)
    finally:
        steps.evalsha = real  # type: ignore[method-assign]

    # The second step was fetched into this worker's hands by the lost call: nothing handed it over.
    assert handed(w) == []
    acks = w.broker.keys.acks(w.broker.broker_id, "echo")
    assert w.broker.records.scard(acks) == 1 and not consumer.in_hand
    # The consumer's next look reclaims it (back to its lane) and fetches it.
    second = next(consumer)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")
    assert consumer.reclaimed


def test_a_consumer_with_a_backlog_fetches_in_batches_and_the_next_step_waits_in_its_lane(worker):
    w = worker
    w.client.run("pair", {"text": "hi"})
    for n in range(5):
        w.client.send("echo", {"text": f"backlog {n}"})
    first = next(w.thread.consumer)  # fetches the window's 4: the queue still holds 2
    assert first.args[0]["step_id"] == "first" and not w.thread.consumer.drained

    run(w, first)

    assert handed(w) == []
    assert w.broker.records.llen(w.broker.keys.queue("echo")) == 3


@pytest.mark.slow
def test_a_worker_killed_holding_a_step_its_last_success_fetched_loses_nothing(make_settings, worker_process,
                                                                                 rclient):
    """Not a fault of the code before (its fetch held the step the same way): the guarantee kept."""
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    client = MeshClient(settings, client=rclient, app=relay)
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    victim = worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env)
    ref = client.run("relay", {"text": "hi"})
    wait_for(lambda: int(rclient.get(arrived_key(settings.namespace)) or 0) == 1, timeout_s=30)
    record = client.status(ref.id)
    first, second = record.steps["first"], record.steps["second"]
    assert first.state is State.SUCCEEDED and second.state is State.RUNNING
    acks = [k for k in rclient.scan_iter(client.keys.acks("*", "held"))]
    assert len(acks) == 1 and rclient.scard(acks[0]) == 1  # held where a reaper looks
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    rclient.set(gate_key(settings.namespace), 1)
    worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env)
    record = client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 20)
    assert record.state is State.SUCCEEDED
    assert record.steps["second"].token is not None and record.steps["second"].token > second.token
    assert int(rclient.hget(client.keys.stats, "recovered") or 0) >= 1
    assert int(rclient.hget(client.keys.stats, "takeovers") or 0) >= 1


def test_a_lost_answer_is_reclaimed_by_the_consumer_rebuilt_after_its_place_was_held(worker):
    """dramatiq rebuilt the consumer (a lost connection) after the write held a place in the old one's
    window and before the call went out: the rebuilt consumer had reclaimed already, and what the lost
    call fetched must still go back (it was left in this live worker's acks set, where no reaper looks)."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    old, steps = w.thread.consumer, w.runtime.steps
    first = next(old)
    real_slot, real = steps.eager, steps.evalsha
    assert real_slot is not None

    def place_then_rebuild(queue: str) -> Any:
        slot = real_slot(queue)
        assert slot is not None
        rebuilt = w.broker.consume("echo", prefetch=4, timeout=100)
        rebuilt._fetch()  # its reclaim, and a fetch finding nothing (the next step is not sent yet)
        assert rebuilt.reclaimed
        w.thread.consumer = rebuilt
        return slot

    def answer_lost_then_sent_again(args: list[Any]) -> Any:
        real(args)
        return real(args)

    steps.eager, steps.evalsha = place_then_rebuild, answer_lost_then_sent_again
    try:
        run(w, first)
    finally:
        steps.eager, steps.evalsha = real_slot, real

    rebuilt = w.thread.consumer
    assert rebuilt is not old and handed(w) == []
    second = next(rebuilt) or next(rebuilt)  # the reclaim puts it back; a look at most waits WAIT_S for it
    assert second is not None and (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")


def test_a_step_fetched_for_a_rebuilt_consumer_is_counted_in_its_window(worker):
    w = worker
    w.client.run("pair", {"text": "hi"})
    old, steps = w.thread.consumer, w.runtime.steps
    first = next(old)
    real_slot = steps.eager
    assert real_slot is not None

    def place_then_rebuild(queue: str) -> Any:
        slot = real_slot(queue)
        w.thread.consumer = w.broker.consume("echo", prefetch=4, timeout=100)
        return slot

    steps.eager = place_then_rebuild
    try:
        run(w, first)
    finally:
        steps.eager = real_slot

    [second] = handed(w)
    rebuilt = w.thread.consumer
    # dramatiq's worker thread settles it through the consumer it has now: the one that counts it.
    assert second.message_id in rebuilt.queued_message_ids and rebuilt.outstanding_message_count == 1
    assert old.eager_reserved == 0


def test_a_step_fetched_for_a_worker_whose_stop_began_meanwhile_goes_back_to_its_lane_at_once(worker):
    """The place was held before the stop began, the answer came after: a stopping worker's threads take
    nothing more from its work queue, so a message handed there would wait for the stop to end (its
    requeue of the work queue), or for a reaper when it came after that requeue."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    consumer, steps = w.thread.consumer, w.runtime.steps
    first = next(consumer)
    real_slot = steps.eager
    assert real_slot is not None

    def place_then_stop(queue: str) -> Any:
        slot = real_slot(queue)
        w.broker.stopping.set()  # what Worker.stop's worker_shutdown signal does first
        return slot

    steps.eager = place_then_stop
    try:
        run(w, first)
    finally:
        steps.eager = real_slot

    assert handed(w) == []
    keys = w.broker.keys
    assert w.broker.records.llen(keys.queue("echo")) == 1  # back in its lane, for any worker
    assert w.broker.records.scard(keys.acks(w.broker.broker_id, "echo")) == 0
    assert not consumer.in_hand and consumer.outstanding_message_count == 0 and consumer.eager_reserved == 0
    w.broker.stopping.clear()
    second = next(consumer)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")
    assert second.mesh_claim.verdict[0] == b"run"  # its first claim was released, not left to time out


@pytest.mark.slow
def test_a_worker_paused_past_its_lease_holding_a_step_its_success_fetched_writes_nothing_when_it_wakes(
        make_settings, worker_process, rclient):
    """Not a fault of the code before either: the eagerly fetched step, taken over while its worker was
    SIGSTOPped, is fenced when the woken worker finishes it (its write refused, the job left as its new
    owner wrote it, nothing dead-lettered)."""
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    client = MeshClient(settings, client=rclient, app=relay)
    ns = settings.namespace
    env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    paused = worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env)
    ref = client.run("relay", {"text": "hi"})
    wait_for(lambda: int(rclient.get(arrived_key(ns)) or 0) == 1, timeout_s=30)
    stale = client.status(ref.id).steps["second"].token
    sigstop(paused.pid)
    try:
        rclient.set(gate_key(ns), 1)
        worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env)
        record = client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert record.state is State.SUCCEEDED
    newer = record.steps["second"].token
    assert newer is not None and stale is not None and newer > stale
    log = paused.log_path  # type: ignore[attr-defined]
    wait_for(lambda: "attempt superseded" in log.read_text(), timeout_s=60)
    after = client.status(ref.id)
    assert after.state is State.SUCCEEDED and after.steps["second"].token == newer
    # The woken worker's write was refused: nothing changed (but the history a retention sweep may have
    # added meanwhile, compacting the ended job: a worker's sweep runs on its own schedule).
    assert after.model_dump(exclude={"history"}) == record.model_dump(exclude={"history"})
    assert rclient.hget(client.keys.stats, "dead_lettered") is None


class AnswerDropper:
    """A loopback TCP relay to Redis that, once, lets a step write carrying an eager fetch (its
    arguments name the worker's held set, ``mark``) reach Redis and run, then closes that connection
    instead of passing the answer on: the call landed, its fetch with it, and the worker never hears of
    it. The answer Redis gave is kept (:attr:`answer`): what the lost call fetched."""

    def __init__(self, target: tuple[str, int], mark: bytes, hold: threading.Event | None = None) -> None:
        """``mark``: what the call's bytes hold (the worker's held set's key, ``{namespace}:__held__.``);
        ``hold``: pass the marked call's answer on once it is set (held, not dropped)."""
        self.target, self.mark, self.hold = target, mark, hold
        self.answered = threading.Event()  # the marked call's answer came from Redis
        self.answer = b""
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.dropped = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            marked = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, marked), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, marked), daemon=True).start()

    def _up(self, src: socket.socket, dst: socket.socket, marked: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if self.mark in data:
                    with self.lock:
                        if not self.dropped.is_set():
                            self.dropped.set()
                            marked.set()
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket, marked: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if marked.is_set():
                    if not self.answered.is_set():
                        self.answer = data
                    self.answered.set()
                    if self.hold is None:
                        break  # the answer to the marked call: never passed on
                    self.hold.wait(120)
                    marked.clear()
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.slow
@pytest.mark.no_cluster("the worker reaches Redis through a TCP relay that holds or drops answers, in front of "
                        "one server; a cluster client connects to each node at the address CLUSTER SLOTS names")
def test_a_step_write_whose_answer_carrying_the_eager_fetch_is_lost_loses_nothing_and_runs_it_once(
        make_settings, worker_process, rclient):
    """The success's call ran in Redis (its record written, the next step fetched into the worker's
    hands and claimed) and its connection was cut before the answer came back: the client sends it
    again, which answers "written" with nothing fetched. The step fetched by the lost call must still
    run, once (back in its lane by the consumer's reclaim, its claim taken over when its lease ends)."""
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    client = MeshClient(settings, client=rclient, app=relay)
    ns = settings.namespace
    kwargs = rclient.connection_pool.connection_kwargs
    dropper = AnswerDropper((kwargs["host"], kwargs["port"]), mark=client.keys.held("").encode())
    try:
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
               "MESH_REDIS_URL": f"redis://127.0.0.1:{dropper.port}/{kwargs.get('db', 0)}"}
        rclient.set(gate_key(ns), 1)
        worker = worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env)
        log = worker.log_path  # type: ignore[attr-defined]
        # A success fetches its next step only for an idle consumer: on a loaded machine the worker's
        # consumers may not have come back empty from their first fetch yet when a run's first step
        # succeeds. Such a run ends as any other (nothing dropped); the next one finds them idle.
        for runs in range(1, 11):
            ref = client.run("relay", {"text": f"hi {runs}"})
            record = client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 60)
            assert record.state is State.SUCCEEDED, (record.error, log.read_text()[-3000:])
            if dropper.dropped.is_set():
                break
        else:
            pytest.fail("no success of 10 runs fetched its next step")
    finally:
        dropper.close()
    # The lost call did fetch this job's second step (its answer, never passed on, carries the message).
    assert dropper.answered.is_set() and ref.id.encode() in dropper.answer, dropper.answer[:500]
    assert int(rclient.get(arrived_key(ns)) or 0) == runs  # each run's second step ran once
    assert rclient.hget(client.keys.stats, "dead_lettered") is None


limited = App("eager-fetch-limited")


@limited.agent(concurrency={"max": 1})
def single(ctx: Context, message: Text) -> Text:
    return message


limited.pipeline(Pipeline("chain").step("first", agent=single).step("second", agent=single, depends_on=["first"]))


def test_a_flow_limited_agents_next_step_is_not_fetched_by_the_success_that_still_holds_its_slot(settings):
    """A flow-limited agent's queue gets no eager fetch (MeshBroker.limited_queues): its next step waits
    in its lane with its wake-up token. The step let go of its concurrency slot before its success's
    write (limits.let_go): the slot is free when the next step is fetched, and that step runs."""
    from mesh.broker.flow_control import FlowControl
    from mesh.ops.worker import flow_control

    broker = build_broker(settings)
    try:
        runtime = AgentRuntime.from_settings(settings, broker.records, limited)
        flow_control(broker, settings, limited)
        declare_app(broker, runtime)
        work: PriorityQueue[Any] = PriorityQueue()
        thread = ConsumerThread(broker=broker, queue_name="single", prefetch=4, work_queue=work, worker_timeout=100)
        thread.consumer = broker.consume("single", prefetch=4, timeout=100)
        thread.running = True
        broker.worker = SimpleNamespace(consumers={"single": thread})
        client = MeshClient(settings, client=broker.records, app=limited)
        ref = client.run("chain", {"text": "hi"})
        consumer = thread.consumer
        first = next(consumer)
        assert consumer.drained  # idle: what the eager fetch looks for
        tokens = broker.records.llen(broker.keys.wake("single"))

        idem = next(m for m in broker.middleware if isinstance(m, Idempotency))
        flow = next(m for m in broker.middleware if isinstance(m, FlowControl))
        idem.before_process_message(broker, first)
        flow.before_process_message(broker, first)  # takes the agent's one slot
        runtime.handle(limited.agents["single"], first.args[0])  # lets go of it before its write

        assert work.empty()
        assert broker.records.llen(broker.keys.queue("single")) == 1
        assert broker.records.llen(broker.keys.wake("single")) == tokens + 1
        assert consumer.eager_reserved == 0

        # Fetched by its wake-up, before the first step's after-hook: it finds the slot free.
        second = next(consumer) or next(consumer)
        assert second is not None and second.args[0]["step_id"] == "second"
        idem.before_process_message(broker, second)
        flow.before_process_message(broker, second)  # raises SkipMessage (deferred) were the slot held
        runtime.handle(limited.agents["single"], second.args[0])
        for message in (first, second):
            flow.after_process_message(broker, message)  # releases nothing twice
            consumer.ack(message)
        record = client.status(ref.id)
        assert record.state is State.SUCCEEDED
        assert not [e for e in trace.read(broker.records, broker.keys, ref.id) if e["event"] == "deferred"]
    finally:
        broker.close()


def test_the_eager_fetch_takes_a_higher_priority_message_first_as_a_fetch_would(worker):
    """Not a fault of the code before (the fetch's own lane order): a low-priority message waiting, a
    high one sent after it, and the success's own next step (normal): the high one is taken first."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    w.client.send("echo", {"text": "low"}, priority="low")
    high = w.client.send("echo", {"text": "high"}, priority="high")

    run(w, first)

    [taken] = handed(w)
    assert taken.args[0]["job_id"] == high.id
    second = next(w.thread.consumer)  # then the normal one, the success's own, before the low one
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")


@pytest.mark.slow
@pytest.mark.no_cluster("the worker reaches Redis through a TCP relay that holds or drops answers, in front of "
                        "one server; a cluster client connects to each node at the address CLUSTER SLOTS names")
def test_a_worker_paused_between_its_successs_answer_and_its_hand_over_runs_the_step_fenced_when_it_wakes(
        make_settings, worker_process, rclient):
    """The worst moment for a pause: the success's call ran (the next step fetched into this worker's
    hands and claimed) and the worker is SIGSTOPped before it has the answer. Past the heartbeat
    timeout the reaper puts the step back and another worker runs it; the woken worker is then handed
    the step, finds its lease taken over, and writes nothing (the job stays as the new owner left it)."""
    settings = make_settings(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    client = MeshClient(settings, client=rclient, app=relay)
    ns = settings.namespace
    kwargs = rclient.connection_pool.connection_kwargs
    hold = threading.Event()
    holder = AnswerDropper((kwargs["host"], kwargs["port"]), mark=client.keys.held("").encode(), hold=hold)
    try:
        env = {"MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
        rclient.set(gate_key(ns), 1)
        paused = worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env,
                                MESH_REDIS_URL=f"redis://127.0.0.1:{holder.port}/{kwargs.get('db', 0)}")
        # A success fetches its next step only for an idle consumer: on a loaded machine the worker's
        # consumers may not have come back empty from their first fetch yet when the first run's first
        # step succeeds. Such a run ends as any other; the next one finds them idle.
        for n in range(5):
            ref = client.run("relay", {"text": f"hi {n}"})
            if holder.answered.wait(20):
                break
            assert client.wait(ref.id, timeout_s=60).state is State.SUCCEEDED
        else:
            pytest.fail("no success of 5 runs fetched its next step")
        sigstop(paused.pid)
        try:
            hold.set()  # the answer waits in the paused worker's socket
            worker_process("--app", "tests.apps.relay:app", "--threads", "2", **env)
            record = client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 30)
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        assert record.state is State.SUCCEEDED
        # The woken worker finds the step's lease lost (taken over) and settles its attempt as superseded.
        log = paused.log_path  # type: ignore[attr-defined]
        wait_for(lambda: "attempt superseded" in log.read_text(), timeout_s=60)
    finally:
        holder.close()
    after = client.status(ref.id)
    # Nothing changed but the history a retention sweep may have added, compacting the ended job meanwhile
    # (the woken worker's sweep ran once it was let go, compacting the first run's job, in 1 run of 25 under load).
    assert after.model_dump(exclude={"history"}) == record.model_dump(exclude={"history"})
    assert rclient.hget(client.keys.stats, "dead_lettered") is None
    assert int(rclient.hget(client.keys.stats, "recovered") or 0) >= 1


@contextlib.contextmanager
def commands_on(client: Any, key: str) -> Iterator[list[str]]:
    """Every command Redis runs while the block runs that names ``key`` (those scripts run included, as
    MONITOR lists them), gathered once the block is left."""
    seen: list[str] = []
    end = f"end-of-watch-{os.getpid()}-{id(seen)}"
    started = threading.Event()

    def watch() -> None:
        with client.monitor() as m:
            client.echo("watch-started")
            for command in m.listen():
                text = command["command"]
                if text.endswith(end):
                    return
                if "watch-started" in text:
                    started.set()
                elif key in text:
                    seen.append(text)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield seen
    finally:
        client.echo(end)
        thread.join(10)
        assert not thread.is_alive()


def test_a_hop_whose_success_fetches_the_next_step_pushes_and_takes_back_no_wake_up_token(worker):
    """The write's own wake-up token for the queue it fetches from is left out, not pushed, capped and
    popped again by the same call (three commands a hop on the code before)."""
    w = worker
    ref = w.client.run("triple", {"text": "hi"})
    first = next(w.thread.consumer)
    wake = w.broker.keys.wake("echo")
    tokens = w.broker.records.llen(wake)

    with commands_on(w.broker.records, wake) as seen:
        run(w, first)
        [second] = handed(w)
        run(w, second)
        [third] = handed(w)

    assert seen == []
    assert w.broker.records.llen(wake) == tokens
    assert (third.args[0]["job_id"], third.args[0]["step_id"]) == (ref.id, "third")
    run(w, third)
    assert w.client.status(ref.id).state is State.SUCCEEDED


def test_a_success_whose_fetch_takes_nothing_leaves_its_next_step_its_wake_up_token(worker):
    """The eager fetch pops an id whose body is gone (a fetch drops it) and takes nothing: the write's
    message waits in its lane, and the token left out of the write is pushed for it."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    keys = w.broker.keys
    w.broker.records.rpush(keys.queue("echo"), "no-such-message")
    tokens = w.broker.records.llen(keys.wake("echo"))

    run(w, first)

    assert handed(w) == []
    assert w.broker.records.lrange(keys.queue("echo"), 0, -1) != []
    assert w.broker.records.llen(keys.wake("echo")) == tokens + 1
    second = next(w.thread.consumer) or next(w.thread.consumer)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")


def test_a_success_whose_message_was_taken_from_it_leaves_its_next_step_its_wake_up_token(worker):
    """The first step's message left this worker's acks set before its success (reaped while the worker
    was paused): the write lands, settles nothing and fetches nothing, and the next step's message waits
    in its lane with the token the write left out."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    keys = w.broker.keys
    w.broker.records.srem(keys.acks(w.broker.broker_id, "echo"), first.options["redis_message_id"])
    tokens = w.broker.records.llen(keys.wake("echo"))

    run(w, first)

    assert handed(w) == []
    assert w.broker.records.llen(keys.queue("echo")) == 1
    assert w.broker.records.llen(keys.wake("echo")) == tokens + 1
    second = next(w.thread.consumer) or next(w.thread.consumer)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")


def test_a_success_redis_refuses_leaves_the_message_it_pushed_its_wake_up_token(worker):
    """Redis refuses a command of the success's write (the running index made a string just before it:
    WRONGTYPE): its other commands ran, the next step's message among them, as in the MULTI it
    replaced, and nothing is fetched: the token left out of the write is pushed for that message."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    keys, steps = w.broker.keys, w.runtime.steps
    tokens = w.broker.records.llen(keys.wake("echo"))
    real, writes = steps.write, []

    def write(*args: Any, **kwargs: Any) -> Any:
        writes.append(kwargs.get("settle"))
        if kwargs.get("settle"):  # the success's: the pick-up's went through
            w.broker.records.delete(keys.running)
            w.broker.records.set(keys.running, "not a sorted set")
        return real(*args, **kwargs)

    steps.write = write  # type: ignore[method-assign]
    try:
        idem = next(m for m in w.broker.middleware if isinstance(m, Idempotency))
        idem.before_process_message(w.broker, first)
        with pytest.raises(OutcomeUnrecorded, match="WRONGTYPE"):
            w.runtime.handle(app.agents["echo"], first.args[0])
    finally:
        steps.write = real  # type: ignore[method-assign]
        w.broker.records.delete(keys.running)

    assert writes[-1] is True
    assert handed(w) == []
    assert w.client.status(ref.id).steps["first"].state is State.SUCCEEDED  # its SET ran
    assert w.broker.records.llen(keys.queue("echo")) == 1
    assert w.broker.records.llen(keys.wake("echo")) == tokens + 1


@pytest.mark.parametrize("broken", ["stats", "held", "claim-list", "claim-set"])
def test_a_success_whose_eager_fetch_redis_refuses_stands_and_puts_the_message_it_took_back_in_its_lane(
        worker, broken):
    """A command of the eager fetch is refused after it took the next step's message (made of the wrong
    type just before the success's write: the stats hash, read for the fencing counter right after the
    pop; the worker's held set; the next step's claim key, a list or a set). The write stands (the first
    step succeeded, its message settled), the message taken goes back to the head of its lane once, with
    a wake-up token, out of the acks set and its claim not taken, its folded pick-up not written, nothing
    is handed over, and once the key is mended the consumer's own fetch runs it and the job ends. On the
    code before, the whole call failed after its pop (WRONGTYPE): the next step's message was in no list,
    and the job stayed running for good."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    keys, steps, records, consumer = w.broker.keys, w.runtime.steps, w.broker.records, w.thread.consumer
    second_key = first.args[0]["key"].rsplit("/", 1)[0] + "/second"
    bad = {"stats": keys.stats, "held": keys.held(w.broker.broker_id)}.get(broken, keys.claim(second_key))
    waiting = records.llen(keys.queue("echo"))
    tokens = records.llen(keys.wake("echo"))
    real, stats = steps.write, records.hgetall(keys.stats)

    def write(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("settle"):  # the success's: the pick-up's went through
            records.delete(bad)
            {"claim-list": records.rpush, "claim-set": records.sadd}.get(broken, records.set)(bad, "x")
        return real(*args, **kwargs)

    steps.write = write  # type: ignore[method-assign]
    try:
        run(w, first)
    finally:
        steps.write = real  # type: ignore[method-assign]
        records.delete(bad)
        if broken == "stats":
            records.hset(keys.stats, mapping=stats)

    assert handed(w) == []
    status = w.client.status(ref.id)
    assert status.steps["first"].state is State.SUCCEEDED
    assert status.steps["second"].state is not State.RUNNING  # its folded pick-up not written
    queue = records.lrange(keys.queue("echo"), 0, -1)
    assert len(queue) == waiting + 1 and len(set(queue)) == len(queue)
    assert records.scard(keys.acks(w.broker.broker_id, "echo")) == 0
    assert records.llen(keys.wake("echo")) > tokens
    assert consumer.eager_reserved == 0 and consumer.outstanding_message_count == 0
    assert claims.read(records, keys.claim(second_key)).state is None  # given back as found: none
    second = next(consumer) or next(consumer)
    assert (second.args[0]["job_id"], second.args[0]["step_id"]) == (ref.id, "second")
    run(w, second)
    assert w.client.status(ref.id).state is State.SUCCEEDED
    assert records.llen(keys.queue("echo")) == 0
    assert records.scard(keys.acks(w.broker.broker_id, "echo")) == 0
    assert consumer.outstanding_message_count == 0


def test_a_success_sending_two_messages_to_the_queue_it_fetches_from_leaves_the_other_its_wake_up_token(worker):
    """The write pushes two messages on the queue its eager fetch takes one of: one token of the two is left
    out of its commands (RPUSH of one token, where the outbox staged two), the other pushed for the message
    left waiting."""
    w = worker
    ref = w.client.run("fork", {"text": "hi"})
    first = next(w.thread.consumer)
    keys = w.broker.keys
    tokens = w.broker.records.llen(keys.wake("echo"))

    with commands_on(w.broker.records, keys.wake("echo")) as seen:
        run(w, first)

    [taken] = handed(w)
    assert w.broker.records.llen(keys.queue("echo")) == 1
    assert w.broker.records.llen(keys.wake("echo")) == tokens + 1
    ran = [c.split() for c in seen if not c.upper().startswith("EVALSHA")]  # the script's own commands
    assert [(c[0].upper(), len(c)) for c in ran] == [("RPUSH", 3), ("LTRIM", 4)]  # one token of two
    other = next(w.thread.consumer)
    steps = {m.args[0]["step_id"] for m in (taken, other)}
    assert {m.args[0]["job_id"] for m in (taken, other)} == {ref.id} and steps == {"left", "right"}


def test_a_refused_owed_token_fails_neither_its_write_nor_the_others_of_its_group(worker):
    """The owed token's push is a command as the write's own were: Redis refusing it (the wake-up list of
    the wrong type) fails no script. Its write stands (the fetch took nothing, the token is left out and
    logged, as a refused counter is), and the other writes of its call land with their counters."""
    w = worker
    ref = w.client.run("pair", {"text": "hi"})
    first = next(w.thread.consumer)
    keys, records, steps = w.broker.keys, w.broker.records, w.runtime.steps
    other = f"{keys.prefix}:test:other-write"
    records.set(other, b"old")
    nobody = Lease(key="", claim_key="", owner="", token=0)
    commands = [(("HINCRBY", keys.stats, "other_write", 1), {}), (("SET", other, b"new"), {})]
    earlier = steps._item(other, b"old", commands, nobody, None, False)  # a write of the same call, before it
    records.rpush(keys.queue("echo"), "no-such-message")  # the eager fetch takes nothing: the token is owed
    records.delete(keys.wake("echo"))
    records.set(keys.wake("echo"), "not a list")  # and its push is refused (WRONGTYPE)
    real, answers, acks = steps.evalsha, [], keys.acks(w.broker.broker_id, "echo")

    def with_earlier(args: list[Any]) -> Any:
        if acks not in args:  # the step's pick-up: alone
            return real(args)
        got = real([args[0], *earlier.args, *args[1:]])  # (sent again: finds it written, counts nothing)
        answers.append(got[0])
        return got[1:]

    steps.evalsha = with_earlier  # type: ignore[method-assign]
    raised = None
    try:
        run(w, first)
    except OutcomeUnrecorded as exc:
        raised = exc
    finally:
        steps.evalsha = real  # type: ignore[method-assign]
        records.delete(keys.wake("echo"))

    assert records.get(other) == b"new" and records.hget(keys.stats, "other_write") == b"1"
    assert answers[0] == 1
    assert raised is None and handed(w) == []
    assert w.client.status(ref.id).steps["first"].state is State.SUCCEEDED
    assert records.llen(keys.queue("echo")) == 1  # the second step waits in its lane
