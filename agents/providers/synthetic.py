"""A valid instance of any output model, built from its JSON schema and a prompt: the local
provider's stand-in answer, for tests and demos (it reads nothing; it is not a model).

Required fields only (the others keep their defaults): strings are the prompt's words, cut or
padded to their length bounds; integers a hash of the prompt and the field's path within their
bounds (0..100 without); numbers 90% of the way through their range (0.9 in [0, 1]); booleans
true; enums and unions their first choice; arrays one item (or their minimum); nested models
recursively. The same prompt always gives the same instance.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from mesh.contracts import InvalidOutput

M = TypeVar("M", bound=BaseModel)


def synthesize(output: type[M], prompt: str) -> M:
    """An ``output`` answering ``prompt``; InvalidOutput where the schema asks what this cannot
    build (a pattern, a custom validator)."""
    schema = output.model_json_schema()
    value = _value(schema, schema.get("$defs", {}), " ".join(re.findall(r"\w+", prompt)) or "answer", "$")
    try:
        return output.model_validate(value)
    except ValidationError as exc:
        raise InvalidOutput(f"the local provider cannot build a valid {output.__name__}: {exc}",
                            agent=output.__name__) from None


def synthesize_json(schema: dict[str, Any], prompt: str) -> Any:
    """A value of JSON ``schema`` answering ``prompt`` (an MCP tool's ``inputSchema``: no model to
    validate it against; the tool's own check does)."""
    return _value(schema, schema.get("$defs", {}), " ".join(re.findall(r"\w+", prompt)) or "answer", "$")


def _value(schema: dict[str, Any], defs: dict[str, Any], text: str, path: str) -> Any:
    if "$ref" in schema:
        return _value(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, text, path)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return _value(options[0], defs, text, path)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: _value(props[name], defs, text, f"{path}.{name}") for name in schema.get("required", [])}
    if kind == "array":
        prefix = schema.get("prefixItems")
        if prefix is not None:
            return [_value(s, defs, text, f"{path}[{i}]") for i, s in enumerate(prefix)]
        n = min(max(1, schema.get("minItems", 0)), schema.get("maxItems", 1_000_000))
        return [_value(schema.get("items", {}), defs, text, f"{path}[{i}]") for i in range(n)]
    if kind == "string":
        return _string(text, schema.get("minLength", 0), schema.get("maxLength"))
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer", text, path)
    if kind == "boolean":
        return True
    return None


def _string(text: str, min_length: int, max_length: int | None) -> str:
    while len(text) < min_length:
        text = f"{text} {text}"
    return text if max_length is None else text[:max_length].rstrip() or text[:max_length]


def _number(schema: dict[str, Any], integer: bool, text: str, path: str) -> float | int:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    lo = (0 if hi is None or hi >= 0 else hi - 100) if lo is None else lo
    hi = lo + 100 if hi is None else hi
    if not integer:
        return lo + 0.9 * (hi - lo)
    first = math.floor(lo) + 1 if "exclusiveMinimum" in schema else math.ceil(lo)
    last = math.ceil(hi) - 1 if "exclusiveMaximum" in schema else math.floor(hi)
    span = max(0, last - first) + 1
    return first + int.from_bytes(hashlib.sha256(f"{path}:{text}".encode()).digest()[:8], "big") % span
