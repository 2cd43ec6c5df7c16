"""An app whose one agent takes its worker down: ``crash`` counts its run in ``{ns}:test.deaths``
and then ends the process (``os._exit``, as a segfaulting extension or the OOM killer would), unless
``{ns}:test.heal`` exists, when it answers."""

from __future__ import annotations

import os

from pydantic import BaseModel

from mesh import App, Context
from mesh.broker.keys import prefix

app = App("poison")


class Order(BaseModel):
    text: str


class Done(BaseModel):
    text: str


@app.agent
def crash(ctx: Context, order: Order) -> Done:
    """Dies holding the message, until healed."""
    redis, ns = ctx.runtime.redis, ctx.runtime.settings.namespace
    redis.incr(f"{prefix(ns)}:test.deaths")
    if not redis.exists(f"{prefix(ns)}:test.heal"):
        os._exit(70)
    return Done(text=order.text)
