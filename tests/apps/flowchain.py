"""A 6-step sequential pipeline whose every step runs on one agent limited to one at a time
(``concurrency: {max: 1}``): each step's next step needs the slot its predecessor held."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context, Pipeline

app = App("flowchain")


class Text(BaseModel):
    text: str


@app.agent(concurrency={"max": 1})
def single(ctx: Context, message: Text) -> Text:
    """Returns its input."""
    return message


chain = Pipeline("chain").step("s0", agent=single)
for _n in range(1, 6):
    chain = chain.step(f"s{_n}", agent=single, depends_on=[f"s{_n - 1}"])
app.pipeline(chain)
