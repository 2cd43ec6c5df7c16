"""MCP client sessions, held for a process on an event loop thread of its own (see
:mod:`mesh.agents.tools.mcp` for why): open, call, close, and the loop worker threads hand them to."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import time
import weakref
from contextlib import AsyncExitStack
from typing import Any

from .pins import HINTS, Definition

logger = logging.getLogger(__name__)

#: How often a worker thread waiting for a call wakes (s): a time limit raised into it lands then.
TICK_S = 0.05


class Session:
    """One MCP client session, held by a task on :data:`LOOP` from open to close."""

    def __init__(self, server: str, config: dict[str, Any]) -> None:
        self.server = server
        self.config = config
        self.alive = False
        self.tools: dict[str, Definition] = {}
        self.client: Any = None
        self._stop: asyncio.Event | None = None
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready = loop.create_future()
        self._task = loop.create_task(self._hold())
        OPEN.add(self)
        await asyncio.shield(self._ready)

    async def _hold(self) -> None:
        assert self._ready is not None and self._stop is not None
        try:
            async with AsyncExitStack() as stack:
                self.client = await stack.enter_async_context(await connect(stack, self.config))
                await self.client.initialize()
                self.tools = await list_tools(self.client)
                self.alive = True
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            else:
                logger.warning("MCP session ended", extra={"server": self.server, "error": describe(exc)})
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.alive = False

    async def call(self, tool: str, args: dict[str, Any], meta: dict[str, Any], timeout_s: float) -> Any:
        if not self.alive:
            from mcp import MCPError
            from mcp_types import CONNECTION_CLOSED

            raise MCPError(CONNECTION_CLOSED, "session closed")
        async with asyncio.timeout(timeout_s):
            return await self.client.call_tool(tool, args, meta=meta)

    async def close(self) -> None:
        self.alive = False
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5.0)
            except BaseException:
                self._task.cancel()


async def connect(stack: AsyncExitStack, config: dict[str, Any]) -> Any:
    """The ``ClientSession`` over the transport ``config`` names (not yet entered)."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    if "url" in config:
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        http = await stack.enter_async_context(create_mcp_http_client(headers=config["headers"]))
        read, write = await stack.enter_async_context(streamable_http_client(config["url"], http_client=http))
    else:
        command = config["command"]
        params = StdioServerParameters(command=command[0], args=command[1:], env=config["env"])
        read, write = await stack.enter_async_context(stdio_client(params))
    return ClientSession(read, write)


async def list_tools(client: Any) -> dict[str, Definition]:
    """The server's tools by name, each with the hints the mesh acts on (pinned with it: a server that
    drops a ``destructiveHint`` has the tool refused until an operator accepts the change)."""
    tools: dict[str, Definition] = {}
    cursor = None
    while True:
        from mcp_types import PaginatedRequestParams

        listed = await client.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
        for tool in listed.tools:
            tools[tool.name] = Definition(tool.name, tool.description or "", dict(tool.input_schema or {}),
                                          hints(tool.annotations))
        cursor = listed.next_cursor
        if not cursor:
            return tools


def hints(annotations: Any) -> dict[str, Any]:
    """The annotations of :data:`~.pins.HINTS` a tool gave (by their wire names), none left out as None."""
    given = annotations.model_dump(by_alias=True, exclude_none=True) if annotations is not None else {}
    return {k: given[k] for k in HINTS if k in given}


def describe(exc: BaseException) -> str:
    """An error's text, a task group's first inner error's when it is a group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class McpLoop:
    """The process's event loop for MCP sessions, on a daemon thread started on first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="mesh-mcp", daemon=True).start()
            return self._loop

    def spawn(self, coro: Any) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop())

    def run(self, coro: Any, timeout_s: float) -> Any:
        """``coro``'s result, waited for at most ``timeout_s`` (TimeoutError after: the coroutine is
        cancelled), polling so an exception raised into this thread lands (and cancels it too)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop())
        end = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    return future.result(timeout=max(0.0, min(TICK_S, end - time.monotonic())))
                except concurrent.futures.TimeoutError:
                    if future.done():
                        return future.result(timeout=0)
                    if time.monotonic() >= end:
                        raise TimeoutError(f"no answer in {timeout_s:g}s") from None
        except BaseException:
            future.cancel()
            raise


LOOP = McpLoop()
#: Sessions opened in this process: closed at exit (a stdio server's process ends with its session).
OPEN: weakref.WeakSet[Session] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for session in list(OPEN):
        try:
            LOOP.run(session.close(), 10.0)
        except BaseException as exc:
            logger.warning("could not close an MCP session", extra={"server": session.server, "error": str(exc)})
