"""A worker with a small prefetch window (2, one or two threads) takes every kind of ending a message
can have (a success, a pipeline step whose success settles it and fetches the next, a retry, a dead
letter, a time limit raised into the thread, a deferral by a flow limit) and finishes every job: no
slot of its window is left counted for a message it let go, so a full window is always fetched again,
and once the work is done each consumer holds nothing (its window, the ids in hand, the places held
for eager fetches, the messages settled by their success)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis
from conftest import wait_for
from pydantic import BaseModel

from mesh import App, Context, Pipeline
from mesh.broker import MeshClient, MeshSettings
from mesh.broker.consumer import MeshConsumer
from mesh.contracts import TERMINAL, PermanentFailure, RateLimited

app = App("window-paths")


class Text(BaseModel):
    text: str


@app.agent()
def ok(ctx: Context, message: Text) -> Text:
    return message


@app.agent(max_attempts=3)
def flaky(ctx: Context, message: Text) -> Text:
    if ctx.attempt == 1:
        raise RateLimited("once", retry_after_s=0.01)
    return message


@app.agent()
def refused(ctx: Context, message: Text) -> Text:
    raise PermanentFailure("no")


@app.agent(time_limit_s=0.2)
def overrun(ctx: Context, message: Text) -> Text:
    time.sleep(1)
    return message


@app.agent(concurrency={"max": 1})
def single(ctx: Context, message: Text) -> Text:
    time.sleep(0.05)  # long enough for the other thread to be deferred by the limit
    return message


app.pipeline(Pipeline("chain").step("a", agent=ok).step("b", agent=ok, depends_on=["a"])
             .step("c", agent=ok, depends_on=["b"]))


def settled_all(worker: Any) -> bool:
    for thread in worker.consumers.values():
        consumer = thread.consumer
        if not isinstance(consumer, MeshConsumer):
            continue
        if (consumer.outstanding_message_count or consumer.written_off or consumer.eager_reserved
                or consumer.in_hand):
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_a_small_window_finishes_every_kind_of_ending_and_holds_nothing_after(
        make_settings: Any, threads: int) -> None:
    from mesh.ops.worker import start_worker

    settings: MeshSettings = make_settings(prefetch=2)
    worker = start_worker(settings, None, threads, app=app)
    client = MeshClient(settings, app=app)
    try:
        refs = []
        for n in range(6):
            refs.append(client.send("ok", {"text": f"ok{n}"}))
            refs.append(client.send("flaky", {"text": f"f{n}"}))
            refs.append(client.send("refused", {"text": f"r{n}"}))
            refs.append(client.run("chain", {"text": f"c{n}"}))
            refs.append(client.send("single", {"text": f"s{n}"}))
        refs += [client.send("overrun", {"text": f"o{n}"}) for n in range(2)]
        wait_for(lambda: all(client.status(ref.id).state in TERMINAL for ref in refs), timeout_s=60)
        wait_for(lambda: settled_all(worker), timeout_s=10)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
        client.close()


class Watched(threading.Event):
    """A consumer's ``settled``: notes each wait that ran out while the window had room to fetch (a
    settlement that made the room did not wake the consumer). A wait that runs out just as the
    settlement that made room is about to wake it is given a moment more before it counts."""

    def __init__(self, consumer: MeshConsumer, missed: list[int]) -> None:
        super().__init__()
        self.consumer, self.missed = consumer, missed

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if not woke and self.consumer._room() and not super().wait(0.05):
            self.missed.append(self.consumer.outstanding_message_count)
        return woke


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [2, 8])
def test_a_full_window_is_woken_by_the_settlement_that_makes_room_not_by_its_wait_running_out(
        make_settings: Any, monkeypatch: pytest.MonkeyPatch, prefetch: int) -> None:
    from mesh.ops.worker import start_worker

    missed: list[int] = []
    waits: list[int] = []
    init = MeshConsumer.__init__

    def watched(self: MeshConsumer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.settled = Watched(self, missed)
        full = self._fetch

        def fetch(wait: bool = False) -> bool:
            got = full(wait)
            waits.append(self.window_full)
            return got

        self._fetch = fetch  # type: ignore[method-assign]

    monkeypatch.setattr(MeshConsumer, "__init__", watched)
    settings: MeshSettings = make_settings(prefetch=prefetch)
    worker = start_worker(settings, ["ok", "flaky", "refused"], 2, app=app)
    client = MeshClient(settings, app=app)
    try:
        refs = []
        for n in range(20):
            refs.append(client.send("ok", {"text": f"ok{n}"}))
            refs.append(client.send("flaky", {"text": f"f{n}"}))
            refs.append(client.send("refused", {"text": f"r{n}"}))
        wait_for(lambda: all(client.status(ref.id).state in TERMINAL for ref in refs), timeout_s=60)
        assert any(waits)  # the window was full (and waited) at least once
        assert missed == []
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
        client.close()


@app.agent()
def paced(ctx: Context, message: Text) -> Text:
    time.sleep(0.02)  # settlements go out while connections are cut
    return message


@pytest.mark.slow
def test_a_small_window_whose_connections_are_cut_while_it_settles_finishes_and_holds_nothing_after(
        tmp_path: Any, make_settings: Any) -> None:
    # Every connection cut (CLIENT KILL) again and again while a worker with a window of 2 fetches and
    # settles: a settlement that failed is sent again by dramatiq, a consumer rebuilt; nothing is left
    # counted in a window, so the work is all fetched and done.
    from mesh.ops.worker import start_worker
    from tests.broker.deployed import private_redis

    server = private_redis(tmp_path)
    settings: MeshSettings = make_settings(prefetch=2, redis_url=server.url)
    worker = start_worker(settings, ["paced"], 2, app=app)
    client = MeshClient(settings, app=app)
    admin = redis.Redis.from_url(server.url)
    try:
        refs = [client.send("paced", {"text": f"p{n}"}) for n in range(60)]
        for _ in range(15):
            admin.client_kill_filter(_type="normal")
            time.sleep(0.05)
        wait_for(lambda: all(client.status(ref.id).state in TERMINAL for ref in refs), timeout_s=90)
        wait_for(lambda: settled_all(worker), timeout_s=10)
    finally:
        worker.stop(timeout=10_000)
        worker.broker.close()
        client.close()
        admin.close()
        server.stop()
