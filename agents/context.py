"""``Context``: what a handler is given. Every guarantee the mesh gives reaches user code here.

    ctx.key, ctx.job_id, ctx.trace_id, ctx.step_id, ctx.attempt, ctx.token   the message's identity
    ctx.deadline_left_s()                                                     the budget left (s)
    ctx.progress("fetched 3 pages")                                           the step moved on
    ctx.cancelled                                                             the job was cancelled
                                                                              (mesh cancel): stop
    ctx.model                                                                 the model provider (a
                                                                              pipeline step's ``model``
                                                                              as its default model)
    ctx.call(file_ticket, FileTicket(...))                                    a declared tool (or its
                                                                              name): traced,
                                                                              breaker-guarded, cut to
                                                                              the deadline, classified,
                                                                              fenced (the lease is
                                                                              confirmed in Redis first)
    ctx.http.post(url, json=...)                                              HTTP with the same guards,
                                                                              MESH_HTTP_ALLOW applied

Secrets are not on the context: a tool reads the ones it declared (``ToolContext.secret``), and the
credential minted for the call (``ToolContext.credential``, ``@app.tool(mint=...)``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import httpx
from dramatiq.middleware import TimeLimitExceeded
from pydantic import BaseModel, ValidationError

from mesh.broker import limits, redact, trace
from mesh.broker.classify import error_for_response
from mesh.contracts import (
    Brownout,
    ConfigError,
    ContractError,
    DependencyTimeout,
    Envelope,
    LeaseLost,
    MeshError,
    ToolRefused,
)
from mesh.contracts.approvals import Decision, call_hash
from mesh.contracts.effects import Verdict, summary

from . import credentials, tool_loop
from .effects import EffectCalls
from .event_loop import resolve
from .tools.base import ToolContext
from .tools.http import GuardedHttp

if TYPE_CHECKING:
    from mesh.broker.idempotency import Lease
    from mesh.contracts import Findings, Plan

    from .app import AgentSpec, Tool, ToolSpec
    from .providers import ModelProvider
    from .runtime import AgentRuntime

M = TypeVar("M", bound=BaseModel)
Args = TypeVar("Args", bound=BaseModel)
R = TypeVar("R")
logger = logging.getLogger(__name__)


def validated_args(spec: ToolSpec, args: BaseModel | dict[str, Any]) -> BaseModel:
    """``args`` as ``spec``'s args model (a model of another class by its fields); ContractError
    with pydantic's errors when they do not fit."""
    if isinstance(args, spec.args):
        return args
    try:
        return spec.args.model_validate(args.model_dump(mode="json") if isinstance(args, BaseModel) else args)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise ContractError(f"invalid {spec.name} args: {exc.error_count()} error(s)", errors=errors) from None  # type: ignore[arg-type]


def read_secret(name: str, secrets_dir: str | None) -> str:
    """A secret by name, at run time: the worker's environment, else a file in MESH_SECRETS_DIR.
    Its value is registered for redaction: it never appears in a log line, trace, job record, output
    or dead letter. A value shorter than 8 characters is refused (ConfigError): it could not be masked."""
    value = os.environ.get(name)
    if value is None and secrets_dir:
        path = Path(secrets_dir) / name
        if path.is_file():
            value = path.read_text().strip()
    if value is None:
        raise ConfigError(f"secret {name} is not set (environment or MESH_SECRETS_DIR)", secret=name, unset=True)
    try:
        redact.register(value, name)
    except redact.SecretTooShort as exc:
        raise ConfigError(str(exc), secret=name) from None
    return value


#: Methods that change nothing at the endpoint: they confirm a stale lease only, not every time.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Context:
    """The step a handler runs: its identity, budget, model, tools and guarded HTTP."""

    runtime: AgentRuntime
    env: Envelope
    spec: AgentSpec
    lease: Lease
    #: ``ctx.http``'s tool context: made at its first use (most handlers make no HTTP call).
    _tool_ctx: ToolContext | None = field(init=False, default=None)
    _effects: EffectCalls | None = field(init=False, default=None)
    #: Effectful calls go through the step's effect ledger (:attr:`effects`).
    _ledger = True
    #: The key a tool loop's call gives its tool (``<key>/turn-3/call-1``); None: the message's key.
    _call_key: str | None = field(init=False, default=None)
    #: How many tool loops (``ctx.model.run``) this attempt started (:mod:`mesh.agents.tool_loop`).
    _loops: int = field(init=False, default=0)

    def _handler_tools(self) -> ToolContext:
        """The handler's own tool context (``ctx.http``'s), under the message's key whatever tool loop
        call is under way, as when it was made with the context. ``_call_key`` is left as it is: a
        loop's call may be running in another thread (an async handler's), and reads it."""
        if self._tool_ctx is None:
            tools = self._tool_context(None)
            self._tool_ctx = tools if tools.key == self.env.key else dataclasses.replace(tools, key=self.env.key)
        return self._tool_ctx

    @property
    def effects(self) -> EffectCalls:
        """This attempt's effectful calls, through the step's ledger (:mod:`mesh.agents.effects`)."""
        if self._effects is None:
            from mesh.broker.ledger import Ledger

            rt = self.runtime
            ledger = Ledger(rt.redis, rt.keys, self.env.job_id, self.env.step_id, rt.settings.dedup_ttl_s)
            self._effects = EffectCalls(ledger, self.env.key, self.lease.token, report=self._verdict)
        return self._effects

    def effect(self) -> Verdict | None:
        """What this attempt's effectful calls came to, the worst of them (None: it made none)."""
        return None if self._effects is None else summary(self._effects.verdicts)

    def _verdict(self, tool: str, n: int, verdict: Any, reason: str | None) -> None:
        """Trace an effectful call's verdict (``verified``, ``unverified``, ...) on the job's timeline."""
        ev = trace.event("effect", trace.fields_of(self.env), worker=self.runtime.worker, tool=tool,
                         call=n, verdict=str(verdict), reason=reason, token=self.lease.token)
        try:
            trace.emit(self.runtime.redis, self.runtime.keys, ev)
        except Exception as exc:  # a trace line: the ledger holds the verdict
            logger.warning("could not trace an effect's verdict", extra={"error": str(exc)})

    key = property(lambda self: self.env.key)
    job_id = property(lambda self: self.env.job_id)
    trace_id = property(lambda self: self.env.trace_id)
    step_id = property(lambda self: self.env.step_id)
    agent = property(lambda self: self.env.agent)
    attempt = property(lambda self: self.env.attempt)

    @property
    def token(self) -> int:
        """The fencing token of this attempt's claim: pass it to effects that compare tokens. For a key
        shared across shards (broker/shared_claims.py), the token of the claim in the key's shard, the one
        every job's attempt on the key takes its token from, so a takeover's is higher there too (the
        job's own claim's token comes from its shard's counter, not comparable with another shard's)."""
        across = self.lease.across
        return across.token if across is not None else self.lease.token

    @property
    def deadline(self) -> float:
        return self.env.deadline

    @property
    def cancelled(self) -> bool:
        """The job was cancelled (``mesh cancel``), seen within one lease renewal: stop and return (or
        raise); whatever the handler returns now is recorded ``cancelled``, never ``succeeded``."""
        return self.lease.cancelled

    def deadline_left_s(self) -> float:
        """Seconds until the deadline, on the Redis server's clock (the deadline's)."""
        return self.env.remaining_s(self.runtime.clock.now_s())

    @property
    def model(self) -> StepModel:
        """The worker's provider (:class:`StepModel`): for a pipeline step that names a ``model``, its
        ``complete`` uses that model unless the call names another; ``run`` lets the model call tools."""
        return StepModel(self.runtime.provider, self.env.model, self)

    @property
    def http(self) -> GuardedHttp:
        return GuardedHttp(self._handler_tools(), lambda method: self._confirm(
            f"http {method.upper()}", effect=method.upper() not in SAFE_METHODS))

    def progress(self, note: str) -> None:
        """The handler moved on: a step that only heartbeats without this is reported stuck."""
        self.runtime.progress(self.env, note)

    @overload
    def call(self, tool: Tool[Args, Coroutine[Any, Any, R]], args: Args | dict[str, Any]) -> R: ...
    @overload
    def call(self, tool: Tool[Args, R], args: Args | dict[str, Any]) -> R: ...
    @overload
    def call(self, tool: str, args: BaseModel | dict[str, Any]) -> Any: ...

    def call(self, tool: Tool[Any, Any] | str, args: BaseModel | dict[str, Any]) -> Any:
        """Call a tool this agent declared (``tools=[...]``): traced, breaker-guarded, classified;
        an effectful call that returned is remembered, so the attempt is never re-run blindly.
        ``tool`` is the declared tool (``ctx.call(post_hook, Hook(...))``, typed: it returns what the
        tool's signature says) or its name."""
        tool = tool if isinstance(tool, str) else tool.name
        spec = self.runtime.app.tools.get(tool) if tool in self.spec.tools else None
        if spec is None:
            raise ToolRefused(f"agent {self.spec.name!r} did not declare tool {tool!r}; it declared "
                              f"{list(self.spec.tools) or 'none'}", tool=tool)
        typed = validated_args(spec, args)
        self._confirm(spec.name, effect=spec.effect)
        if spec.effect:
            # Through the ledger: intent before the call, outcome and verdict after; a re-run
            # attempt gets the recorded result or the verifier's word, never a blind second call.
            dependency = spec.target(typed) if spec.dependency is not None else None
            result = self.effects.call(spec, typed, self._tool_context(spec, dependency),
                                       lambda: self._run(spec, typed))
            if spec.compensate:
                # What undoes this call should the job halt or be cancelled: also for a call the
                # ledger answered from an earlier attempt (it happened, so it is undone too).
                # Its wire names (by alias), as the call was made: the compensating tool validates them.
                self.lease.undo_calls.append({"tool": spec.compensate,
                                              "args": typed.model_dump(mode="json", by_alias=True)})
            return result
        return self._run(spec, typed)

    def _loop_tools(self, tools: Sequence[Tool[Any, Any] | str] | None) -> list[ToolSpec]:
        """The declared tools a tool loop offers the model (:mod:`mesh.agents.tool_loop`)."""
        names = tool_loop.offered(self.spec.tools, tools, self.spec.name)
        return [self.runtime.app.tools[name] for name in names]

    def _describe(self, spec: ToolSpec) -> tuple[str, dict[str, Any] | None, bool]:
        """How a tool loop shows ``spec`` to the model: its description and args JSON schema (None:
        its args model's), and whether each call waits for a person's approval. An MCP tool's are its
        server's, once they match its pin (ToolRefused when they changed): the model reads what an
        operator accepted, nothing else; one its server says is destructive waits for approval."""
        server, tool = getattr(spec.args, "server", None), getattr(spec.args, "tool", "")
        if server is None:
            return spec.description, None, spec.destructive
        definition, destructive = server.definition(self._tool_context(spec), tool)
        return (definition.description or spec.description, definition.input_schema or None,
                spec.destructive or destructive)

    def _checkpoints(self) -> tool_loop.Checkpoints:
        """Where this step's tool loop keeps its turns and calls (:mod:`mesh.broker.transcript`)."""
        from mesh.broker.transcript import Transcript

        rt = self.runtime
        return Transcript(rt.redis, rt.keys, self.env.job_id, self.env.step_id, rt.settings.dedup_ttl_s)

    def _loop_event(self, kind: str, **fields: Any) -> None:
        """Trace what a tool loop did without a call (a call replayed, one the model invented)."""
        ev = trace.event(kind, trace.fields_of(self.env), worker=self.runtime.worker,
                         **{k: redact.redact_value(v) for k, v in fields.items()})
        try:
            trace.emit(self.runtime.redis, self.runtime.keys, ev)
        except Exception as exc:  # a trace line: the loop goes on without it
            logger.warning("could not trace a tool loop event", extra={"error": str(exc)})

    def _approve(self, spec: ToolSpec, args: BaseModel) -> None:
        """A destructive call of a tool loop may be made: this step holds a person's approval of
        exactly it, or CallNeedsApproval (the worker parks the step asking for it)."""
        call = {"tool": spec.name, "args": args.model_dump(mode="json", by_alias=True)}
        record = self.runtime.jobs.get(self.env.job_id)
        if record is None or not record.pipeline_digest:
            raise ToolRefused(f"tool {spec.name!r} is destructive: each call waits for a person's approval, and "
                              "only a pipeline's step can wait; run the agent in a pipeline", tool=spec.name)
        digest = call_hash(call, f"{self.env.job_id}/{self.env.step_id}", record.pipeline_digest)
        step = record.steps.get(self.env.step_id)
        approval = step.approval if step is not None else None
        if approval is not None and approval.decision is Decision.APPROVED and approval.hash == digest:
            return
        raise tool_loop.CallNeedsApproval(f"{spec.name} is destructive: its call {digest[:12]} waits for a "
                                          "person's approval", call=call, hash=digest)

    def undo(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        """Run a compensation of tool calls (``{"tool", "args"}``, in the order given: last call
        first): each through the same guards as :meth:`call`, whichever agent declared the tool."""
        for done, undo in enumerate(calls):
            spec = self.runtime.app.tools.get(str(undo.get("tool")))
            if spec is None:
                raise ConfigError(f"compensating tool {undo.get('tool')!r} is not declared by app "
                                  f"{self.runtime.app.name!r} ({done} of {len(calls)} calls undone)")
            try:
                typed = spec.args.model_validate(undo.get("args") or {})
            except ValidationError as exc:
                raise ContractError(f"{spec.name} cannot take the args of the call it undoes: "
                                    f"{exc.error_count()} error(s)") from None
            self._confirm(spec.name, effect=spec.effect)
            if spec.effect:  # through the ledger: a compensation re-run after a crash never undoes twice blindly
                dependency = spec.target(typed) if spec.dependency is not None else None
                self.effects.call(spec, typed, self._tool_context(spec, dependency),
                                  functools.partial(self._run, spec, typed))
            else:
                self._run(spec, typed)
        return {"undone": len(calls)}

    def _confirm(self, call: str, *, effect: bool) -> None:
        """The attempt's lease holds its key now (checked in Redis when :class:`~mesh.broker.fence.Fence`
        says so), or LeaseLost: the new owner carries the work, this attempt acts no more. A refusal
        is traced with the refused token."""
        try:
            self.runtime.fence.confirm(self.lease, effect=effect)
        except LeaseLost:
            self.runtime.fenced(self.env, call, self.lease.token)
            raise

    def _run(self, spec: ToolSpec, args: BaseModel) -> Any:
        dependency = spec.target(args) if spec.dependency is not None else "mesh"
        tool_ctx = self._tool_context(spec, dependency if spec.dependency is not None else None)
        started = time.monotonic()
        outcome: dict[str, Any] = {}
        try:
            if spec.mint is not None:  # a fresh credential for each call, each attempt: never one kept
                tool_ctx = dataclasses.replace(tool_ctx, minted=self._mint(spec, args, tool_ctx))
            if spec.dependency is None:
                result = resolve(spec.run(tool_ctx, args))
            else:
                limits.call_made(dependency)
                result = tool_ctx.guarded(dependency, lambda: _classified(dependency, spec.run, tool_ctx, args))
            if spec.effect:
                self.lease.effects += 1
            detail = getattr(result, "detail", None)
            outcome = {"status": detail.get("status") if isinstance(detail, dict) else "ok"}
            return result
        except TimeLimitExceeded as exc:
            # Stopped mid-call: the tool may have acted. The effect cannot be proven either way.
            outcome = {"error": "time limit"}
            raise DependencyTimeout(f"{spec.name} hit its time limit; its effect is unknown", tool=spec.name,
                                    effect_unknown=spec.effect) from exc
        except Exception as exc:
            outcome = {"error": redact.redact(str(exc))}
            raise
        finally:
            if outcome:  # not when interrupted otherwise (a shutdown): the attempt is abandoned, not traced
                self.runtime.tool_call(self.env, spec.name, dependency, time.monotonic() - started,
                                       token=self.token, **outcome)

    def _mint(self, spec: ToolSpec, args: BaseModel, tool_ctx: ToolContext) -> credentials.Credential:
        """A credential for this call of ``spec``. Stopped by the time limit while minting, the tool
        was not called: a timeout whose effect is known not to have happened (the ledger says failed)."""
        try:
            return credentials.mint(spec, args, tool_ctx, self.env)
        except TimeLimitExceeded as exc:
            raise DependencyTimeout(f"{spec.name}: its credential minter was still running at the time limit; "
                                    "not called", tool=spec.name, effect_unknown=False) from exc

    def _tool_context(self, spec: ToolSpec | None, dependency: str | None = None) -> ToolContext:
        """What ``spec`` is given (None: the handler's own ``ctx.http``): its secrets and allowlist."""
        rt = self.runtime
        secrets = spec.secrets if spec is not None else ()
        allow = spec.allowlist(rt.settings) if spec is not None else None
        return ToolContext(key=self._call_key or self.env.key, job_id=self.env.job_id, trace_id=self.env.trace_id,
                           fencing_token=self.token, deadline=self.env.deadline, clock=rt.clock.now_s,
                           breakers=rt.breakers, settings=rt.settings, redis=rt.redis, keys=rt.keys,
                           client=rt.http, resolve=rt.resolve, allow=allow, dependency=dependency,
                           secrets={name: read_secret(name, rt.settings.secrets_dir) for name in secrets})


class StepModel:
    """``ctx.model``: the worker's provider, whose ``complete`` defaults to ``model`` (a pipeline
    step's; None: MESH_MODEL_NAME), and whose :meth:`run` lets the model call the step's tools
    through ``context``. Everything else is the wrapped provider's."""

    def __init__(self, provider: ModelProvider, model: str | None, context: Context | None = None) -> None:
        self.provider = provider
        self.model = model
        self.name = provider.name
        self.context = context

    def run(self, prompt: str, *, output: type[M], tools: Sequence[Tool[Any, Any] | str] | None = None,
            max_turns: int = 10, system: str | None = None, model: str | None = None) -> M:
        """``prompt`` answered as a validated ``output`` by the model, which may call ``tools`` (the
        agent's declared tools, all of them when None) first: each call through :meth:`Context.call`,
        each turn and call checkpointed on the step. See :mod:`mesh.agents.tool_loop`."""
        if self.context is None:
            raise ConfigError("ctx.model.run needs the step's context: call it as ctx.model.run(...)")
        context = self.context
        return tool_loop.run(context, self.provider, lambda spec, args: context.call(spec.name, args), prompt,
                             tools=tools, output=output, max_turns=max_turns, system=system,
                             model=model or self.model)

    def complete(self, prompt: str, output: type[M], *, system: str | None = None, model: str | None = None) -> M:
        return self.provider.complete(prompt, output, system=system, model=model or self.model)

    async def acomplete(self, prompt: str, output: type[M], *, system: str | None = None,
                        model: str | None = None) -> M:
        return await self.provider.acomplete(prompt, output, system=system, model=model or self.model)

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        return self.provider.plan(goal, timeout_s=timeout_s)

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        return self.provider.research(question, timeout_s=timeout_s)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.provider, attr)  # the provider's other attributes (``dependency``, ``close``, ...)


def _classified(dependency: str, run: Any, tool_ctx: ToolContext, args: BaseModel) -> Any:
    """Run a tool, its raw HTTP failures raised as the mesh's classes, so its breaker counts them."""
    try:
        return resolve(run(tool_ctx, args))
    except MeshError:
        raise
    except httpx.HTTPStatusError as exc:
        raise error_for_response(exc.response, dependency=dependency) from exc
    except httpx.TimeoutException as exc:
        raise DependencyTimeout(f"{dependency} timed out: {exc}", dependency=dependency,
                                effect_unknown=True) from exc
    except httpx.TransportError as exc:
        raise Brownout(f"{dependency} unreachable: {exc}", dependency=dependency) from exc
