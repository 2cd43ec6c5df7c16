"""``AgentRef``: a declared agent as the client, job records and pipelines refer to it, typed.

``@app.agent`` returns a :class:`mesh.Agent`, which is one: ``client.send(classify, Incoming(...))``,
``record.output(classify)`` and ``Pipeline(...).step(classify)`` take it where they take a name, and
a type checker reads its input and output models from it (``AgentRef[Incoming, Classified]``), so
sending the wrong model or reading the wrong output is a type error, not a dead letter. It lives
here, with the contracts, because the broker's client reads it and never imports the agents layer.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel

#: An agent's input model and output model.
In = TypeVar("In", bound=BaseModel)
Out = TypeVar("Out", bound=BaseModel)


class AgentRef(Generic[In, Out]):
    """A declared agent's name, input and output models, queue and contract version. Invariant in
    both models: an ``AgentRef[Ticket, Triage]`` takes a ``Ticket``, not any model."""

    __slots__ = ("input", "name", "output", "queue", "version")

    def __init__(self, name: str, input: type[In], output: type[Out], *, queue: str | None = None,
                 version: int = 1) -> None:
        self.name = name
        self.input = input
        self.output = output
        self.queue = queue or name
        self.version = version

    def __repr__(self) -> str:
        return f"<agent {self.name} ({self.input.__name__} -> {self.output.__name__})>"


def name_of(agent: str | AgentRef[Any, Any]) -> str:
    """The agent's name, given the agent or its name."""
    return agent if isinstance(agent, str) else agent.name
