"""A model provider for any OpenAI-compatible chat-completions endpoint, spoken over httpx.

Every answer is asked for as a JSON object and validated against the agent's output contract;
transport and HTTP failures are mapped onto the mesh's error tree so routing can act on them.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, cast
from urllib.parse import urlsplit

import httpx

from mesh.broker.breaker import Breakers
from mesh.broker.classify import error_for_response
from mesh.broker.settings import MeshSettings
from mesh.contracts import Brownout, ConfigError, DependencyTimeout, Findings, InvalidOutput, Plan
from mesh.contracts.messages import validate_output

log = logging.getLogger(__name__)

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


def _system_prompt(what: str, schema: dict[str, Any], rules: str) -> str:
    return (
        f"You are the {what} of an agent mesh. Reply with one JSON object and nothing else.\n"
        f"{rules}\nThe object must match this JSON schema:\n{json.dumps(schema, separators=(',', ':'))}"
    )


PLAN_PROMPT = _system_prompt("planner", Plan.model_json_schema(), _PLAN_RULES)
RESEARCH_PROMPT = _system_prompt("researcher", Findings.model_json_schema(), _RESEARCH_RULES)


class OpenAIProvider:
    """Plans and researches by asking an OpenAI-compatible ``/chat/completions`` endpoint for JSON."""

    name = "openai"

    def __init__(self, settings: MeshSettings, *, client: httpx.Client | None = None,
                 breakers: Breakers | None = None) -> None:
        if settings.model_url is None:
            raise ConfigError("model provider 'openai' needs a model URL: set MESH_MODEL_URL (e.g. .../v1)")
        self._settings = settings
        self._endpoint = settings.model_url.rstrip("/") + "/chat/completions"
        parts = urlsplit(settings.model_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.dependency = f"{parts.hostname}:{port}"
        self._client = client or httpx.Client()
        self._owns_client = client is None
        self._breakers = breakers

    def close(self) -> None:
        """Close the HTTP client if this provider created it."""
        if self._owns_client:
            self._client.close()

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan:
        """A validated plan for ``goal``; InvalidOutput when the model's answer breaks the contract."""
        answer = self._complete(PLAN_PROMPT, goal, agent="planner", timeout_s=timeout_s)
        return cast(Plan, validate_output("planner", answer))

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings:
        """Validated findings for ``question``; InvalidOutput when the answer breaks the contract."""
        answer = self._complete(RESEARCH_PROMPT, question, agent="researcher", timeout_s=timeout_s)
        return cast(Findings, validate_output("researcher", answer))

    def _complete(self, system: str, user: str, *, agent: str, timeout_s: float | None) -> Any:
        """POST one chat completion and return its message content decoded from JSON."""
        body = {
            "model": self._settings.model_name,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "response_format": {"type": "json_object"},
            "temperature": 0,
        }
        headers = {"Accept": "application/json"}
        if self._settings.model_api_key is not None:
            headers["Authorization"] = f"Bearer {self._settings.model_api_key.get_secret_value()}"
        timeout = min(self._settings.model_timeout_s, timeout_s or math.inf)

        def send() -> httpx.Response:
            try:
                resp = self._client.post(self._endpoint, json=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException as exc:
                raise DependencyTimeout(f"{self.dependency} did not answer within {timeout:g}s",
                                        dependency=self.dependency) from exc
            except httpx.TransportError as exc:
                raise Brownout(f"{self.dependency} unreachable: {exc}", dependency=self.dependency) from exc
            if not resp.is_success:
                log.warning("model %s answered %s for %s", self.dependency, resp.status_code, agent)
                raise error_for_response(resp, dependency=self.dependency)
            return resp

        resp = send() if self._breakers is None else self._breakers.call(self.dependency, send)
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError) as exc:
            raise InvalidOutput(f"{self.dependency} sent no chat completion", agent=agent) from exc
        if not isinstance(content, str):
            raise InvalidOutput(f"{agent} output is not text", agent=agent)
        try:
            return json.loads(content)
        except ValueError as exc:
            raise InvalidOutput(f"{agent} output is not JSON: {exc}", agent=agent) from exc
