"""The provider interface: how agents reach a model, whichever model it is."""

from __future__ import annotations

from typing import Protocol

from mesh.contracts import Findings, Plan


class ModelProvider(Protocol):
    """Turns a goal into a plan and a question into findings; outputs are validated contracts."""

    name: str

    def plan(self, goal: str, *, timeout_s: float | None = None) -> Plan: ...

    def research(self, question: str, *, timeout_s: float | None = None) -> Findings: ...
