"""Deadline: a handler's time limit is the tightest of its limits, never more than its deadline leaves."""

from __future__ import annotations

from typing import Any

from dramatiq.broker import Broker, MessageProxy
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import Middleware

from .clock import server_now_ms
from .settings import MeshSettings

#: Where the message's own ``time_limit`` waits while the computed one is in its options.
_OWN = "mesh_own_time_limit"
_ABSENT, _NOT_RUN = object(), object()


def effective_limit_ms(setting_ms: int, *options_ms: Any, deadline_s: Any = None, now_ms: int) -> int:
    """The smallest of ``setting_ms``, the ``time_limit`` options given (ms; anything that is not a
    positive number sets no limit) and the time left until ``deadline_s`` (absolute UNIX seconds);
    at least 1 ms, so a spent budget still arms the timer."""
    limit = min([setting_ms, *(v for v in options_ms if _positive(v))])
    if _number(deadline_s):
        limit = min(limit, deadline_s * 1000 - now_ms)
    return int(max(1, limit))  # a deadline of -1e308 makes the limit -inf, which int() refuses


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
        own = message.options.get("time_limit", _ABSENT)
        try:
            actor_limit = broker.get_actor(message.actor_name).options.get("time_limit")
        except ActorNotFound:  # TimeLimit raises it next; the router dead-letters the message
            actor_limit = None
        envelope = message.args[0] if len(message.args) == 1 and isinstance(message.args[0], dict) else {}
        message.options["time_limit"] = effective_limit_ms(
            self.limit_ms, None if own is _ABSENT else own, actor_limit,
            deadline_s=envelope.get("deadline"), now_ms=server_now_ms(broker))
        setattr(message, _OWN, own)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        own = message.__dict__.pop(_OWN, _NOT_RUN)
        if own is _NOT_RUN:  # skipped by an earlier middleware before this one ran
            return
        if own is _ABSENT:
            message.options.pop("time_limit", None)
        else:
            message.options["time_limit"] = own

    after_skip_message = after_process_message
