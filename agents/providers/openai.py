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
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from mesh.broker import redact
from mesh.broker.breaker import Breakers
from mesh.broker.classify import error_for_response
from mesh.broker.idempotency import current_lease
from mesh.broker.settings import MeshSettings
from mesh.contracts import Brownout, ConfigError, DeadlineExceeded, DependencyTimeout, Findings, InvalidOutput, Plan

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
                 breakers: Breakers | None = None, meter: Meter | None = None) -> None:
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

    def _ask(self, prompt: str, output: type[M], *, system: str | None, model: str | None = None,
             timeout_s: float | None = None, label: str | None = None) -> M:
        """Ask, validate, and send an invalid answer back with its errors until it is valid or the
        repairs run out."""
        lease = current_lease()
        label = label or (str(lease.envelope.get("agent")) if lease else output.__name__)
        until = time.time() + timeout_s if timeout_s is not None else (
            float(lease.envelope["deadline"]) if lease and "deadline" in lease.envelope else None)
        messages = [{"role": "user", "content": prompt}]
        with self._meter.call(model or self._settings.model_name) as call:
            while True:
                content = self._chat(call, system, messages, output, label, until)
                answer, problem = parsed(content, output)
                if answer is not None:
                    return answer
                if call.repairs >= self._settings.model_repairs:
                    after = f" after {call.repairs} repair(s)" if call.repairs else ""
                    raise InvalidOutput(f"invalid {label} output{after}: {problem}", agent=label,
                                        repairs=call.repairs)
                call.repairs += 1
                log.info("repairing model output", extra={"agent": label, "repair": call.repairs})
                messages += [{"role": "assistant", "content": content},
                             {"role": "user", "content": f"Your reply is invalid: {problem}\n"
                                                         f"Reply again with the corrected JSON object only."}]

    def _chat(self, call: Call, system: str | None, messages: list[dict[str, str]], output: type[BaseModel],
              label: str, until: float | None) -> str:
        """One chat completion (metered, breaker-guarded, cut to ``until``); its message content."""
        mode = self.structured
        prompt, fmt = response_format(mode, output, system)
        body = {"model": call.model, "messages": [{"role": "system", "content": prompt}, *messages],
                "response_format": fmt, "temperature": 0}
        self._meter.admit()
        resp = self._post(body, label, until, schema_refusable=mode == "json_schema")
        if not resp.is_success:  # the endpoint refused json_schema: ask it for json_object from now on
            log.warning("model %s refused response_format json_schema; using json_object", self.dependency)
            self.structured = "json_object"
            return self._chat(call, system, messages, output, label, until)
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

    def _post(self, body: dict[str, Any], label: str, until: float | None, *,
              schema_refusable: bool) -> httpx.Response:
        """POST through the endpoint's breaker; a success, or (``schema_refusable``) a 400 refusing
        ``json_schema``; any other answer raised as the mesh's class."""
        headers = {"Accept": "application/json"}
        if self._settings.model_api_key is not None:
            headers["Authorization"] = f"Bearer {self._settings.model_api_key.get_secret_value()}"
        left = math.inf if until is None else until - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"no time left for a call to {self.dependency}", deadline=until)
        timeout = min(self._settings.model_timeout_s, left)

        def send() -> httpx.Response:
            try:
                resp = self._client.post(self._endpoint, json=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException as exc:
                raise DependencyTimeout(f"{self.dependency} did not answer within {timeout:.2g}s",
                                        dependency=self.dependency) from exc
            except httpx.TransportError as exc:
                raise Brownout(f"{self.dependency} unreachable: {exc}", dependency=self.dependency) from exc
            if resp.is_success or (schema_refusable and _refuses_schema(resp)):
                return resp
            log.warning("model %s answered %s for %s", self.dependency, resp.status_code, label)
            raise error_for_response(resp, dependency=self.dependency)

        return send() if self._breakers is None else self._breakers.call(self.dependency, send)


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
