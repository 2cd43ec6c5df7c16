"""The Deadline middleware: a handler's time limit is the smallest of the message's ``time_limit``,
the actor's, ``MESH_TIME_LIMIT_S`` and what the envelope's deadline leaves."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from conftest import wait_for
from dramatiq import Worker
from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from mesh.broker.deadline import Deadline, effective_limit_ms
from mesh.broker.mesh_broker import MeshBroker, build_broker
from mesh.broker.outbox import build_message
from mesh.contracts import Envelope, new_trace_id
from mesh.dlq import DeadLetterStore

NOW_MS = 1_700_000_000_000


def envelope(agent: str, deadline_s: float) -> Envelope:
    return Envelope(key=f"k-{uuid.uuid4().hex}", job_id=f"j-{uuid.uuid4().hex}", step_id=agent, agent=agent,
                    trace_id=new_trace_id(), deadline=deadline_s, payload={})


# -- the computation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "deadline_s", "expected"), [
    ((), None, 300_000),                         # only the setting
    ((1_000,), None, 1_000),                     # the actor's (or message's) own limit is tighter
    ((5_000, 1_000), None, 1_000),               # message and actor: the smaller of both
    ((1_000, 5_000), None, 1_000),
    ((600_000,), None, 300_000),                 # a longer own limit does not lift the setting
    ((1_000,), NOW_MS / 1000 + 0.25, 250),       # the deadline leaves less than any limit
    ((), NOW_MS / 1000 + 10_000, 300_000),       # a far deadline changes nothing
    ((), NOW_MS / 1000 - 5, 1),                  # a spent budget still arms the timer
    ((None, 0, -3, True, "1"), None, 300_000),   # what is not a positive number sets no limit
    ((float("inf"),), None, 300_000),            # dramatiq's "no limit" does not lift the setting
])
def test_effective_limit_is_the_smallest_of_every_limit_and_the_deadline(
        options: tuple[Any, ...], deadline_s: float | None, expected: int) -> None:
    assert effective_limit_ms(300_000, *options, deadline_s=deadline_s, now_ms=NOW_MS) == expected


@pytest.fixture
def broker(settings) -> Iterator[MeshBroker]:
    broker = MeshBroker(settings)
    yield broker
    broker.close()


def declare(broker: MeshBroker, name: str, **options: Any) -> dramatiq.Actor:
    return dramatiq.Actor(lambda env: None, broker=broker, actor_name=name, queue_name=name, priority=0,
                          options=options)


def test_the_actors_time_limit_is_kept_and_the_messages_own_option_travels_on_unchanged(broker, settings) -> None:
    declare(broker, "quick", time_limit=1_000)
    message = MessageProxy(build_message(envelope("quick", time.time() + 600), time_limit=5_000))
    deadline = Deadline(settings)

    deadline.before_process_message(broker, message)
    assert message.options["time_limit"] == 1_000  # what TimeLimit arms
    deadline.after_process_message(broker, message, exception=RuntimeError("x"))
    assert message.options["time_limit"] == 5_000  # what a retried copy carries

    bare = MessageProxy(Message(queue_name="quick", actor_name="quick", args=(), kwargs={}, options={}))
    deadline.before_process_message(broker, bare)
    assert bare.options["time_limit"] == 1_000
    deadline.after_skip_message(broker, bare)
    assert "time_limit" not in bare.options


@pytest.mark.parametrize(("actor_ms", "own_ms", "deadline_in_s", "named", "others"), [
    (1_000, None, 600, "stopped at 1 s, agent quick's time limit",
     "(the other limits: MESH_TIME_LIMIT_S 300 s, the job's deadline 600 s)"),
    (60_000, 500, 600, "stopped at 0.5 s, the step's timeout_ms",
     "(the other limits: MESH_TIME_LIMIT_S 300 s, agent quick's time limit 60 s, the job's deadline 600 s)"),
    (None, None, 600, "stopped at 300 s, MESH_TIME_LIMIT_S", "(the other limits: the job's deadline 600 s)"),
    (60_000, None, 2.5, "stopped at 2.5 s, the job's deadline", "agent quick's time limit 60 s"),
])
def test_a_timed_out_attempts_error_names_the_limit_that_stopped_it_and_the_others(
        broker, settings, monkeypatch, actor_ms, own_ms, deadline_in_s, named, others) -> None:
    from dramatiq.middleware import TimeLimitExceeded

    monkeypatch.setattr("mesh.broker.deadline.server_now_ms", lambda broker: NOW_MS)  # the Redis clock
    declare(broker, "quick", **({"time_limit": actor_ms} if actor_ms else {}))
    options = {"time_limit": own_ms} if own_ms else {}
    message = MessageProxy(build_message(envelope("quick", NOW_MS / 1000 + deadline_in_s), **options))
    deadline = Deadline(settings)
    deadline.before_process_message(broker, message)

    exc = TimeLimitExceeded()  # what dramatiq raises into the thread: no message of its own
    deadline.after_process_message(broker, message, exception=exc)
    assert str(exc).startswith(f"TimeLimitExceeded: {named}"), str(exc)
    assert others in str(exc), str(exc)


def test_a_tool_interrupted_by_the_limit_names_it_too(broker, settings) -> None:
    from dramatiq.middleware import TimeLimitExceeded

    from mesh.contracts import DependencyTimeout

    declare(broker, "quick", time_limit=1_000)
    message = MessageProxy(build_message(envelope("quick", time.time() + 600)))
    deadline = Deadline(settings)
    deadline.before_process_message(broker, message)
    try:
        try:
            raise TimeLimitExceeded()
        except TimeLimitExceeded as cause:
            raise DependencyTimeout("pay hit its time limit; its effect is unknown", tool="pay") from cause
    except DependencyTimeout as exc:
        deadline.after_process_message(broker, message, exception=exc)
        assert str(exc).startswith("pay hit its time limit; its effect is unknown (TimeLimitExceeded: stopped at "
                                   "1 s, agent quick's time limit"), str(exc)


# -- a real worker ----------------------------------------------------------------------------------

LOOP_S = 20.0  # the handler's own bound: well under the setting below, well over the actor's limit


@pytest.mark.slow
def test_an_actor_declared_with_a_one_second_limit_is_interrupted_and_dead_lettered_as_timeout(
        make_settings, client) -> None:
    settings = make_settings(time_limit_s=60)
    broker = build_broker(settings)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slowpoke(env: dict[str, Any]) -> None:
        started.set()
        end = time.monotonic() + LOOP_S
        while time.monotonic() < end and not release.wait(0.01):
            pass
        finished.set()

    actor = dramatiq.Actor(slowpoke, broker=broker, actor_name="slowpoke", queue_name="slowpoke", priority=0,
                           options={"time_limit": 1_000})
    worker = Worker(broker, queues={"slowpoke"}, worker_threads=1, worker_timeout=100)
    broker.emit_after("process_boot")  # starts TimeLimit's timer thread, as dramatiq's CLI does
    worker.start()
    try:
        message = actor.send(envelope("slowpoke", time.time() + 600).model_dump(mode="json"))
        store = DeadLetterStore(client.redis, client.keys)
        entry = wait_for(lambda: store.get(message.message_id), timeout_s=12)
        assert entry.failure_class == "timeout"
        assert entry.error.startswith("TimeLimitExceeded: stopped at 1 s, agent slowpoke's time limit (the other "
                                      "limits: MESH_TIME_LIMIT_S 60 s, the job's deadline "), entry.error
        assert started.is_set() and not finished.is_set()  # stopped by the limit, not by its own bound
    finally:
        release.set()
        worker.stop(timeout=10_000)
        broker.close()
