"""An app for the queue's lanes: ``work`` sleeps ``ms`` and answers its ``n``; its limit key is the
tenant, so every message carries the tenant as its flow key (a fair share per tenant). ``fail``:
``"once"`` fails the first attempt (retried), ``"always"`` fails for good (dead-lettered)."""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from mesh import App, Context, PermanentFailure

app = App("lanes")


class Work(BaseModel):
    n: int
    tenant: str = Field(default="-", min_length=1, max_length=64)
    ms: int = Field(default=0, ge=0, le=10_000)
    fail: str = "never"


class Done(BaseModel):
    n: int


@app.agent(concurrency={"max": 1_000_000, "key": "input.tenant"})
def work(ctx: Context, item: Work) -> Done:
    """Work for ``ms`` milliseconds."""
    time.sleep(item.ms / 1000)
    if item.fail == "always" or (item.fail == "once" and ctx.attempt == 1):
        raise PermanentFailure("told to fail") if item.fail == "always" else RuntimeError("told to fail once")
    return Done(n=item.n)
