"""A user's app whose credential minter outlasts the step's time limit (it ignores
``scope.timeout_s``): its effectful tool counts each call in Redis (``{ns}:test.paid``), so a test
can tell it was never called. tests/apps/test_minted_credentials.py runs it on a real worker."""

from __future__ import annotations

import time

from pydantic import BaseModel

from mesh import App, Context, Credential, CredentialScope, ToolContext

app = App("slow-minting")


class Pay(BaseModel):
    cents: int


class Paid(BaseModel):
    cents: int


def stall(scope: CredentialScope) -> Credential:
    """A token server that never answers in time, asked without a timeout."""
    for _ in range(300):  # short sleeps: the time limit lands between two
        time.sleep(0.1)
    return Credential("slow-minted-token-0123", expires_at=time.time() + 60)


@app.tool(mint=stall)
def pay(ctx: ToolContext, args: Pay) -> Paid:
    """Pays ``cents``: an effect, counted."""
    ctx.redis.incr(f"{ctx.keys.prefix}:test.paid")
    return Paid(cents=args.cents)


@app.agent(tools=[pay], time_limit_s=1, max_attempts=1)
def payer(ctx: Context, args: Pay) -> Paid:
    """Pays once."""
    return ctx.call(pay, args)
