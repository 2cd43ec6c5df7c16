"""A user's app whose agent asks a model and declares the rate its model API allows (``MODEL_RATE``
requests a second, read when the app is imported, as a deployment's config would be): its model
calls reserve tokens on that rate, and a 429 from the model lowers it for the fleet."""

from __future__ import annotations

import os

from pydantic import BaseModel

from mesh import App, Context

RATE = os.environ.get("MODEL_RATE", "40/s")

app = App("model-limited")


class Ask(BaseModel):
    n: int


class Reply(BaseModel):
    text: str


@app.agent(rate={"requests": RATE, "tokens": "6000000/min"}, max_attempts=1)
def asker(ctx: Context, ask: Ask) -> Reply:
    """Asks the model once."""
    return ctx.model.complete(f"answer {ask.n}", Reply, system="Answer briefly.")
