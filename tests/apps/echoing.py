"""A user's app whose tool's answer carries the tool's secret back: the endpoint echoes the
``Authorization`` header, as careless or hostile services do. ``fetch`` calls it and returns the
echo in its output; ``sink`` consumes that output and refuses it, so the output travels on into the
next step's message and its dead letter. tests/apps/test_secret_outputs.py checks that the token
reaches none of what the mesh keeps or prints."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mesh import App, Context, ToolContext, host_port, send_request
from mesh.agents.pipelines import Pipeline
from mesh.contracts import PermanentFailure

app = App("echoing")


class Fetch(BaseModel):
    url: str


class Fetched(BaseModel):
    echo: str
    headers: dict[str, str]
    count: int


class Done(BaseModel):
    ok: bool


class Lookup(BaseModel):
    url: str


@app.tool(dependency=lambda args: host_port(args.url), secrets=["ECHO_TOKEN"], effect=False)
def lookup(ctx: ToolContext, args: Lookup) -> dict[str, Any]:
    """POSTs with the bearer token; the answer is whatever the service sent back."""
    headers = {"Authorization": f"Bearer {ctx.secret('ECHO_TOKEN')}"}
    answer: dict[str, Any] = send_request(ctx, "POST", args.url, json={}, headers=headers).json()
    return answer


@app.agent(tools=["lookup"])
def fetch(ctx: Context, job: Fetch) -> Fetched:
    """Returns the echo as it came: the token in a value, in a key, next to a number."""
    answer = ctx.call("lookup", Lookup(url=job.url))
    ctx.progress(f"the service said {answer['you_sent']}")
    return Fetched(echo=answer["you_sent"], headers={answer["you_sent"]: "sent"}, count=1234567890123)


@app.agent
def sink(ctx: Context, fetched: Fetched) -> Done:
    """Refuses what it is given, so the step's message (the fetched output) is dead-lettered."""
    raise PermanentFailure(f"sink refuses {fetched.echo[:12]}...")


app.pipeline(Pipeline("echo").step("fetch").step("sink", depends_on=["fetch"])
             .tracing(log_inputs=True, log_outputs=True).build())
