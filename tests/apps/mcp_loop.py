"""An app whose agents let the model call the tools of a real MCP server (tests/agents/mcp_server.py,
over stdio) through a tool loop. The server appends every call it receives to the file MCP_LOG (read
from the worker's environment, so a test can tell what reached the server): ``demo.add`` adds,
``demo.drop`` is marked ``destructiveHint`` by the server, so each call the model asks for waits for
a person's approval. tests/agents/test_mcp_loop.py drives them with a loopback model server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import BaseModel

from mesh import App, AsyncContext, Context

SERVER = str(Path(__file__).resolve().parent.parent / "agents" / "mcp_server.py")

app = App("mcp-loop")
demo = app.mcp("demo", command=[sys.executable, SERVER], allow=["add", "drop", "count"],
               env={"MCP_LOG": os.environ.get("MCP_LOG", os.devnull),
                    "MCP_VARIANT": os.environ.get("MCP_VARIANT", "1")})


class Task(BaseModel):
    text: str


class Total(BaseModel):
    total: int


class Dropped(BaseModel):
    table: str


@app.agent(tools=["demo.add"])
def adder(ctx: Context, task: Task) -> Total:
    """Asks the model to add numbers with the server's ``add``."""
    return ctx.model.run(task.text, tools=["demo.add"], output=Total, max_turns=8)


@app.agent(tools=["demo.add"])
async def aadder(ctx: AsyncContext, task: Task) -> Total:
    """:func:`adder` awaited: the server is asked what it presents in a thread, not on the handler's loop."""
    return await ctx.model.run(task.text, tools=["demo.add"], output=Total, max_turns=8)


@app.agent(tools=["demo.add", "demo.drop", "demo.count"])
def dropper(ctx: Context, task: Task) -> Dropped:
    """Asks the model to drop a table with the server's ``drop`` (destructive)."""
    return ctx.model.run(task.text, output=Dropped, max_turns=4)
