"""The one rule for agent names and step ids: a step runs the agent of its id unless it names
another, and expressions read a step id as a name (``coder.confidence``), so both are lower-case
identifiers: a letter, then letters, digits or ``_`` (``-`` would read as minus)."""

from __future__ import annotations

import re

#: An agent's name and a pipeline step's id.
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def name_problem(what: str, value: str) -> str | None:
    """Why ``value`` is no agent name or step id (``what`` says which: ``agent name``, ``step id``);
    None when it is one."""
    if NAME.match(value):
        return None
    hint = f"; write {value.replace('-', '_')!r}" if "-" in value and NAME.match(value.replace("-", "_")) else ""
    return (f"{what} {value!r} must be a lower-case name: a letter, then letters, digits or '_', at most 63 "
            f"({NAME.pattern}). Agent names and step ids follow this one rule: a step runs the agent of its id, "
            f"and expressions read the id as a name, where '-' is minus{hint}")
