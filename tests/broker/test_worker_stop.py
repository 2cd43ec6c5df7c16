"""Stopping a worker does not wait out its idle consumers' block on Redis (``consumer.WAIT_S``):
the stop wakes them, so a deploy's SIGTERM, and every test's teardown, is not held up by it."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from mesh.broker import consumer
from mesh.broker.mesh_broker import MeshBroker
from mesh.ops.worker import start_worker
from tests.conftest import wait_for


@pytest.mark.slow
def test_stopping_an_idle_worker_wakes_its_consumer_instead_of_waiting_out_its_block(settings, monkeypatch):
    # Long enough that the block cannot end by itself while the stop begins (and under the
    # connection's 5 s socket timeout, which would end it with an error instead).
    monkeypatch.setattr(consumer, "WAIT_S", 3.0)
    stop_began, blocking = threading.Event(), threading.Event()
    waits: list[tuple[bool, bool]] = []  # (began before the stop, woken rather than timed out)
    real_wait = MeshBroker.wait_for_work

    def wait_for_work(self: MeshBroker, queue_name: str, timeout_s: float) -> Any:
        before = not stop_began.is_set()
        blocking.set()
        woken = real_wait(self, queue_name, timeout_s)
        waits.append((before, woken))
        return woken

    monkeypatch.setattr(MeshBroker, "wait_for_work", wait_for_work)
    worker = start_worker(settings, ["planner"], 1)
    try:
        wait_for(blocking.is_set)  # the consumer found its queue empty and blocks on Redis
        stop_began.set()
        worker.stop(timeout=30_000)
        blocked_at_the_stop = [woken for before, woken in waits if before]
        assert blocked_at_the_stop == [True], waits  # woken by the stop, not by its block's end
        assert not any(thread.is_alive() for thread in worker.consumers.values())
    finally:
        worker.broker.close()
