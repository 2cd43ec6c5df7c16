"""A worker's publication of its agents (``mesh agents``) while Redis refuses it: retried in-process
(tenacity) 0.1s after the first failure, the wait doubling to at most 5s, each failure logged with
the wait, for as long as it takes; made once Redis answers. Real connection errors: the registry's
client points at a port nothing listens on until the test gives it the real Redis."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mesh.broker.keys import Keys
from mesh.broker.registry import Registry
from mesh.ops.worker import _publish, published
from tests.apps.greeter import app


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_publication_is_retried_with_doubling_waits_until_redis_answers(
        settings: Any, rclient: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(settings.namespace)
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
    reg = Registry(rclient, Keys(settings.namespace), settings.heartbeat_timeout_s)
    waits: list[float] = []
    with pytest.raises(AttributeError):
        _publish(reg, "w-1", "host:1", [object()], app.name, sleep=waits.append)  # type: ignore[list-item]
    assert waits == []


def test_a_stop_ends_the_tries_of_a_publication_redis_refused_and_it_never_lands_after(
        settings: Any, rclient: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys(settings.namespace)
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
