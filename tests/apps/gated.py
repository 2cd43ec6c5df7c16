"""An app whose one agent waits at a gate before its one effect, so a test can hold a worker's
handlers right before ``ctx.call``: ``mesh worker --app tests.apps.gated:app``.

The gate is a Redis key in the test's namespace (:func:`gate_key`); each handler counts itself in
at the gate (:func:`arrived_key`) and out once its call returned or raised (:func:`passed_key`),
so the test waits on counts, never on time.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from mesh import App, Context, Receipt, ToolContext
from mesh.agents.tools import effect_id, host_port, send_request
from mesh.broker.keys import prefix
from mesh.contracts import PermanentFailure
from mesh.contracts.effects import Verdict

app = App("gated")

#: How often a handler at the gate looks whether it opened (s).
GATE_POLL_S = 0.02


def gate_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:gate"


def arrived_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:arrived"


def wait_at_gate(redis: Any, namespace: str) -> None:
    """Count this handler in at the gate (:func:`arrived_key`), then wait until the test opens it."""
    redis.incr(arrived_key(namespace))
    while not redis.exists(gate_key(namespace)):
        time.sleep(GATE_POLL_S)


def passed_key(namespace: str) -> str:
    return f"{prefix(namespace)}:test:passed"


class Hook(BaseModel):
    url: str
    n: int
    #: Where the hook's effect can be looked up (a GET carrying the key: 200 applied, 404 not);
    #: None: the call shows ``unverified``.
    verify_url: str | None = None


class Posted(BaseModel):
    status: int


def hook_applied(ctx: ToolContext, args: Hook, result: Receipt | None) -> Receipt | bool | Verdict:
    """``post_hook``'s verifier: GET ``verify_url`` with the key; 404 says it never arrived."""
    if args.verify_url is None:
        return Verdict.UNVERIFIED
    try:
        send_request(ctx, "GET", args.verify_url)
    except PermanentFailure as exc:
        if exc.context.get("status") == 404:
            return False
        raise
    return result or Receipt(tool="post_hook", effect_id=effect_id(ctx.key), detail={"status": 200})


@app.tool(dependency=lambda args: host_port(args.url), effect=True, verify=hook_applied)
def post_hook(ctx: ToolContext, args: Hook) -> Receipt:
    """POSTs ``n`` to the hook: the effect (the request carries the key and the fencing token)."""
    response = send_request(ctx, "POST", args.url, json={"n": args.n})
    return Receipt(tool="post_hook", effect_id=effect_id(ctx.key), detail={"status": response.status_code})


@app.agent(tools=["post_hook"])
def poster(ctx: Context, hook: Hook) -> Posted:
    """Waits at the gate, then calls ``post_hook`` once."""
    redis, ns = ctx.runtime.redis, ctx.runtime.settings.namespace
    wait_at_gate(redis, ns)
    try:
        receipt = ctx.call("post_hook", hook)
    finally:
        redis.incr(passed_key(ns))
    return Posted(status=receipt.detail["status"])
