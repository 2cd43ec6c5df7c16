"""A model provider on the ``anthropic`` SDK (the ``anthropic`` extra): Anthropic's Messages API
(MESH_MODEL_URL, when set, as the SDK's ``base_url``).

Structured output is a forced tool call: the output model's JSON schema is the ``input_schema`` of
the one tool the request offers, and ``tool_choice`` makes the model call it, so the answer is the
call's input, a JSON object. Its token counts are the response's ``usage`` (``input_tokens``,
``output_tokens``); MESH_MODEL_MAX_TOKENS bounds the answer (the API requires a bound). What the
SDKs share (retries off, failures mapped to the mesh's classes, repairs, metering) is :mod:`.sdk`.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from mesh.contracts import InvalidOutput

from .openai import schema_name
from .sdk import Answer, SDKProvider

_ANSWER = "Answer by calling the tool {name} once, its input the answer."


class AnthropicProvider(SDKProvider):
    """Asks the Messages API through ``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic``."""

    name = "anthropic"
    module = "anthropic"
    base_error = "AnthropicError"

    def _make(self, options: dict[str, Any], *, asynchronous: bool) -> Any:
        return (self._sdk.AsyncAnthropic if asynchronous else self._sdk.Anthropic)(**options)

    def _send(self, client: Any, model: str, system: str | None, messages: list[dict[str, Any]],
              output: type[BaseModel], timeout: float) -> Any:
        name = schema_name(output)
        tool = {"name": name, "description": f"Give the answer as a {output.__name__}.",
                "input_schema": output.model_json_schema()}
        instruction = _ANSWER.format(name=name)
        return client.messages.create(
            model=model, max_tokens=self._settings.model_max_tokens,
            system=f"{system}\n{instruction}" if system else instruction, messages=messages, tools=[tool],
            tool_choice={"type": "tool", "name": name}, timeout=timeout)

    def _read(self, response: Any, label: str) -> Answer:
        usage = getattr(response, "usage", None)
        tokens = (_count(usage, "input_tokens"), _count(usage, "output_tokens"))
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise InvalidOutput(f"{self.dependency} sent no message", agent=label)
        for block in blocks:
            if getattr(block, "type", None) == "tool_use":
                return json.dumps(getattr(block, "input", None)), *tokens
        # No tool call: its text, if any, is validated (and sent back to be repaired) like any answer.
        text = "".join(getattr(b, "text", "") for b in blocks if getattr(b, "type", None) == "text")
        return text, *tokens


def _count(usage: Any, field: str) -> int:
    n = getattr(usage, field, None)
    return n if isinstance(n, int) and n > 0 else 0
