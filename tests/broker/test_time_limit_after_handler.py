"""A time limit that passes as the handler returns: dramatiq's timer decides to interrupt the thread
under its lock, then raises after letting the lock go, so a handler that returned and cancelled its
timer in between still got the exception later, wherever its thread was by then (settling, or
waiting for the next message), and the thread died there with its message held for good."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import wait_for
from dramatiq.middleware import Middleware, time_limit

from mesh.broker import MeshClient, MeshSettings
from mesh.contracts import State

NOTE = {"tool": "note", "args": {"title": "t"}}
EMPTY = {"ready": 0, "delayed": 0, "in_flight": 0}


class _Overrun(Middleware):
    """Goes after TimeLimit: the first message's before-hook outlasts its time limit (the timer fires
    while it runs); its before-ack hook notes the thread got there, then runs Python code for a while,
    where an exception raised into the thread lands."""

    def __init__(self) -> None:
        self.first = True
        self.reached = threading.Event()

    def before_process_message(self, broker: Any, message: Any) -> None:
        if self.first:
            self.first = False
            time.sleep(1.6)  # past the 0.2 s limit and the timer's 1 s look

    def before_ack(self, broker: Any, message: Any) -> None:
        self.reached.set()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass


@pytest.mark.slow
def test_a_time_limit_raised_after_the_handler_returned_neither_kills_the_thread_nor_strands_the_message(
        client: MeshClient, make_settings: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings: MeshSettings = make_settings(time_limit_s=0.2)
    overrun = _Overrun()
    raised = threading.Event()
    real = time_limit.raise_thread_exception

    def late_raise(thread_id: int, exception: type[BaseException]) -> None:
        # The timer has decided (under its lock); the raise follows once the thread is at its ack
        # (or, when the lock held back the thread's cancelling, after a while): the window, made wide.
        overrun.reached.wait(3)
        real(thread_id, exception)
        raised.set()

    monkeypatch.setattr(time_limit, "raise_thread_exception", late_raise)
    worker = start_worker(settings, ("executor",), threads=1)
    worker.broker.add_middleware(overrun)
    first = client.send("executor", NOTE)
    wait_for(raised.is_set)
    second = client.send("executor", NOTE)  # needs the one worker thread to be alive
    wait_for(lambda: all((r := client.jobs.get(ref.id)) is not None and r.state == State.SUCCEEDED
                         for ref in (first, second)), timeout_s=20)
    wait_for(lambda: client.queues(["executor"])["executor"] == EMPTY)
    assert all(t.is_alive() for t in worker.workers)
