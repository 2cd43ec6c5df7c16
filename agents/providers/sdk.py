"""What the providers on a vendor's SDK (:mod:`.openai_sdk`, :mod:`.anthropic_sdk`) share.

The SDK's own retries are off (``max_retries=0``): the mesh routes each failure by its class, so an
SDK that retried a 429 or a 500 by itself would spend the job's deadline where the router would
have deferred it or opened the endpoint's breaker. An SDK error becomes the mesh's: an HTTP
answer as :func:`~mesh.broker.classify.error_for_response` maps it (429 ``rate_limited`` with its
``Retry-After``, 5xx ``brownout``, 408/504 ``timeout``, other 4xx ``permanent``), a timeout
``DependencyTimeout``, a connection that failed ``Brownout``.

Each answer is asked for as structured output, validated against the caller's model, and sent back
with its validation errors at most MESH_MODEL_REPAIRS times before InvalidOutput; every request
goes through the endpoint's breaker, is cut to the deadline and is metered (:mod:`.meter`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from mesh.broker import redact
from mesh.broker.breaker import Breakers
from mesh.broker.classify import error_for_response
from mesh.broker.idempotency import current_lease
from mesh.broker.settings import MeshSettings
from mesh.contracts import (
    Brownout,
    ConfigError,
    DeadlineExceeded,
    DependencyTimeout,
    Findings,
    InvalidOutput,
    MeshError,
    Plan,
)

from ..tool_loop import Message, ModelTurn, ToolDef, answer_prompt
from ..tools.http import host_port
from .meter import Call, Meter
from .openai import PLAN_PROMPT, RESEARCH_PROMPT, parsed

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
#: One answer: its text (JSON, to be validated), the prompt's tokens and the answer's.
Answer = tuple[str, int, int]


def sdk(module: str, provider: str) -> ModuleType:
    """The SDK ``module``, or ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"model provider {provider!r} needs the {module} SDK: pip install "
                          f"'agent-mesh[{module}]'") from None


class SDKProvider:
    """A provider asking a vendor's SDK for answers shaped by a pydantic model, synchronously
    (:meth:`complete`) or on an event loop (:meth:`acomplete`). A subclass builds the request and
    reads the answer; this class validates, repairs, meters and maps failures."""

    name = "sdk"
    #: The SDK's module: ``openai`` or ``anthropic``; and the root of its exceptions.
    module = ""
    base_error = ""

    def __init__(self, settings: MeshSettings, *, breakers: Breakers | None = None, meter: Meter | None = None
                 ) -> None:
        self._sdk = sdk(self.module, self.name)
        key = settings.model_api_key.get_secret_value() if settings.model_api_key is not None else None
        if key is not None:
            # The endpoint may echo the key (a 401 body): masked wherever the mesh keeps text.
            try:
                redact.register(key, "MESH_MODEL_API_KEY")
            except redact.SecretTooShort as exc:
                raise ConfigError(str(exc)) from None
        options: dict[str, Any] = {"max_retries": 0, "timeout": settings.model_timeout_s}
        if settings.model_url is not None:
            options["base_url"] = settings.model_url
        if key is not None:
            options["api_key"] = key
        try:
            self._client = self._make(options, asynchronous=False)
        except getattr(self._sdk, self.base_error) as exc:
            raise ConfigError(f"model provider {self.name!r}: {exc}") from None
        self._options = options
        # One async client per event loop: its connections belong to the loop that opened them.
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._settings = settings
        # The breaker's name in the allowlist's normal form, as a tool's HTTP dependency is named.
        self.dependency = host_port(str(self._client.base_url))
        self._breakers = breakers
        self._meter = meter or Meter()

    # -- what a subclass says -------------------------------------------------------------------

    def _make(self, options: dict[str, Any], *, asynchronous: bool) -> Any:
        """The SDK's client (its async client when ``asynchronous``) made with ``options``."""
        raise NotImplementedError

    def _send(self, client: Any, model: str, system: str | None, messages: list[dict[str, Any]],
              output: type[BaseModel], timeout: float) -> Any:
        """One request through ``client`` (for the async client: an awaitable)."""
        raise NotImplementedError

    def _read(self, response: Any, label: str) -> Answer:
        """The answer's text and token counts; InvalidOutput when the response holds no answer."""
        raise NotImplementedError

    def _send_turn(self, client: Any, model: str, system: str, messages: list[Message], tools: Sequence[ToolDef],
                   timeout: float) -> Any:
        """One turn of a tool loop through ``client``: the conversation in the vendor's format, the tools
        offered (for the async client: an awaitable)."""
        raise NotImplementedError

    def _read_turn(self, response: Any, label: str) -> ModelTurn:
        """The tool calls the response asks for, or its final text, and its token counts."""
        raise NotImplementedError

    # -- the provider ---------------------------------------------------------------------------

    def turn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
             system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """One turn of a tool loop (:mod:`mesh.agents.tool_loop`) through the SDK: metered, through
        the endpoint's breaker, cut to the deadline, its failure as the mesh's class."""
        label, until = _where(output, None, None)
        prompt = answer_prompt(system, output)
        with self._meter.call(self._model(model)) as call:
            call.turn = turn
            self._meter.admit()
            timeout = self._timeout(until)
            response = self._guarded(lambda: self._mapped(
                lambda: self._send_turn(self._client, call.model, prompt, messages, tools, timeout), timeout))
            return self._turned(call, response, label)

    async def aturn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
                    system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """:meth:`turn` through the SDK's async client of the running loop."""
        label, until = _where(output, None, None)
        prompt = answer_prompt(system, output)
        with self._meter.call(self._model(model)) as call:
            call.turn = turn
            self._meter.admit()
            timeout = self._timeout(until)
            client = self._aclient()
            response = await self._aguarded(lambda: self._amapped(
                self._send_turn(client, call.model, prompt, messages, tools, timeout), timeout))
            return self._turned(call, response, label)

    def _turned(self, call: Call, response: Any, label: str) -> ModelTurn:
        turned = self._read_turn(response, label)
        self._meter.charge(call, turned.tokens_in, turned.tokens_out)
        call.tools = [c.name for c in turned.calls]
        return turned


    def close(self) -> None:
        """Close the SDK's synchronous client (the async one closes with its event loop's transports)."""
        self._client.close()

    def complete(self, prompt: str, output: type[M], *, system: str | None = None, model: str | None = None) -> M:
        """``prompt`` answered as a validated ``output``, within the deadline of the message being
        processed; InvalidOutput when the repairs run out, BudgetExceeded when the job's tokens do."""
        return self._ask(prompt, output, system=system, model=model)

    async def acomplete(self, prompt: str, output: type[M], *, system: str | None = None,
                        model: str | None = None) -> M:
        """:meth:`complete` on the running event loop, through the SDK's async client."""
        label, until = _where(output, None, None)
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        with self._meter.call(self._model(model)) as call:
            while True:
                self._meter.admit()
                response = await self._arequest(call.model, system, messages, output, self._timeout(until))
                answer = self._answered(call, response, output, label, messages)
                if answer is not None:
                    return answer

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        """A validated plan for ``goal``; InvalidOutput when the model's answer breaks the contract."""
        return self._ask(goal, Plan, system=PLAN_PROMPT, timeout_s=timeout_s, label="planner")

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        """Validated findings for ``question``; InvalidOutput when the answer breaks the contract."""
        return self._ask(question, Findings, system=RESEARCH_PROMPT, timeout_s=timeout_s, label="researcher")

    def _ask(self, prompt: str, output: type[M], *, system: str | None, model: str | None = None,
             timeout_s: float | None = None, label: str | None = None) -> M:
        label, until = _where(output, timeout_s, label)
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
        with self._meter.call(self._model(model)) as call:
            while True:
                self._meter.admit()
                response = self._request(call.model, system, messages, output, self._timeout(until))
                answer = self._answered(call, response, output, label, messages)
                if answer is not None:
                    return answer

    def _request(self, model: str, system: str | None, messages: list[dict[str, Any]], output: type[BaseModel],
                 timeout: float) -> Any:
        """One request, through the breaker, its failure as the mesh's class."""
        return self._guarded(lambda: self._mapped(
            lambda: self._send(self._client, model, system, messages, output, timeout), timeout))

    async def _arequest(self, model: str, system: str | None, messages: list[dict[str, Any]],
                        output: type[BaseModel], timeout: float) -> Any:
        """:meth:`_request` through the SDK's async client of the running loop."""
        client = self._aclient()
        return await self._aguarded(lambda: self._amapped(
            self._send(client, model, system, messages, output, timeout), timeout))

    def _aclient(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._aclients.get(loop)
        if client is None:
            client = self._aclients[loop] = self._make(self._options, asynchronous=True)
        return client

    def _model(self, model: str | None) -> str:
        """The model asked: the call's, else MESH_MODEL_NAME, which must then be set (the SDKs serve
        many models, and the mesh names none of its own)."""
        if model:
            return model
        if "model_name" not in self._settings.model_fields_set:
            raise ConfigError(f"model provider {self.name!r} asks the model a pipeline step (model:) or the call "
                              "names; neither did: set MESH_MODEL_NAME")
        return self._settings.model_name

    def _timeout(self, until: float | None) -> float:
        left = math.inf if until is None else until - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"no time left for a call to {self.dependency}", deadline=until)
        return min(self._settings.model_timeout_s, left)

    def _answered(self, call: Call, response: Any, output: type[M], label: str,
                  messages: list[dict[str, Any]]) -> M | None:
        """The valid answer in ``response`` (its tokens charged); None after adding a repair request
        to ``messages``; InvalidOutput when the repairs have run out."""
        content, tokens_in, tokens_out = self._read(response, label)
        self._meter.charge(call, tokens_in, tokens_out)
        answer, problem = parsed(content, output)
        if answer is not None:
            return answer
        if call.repairs >= self._settings.model_repairs:
            after = f" after {call.repairs} repair(s)" if call.repairs else ""
            raise InvalidOutput(f"invalid {label} output{after}: {problem}", agent=label, repairs=call.repairs)
        call.repairs += 1
        log.info("repairing model output", extra={"agent": label, "repair": call.repairs})
        messages += [{"role": "assistant", "content": content},
                     {"role": "user", "content": f"Your reply is invalid: {problem}\n"
                                                 "Reply again with the corrected JSON object only."}]
        return None

    def _mapped(self, send: Callable[[], T], timeout: float) -> T:
        try:
            return send()
        except Exception as exc:
            mapped = self._error(exc, timeout)
            if mapped is None:
                raise
            raise mapped from exc

    async def _amapped(self, sent: Awaitable[T], timeout: float) -> T:
        try:
            return await sent
        except Exception as exc:
            mapped = self._error(exc, timeout)
            if mapped is None:
                raise
            raise mapped from exc

    def _guarded(self, send: Callable[[], T]) -> T:
        return send() if self._breakers is None else self._breakers.call(self.dependency, send)

    async def _aguarded(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send()`` awaited through the endpoint's breaker: the breaker's bookkeeping (Redis,
        blocking) runs on a thread while the request itself runs on this loop."""
        if self._breakers is None:
            return await send()
        loop = asyncio.get_running_loop()
        breakers = self._breakers

        def blocking() -> T:
            return asyncio.run_coroutine_threadsafe(send(), loop).result()  # type: ignore[arg-type]

        return await asyncio.to_thread(breakers.call, self.dependency, blocking)

    def _error(self, exc: Exception, timeout: float) -> MeshError | None:
        """The mesh's error for an SDK error (None: not the SDK's, raised as it is)."""
        if isinstance(exc, self._sdk.APITimeoutError):
            return DependencyTimeout(f"{self.dependency} did not answer within {timeout:.2g}s",
                                     dependency=self.dependency)
        if isinstance(exc, self._sdk.APIStatusError):
            got = exc.response
            log.warning("model %s answered %s", self.dependency, got.status_code)
            response = httpx.Response(got.status_code, headers=list(got.headers.items()), content=got.content)
            return error_for_response(response, dependency=self.dependency)
        if isinstance(exc, self._sdk.APIConnectionError):
            return Brownout(f"{self.dependency} unreachable: {exc}", dependency=self.dependency)
        return None


def _where(output: type[BaseModel], timeout_s: float | None, label: str | None) -> tuple[str, float | None]:
    """Who asks (the agent of the message being processed, else the output's name) and until when
    (``timeout_s`` from now, else the message's deadline, else no bound)."""
    lease = current_lease()
    label = label or (str(lease.envelope.get("agent")) if lease else output.__name__)
    until = time.time() + timeout_s if timeout_s is not None else (
        float(lease.envelope["deadline"]) if lease and "deadline" in lease.envelope else None)
    return label, until
