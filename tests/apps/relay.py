"""A two-step pipeline whose second step waits at a gate, so a test can kill the worker holding it:
``mesh worker --app tests.apps.relay:app``. The first step's success fetches the second for the same
worker (an idle worker serving both agents), so the second is held as that fetch left it.

The gate is a Redis key in the test's namespace (:func:`gate_key`); the held step counts itself in
(:func:`arrived_key`), so the test waits on counts, never on time."""

from __future__ import annotations

import time

from pydantic import BaseModel

from mesh import App, Context, Pipeline
from mesh.broker.keys import prefix

app = App("relay")

#: How often the held step looks whether the gate opened (s).
GATE_POLL_S = 0.02


def gate_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:gate"


def arrived_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:arrived"


class Text(BaseModel):
    text: str


@app.agent()
def handing(ctx: Context, message: Text) -> Text:
    return message


@app.agent()
def held(ctx: Context, message: Text) -> Text:
    """Waits at the gate, then gives its input back."""
    redis, ns = ctx.runtime.redis, ctx.runtime.settings.namespace
    redis.incr(arrived_key(ns))
    while not redis.exists(gate_key(ns)):
        time.sleep(GATE_POLL_S)
    return message


app.pipeline(Pipeline("relay").step("first", agent=handing).step("second", agent=held, depends_on=["first"]))
