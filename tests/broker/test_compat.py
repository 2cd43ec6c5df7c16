"""dramatiq's actor options on a MeshBroker: the ones that map onto routing keep their meaning
(``throws`` → permanent, ``Retry(delay=)`` → a deferral of that delay), the ones no mesh middleware
reads are refused at declaration, naming what the mesh does instead."""

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

from mesh.broker.mesh_broker import MeshBroker, build_broker
from mesh.broker.outbox import build_message
from mesh.broker.router import FailureRouter
from mesh.broker.settle import DeadLetterIt, RetryLater, decision_of
from mesh.contracts import ConfigError, Envelope, MeshError, RateLimited, new_trace_id
from mesh.dlq import DeadLetterStore

#: Each refused option, a value dramatiq would take, and words of the mesh equivalent its error names.
REFUSED = [
    ("min_backoff", 5_000, "MESH_RETRY_MIN_BACKOFF_MS"),
    ("max_backoff", 60_000, "MESH_RETRY_MAX_BACKOFF_MS"),
    ("retry_when", lambda n, exc: n < 3, "PermanentFailure"),
    ("on_retry_exhausted", "cleanup", "mesh DLQ"),
    ("max_age", 3_600_000, "MESH_JOB_DEADLINE_S"),
    ("on_failure", "cleanup", "mesh DLQ"),
    ("on_success", "next_one", "depends_on"),
    ("pipe_target", "next_one", "depends_on"),
    ("pipe_ignore", True, "pipeline step's input"),
    ("store_results", True, "job record"),
    ("result_ttl", 60_000, "MESH_JOB_RETENTION_S"),
]


@pytest.fixture
def broker(settings) -> Iterator[MeshBroker]:
    broker = MeshBroker(settings)
    yield broker
    broker.close()


def handler(env: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(("option", "value", "instead"), REFUSED)
def test_an_option_the_mesh_has_no_meaning_for_is_refused_at_declaration_naming_the_equivalent(
        broker, option, value, instead) -> None:
    with pytest.raises(ConfigError) as decorated:
        dramatiq.actor(handler, broker=broker, actor_name=f"a-{option}", **{option: value})
    assert option in str(decorated.value) and instead in str(decorated.value), str(decorated.value)
    with pytest.raises(ConfigError) as built:  # dramatiq.Actor checks nothing itself
        dramatiq.Actor(handler, broker=broker, actor_name=f"b-{option}", queue_name="q", priority=0,
                       options={option: value})
    assert instead in str(built.value)
    assert f"a-{option}" not in broker.actors and f"b-{option}" not in broker.actors


def test_the_options_routing_honours_are_accepted_and_a_throws_that_is_no_exception_is_refused(broker) -> None:
    dramatiq.actor(handler, broker=broker, actor_name="ok", throws=(ValueError,), max_retries=2, time_limit=1_000,
                   notify_shutdown=True, timeout_retries=1)
    assert "ok" in broker.actors
    with pytest.raises(ConfigError, match="throws"):
        dramatiq.actor(handler, broker=broker, actor_name="bad", throws="ValueError")


# -- what the router makes of them -------------------------------------------------------------------

def envelope(agent: str) -> dict[str, Any]:
    return Envelope(key=f"k-{uuid.uuid4().hex}", job_id=f"j-{uuid.uuid4().hex}", step_id=agent, agent=agent,
                    trace_id=new_trace_id(), deadline=time.time() + 600, payload={}).model_dump(mode="json")


def fail(broker: MeshBroker, settings, agent: str, exc: BaseException) -> Any:
    message = MessageProxy(build_message(Envelope.model_validate(envelope(agent))))
    FailureRouter(settings).after_process_message(broker, message, exception=exc)
    return decision_of(message)


def test_an_exception_listed_in_throws_is_permanent_and_dead_lettered_at_once(broker, settings) -> None:
    dramatiq.Actor(handler, broker=broker, actor_name="strict", queue_name="strict", priority=0,
                   options={"throws": (ValueError,)})
    dramatiq.Actor(handler, broker=broker, actor_name="lax", queue_name="lax", priority=0, options={})

    thrown = fail(broker, settings, "strict", ValueError("bad order"))
    assert isinstance(thrown, DeadLetterIt), thrown
    assert (thrown.entry.failure_class, thrown.route) == ("permanent", "permanent:dead_letter")
    assert isinstance(fail(broker, settings, "lax", ValueError("bad order")), RetryLater)  # unlisted: unknown
    assert isinstance(fail(broker, settings, "strict", KeyError("other")), RetryLater)


def test_a_mesh_error_listed_in_throws_keeps_its_own_route(broker, settings) -> None:
    dramatiq.Actor(handler, broker=broker, actor_name="meshy", queue_name="meshy", priority=0,
                   options={"throws": (MeshError,)})  # what the mesh's own agents declare, for quiet logs
    got = fail(broker, settings, "meshy", RateLimited("429", retry_after_s=1.0))
    assert isinstance(got, RetryLater) and got.route == "rate_limited:defer"


def test_retry_with_a_delay_is_a_deferral_of_that_delay_spending_no_retry_budget(broker, settings) -> None:
    dramatiq.Actor(handler, broker=broker, actor_name="later", queue_name="later", priority=0, options={})

    got = fail(broker, settings, "later", dramatiq.Retry("not yet", delay=1_500))
    assert isinstance(got, RetryLater), got
    assert (got.stat, got.route) == ("deferred", "rate_limited:defer")
    assert 1_500 <= got.delay_ms <= 1_750
    assert got.message.args[0]["attempt"] == 1 and got.message.options["mesh_defers"] == 1

    plain = fail(broker, settings, "later", dramatiq.Retry("again"))  # no delay: a retry, with backoff
    assert isinstance(plain, RetryLater) and plain.route == "unknown:retry"
    assert plain.message.args[0]["attempt"] == 2


# -- a real worker ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_on_a_worker_throws_dead_letters_at_once_and_retry_delay_runs_again_after_it(make_settings, client) -> None:
    settings = make_settings(max_retries=3, retry_min_backoff_ms=50, retry_max_backoff_ms=100)
    broker = build_broker(settings)
    calls: list[tuple[int, float]] = []
    seen = threading.Event()

    def strict(env: dict[str, Any]) -> None:
        raise ValueError("refused order")

    def later(env: dict[str, Any]) -> None:
        calls.append((env["attempt"], time.monotonic()))
        if len(calls) == 1:
            raise dramatiq.Retry("come back later", delay=1_500)
        seen.set()

    strict_actor = dramatiq.actor(strict, broker=broker, actor_name="strict", queue_name="strict",
                                  throws=(ValueError,))
    later_actor = dramatiq.actor(later, broker=broker, actor_name="later", queue_name="later")
    worker = Worker(broker, queues={"strict", "later"}, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        message = strict_actor.send(envelope("strict"))
        later_actor.send(envelope("later"))
        store = DeadLetterStore(client.redis, client.keys)
        entry = wait_for(lambda: store.get(message.message_id), timeout_s=15)
        assert entry.failure_class == "permanent" and len(entry.attempts) == 1  # never retried
        wait_for(seen.is_set, timeout_s=15)
        (first, at), (second, again) = calls
        assert first == second == 1  # a deferral, not a retry: the attempt did not change
        assert again - at >= 1.5  # dramatiq's "at least that long"
    finally:
        worker.stop(timeout=10_000)
        broker.close()
