"""An app for the queue's lanes: ``work`` sleeps ``ms`` and answers its ``n``; its limit key is the
tenant, so every message carries the tenant as its flow key (a fair share per tenant)."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from mesh import App, Context

app = App("lanes")


class Work(BaseModel):
    n: int
    tenant: str = Field(default="-", min_length=1, max_length=64)
    ms: int = Field(default=0, ge=0, le=10_000)


class Done(BaseModel):
    n: int


@app.agent(concurrency={"max": 1_000_000, "key": "input.tenant"})
def work(ctx: Context, item: Work) -> Done:
    """Work for ``ms`` milliseconds."""
    time.sleep(item.ms / 1000)
    return Done(n=item.n)
