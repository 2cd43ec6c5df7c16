"""An app whose agent lets the model charge an order through a tool loop: each ``charge`` call is an
effect counted in Redis (``{ns}:test.charges``), so a test can tell how many times it happened.
tests/agents/test_tool_loop_chaos.py kills the worker mid-loop."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.tools.base import ToolContext

app = App("tool-loop")


class Order(BaseModel):
    order_id: str


class Charge(BaseModel):
    order_id: str
    n: int


class Bill(BaseModel):
    order_id: str
    charges: int


@app.tool
def charge(ctx: ToolContext, args: Charge) -> dict[str, int]:
    """Charge one instalment of an order."""
    total = int(ctx.redis.incr(f"{ctx.keys.prefix}:test.charges"))
    ctx.redis.rpush(f"{ctx.keys.prefix}:test.charge_keys", ctx.key)  # the key each call was given
    return {"instalment": args.n, "charges_so_far": total}


@app.agent(tools=[charge])
def biller(ctx: Context, order: Order) -> Bill:
    """Asks the model to charge ``order`` in five instalments."""
    return ctx.model.run(f"Charge order {order.order_id} in five instalments", tools=[charge], output=Bill,
                         max_turns=8)


class Refund(BaseModel):
    order_id: str
    cents: int


class Refunded(BaseModel):
    order_id: str
    cents: int


@app.tool(destructive=True)
def refund(ctx: ToolContext, args: Refund) -> dict[str, int]:
    """Refund an order: destructive, each call approved by a person."""
    total = int(ctx.redis.incr(f"{ctx.keys.prefix}:test.refunds"))
    return {"cents": args.cents, "refunds_so_far": total}


@app.agent(tools=[charge, refund])
def refunder(ctx: Context, order: Order) -> Refunded:
    """Asks the model to charge, then refund, ``order``."""
    return ctx.model.run(f"Charge order {order.order_id}, then refund it", output=Refunded, max_turns=5)
