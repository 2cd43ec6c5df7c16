"""A tiny user app: ``greet`` (contract version 1) and ``shout``, which calls the ``upper`` tool.

``app_v2`` declares ``greet`` again at contract version 2: a client holding it stamps its messages
with version 2, which a worker serving ``app`` must refuse.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mesh import App, Context, ToolContext

app = App("greeter")
app_v2 = App("greeter")


class Name(BaseModel):
    name: str = Field(min_length=1, max_length=40)
    times: int = Field(default=1, ge=1, le=3)


class Greeting(BaseModel):
    greeting: str


class Text(BaseModel):
    text: str


@app.tool(effect=False)
def upper(ctx: ToolContext, args: Text) -> str:
    """Upper-case a text."""
    return args.text.upper()


@app.agent(version=1)
def greet(ctx: Context, who: Name) -> Greeting:
    """Greet someone by name."""
    ctx.progress("greeting")
    return Greeting(greeting=" ".join([f"hello {who.name}"] * who.times))


@app.agent(tools=["upper"])
def shout(ctx: Context, who: Name) -> Greeting:
    """Greet someone, loudly."""
    return Greeting(greeting=str(ctx.call("upper", Text(text=f"hello {who.name}"))))


app_v2.agent(greet, version=2)
