"""Deadline: a handler's time limit never exceeds what is left of its message's deadline."""

from __future__ import annotations

from dramatiq.broker import Broker, MessageProxy
from dramatiq.common import current_millis
from dramatiq.middleware import Middleware

from .settings import MeshSettings


class Deadline(Middleware):
    """Cuts dramatiq's ``time_limit`` for each message to the budget its envelope has left.

    A message already past its deadline is dead-lettered by the agent runtime without running;
    this only makes sure a running handler cannot outlive the budget. Goes before ``TimeLimit``.
    """

    def __init__(self, settings: MeshSettings) -> None:
        self.limit_ms = int(settings.time_limit_s * 1000)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        limit = self.limit_ms
        envelope = message.args[0] if len(message.args) == 1 and isinstance(message.args[0], dict) else {}
        deadline = envelope.get("deadline")
        if isinstance(deadline, int | float):
            limit = min(limit, int(deadline * 1000) - current_millis())
        message.options["time_limit"] = max(1, limit)
