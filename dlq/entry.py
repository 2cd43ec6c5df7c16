"""The dead-letter entry is a record of the mesh's language: it lives in ``mesh.contracts``."""

from __future__ import annotations

from mesh.contracts.deadletter import Attempt, DeadLetter, format_traceback

__all__ = ["Attempt", "DeadLetter", "format_traceback"]
