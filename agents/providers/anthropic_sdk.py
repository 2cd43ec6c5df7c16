"""A model provider on the ``anthropic`` SDK (the ``anthropic`` extra): Anthropic's Messages API
(MESH_MODEL_URL, when set, as the SDK's ``base_url``).

Structured output is a forced tool call: the output model's JSON schema is the ``input_schema`` of
the one tool the request offers, and ``tool_choice`` makes the model call it, so the answer is the
call's input, a JSON object. Its token counts are the response's ``usage`` (``input_tokens``,
``output_tokens``); MESH_MODEL_MAX_TOKENS bounds the answer (the API requires a bound). What the
SDKs share (retries off, failures mapped to the mesh's classes, repairs, metering) is :mod:`.sdk`.

A tool loop's turn (``ctx.model.run``) offers the declared tools as ``tools`` without forcing one:
the model's ``tool_use`` blocks are the calls it asks for, their results go back as ``tool_result``
blocks, and a reply without a call is the final answer (the output's JSON schema in the system prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from mesh.contracts import InvalidOutput

from ..tool_loop import Message, ModelTurn, ToolDef, ToolRequest
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

    def _send_turn(self, client: Any, model: str, system: str, messages: list[Message], tools: Sequence[ToolDef],
                   timeout: float) -> Any:
        offered = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]
        return client.messages.create(model=model, max_tokens=self._settings.model_max_tokens, system=system,
                                      messages=wire_messages(messages), timeout=timeout,
                                      **({"tools": offered} if offered else {}))

    def _read_turn(self, response: Any, label: str) -> ModelTurn:
        usage = getattr(response, "usage", None)
        blocks = getattr(response, "content", None)
        if not isinstance(blocks, list):
            raise InvalidOutput(f"{self.dependency} sent no message", agent=label)
        calls = tuple(ToolRequest(str(getattr(b, "id", "")), str(getattr(b, "name", "")),
                                  json.dumps(getattr(b, "input", None) or {}))
                      for b in blocks if getattr(b, "type", None) == "tool_use")
        text = "".join(getattr(b, "text", "") for b in blocks if getattr(b, "type", None) == "text")
        return ModelTurn(text or None, calls, _count(usage, "input_tokens"), _count(usage, "output_tokens"))

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


def wire_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """A tool loop's conversation as the Messages API takes it: an assistant's calls as ``tool_use``
    blocks, the results that answer them as ``tool_result`` blocks of the next user message."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": m["id"], "content": m["content"],
                     **({"is_error": True} if str(m["content"]).startswith("error: ") else {})}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif m["role"] == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": _input(c["arguments"])}
                       for c in m.get("calls") or ()]
            out.append({"role": "assistant", "content": blocks or [{"type": "text", "text": ""}]})
        else:
            out.append({"role": "user", "content": m.get("content") or ""})
    return out


def _input(arguments: str) -> Any:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
