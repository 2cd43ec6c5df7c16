"""The dead-letter store: the single home of messages the mesh could not resolve."""

from __future__ import annotations

from .entry import Attempt, DeadLetter
from .store import DeadLetterStore

__all__ = ["Attempt", "DeadLetter", "DeadLetterStore"]
