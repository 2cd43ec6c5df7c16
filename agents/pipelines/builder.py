"""Build a pipeline in Python; the result is the same :class:`PipelineSpec` a YAML file loads to.

    spec = (Pipeline("review", version="1.0.0")
            .step("researcher", output_schema="research_result")
            .step("coder", depends_on=["researcher"], idempotency_key="{{key}}:coder")
            .step("reviewer", depends_on=["coder"], gate="coder.confidence >= 0.85")
            .build())

Each ``step`` takes the YAML step's keys as keyword arguments. A step may be given as the declared
agent it runs (``@app.agent``): its id defaults to the agent's name, and ``depends_on`` may name
declared agents too (each stands for the step this builder added for it)::

    spec = Pipeline("support").step(classify).step(notify, depends_on=[classify]).build()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from mesh.contracts import AgentRef, ConfigError

from .loader import _keys
from .spec import PipelineSpec


class Pipeline:
    """A pipeline under construction: ``.step(...)`` in any order, then :meth:`build`."""

    def __init__(self, name: str, *, version: str = "1", description: str = "",
                 input_schema: str | None = None) -> None:
        self._data: dict[str, Any] = {"name": name, "version": version, "description": description, "steps": []}
        #: Agent name -> the id of the step added for it (given as a declared agent), for ``depends_on``.
        self._by_agent: dict[str, str] = {}
        if input_schema is not None:
            self._data["input_schema"] = input_schema

    def step(self, step: str | AgentRef[Any, Any], /, **keys: Any) -> Pipeline:
        """Add a step: its id, or the declared agent it runs (its id then defaults to the agent's name:
        pass ``id=`` for another). Its keys as in YAML: ``agent``, ``depends_on``, ``gate``, ...;
        ``agent``, ``depends_on`` and ``compensate``'s ``agent`` may give declared agents where YAML
        gives names."""
        if isinstance(step, AgentRef):
            keys = {"id": keys.pop("id", step.name), "agent": keys.pop("agent", step), **keys}
        else:
            keys = {"id": step, **keys}
        if isinstance(keys.get("agent"), AgentRef):
            self._by_agent.setdefault(keys["agent"].name, str(keys["id"]))
            keys["agent"] = keys["agent"].name
        if "depends_on" in keys and not isinstance(keys["depends_on"], str):
            keys["depends_on"] = self._ids(keys["depends_on"])
        undo = keys.get("compensate")
        if isinstance(undo, dict) and isinstance(undo.get("agent"), AgentRef):
            keys["compensate"] = {**undo, "agent": undo["agent"].name}
        self._data["steps"].append(keys)
        return self

    def _ids(self, depends_on: Iterable[Any]) -> list[Any]:
        return [self._by_agent.get(d.name, d.name) if isinstance(d, AgentRef) else d for d in depends_on]

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
            lines = [self._message(e) for e in exc.errors()]
            raise ConfigError(f"pipeline {self._data['name']!r} is invalid:\n  " + "\n  ".join(lines)) from None

    def _message(self, error: Any) -> str:
        """A step's error names the step (``step 'notify': ...``); a bad keyword lists the keys it takes,
        as the YAML loader does."""
        loc = tuple(error["loc"])
        steps = self._data["steps"]
        if loc[:1] == ("steps",) and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(steps):
            where, rest = f"step {steps[loc[1]].get('id')!r}", loc[2:]
        else:
            where, rest = "", loc
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(k.replace("agents|steps", "steps") for k in _keys(loc[:-1]))
            return f"{where or 'the pipeline'}: unknown key {loc[-1]!r}" + \
                (f" in {'.'.join(map(str, rest[:-1]))}" if rest[:-1] else "") + f"; allowed: {allowed}"
        message = error["msg"].removeprefix("Value error, ")
        path = ".".join(map(str, rest))
        return ": ".join(p for p in (where, path, message) if p)
