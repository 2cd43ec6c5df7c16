"""Durable waits as records carry them: a step parked on a timer (``sleep:``) or on an event
(``wait_for:``), and how the wait ended.

A waiting step holds no worker thread and no message in flight: its record says what it waits
for and until when (:class:`Wait`), and a durable timer in Redis (:mod:`mesh.broker.timers`)
ends it at its due time, or an event delivered to the job (``mesh signal``, ``mesh emit``) ends it
first. ``seq`` counts the step's waits, so a timer or event meant for an earlier wait of the same
step (a replayed job) never ends a later one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ConfigDict, Field

from .envelope import Frozen


class WaitKind(StrEnum):
    SLEEP = "sleep"
    EVENT = "event"


class WaitEnd(StrEnum):
    """How a wait ended: the sleep ran out, an event came, or the timeout came first."""

    SLEPT = "slept"
    EVENT = "event"
    TIMEOUT = "timeout"


class Wait(Frozen):
    """A step's wait (extra fields kept, as records keep a newer release's)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    kind: WaitKind
    #: The event name a ``wait_for`` step waits for (None for a sleep).
    event: str | None = None
    #: Its ``match`` as written (None: any event of that name).
    match: str | None = None
    started_at: float
    #: How long it waits: the sleep, or the event's timeout (s).
    duration_s: float
    #: ``fail`` or ``continue``: what the timeout of a ``wait_for`` does.
    on_timeout: str = "fail"
    #: The step's how-many-th wait (a replayed job's step waits again under the next number).
    seq: int = Field(default=1, ge=1)
    #: What the run had left of its deadline when the wait began (s): the resumed run gets it back
    #: from its resumption, so a wait does not spend it. Its token budget goes with it.
    deadline_left_s: float | None = None
    token_budget: int | None = None
    #: Once ended: how, when, and the event that ended it (its id, how it came: signal or emit).
    ended: WaitEnd | None = None
    ended_at: float | None = None
    event_id: str | None = None
    via: str | None = None

    @property
    def until(self) -> float:
        """When the sleep or the timeout is due (s, by the clock of the writer that started it)."""
        return self.started_at + self.duration_s

    def describe(self) -> str:
        """What it waits for, as a line says it: ``event payment.settled where event.order == input.order``."""
        if self.kind is WaitKind.SLEEP:
            return "a timer (sleep)"
        return f"event {self.event}" + (f" where {self.match}" if self.match else "")


def timed_out() -> dict[str, Any]:
    """The output of a ``wait_for`` step whose timeout came first under ``on_timeout: continue``."""
    return {"timed_out": True}


#: An event name: ``payment.settled``, ``order:42.shipped`` (letters, digits and ``._:-``, 1 to 128).
EVENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
