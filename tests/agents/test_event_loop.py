"""The event loop an ``async def`` handler runs on (mesh.agents.event_loop), without a worker: one
loop per thread, reused; dramatiq's time limit (an exception raised into the thread) stops a
coroutine that awaits forever and leaves the loop usable; a cancel stops it; the deadline cuts it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from dramatiq.middleware import TimeLimitExceeded
from dramatiq.threading import raise_thread_exception

from mesh.agents import event_loop
from mesh.contracts import PermanentFailure


def in_a_thread(fn: Any) -> Any:
    """``fn()`` on a thread of its own (as a worker thread): what it returned or raised."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return out


async def which_loop() -> int:
    await asyncio.sleep(0)
    return id(asyncio.get_running_loop())


def test_two_runs_on_one_thread_share_its_loop_and_another_thread_has_its_own() -> None:
    def twice() -> tuple[int, int]:
        return event_loop.run(which_loop()), event_loop.run(which_loop())

    first = in_a_thread(twice)["value"]
    other = in_a_thread(twice)["value"]
    assert first[0] == first[1] and other[0] == other[1]
    assert first[0] != other[0]


def test_the_time_limit_raised_into_the_thread_stops_a_coroutine_awaiting_forever_and_the_loop_goes_on() -> None:
    started = threading.Event()
    cleaned: list[str] = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("forever")

    async def background() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append("background")

    async def handler() -> None:
        asyncio.get_running_loop().create_task(background())
        await forever()

    def worker() -> Any:
        ident = threading.get_ident()
        threading.Timer(0.2, lambda: raise_thread_exception(ident, TimeLimitExceeded)).start()
        began = time.monotonic()
        try:
            event_loop.run(handler())
        except TimeLimitExceeded as exc:
            stopped = (exc, time.monotonic() - began)
        # The same loop serves the next message.
        return stopped, event_loop.run(which_loop()), id(event_loop.thread_loop())

    out = in_a_thread(worker)
    (exc, took), loop_after, loop_id = out["value"]
    assert isinstance(exc, TimeLimitExceeded) and took < 2.0
    assert sorted(cleaned) == ["background", "forever"]  # its task and the one it started were cancelled
    assert loop_after == loop_id


def test_a_cancel_cancels_the_awaiting_handler_and_ends_it_as_a_failure_unless_it_returns() -> None:
    flag = threading.Event()

    async def stubborn() -> str:
        threading.Timer(0.1, flag.set).start()
        await asyncio.sleep(3600)
        return "never"

    async def graceful() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            return "stopped"
        return "never"

    out = in_a_thread(lambda: event_loop.run(stubborn(), cancelled=flag.is_set))
    assert isinstance(out["error"], PermanentFailure) and "the job was cancelled" in str(out["error"])
    assert in_a_thread(lambda: event_loop.run(graceful(), cancelled=lambda: True))["value"] == "stopped"


def test_the_deadline_cut_ends_the_handler_as_its_time_limit_would_but_its_own_timeout_is_its_own() -> None:
    async def sleeps() -> None:
        await asyncio.sleep(3600)

    async def own_timeout() -> str:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(3600)
        except TimeoutError:
            return "caught its own"
        return "never"

    cut = in_a_thread(lambda: event_loop.run(sleeps(), timeout_s=0.1))
    assert type(cut["error"]) is TimeLimitExceeded and not cut["error"].args  # named by the Deadline middleware
    assert in_a_thread(lambda: event_loop.run(own_timeout(), timeout_s=30))["value"] == "caught its own"


def test_a_sync_call_in_a_thread_awaits_an_async_tool_back_on_the_handlers_loop() -> None:
    async def tool() -> int:
        return id(asyncio.get_running_loop())

    async def handler() -> tuple[int, int, bool]:
        here = threading.get_ident()
        loop_id = await event_loop.in_thread(lambda: event_loop.resolve(tool()))
        other = await event_loop.in_thread(threading.get_ident)
        return loop_id, id(asyncio.get_running_loop()), other != here

    loop_id, handler_loop, elsewhere = in_a_thread(lambda: event_loop.run(handler()))["value"]
    assert loop_id == handler_loop and elsewhere


def test_the_time_limit_reaches_a_call_made_in_a_thread_and_the_handler_waits_for_it() -> None:
    seen: list[str] = []

    def sync_tool() -> None:
        try:
            while True:
                time.sleep(0.01)
        except TimeLimitExceeded:
            seen.append("interrupted")
            raise

    async def handler() -> None:
        await event_loop.in_thread(sync_tool)

    def worker() -> Any:
        ident = threading.get_ident()
        threading.Timer(0.2, lambda: raise_thread_exception(ident, TimeLimitExceeded)).start()
        with pytest.raises(TimeLimitExceeded):
            event_loop.run(handler())
        return list(seen)  # read when run returned: the call's thread had ended by then

    assert in_a_thread(worker)["value"] == ["interrupted"]


def test_closing_a_threads_loop_closes_its_http_client_and_the_next_run_makes_a_new_loop() -> None:
    async def grab() -> tuple[asyncio.AbstractEventLoop, Any]:
        return asyncio.get_running_loop(), event_loop.http_client()

    def worker() -> Any:
        loop, client = event_loop.run(grab())
        event_loop.close_thread_loop()
        again, _ = event_loop.run(grab())
        event_loop.close_thread_loop()
        return loop, client, again

    loop, client, again = in_a_thread(worker)["value"]
    assert loop.is_closed() and client.is_closed
    assert again is not loop and again.is_closed()


def test_a_handler_cancelling_its_own_task_fails_as_an_error_not_as_a_cancel() -> None:
    async def cancels_itself() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    out = in_a_thread(lambda: event_loop.run(cancels_itself()))
    assert type(out["error"]) is RuntimeError and "not by mesh cancel" in str(out["error"])


def test_a_call_made_after_a_cancel_waits_for_the_call_still_in_flight_one_call_at_a_time() -> None:
    from mesh import AsyncContext
    from mesh.testing import TestContext

    log: list[str] = []
    started, cancelled = threading.Event(), threading.Event()

    def slow(args: Any) -> dict[str, int]:
        log.append("slow started")
        started.set()
        time.sleep(0.5)  # in flight meanwhile: the cancel lands, the handler makes its cleanup call
        log.append("slow ended")
        return {"n": 1}

    async def handler(ctx: AsyncContext) -> str:
        try:
            await ctx.call("slow", {})
        except asyncio.CancelledError:  # the cancel reaches the handler while its call goes on
            log.append("handler cancelled")
            await ctx.call("fast", {})  # its cleanup call: made once the call in flight ended
            return "cleaned up"
        return "never"

    ctx = TestContext(tools={"slow": slow, "fast": lambda args: log.append("fast called") or {"n": 2}})
    threading.Thread(target=lambda: started.wait(10) and cancelled.set()).start()
    out = in_a_thread(lambda: event_loop.run(handler(AsyncContext(ctx)), cancelled=cancelled.is_set))
    assert out.get("value") == "cleaned up", out
    assert log == ["slow started", "handler cancelled", "slow ended", "fast called"]


def test_a_task_that_swallows_its_cancel_does_not_run_on_into_the_next_message() -> None:
    ticks: list[int] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
                ticks.append(1)
            except asyncio.CancelledError:
                pass  # it will not end

    left: list[asyncio.Future[None]] = []

    async def leaves_it() -> str:
        left.append(asyncio.ensure_future(stubborn()))
        await asyncio.sleep(0.05)
        return "done"

    async def next_message() -> int:
        before = len(ticks)
        await asyncio.sleep(0.3)
        return len(ticks) - before

    def both() -> tuple[str, int]:
        return event_loop.run(leaves_it()), event_loop.run(next_message())

    assert in_a_thread(both)["value"] == ("done", 0)
