"""A model provider on the ``openai`` SDK (the ``openai`` extra): OpenAI's API, or any endpoint that
speaks it (MESH_MODEL_URL as the SDK's ``base_url``).

Answers are asked for as structured output, as :mod:`.openai` asks: the output model's JSON schema
as ``response_format`` (``json_schema``), or with MESH_MODEL_STRUCTURED=json_object the schema in
the system prompt. The token counts are the response's ``usage``. A tool loop's turn
(``ctx.model.run``) offers the tools as ``tools`` and reads the ``tool_calls`` asked for. What the
SDKs share (retries off, failures mapped to the mesh's classes, repairs, metering) is :mod:`.sdk`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from mesh.contracts import InvalidOutput

from ..tool_loop import Message, ModelTurn, ToolDef, ToolRequest
from .openai import response_format, wire_message
from .sdk import Answer, SDKProvider


class OpenAISDKProvider(SDKProvider):
    """Asks the chat-completions API through ``openai.OpenAI`` / ``openai.AsyncOpenAI``."""

    name = "openai_sdk"
    module = "openai"
    base_error = "OpenAIError"

    def _make(self, options: dict[str, Any], *, asynchronous: bool) -> Any:
        return (self._sdk.AsyncOpenAI if asynchronous else self._sdk.OpenAI)(**options)

    def _send(self, client: Any, model: str, system: str | None, messages: list[dict[str, Any]],
              output: type[BaseModel], timeout: float) -> Any:
        prompt, fmt = response_format(self._settings.model_structured, output, system)
        return client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": prompt}, *messages], response_format=fmt,
            temperature=0, max_completion_tokens=self._settings.model_max_tokens, timeout=timeout)

    def _send_turn(self, client: Any, model: str, system: str, messages: list[Message], tools: Sequence[ToolDef],
                   timeout: float) -> Any:
        offered = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": t.parameters}} for t in tools]
        return client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": system}, *(wire_message(m) for m in messages)],
            temperature=0, max_completion_tokens=self._settings.model_max_tokens, timeout=timeout,
            **({"tools": offered} if offered else {}))

    def _read_turn(self, response: Any, label: str) -> ModelTurn:
        usage = getattr(response, "usage", None)
        try:
            message = response.choices[0].message
        except (AttributeError, LookupError, TypeError) as exc:
            raise InvalidOutput(f"{self.dependency} sent no chat completion", agent=label) from exc
        calls = tuple(ToolRequest(str(c.id), str(c.function.name), str(c.function.arguments or "{}"))
                      for c in getattr(message, "tool_calls", None) or ())
        content = getattr(message, "content", None)
        return ModelTurn(content if isinstance(content, str) else None, calls,
                         _count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))

    def _read(self, response: Any, label: str) -> Answer:
        usage = getattr(response, "usage", None)
        tokens = (_count(usage, "prompt_tokens"), _count(usage, "completion_tokens"))
        try:
            content = response.choices[0].message.content
        except (AttributeError, LookupError, TypeError) as exc:
            raise InvalidOutput(f"{self.dependency} sent no chat completion", agent=label) from exc
        if not isinstance(content, str):
            raise InvalidOutput(f"{label} output is not text", agent=label)
        return content, *tokens


def _count(usage: Any, field: str) -> int:
    n = getattr(usage, field, None)
    return n if isinstance(n, int) and n > 0 else 0
