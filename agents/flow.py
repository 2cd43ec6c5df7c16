"""Rendering a flow limit's key: the CEL expression over a message's input (``input.tenant``),
evaluated by the sender so the envelope carries it (:attr:`~mesh.contracts.Envelope.flow_key`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mesh.contracts import ConfigError
from mesh.contracts.flow import FlowLimits, flow_key_of

from .pipelines.expr import Expression, ExpressionError

if TYPE_CHECKING:
    from .app import App


class FlowKey(Expression):
    """A limit's ``key``: a CEL expression over ``input`` (the message's payload)."""

    kind = "limit key"


@functools.lru_cache(maxsize=256)
def compile_key(text: str) -> FlowKey:
    """``text`` compiled; ConfigError when it does not compile or reads something besides ``input``."""
    try:
        expr = FlowKey(text)
    except ValueError as exc:
        raise ConfigError(f"limit key {text!r}: {exc}") from None
    other = sorted(expr.names - {"input"})
    if other:
        raise ConfigError(f"limit key {text!r} reads {other}; a limit key reads the message's input only "
                          "(input.tenant)")
    return expr


def check_limits(owner: str, limits: FlowLimits | None) -> None:
    """ConfigError, naming ``owner``, when ``limits``' key does not compile."""
    if limits is not None and limits.key is not None:
        try:
            compile_key(limits.key)
        except ConfigError as exc:
            raise ConfigError(f"{owner}: {exc.message}") from None


def render_flow_key(limits: FlowLimits | None, payload: Mapping[str, Any], *, agent: str = "") -> str | None:
    """The flow key of a message with ``payload`` under ``limits`` (None without a key expression, or
    when it gives null or ""); ExpressionError when it cannot be evaluated over the payload (a pipeline
    step's message is then not sent, as for its other expressions)."""
    if limits is None or limits.key is None:
        return None
    try:
        value = compile_key(limits.key).evaluate({"input": dict(payload)})
    except ExpressionError as exc:
        raise type(exc)(f"agent {agent!r}: its limit key cannot be rendered from the input: {exc.message}") from None
    return flow_key_of(value)


def flow_plan(app: App) -> tuple[dict[str, FlowLimits], dict[str, list[str]]]:
    """The limits ``app`` declares, by limit name (``agent:{name}``, ``dependency:{name}``), and for
    each agent the limits its messages take before they run: its own, then those of the fixed
    dependencies its tools reach (one request each; a second call of a step takes another)."""
    from mesh.broker.limits import AGENT, DEPENDENCY

    declared: dict[str, FlowLimits] = {f"{DEPENDENCY}{d}": limits for d, limits in app.dependencies.items()}
    plan: dict[str, list[str]] = {}
    for name, spec in app.agents.items():
        names = []
        if spec.limits is not None:
            declared[f"{AGENT}{name}"] = spec.limits
            names.append(f"{AGENT}{name}")
        for tool in spec.tools:
            dep = app.tools[tool].dependency if tool in app.tools else None
            if isinstance(dep, str) and dep in app.dependencies and f"{DEPENDENCY}{dep}" not in names:
                names.append(f"{DEPENDENCY}{dep}")
        if names:
            plan[name] = names
    return declared, plan
