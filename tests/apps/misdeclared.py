"""Apps with a deployment mistake that would fail every call: ``mesh worker --app`` refuses them at
start (tests/ops/test_worker_start_checks.py)."""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context, ToolContext


class Query(BaseModel):
    text: str = ""


class Reply(BaseModel):
    text: str = ""


#: An agent naming a tool nobody declared.
no_tool = App("no-tool")


@no_tool.agent(tools=["lookup_ticket"])
def triage(ctx: Context, q: Query) -> Reply:
    return Reply(text=q.text)


#: A tool whose secret the worker may not have; ``plain`` calls no tool and needs none.
needs_secret = App("needs-secret")


@needs_secret.tool(secrets=["MISDECLARED_TOKEN"], effect=False)
def fetch_ticket(ctx: ToolContext, q: Query) -> Reply:
    return Reply(text=ctx.secret("MISDECLARED_TOKEN")[:0])


@needs_secret.agent(tools=["fetch_ticket"])
def reader(ctx: Context, q: Query) -> Reply:
    result: Reply = ctx.call("fetch_ticket", q.model_dump())
    return result


@needs_secret.agent
def plain(ctx: Context, q: Query) -> Reply:
    return Reply(text=q.text)


#: A tool naming an undeclared tool to undo its calls.
no_undo = App("no-undo")


@no_undo.tool(compensate="unbook")
def book(ctx: ToolContext, q: Query) -> Reply:
    return Reply(text=q.text)


@no_undo.agent(tools=["book"])
def booker(ctx: Context, q: Query) -> Reply:
    result: Reply = ctx.call("book", q.model_dump())
    return result
