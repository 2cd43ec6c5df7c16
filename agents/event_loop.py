"""One asyncio event loop per worker thread: where ``async def`` handlers, tools and verifiers run.

A worker thread creates its loop the first time it runs async code and keeps it for every message
after (never ``asyncio.run`` per message: a fresh loop per message would also throw away the
thread's HTTP connections). The handler runs *on the worker thread*, so everything the mesh keeps
per thread (the message's claim, its token metering) holds inside it, and dramatiq's ``TimeLimit``
reaches it: the exception it raises asynchronously into the thread lands in the loop (which wakes
every :data:`TICK_S` so it lands promptly even while every task awaits), the handler's task and
whatever it started are cancelled, and the attempt ends ``timeout`` as a sync one does, the loop
left clean for the next message. dramatiq's own ``AsyncIO`` middleware runs every actor's coroutine
on one shared loop in a thread of its own: the thread-local claim would not be there, and its
``TimeLimit`` interrupt cannot reach the coroutine that overran.

A job cancelled while its handler awaits (``mesh cancel``, seen by the lease renewal) cancels the
handler's task: it may catch ``CancelledError`` and return (the output is recorded ``cancelled``);
if it does not, the attempt ends ``cancelled`` all the same.

A handler's tool calls run the sync machinery (:meth:`Context.call`) in a thread of their own
(:func:`in_thread`); an ``async def`` tool's coroutine is sent back to the handler's loop from there
(:func:`resolve`). When the handler ends, its calls in flight are waited for (a cancel lets them
finish, so their effects are in the ledger); an interrupt is raised into them as well, as it would
have stopped a sync handler's call, and the call's "effect unknown" is what the attempt ends with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
from dramatiq.broker import Broker
from dramatiq.middleware import Middleware, TimeLimitExceeded
from dramatiq.threading import raise_thread_exception

from mesh.broker import limits
from mesh.broker.idempotency import acting_for, current_lease
from mesh.contracts import PermanentFailure

T = TypeVar("T")

#: How often a running loop wakes to let an interrupt land and to look at ``ctx.cancelled`` (s).
TICK_S = 0.05
#: How long the cancelled tasks of an interrupted handler get to finish (s).
CLEANUP_S = 1.0

_thread = threading.local()
#: The loop of the handler that a sync call made in a thread of its own (:func:`in_thread`) serves.
_home: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar("mesh_home_loop",
                                                                                          default=None)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop, created the first time it is asked for and reused after."""
    loop: asyncio.AbstractEventLoop | None = getattr(_thread, "loop", None)
    if loop is None or loop.is_closed():
        loop = _thread.loop = asyncio.new_event_loop()
    return loop


def http_client() -> httpx.AsyncClient:
    """The running loop's HTTP client (an ``httpx.AsyncClient`` is bound to the loop it first ran on)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = _clients[loop] = httpx.AsyncClient()
    return client


def close_thread_loop() -> None:
    """Close this thread's loop and its HTTP client, if it made them (its worker thread is stopping)."""
    loop: asyncio.AbstractEventLoop | None = getattr(_thread, "loop", None)
    _thread.loop = None
    if loop is None or loop.is_closed():
        return
    client = _clients.pop(loop, None)
    try:
        if client is not None:
            loop.run_until_complete(client.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


class EventLoops(Middleware):
    """Closes each worker thread's event loop (and its HTTP client) as the thread stops."""

    def before_worker_thread_shutdown(self, broker: Broker, thread: Any) -> None:
        close_thread_loop()


def run(coro: Coroutine[Any, Any, T], *, cancelled: Callable[[], bool] = lambda: False,
        timeout_s: float | None = None) -> T:
    """Run ``coro`` to its end on this thread's loop: cancelled when ``cancelled()`` turns true,
    cut after ``timeout_s`` (TimeLimitExceeded), stopped by an interrupt dramatiq raises into the
    thread. Calls it made in threads (:func:`in_thread`) are waited for (an interrupt is passed on
    to them); tasks it leaves behind are cancelled; the loop stays usable."""
    loop = thread_loop()
    if loop.is_running():
        raise RuntimeError("the mesh's loop is already running on this thread")
    calls: set[_Call] = set()
    context = contextvars.copy_context()
    context.run(_home.set, loop)
    context.run(_calls.set, calls)
    task = loop.create_task(_cut(coro, timeout_s), context=context)
    watch = _Watch(loop, task, cancelled)
    interrupted = True
    try:
        result = loop.run_until_complete(task)
        interrupted = False
        return result
    except asyncio.CancelledError:
        interrupted = False
        if not watch.fired:  # cancelled by the handler's own code: a failure of the handler, retried as one
            raise RuntimeError("the handler's task was cancelled, and not by mesh cancel") from None
        raise PermanentFailure("stopped: the job was cancelled (mesh cancel) while its handler awaited") from None
    except Exception:
        interrupted = False
        raise
    finally:
        watch.stop()
        instead = _end(loop, task, calls, interrupted)
        if instead is not None:
            raise instead


async def _cut(coro: Awaitable[T], timeout_s: float | None) -> T:
    """``coro`` within ``timeout_s``: past it, TimeLimitExceeded as the time limit raises it (no
    args: the Deadline middleware names the limit), so the attempt is classified as a sync one is."""
    if timeout_s is None:
        return await coro
    cut = asyncio.timeout(max(0.0, timeout_s))
    try:
        async with cut:
            return await coro
    except TimeoutError as exc:
        if not cut.expired():  # the handler's own timeout, not the cut
            raise
        raise TimeLimitExceeded() from exc


class _Watch:
    """Wakes the loop every TICK_S (an interrupt raised into the thread lands in Python code, not in
    a ``select`` waiting forever) and cancels ``task`` once ``cancelled()`` says so."""

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], cancelled: Callable[[], bool]) -> None:
        self.loop, self.task, self.cancelled = loop, task, cancelled
        self.fired = False
        self.handle: asyncio.TimerHandle | None = loop.call_later(TICK_S, self.tick)

    def tick(self) -> None:
        if not self.fired and not self.task.done() and self.cancelled():
            self.fired = True
            self.task.cancel("the job was cancelled")
        self.handle = self.loop.call_later(TICK_S, self.tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _end(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], calls: set[_Call],
         interrupted: bool) -> BaseException | None:
    """After the handler: its calls in threads end first (their ledger entries are written by
    them; an interrupt is passed on to them, as it would have reached a sync handler's call), then
    every task it left is cancelled and given CLEANUP_S to end: nothing runs on into the next message
    (a task still running then, one that swallows its cancel, is dropped with the thread's loop,
    which the next message makes anew).
    Interrupted, a call that says its effect is unknown (a tool stopped mid-call) is what the
    attempt ends with, as when the interrupt stops a sync handler's call: the step is ``unknown``."""
    made = list(calls)
    instead: BaseException | None = None
    try:
        if made:
            if interrupted:
                for call in made:
                    call.interrupt()
            loop.run_until_complete(asyncio.wait([c.future for c in made], timeout=CLEANUP_S if interrupted else None))
            for call in made:
                if call.future.done() and not call.future.cancelled():
                    error = call.future.exception()  # retrieved here: the handler may not await it any more
                    if interrupted and instead is None and _effect_unknown(error):
                        instead = error
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=CLEANUP_S))
        for t in pending:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: no "exception was never retrieved" at collection
        if any(not t.done() for t in pending):  # one swallows its cancel: the loop goes, and it with it
            close_thread_loop()
    return instead


def _effect_unknown(error: BaseException | None) -> bool:
    return bool(error is not None and (getattr(error, "context", None) or {}).get("effect_unknown"))


_calls: contextvars.ContextVar[set[_Call] | None] = contextvars.ContextVar("mesh_thread_calls", default=None)


class _Call:
    """A sync call made from a handler in a thread of its own (see :func:`in_thread`)."""

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future
        self.ident: int | None = None
        self.lock = threading.Lock()
        self.running = True

    def interrupt(self) -> None:
        """TimeLimitExceeded into the call's thread, as dramatiq's time limit raises it into a worker's."""
        with self.lock:
            if self.running and self.ident is not None:
                raise_thread_exception(self.ident, TimeLimitExceeded)


async def in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of its own (the loop goes on meanwhile), with this task's context
    (:func:`resolve` finds the handler's loop through it). The handler's end waits for it; an
    interrupt of the handler (its time limit) is raised into it too."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    call = _Call(future)
    calls = _calls.get()
    context = contextvars.copy_context()
    if _home.get() is None:  # a loop not the mesh's (a test's asyncio.run): an async tool is awaited back on it
        context.run(_home.set, loop)
    lease, held = current_lease(), limits.current_held()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def body() -> None:
        call.ident = threading.get_ident()
        try:
            try:
                with acting_for(lease), limits.acting_for(held):
                    outcome: tuple[bool, Any] = (True, context.run(fn))
            finally:
                with call.lock:
                    call.running = False
        except BaseException as exc:  # an interrupt too: it is the call's outcome
            outcome = (False, exc if isinstance(exc, Exception) else _Stopped(exc))
        if calls is not None:
            loop.call_soon_threadsafe(calls.discard, call)
        loop.call_soon_threadsafe(settle, *outcome)

    if calls is not None:
        calls.add(call)
    threading.Thread(target=body, name="mesh-call", daemon=True).start()
    return await asyncio.shield(future)


class _Stopped(Exception):
    """A call's thread ended by an interrupt (a BaseException a future cannot carry): raised as its cause."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"stopped: {type(exc).__name__}")
        self.__cause__ = exc


def resolve(value: T | Awaitable[T]) -> T:
    """``value``, awaited when it is an awaitable (an ``async def`` tool's or verifier's answer),
    from sync code: on the loop of the async handler this call was made for (the caller is in a
    thread of :func:`in_thread`), else on this thread's loop. An interrupt raised into the
    waiting thread cancels the awaitable's task and is raised again."""
    if not isinstance(value, Awaitable):
        return value
    coro = value if isinstance(value, Coroutine) else _awaited(value)
    home = _home.get()
    if home is not None and home.is_running() and not _on(home):
        future = asyncio.run_coroutine_threadsafe(coro, home)
        try:
            while True:
                try:
                    return future.result(timeout=TICK_S)
                except concurrent.futures.TimeoutError:
                    if future.done():
                        return future.result(timeout=0)
        except concurrent.futures.CancelledError:
            # Its task was cancelled (the handler ended under it): stopped mid-call, as an interrupt stops it.
            raise TimeLimitExceeded("stopped mid-call: the handler it was made for ended") from None
        except BaseException:
            future.cancel()
            raise
    loop = thread_loop()
    if loop.is_running() or _on_a_loop():
        coro.close()
        raise RuntimeError("an async tool or verifier called from sync code on a running loop: await it "
                           "(an async handler is given an AsyncContext: AsyncContext(ctx) in a test)")
    return run(coro)


async def _awaited(value: Awaitable[T]) -> T:
    return await value


def _on_a_loop() -> bool:
    """Whether a loop (the mesh's or another, a test's ``asyncio.run``) runs on this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
