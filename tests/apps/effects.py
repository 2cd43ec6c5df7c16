"""An app whose first step makes an effect the mesh must prove (``http_post`` with a
``verify_url``) and whose second step depends on it: tests/agents/test_effects.py checks that an
unproven effect holds the dependent back, and that ``mesh verify`` moves the job on."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context
from mesh.agents.builtin import app as builtin
from mesh.agents.pipelines import Pipeline
from mesh.contracts import Receipt

app = App("effects")
for tool in builtin.tools.values():
    app.add_tool(tool)


class Post(BaseModel):
    url: str
    verify_url: str | None = None


class Done(BaseModel):
    effect_id: str


@app.agent(tools=["http_post"])
def poster(ctx: Context, task: Post) -> Receipt:
    """POSTs once to ``task.url``; the effect is checked at ``task.verify_url``."""
    receipt: Receipt = ctx.call("http_post", {"url": task.url, "json": {"order": 7},
                                              "verify_url": task.verify_url})
    return receipt


@app.agent()
def after(ctx: Context, receipt: Receipt) -> Done:
    """Runs only once the post is proven (or settled applied)."""
    return Done(effect_id=receipt.effect_id)


app.pipeline(Pipeline("posted").step("post", agent="poster").step("after", agent="after", depends_on=["post"]))
