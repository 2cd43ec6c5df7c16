"""An app whose one agent fails for good while a file says so: ``mesh worker --app
tests.apps.flaky:app`` with ``TEST_FLAKY_DIR`` set. While ``broken`` exists in that folder, an
order is refused with a permanent failure (dead-lettered at once); once it is gone, a replayed
order succeeds. The console's browser test dead-letters a job this way, then replays it."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from mesh import App, Context, PermanentFailure

app = App("flaky")


class Order(BaseModel):
    order: str


class Shipped(BaseModel):
    order: str
    shipped: bool


@app.agent()
def flaky_shipper(ctx: Context, order: Order) -> Shipped:
    """Ships the order, or refuses it while ``broken`` exists in TEST_FLAKY_DIR."""
    if (Path(os.environ["TEST_FLAKY_DIR"]) / "broken").exists():
        raise PermanentFailure(f"warehouse refused order {order.order}: closed for stock-taking")
    ctx.progress(f"packing {order.order}")
    return Shipped(order=order.order, shipped=True)
