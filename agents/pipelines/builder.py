"""Build a pipeline in Python; the result is the same :class:`PipelineSpec` a YAML file loads to.

    spec = (Pipeline("review", version="1.0.0")
            .step("researcher", output_schema="research_result")
            .step("coder", depends_on=["researcher"], idempotency_key="{{key}}:coder")
            .step("reviewer", depends_on=["coder"], gate="coder.confidence >= 0.85")
            .build())

Each ``step`` takes the YAML step's keys as keyword arguments.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mesh.contracts import ConfigError

from .spec import PipelineSpec


class Pipeline:
    """A pipeline under construction: ``.step(...)`` in any order, then :meth:`build`."""

    def __init__(self, name: str, *, version: str = "1", description: str = "",
                 input_schema: str | None = None) -> None:
        self._data: dict[str, Any] = {"name": name, "version": version, "description": description, "steps": []}
        if input_schema is not None:
            self._data["input_schema"] = input_schema

    def step(self, id: str, **keys: Any) -> Pipeline:
        """Add the step ``id`` (its keys as in YAML: ``agent``, ``depends_on``, ``gate``, ...)."""
        self._data["steps"].append({"id": id, **keys})
        return self

    def tracing(self, **keys: Any) -> Pipeline:
        """Set ``tracing`` (``enabled``, ``provider``, ``log_inputs``, ``log_outputs``)."""
        self._data["tracing"] = keys
        return self

    def checkpointing(self, **keys: Any) -> Pipeline:
        """Set ``checkpointing`` (``enabled``, ``store``, ``ttl_minutes``)."""
        self._data["checkpointing"] = keys
        return self

    def build(self) -> PipelineSpec:
        """The spec; :class:`ConfigError` naming each bad key otherwise. Checks against an app (agents,
        schemas, the fields gates read) happen when the app registers it (``app.pipeline(...)``)."""
        try:
            return PipelineSpec.model_validate(self._data)
        except ValidationError as exc:
            lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
            raise ConfigError(f"pipeline {self._data['name']!r} is invalid:\n  " + "\n  ".join(lines)) from None
