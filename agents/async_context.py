"""``AsyncContext``: what an ``async def`` handler is given, the awaitable face of :class:`Context`.

    @app.agent(tools=["file_ticket"])
    async def triage(ctx: AsyncContext, ticket: Ticket) -> Triage:
        answer = await ctx.model.complete(f"Route: {ticket.text}", output=Triage)
        await ctx.call("file_ticket", {"queue": answer.queue})
        return answer

Every guarantee is the sync context's, from the same code: ``await ctx.call(...)`` runs
:meth:`Context.call` (fencing, breaker, deadline cut, classification, tracing, the effect ledger)
in a thread of its own while the loop goes on; an ``async def`` tool's coroutine is awaited back
on the handler's loop (:func:`mesh.agents.event_loop.resolve`), a sync tool runs in that thread.
Calls are made one at a time, in the order the handler makes them: the ledger numbers effectful
calls in order, and a re-run attempt must meet them in that order. ``await ctx.model.complete(...)``
awaits the provider's ``acomplete``; ``ctx.http`` is :class:`~mesh.agents.tools.http.AsyncGuardedHttp`.
The handler runs on the worker thread's event loop (:mod:`mesh.agents.event_loop`), cut to the
job's deadline, stopped by its time limit and cancelled by ``mesh cancel``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel

from mesh.contracts import ConfigError

from . import event_loop, tool_loop
from .context import Context
from .tools.http import AsyncGuardedHttp

if TYPE_CHECKING:
    from mesh.broker.idempotency import Lease
    from mesh.contracts import Envelope, Findings, Plan
    from mesh.contracts.effects import Verdict

    from .app import AgentSpec, Tool
    from .effects import EffectCalls
    from .providers import ModelProvider
    from .runtime import AgentRuntime

M = TypeVar("M", bound=BaseModel)
Args = TypeVar("Args", bound=BaseModel)
R = TypeVar("R")


class AsyncContext:
    """The step an ``async def`` handler runs: :class:`Context`'s identity, budget and guards, its
    tool calls, model and HTTP awaited."""

    def __init__(self, context: Context) -> None:
        self.sync = context
        self._one_call: asyncio.Lock | None = None
        self._in_flight: asyncio.Future[Any] | None = None

    @property
    def runtime(self) -> AgentRuntime:
        return self.sync.runtime

    @property
    def env(self) -> Envelope:
        return self.sync.env

    @property
    def spec(self) -> AgentSpec:
        return self.sync.spec

    @property
    def lease(self) -> Lease:
        return self.sync.lease

    @property
    def key(self) -> str:
        """The message's idempotency key."""
        return self.env.key

    @property
    def job_id(self) -> str:
        return self.env.job_id

    @property
    def trace_id(self) -> str:
        return self.env.trace_id

    @property
    def step_id(self) -> str:
        return self.env.step_id

    @property
    def agent(self) -> str:
        return self.env.agent

    @property
    def attempt(self) -> int:
        """1 on the first delivery, one more per retry (a deferral keeps it)."""
        return self.env.attempt

    @property
    def token(self) -> int:
        """The fencing token of this attempt's claim (:attr:`Context.token`)."""
        return self.sync.token

    @property
    def deadline(self) -> float:
        return self.sync.deadline

    @property
    def cancelled(self) -> bool:
        """The job was cancelled (:attr:`Context.cancelled`); the handler's task is cancelled too."""
        return self.sync.cancelled

    @property
    def effects(self) -> EffectCalls:
        return self.sync.effects

    def effect(self) -> Verdict | None:
        return self.sync.effect()

    def deadline_left_s(self) -> float:
        """Seconds until the deadline, on the Redis server's clock."""
        return self.sync.deadline_left_s()

    def progress(self, note: str) -> None:
        """The handler moved on (:meth:`Context.progress`)."""
        self.sync.progress(note)

    @property
    def model(self) -> AsyncModel:
        """The worker's provider, its ``complete`` awaited (the provider's ``acomplete``)."""
        return AsyncModel(self.sync.model, self)

    @property
    def http(self) -> AsyncGuardedHttp:
        """HTTP with the sync context's guards (allowlist, pinning, lease confirmed, breakers), awaited."""
        guarded = self.sync.http  # the sync context's guards, whatever the context (a TestContext's too)
        return AsyncGuardedHttp(guarded.tool, guarded.confirm, client=guarded.tool.aclient)

    @overload
    async def call(self, tool: Tool[Args, Coroutine[Any, Any, R]], args: Args | dict[str, Any]) -> R: ...
    @overload
    async def call(self, tool: Tool[Args, R], args: Args | dict[str, Any]) -> R: ...
    @overload
    async def call(self, tool: str, args: BaseModel | dict[str, Any]) -> Any: ...

    async def call(self, tool: Tool[Any, Any] | str, args: BaseModel | dict[str, Any]) -> Any:
        """Call a tool this agent declared: :meth:`Context.call`, awaited (see the module docstring);
        typed as it is (``await ctx.call(post_hook, Hook(...))`` returns what the tool returns)."""
        if self._one_call is None:
            self._one_call = asyncio.Lock()
        async with self._one_call:
            if self._in_flight is not None:  # a call the handler stopped awaiting (cancelled) ends first
                await asyncio.wait([self._in_flight])
            self._in_flight = call = asyncio.ensure_future(event_loop.in_thread(lambda: self.sync.call(tool, args)))
            call.add_done_callback(_retrieved)
            return await asyncio.shield(call)


def _retrieved(call: asyncio.Future[Any]) -> None:
    """A call's outcome marked read: a cancelled handler no longer awaits it (its effect is the ledger's)."""
    if not call.cancelled():
        call.exception()


class AsyncModel:
    """``ctx.model`` of an async handler: ``await ctx.model.complete(...)`` (the provider's
    ``acomplete``); ``plan`` and ``research`` awaitable too. Other attributes are the provider's."""

    def __init__(self, provider: ModelProvider, context: AsyncContext | None = None) -> None:
        self.provider = provider
        self.name = provider.name
        self.context = context

    async def run(self, prompt: str, *, output: type[M], tools: Sequence[Tool[Any, Any] | str] | None = None,
                  max_turns: int = 10, system: str | None = None, model: str | None = None) -> M:
        """:meth:`StepModel.run <mesh.agents.context.StepModel.run>` awaited: the provider's turns
        awaited (``aturn``), each tool call through ``await ctx.call`` (one at a time, in order)."""
        context = self.context
        if context is None:
            raise ConfigError("ctx.model.run needs the step's context: call it as await ctx.model.run(...)")
        provider = getattr(self.provider, "provider", self.provider)  # the StepModel's own provider
        step_model = getattr(self.provider, "model", None)
        return await tool_loop.arun(context.sync, provider, lambda spec, args: context.call(spec.name, args), prompt,
                                    tools=tools, output=output, max_turns=max_turns, system=system,
                                    model=model or (step_model if isinstance(step_model, str) else None))

    async def complete(self, prompt: str, output: type[M], *, system: str | None = None,
                       model: str | None = None) -> M:
        """``prompt`` answered as a validated ``output`` (:meth:`ModelProvider.complete`), awaited."""
        return await self.provider.acomplete(prompt, output, system=system, model=model)

    async def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        return await event_loop.in_thread(lambda: self.provider.plan(goal, timeout_s=timeout_s))

    async def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        return await event_loop.in_thread(lambda: self.provider.research(question, timeout_s=timeout_s))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.provider, attr)


def run_handler(context: Context, payload: BaseModel) -> Any:
    """Run the ``async def`` handler of ``context``'s agent on this worker thread's loop, cut to the
    job's deadline and cancelled with the job (see :mod:`mesh.agents.event_loop`)."""
    handler = context.spec.handler
    return event_loop.run(handler(AsyncContext(context), payload), cancelled=lambda: context.cancelled,
                          timeout_s=context.deadline_left_s())
