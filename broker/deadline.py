"""Deadline: a handler's time limit is the tightest of its limits, never more than its deadline leaves."""

from __future__ import annotations

from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import Middleware, TimeLimitExceeded

from mesh.contracts import MeshError

from .clock import server_now_ms
from .settings import MeshSettings

#: Where the message's own ``time_limit`` waits while the computed one is in its options.
_OWN = "mesh_own_time_limit"
#: Which limit the attempt runs under, for the error it fails with if the limit stops it.
_WHY = "mesh_time_limit_why"
_ABSENT, _NOT_RUN = object(), object()


def effective_limit_ms(setting_ms: int, *options_ms: Any, deadline_s: Any = None, now_ms: int) -> int:
    """The smallest of ``setting_ms``, the ``time_limit`` options given (ms; anything that is not a
    positive number sets no limit) and the time left until ``deadline_s`` (absolute UNIX seconds);
    at least 1 ms, so a spent budget still arms the timer."""
    return applied_limit([("", setting_ms), *(("", v) for v in options_ms)], deadline_s=deadline_s,
                         now_ms=now_ms)[0]


def applied_limit(limits: list[tuple[str, Any]], *, deadline_s: Any = None,
                  now_ms: int) -> tuple[int, str, list[tuple[str, float]]]:
    """Of the named limits (ms; what is not a positive number sets none; the first always counts)
    and the time left until ``deadline_s`` (named "the job's deadline"): the smallest (at least
    1 ms), its name, and every limit that counted, by name."""
    counted = [(name, float(ms)) for i, (name, ms) in enumerate(limits) if i == 0 or _positive(ms)]
    if _number(deadline_s):
        counted.append(("the job's deadline", deadline_s * 1000 - now_ms))
    name, limit = counted[0]
    for other, ms in counted[1:]:
        if ms < limit:
            name, limit = other, ms
    return int(max(1, limit)), name, counted  # a deadline of -1e308 makes the limit -inf, which int() refuses


def explain(limit_ms: int, name: str, counted: list[tuple[str, float]]) -> str:
    """Why an attempt was stopped: ``TimeLimitExceeded: stopped at 0.5 s, the step's timeout_ms (the
    other limits: MESH_TIME_LIMIT_S 300 s, agent a's time limit 60 s, the job's deadline 41.8 s)``."""
    others = ", ".join(f"{other} {_secs(ms)}" for other, ms in counted if other != name)
    return f"TimeLimitExceeded: stopped at {_secs(limit_ms)}, {name}" + (
        f" (the other limits: {others})" if others else "")


def _secs(ms: float) -> str:
    return f"{max(ms, 0) / 1000:.3f}".rstrip("0").rstrip(".") + " s"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


class Deadline(Middleware):
    """Arms dramatiq's ``TimeLimit`` with the smallest of the message's ``time_limit``, the actor's,
    ``MESH_TIME_LIMIT_S`` and the budget the envelope's deadline has left; goes before ``TimeLimit``.

    TimeLimit takes the message's option when there is one, so this writes the computed limit there
    for the attempt and puts the message's own value back afterwards: a retried copy carries what
    the sender asked for, not one worker's computation. The time left is counted on the Redis
    server's clock (the deadline's), not this host's. A message already past its deadline is
    dead-lettered by the agent runtime without running; this keeps a running handler inside it.
    """

    def __init__(self, settings: MeshSettings) -> None:
        self.limit_ms = int(settings.time_limit_s * 1000)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        # Each read once: every attribute of the proxy is a __getattr__ forwarded to the message.
        options, actor_name, args = message.options, message.actor_name, message.args
        own = options.get("time_limit", _ABSENT)
        try:
            actor_limit = broker.get_actor(actor_name).options.get("time_limit")
        except ActorNotFound:  # TimeLimit raises it next; the router dead-letters the message
            actor_limit = None
        envelope = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
        limit_ms, name, counted = applied_limit(
            [("MESH_TIME_LIMIT_S", self.limit_ms),
             ("the step's timeout_ms" if envelope else "the message's time_limit", None if own is _ABSENT else own),
             (f"agent {actor_name}'s time limit", actor_limit)],
            deadline_s=envelope.get("deadline"), now_ms=server_now_ms(broker))
        options["time_limit"] = limit_ms
        setattr(message, _OWN, own)
        setattr(message, _WHY, (limit_ms, name, counted))  # worded only if the limit stops the attempt

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        own = message.__dict__.pop(_OWN, _NOT_RUN)
        if own is _NOT_RUN:  # skipped by an earlier middleware before this one ran
            return
        applied = message.__dict__.pop(_WHY, None)
        if applied is not None:
            _name_the_limit(exception, *applied)
        if own is _ABSENT:
            message.options.pop("time_limit", None)
        else:
            message.options["time_limit"] = own

    after_skip_message = after_process_message


def _name_the_limit(exception: BaseException | None, limit_ms: int, name: str,
                    counted: list[tuple[str, float]]) -> None:
    """Say which limit stopped the attempt in the error it failed with (this runs before the router's
    hook records it): dramatiq raises a bare ``TimeLimitExceeded`` into the thread, and a tool
    interrupted mid-call raises a timeout naming only itself (``DependencyTimeout`` from it)."""
    if isinstance(exception, TimeLimitExceeded) and not exception.args:
        exception.args = (explain(limit_ms, name, counted),)
    elif isinstance(exception, MeshError) and isinstance(exception.__cause__, TimeLimitExceeded):
        exception.message = f"{exception.message} ({explain(limit_ms, name, counted)})"
