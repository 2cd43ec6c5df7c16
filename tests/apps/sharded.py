"""An app for a worker serving several shards (MESH_SHARDS > 1; tests/ops/test_worker_shards.py):
``work`` counts each run under its item's number and the shard whose consumers ran it, and an item
marked ``hold`` waits at a gate first, so a test holds a shard's threads on counts, never on time.

Its test keys are in the namespace's tag (single-key commands: a cluster takes them from any shard's
consumers): the gate (:func:`gate_key`), the handlers at it (:func:`arrived_key`), the runs
(:func:`runs_key`, a hash ``"SHARD:N" -> runs``).
"""

from __future__ import annotations

import time

from pydantic import BaseModel

from mesh import App, Context
from mesh.broker.keys import prefix

app = App("sharded")

#: How often a handler at the gate looks whether it opened (s).
GATE_POLL_S = 0.02


def gate_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:gate"


def arrived_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:arrived"


def runs_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:runs"


class Item(BaseModel):
    n: int
    hold: bool = False


class Done(BaseModel):
    n: int
    shard: int


@app.agent
def work(ctx: Context, item: Item) -> Done:
    """Counts its run (by the shard of the consumers running it), after the gate when ``hold``."""
    redis, settings = ctx.runtime.redis, ctx.runtime.settings
    if item.hold:
        redis.incr(arrived_key(settings.namespace))
        while not redis.exists(gate_key(settings.namespace)):
            time.sleep(GATE_POLL_S)
    redis.hincrby(runs_key(settings.namespace), f"{settings.shard}:{item.n}", 1)
    return Done(n=item.n, shard=settings.shard)
