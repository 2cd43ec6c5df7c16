"""A model provider for any OpenAI-compatible chat-completions endpoint, spoken over httpx.

Answers are asked for as structured output: the output model's JSON schema as ``response_format``
(``json_schema``); where the endpoint refuses that (a 400 naming it) or MESH_MODEL_STRUCTURED says
so, as a ``json_object`` with the schema in the system prompt, and a refusal is remembered. An
answer that is not JSON or breaks the model is sent back with its validation errors, at most
MESH_MODEL_REPAIRS times, before InvalidOutput. Every request goes through the endpoint's breaker,
is cut to the deadline, and is metered (tokens per attempt, agent and job; a job's token budget
fails closed). Transport and HTTP failures are mapped onto the mesh's error tree so routing can act.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from mesh.broker import redact
from mesh.broker.breaker import Breakers
from mesh.broker.classify import error_for_response
from mesh.broker.idempotency import current_lease
from mesh.broker.settings import MeshSettings
from mesh.contracts import Brownout, ConfigError, DeadlineExceeded, DependencyTimeout, Findings, InvalidOutput, Plan

from ..tool_loop import Message, ModelTurn, ToolDef, ToolRequest, answer_prompt
from ..tools.http import host_port
from .meter import Call, Meter

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_PLAN_RULES = """\
A plan has research steps and action steps; research steps run first, then actions.
- A research step: {"kind": "research", "step_id": "r1", "question": "..."}; ids r1, r2, ...
- An action step: {"kind": "action", "step_id": "a1", "tool": "note" or "http_post",
  "args": {...}, "use_findings": true or false}; ids a1, a2, ...
  Set use_findings to true when the action needs what the research found.
Step ids are unique, lowercase letters, digits, '_' or '-'. Echo the goal back in "goal"."""

_RESEARCH_RULES = """\
Answer the question with a short summary and the findings behind it; each finding has its text
and a source (a path#section or a URL). Echo the question back in "question"."""

PLAN_PROMPT = f"You are the planner of an agent mesh.\n{_PLAN_RULES}"
RESEARCH_PROMPT = f"You are the researcher of an agent mesh.\n{_RESEARCH_RULES}"
_JSON_ONLY = "Reply with one JSON object and nothing else."


class OpenAIProvider:
    """Asks an OpenAI-compatible ``/chat/completions`` endpoint for answers shaped by a pydantic model."""

    name = "openai"

    def __init__(self, settings: MeshSettings, *, client: httpx.Client | None = None,
                 breakers: Breakers | None = None, meter: Meter | None = None,
                 aclient: httpx.AsyncClient | None = None) -> None:
        if settings.model_url is None:
            raise ConfigError("model provider 'openai' needs a model URL: set MESH_MODEL_URL (e.g. .../v1)")
        if settings.model_api_key is not None:
            # The endpoint may echo the key (a 401 body): masked wherever the mesh keeps text.
            try:
                redact.register(settings.model_api_key.get_secret_value(), "MESH_MODEL_API_KEY")
            except redact.SecretTooShort as exc:
                raise ConfigError(str(exc)) from None
        self._settings = settings
        self._endpoint = settings.model_url.rstrip("/") + "/chat/completions"
        # The breaker's name in the allowlist's normal form, as a tool's HTTP dependency is named.
        self.dependency = host_port(settings.model_url)
        self._client = client or httpx.Client()
        self._owns_client = client is None
        #: :meth:`acomplete`'s client; None: the running loop's (:func:`mesh.agents.event_loop.http_client`).
        self._aclient = aclient
        self._breakers = breakers
        self._meter = meter or Meter()
        #: How answers are asked for: json_schema until the endpoint refuses it, then json_object.
        self.structured = settings.model_structured

    def close(self) -> None:
        """Close the HTTP client if this provider created it."""
        if self._owns_client:
            self._client.close()

    def complete(self, prompt: str, output: type[M], *, system: str | None = None, model: str | None = None) -> M:
        """``prompt`` answered as a validated ``output``, within the deadline of the message being
        processed; InvalidOutput when the repairs run out, BudgetExceeded when the job's tokens do."""
        return self._ask(prompt, output, system=system, model=model)

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        """A validated plan for ``goal``; InvalidOutput when the model's answer breaks the contract."""
        return self._ask(goal, Plan, system=PLAN_PROMPT, timeout_s=timeout_s, label="planner")

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        """Validated findings for ``question``; InvalidOutput when the answer breaks the contract."""
        return self._ask(question, Findings, system=RESEARCH_PROMPT, timeout_s=timeout_s, label="researcher")

    async def acomplete(self, prompt: str, output: type[M], *, system: str | None = None,
                        model: str | None = None) -> M:
        """:meth:`complete` on an ``httpx.AsyncClient`` (the running loop's unless one was given):
        the same requests, breaker, deadline cut, repairs, classification and metering."""
        asking = self._asking(prompt, output, system=system, model=model)
        with self._meter.call(asking.model) as call:
            content: str | None = None
            while True:
                request = asking.next(call, content)
                if request is None:
                    return asking.answer
                content = await self._achat(call, request)

    def turn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
             system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """One turn of a tool loop (:mod:`mesh.agents.tool_loop`): the conversation and the tools sent
        as ``tools``; the tool calls asked for (``tool_calls``) or the final text. Metered, breaker-guarded,
        cut to the deadline and classified as :meth:`complete` is."""
        request = self._turn_request(messages, tools, output, system, model)
        with self._meter.call(request.model) as call:
            call.turn = turn
            self._meter.admit()
            post = self._post_args(request)
            post.schema_refusable = False
            return self._turn_reply(call, request.label, self._send(post))

    async def aturn(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel], *,
                    system: str | None = None, model: str | None = None, turn: int = 1) -> ModelTurn:
        """:meth:`turn` on an ``httpx.AsyncClient``."""
        request = self._turn_request(messages, tools, output, system, model)
        with self._meter.call(request.model) as call:
            call.turn = turn
            self._meter.admit()
            post = self._post_args(request)
            post.schema_refusable = False
            return self._turn_reply(call, request.label, await self._asend(post))

    def _turn_request(self, messages: list[Message], tools: Sequence[ToolDef], output: type[BaseModel],
                      system: str | None, model: str | None) -> _TurnRequest:
        asking = self._asking("", output, system=system, model=model)
        return _TurnRequest(asking.model, answer_prompt(system, output), messages, tools, asking.label,
                            asking.request.until)

    def _turn_reply(self, call: Call, label: str, resp: httpx.Response) -> ModelTurn:
        """The turn the endpoint answered, its tokens charged (BudgetExceeded past the job's budget)."""
        try:
            data = resp.json()
            message = data["choices"][0]["message"]
        except (ValueError, LookupError, TypeError) as exc:
            raise InvalidOutput(f"{self.dependency} sent no chat completion", agent=label) from exc
        usage = data.get("usage") if isinstance(data, dict) else None
        tokens_in, tokens_out = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
        self._meter.charge(call, tokens_in, tokens_out)
        calls = []
        for n, asked in enumerate(message.get("tool_calls") or (), 1):
            asked = asked if isinstance(asked, dict) else {}
            fn: dict[str, Any] = asked["function"] if isinstance(asked.get("function"), dict) else {}
            arguments = fn.get("arguments")
            calls.append(ToolRequest(str(asked.get("id") or f"call-{n}"), str(fn.get("name") or ""),
                                     arguments if isinstance(arguments, str) else json.dumps(arguments or {})))
        call.tools = [c.name for c in calls]
        content = message.get("content")
        return ModelTurn(content if isinstance(content, str) else None, tuple(calls), tokens_in, tokens_out)

    def _ask(self, prompt: str, output: type[M], *, system: str | None, model: str | None = None,
             timeout_s: float | None = None, label: str | None = None) -> M:
        """Ask, validate, and send an invalid answer back with its errors until it is valid or the
        repairs run out."""
        asking = self._asking(prompt, output, system=system, model=model, timeout_s=timeout_s, label=label)
        with self._meter.call(asking.model) as call:
            content: str | None = None
            while True:
                request = asking.next(call, content)
                if request is None:
                    return asking.answer
                content = self._chat(call, request)

    def _asking(self, prompt: str, output: type[M], *, system: str | None, model: str | None = None,
                timeout_s: float | None = None, label: str | None = None) -> _Asking[M]:
        lease = current_lease()
        label = label or (str(lease.envelope.get("agent")) if lease else output.__name__)
        until = time.time() + timeout_s if timeout_s is not None else (
            float(lease.envelope["deadline"]) if lease and "deadline" in lease.envelope else None)
        return _Asking(self._settings, output, system, [{"role": "user", "content": prompt}], label, until,
                       model or self._settings.model_name)

    def _chat(self, call: Call, request: _Request) -> str:
        """One chat completion (metered, breaker-guarded, cut to the deadline); its message content."""
        self._meter.admit()
        resp = self._send(self._post_args(request))
        if not resp.is_success:  # the endpoint refused json_schema: ask it for json_object from now on
            return self._chat(call, self._refused(request))
        return self._content(call, request, resp)

    async def _achat(self, call: Call, request: _Request) -> str:
        """:meth:`_chat` awaited on an ``httpx.AsyncClient``."""
        self._meter.admit()
        resp = await self._asend(self._post_args(request))
        if not resp.is_success:
            return await self._achat(call, self._refused(request))
        return self._content(call, request, resp)

    def _send(self, post: _Post) -> httpx.Response:
        """One POST to the endpoint, through its breaker, its failure as the mesh's class."""

        def send() -> httpx.Response:
            with post.classified():
                resp = self._client.post(self._endpoint, **post.kwargs)
            return post.checked(resp)

        return send() if self._breakers is None else self._breakers.call(self.dependency, send)

    async def _asend(self, post: _Post) -> httpx.Response:
        """:meth:`_send` on an ``httpx.AsyncClient`` (the running loop's unless one was given)."""
        from ..event_loop import http_client

        client = self._aclient or http_client()

        async def send() -> httpx.Response:
            with post.classified():
                resp = await client.post(self._endpoint, **post.kwargs)
            return post.checked(resp)

        return await send() if self._breakers is None else await self._breakers.acall(self.dependency, send)

    def _refused(self, request: _Request) -> _Request:
        log.warning("model %s refused response_format json_schema; using json_object", self.dependency)
        self.structured = "json_object"
        return request

    def _content(self, call: Call, request: _Request, resp: httpx.Response) -> str:
        """The answer's text, its tokens charged to the call (BudgetExceeded past the job's budget)."""
        label = request.label
        try:
            data = resp.json()
        except ValueError as exc:
            raise InvalidOutput(f"{self.dependency} sent no chat completion", agent=label) from exc
        usage = data.get("usage") if isinstance(data, dict) else None
        self._meter.charge(call, _count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))
        try:
            content = data["choices"][0]["message"]["content"]
        except (LookupError, TypeError) as exc:
            raise InvalidOutput(f"{self.dependency} sent no chat completion", agent=label) from exc
        if not isinstance(content, str):
            raise InvalidOutput(f"{label} output is not text", agent=label)
        return content

    def _post_args(self, request: _Request | _TurnRequest) -> _Post:
        """How ``request`` is POSTed: body, headers, timeout cut to its deadline (DeadlineExceeded
        when none is left), and how its answers are classified."""
        headers = {"Accept": "application/json"}
        if self._settings.model_api_key is not None:
            headers["Authorization"] = f"Bearer {self._settings.model_api_key.get_secret_value()}"
        until = request.until
        left = math.inf if until is None else until - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"no time left for a call to {self.dependency}", deadline=until)
        timeout = min(self._settings.model_timeout_s, left)
        body = request.body(self.structured)
        return _Post(self.dependency, request.label, timeout, self.structured == "json_schema",
                     {"json": body, "headers": headers, "timeout": timeout})


@dataclass
class _Request:
    """One chat completion to ask: the conversation so far and what the answer must be."""

    model: str
    system: str | None
    messages: list[dict[str, str]]
    output: type[BaseModel]
    label: str
    until: float | None

    def body(self, mode: str) -> dict[str, Any]:
        """The request body, the answer asked for as ``mode`` (``json_schema`` or ``json_object``)."""
        prompt, fmt = response_format(mode, self.output, self.system)
        return {"model": self.model, "messages": [{"role": "system", "content": prompt}, *self.messages],
                "response_format": fmt, "temperature": 0}


@dataclass
class _TurnRequest:
    """One turn of a tool loop to ask: the conversation, the tools offered, how to answer."""

    model: str
    system: str
    messages: list[Message]
    tools: Sequence[ToolDef]
    label: str
    until: float | None

    def body(self, mode: str) -> dict[str, Any]:
        """The request body in the OpenAI wire format (``tools``, ``tool_calls``, ``role: tool``)."""
        body: dict[str, Any] = {"model": self.model, "temperature": 0,
                                "messages": [{"role": "system", "content": self.system},
                                             *(wire_message(m) for m in self.messages)]}
        if self.tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": t.parameters}} for t in self.tools]
        return body


def wire_message(message: Message) -> dict[str, Any]:
    """A message of a tool loop's conversation as the OpenAI chat-completions API takes it."""
    if message["role"] == "tool":
        return {"role": "tool", "tool_call_id": message["id"], "content": message["content"]}
    if message["role"] == "assistant" and message.get("calls"):
        return {"role": "assistant", "content": message.get("content"),
                "tool_calls": [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for c in message["calls"]]}
    return {"role": message["role"], "content": message.get("content") or ""}


@dataclass
class _Post:
    """One POST to the endpoint and how its answer is read."""

    dependency: str
    label: str
    timeout: float
    schema_refusable: bool
    kwargs: dict[str, Any]

    @contextmanager
    def classified(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise DependencyTimeout(f"{self.dependency} did not answer within {self.timeout:.2g}s",
                                    dependency=self.dependency) from exc
        except httpx.TransportError as exc:
            raise Brownout(f"{self.dependency} unreachable: {exc}", dependency=self.dependency) from exc

    def checked(self, resp: httpx.Response) -> httpx.Response:
        """A success, or (``schema_refusable``) a 400 refusing ``json_schema``; any other answer
        raised as the mesh's class (a 429 rate_limited, a 5xx brownout)."""
        if resp.is_success or (self.schema_refusable and _refuses_schema(resp)):
            return resp
        log.warning("model %s answered %s for %s", self.dependency, resp.status_code, self.label)
        raise error_for_response(resp, dependency=self.dependency)


class _Asking(Generic[M]):
    """One ``complete``: the requests it makes, an invalid answer sent back with its errors until it
    is valid (:attr:`answer`) or the repairs run out (InvalidOutput). Both clients drive it."""

    def __init__(self, settings: MeshSettings, output: type[M], system: str | None, messages: list[dict[str, str]],
                 label: str, until: float | None, model: str) -> None:
        self.settings, self.output, self.label, self.model = settings, output, label, model
        self.request = _Request(model, system, messages, output, label, until)
        self.answer: M

    def next(self, call: Call, content: str | None) -> _Request | None:
        """The next request, given the last one's answer (None: none made yet); None once valid."""
        if content is None:
            return self.request
        answer, problem = parsed(content, self.output)
        if answer is not None:
            self.answer = answer
            return None
        if call.repairs >= self.settings.model_repairs:
            after = f" after {call.repairs} repair(s)" if call.repairs else ""
            raise InvalidOutput(f"invalid {self.label} output{after}: {problem}", agent=self.label,
                                repairs=call.repairs)
        call.repairs += 1
        log.info("repairing model output", extra={"agent": self.label, "repair": call.repairs})
        self.request.messages += [{"role": "assistant", "content": content},
                                  {"role": "user", "content": f"Your reply is invalid: {problem}\n"
                                                              f"Reply again with the corrected JSON object only."}]
        return self.request


def schema_name(output: type[BaseModel]) -> str:
    """``output``'s name as the APIs take a schema's or a tool's name (``[A-Za-z0-9_-]``, at most 64)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", output.__name__)[:64]


def response_format(mode: str, output: type[BaseModel], system: str | None) -> tuple[str, dict[str, Any]]:
    """The system prompt and ``response_format`` that ask for ``output`` as JSON: its JSON schema as
    ``json_schema``, or (``json_object``) the schema in the prompt."""
    schema = output.model_json_schema()
    prompt = f"{system}\n{_JSON_ONLY}" if system else _JSON_ONLY
    if mode == "json_schema":
        return prompt, {"type": "json_schema",
                        "json_schema": {"name": schema_name(output), "schema": schema, "strict": False}}
    prompt += f"\nThe object must match this JSON schema:\n{json.dumps(schema, separators=(',', ':'))}"
    return prompt, {"type": "json_object"}


def parsed(content: str, output: type[M]) -> tuple[M | None, str]:
    """The answer as ``output``, or what is wrong with it (said so that a model can fix it)."""
    try:
        data = json.loads(content)
    except ValueError as exc:
        return None, f"not JSON: {exc}"
    try:
        return output.model_validate(data), ""
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        return None, "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors)


def _refuses_schema(resp: httpx.Response) -> bool:
    return resp.status_code == 400 and ("response_format" in resp.text or "json_schema" in resp.text)


def _count(usage: Any, field: str) -> int:
    n = usage.get(field) if isinstance(usage, dict) else None
    return n if isinstance(n, int) and n > 0 else 0
