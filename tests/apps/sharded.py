"""An app for a worker serving several shards (MESH_SHARDS > 1; tests/ops/test_worker_shards.py):
``work`` counts each run under its item's number and the shard whose consumers ran it, and an item
marked ``hold`` waits at a gate first, so a test holds a shard's threads on counts, never on time.

Its test keys are in the namespace's tag (single-key commands: a cluster takes them from any shard's
consumers): the gate and the handlers at it (tests/apps/gated.py's, :func:`gate_key` and
:func:`arrived_key`), the runs (:func:`runs_key`, a hash ``"SHARD:N" -> runs``).
"""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context
from mesh.broker.keys import prefix
from tests.apps.gated import arrived_key, gate_key, wait_at_gate

__all__ = ["app", "arrived_key", "gate_key", "runs_key"]

app = App("sharded")


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
        wait_at_gate(redis, settings.namespace)
    redis.hincrby(runs_key(settings.namespace), f"{settings.shard}:{item.n}", 1)
    return Done(n=item.n, shard=settings.shard)
