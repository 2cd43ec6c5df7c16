"""The provider interface: how agents reach a model, whichever model it is."""

from __future__ import annotations

from typing import Protocol, TypeVar

from pydantic import BaseModel

from mesh.contracts import Findings, Plan

M = TypeVar("M", bound=BaseModel)


class ModelProvider(Protocol):
    """Answers a prompt as a validated instance of the caller's output model; plans and researches
    for the built-in agents. Every call is metered in tokens against the job's budget."""

    name: str

    def complete(self, prompt: str, output: type[M], *, system: str | None = None, model: str | None = None) -> M:
        """``prompt`` answered as an ``output``; ``model`` overrides MESH_MODEL_NAME for this call.
        InvalidOutput when no valid answer came; BudgetExceeded when the job's token budget is spent."""
        ...

    async def acomplete(self, prompt: str, output: type[M], *, system: str | None = None,
                        model: str | None = None) -> M:
        """:meth:`complete` awaited: what ``await ctx.model.complete(...)`` calls in an ``async def``
        handler. The same answer, errors, deadline cut and token metering as ``complete``."""
        ...

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan: ...

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings: ...
