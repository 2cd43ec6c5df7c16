"""A user's app whose tool reaches one rate- and concurrency-limited dependency: the loopback server
a test starts (``LIMITED_HOST``, read when the app is imported, as a deployment's config would be).
``LIMITED_RATE`` is the dependency's declared rate; ``caller`` calls it once per message, ``slow``
(at most ``SLOW_MAX`` at once, per tenant: ``input.tenant``) calls it and the server takes its time."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from mesh import App, Context, ToolContext, send_request

HOST = os.environ.get("LIMITED_HOST", "127.0.0.1:9")
RATE = os.environ.get("LIMITED_RATE", "100/s")
SLOW_MAX = int(os.environ.get("SLOW_MAX", "2"))

app = App("limited")


class Hit(BaseModel):
    n: int
    tenant: str = "a"


class Hits(BaseModel):
    n: int
    status: int


@app.tool(dependency=HOST, rate={"requests": RATE}, effect=False)
def hit(ctx: ToolContext, args: Hit) -> dict[str, Any]:
    """POSTs the job's number to the limited service."""
    reply: dict[str, Any] = send_request(ctx, "POST", f"http://{HOST}/hit", json=args.model_dump()).json()
    return reply


@app.tool(name="hold", dependency=HOST, effect=False)
def hold(ctx: ToolContext, args: Hit) -> dict[str, Any]:
    """POSTs to the service's slow path."""
    reply: dict[str, Any] = send_request(ctx, "POST", f"http://{HOST}/slow", json=args.model_dump()).json()
    return reply


@app.agent(tools=[hit], max_attempts=1)
def caller(ctx: Context, job: Hit) -> Hits:
    """Calls the limited service once."""
    ctx.call(hit, job)
    return Hits(n=job.n, status=200)


@app.agent(tools=[hold], concurrency={"max": SLOW_MAX, "key": "input.tenant"}, max_attempts=1)
def slow(ctx: Context, job: Hit) -> Hits:
    """Calls the service's slow path; at most SLOW_MAX at once per tenant, fleet-wide."""
    ctx.call(hold, job)
    return Hits(n=job.n, status=200)
