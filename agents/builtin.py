"""The built-in planner → researchers → executor, declared through the same public API as any
user's agents and pipelines (``App``, ``@app.agent``, ``@app.tool``, ``app.pipeline``): no private
path, and no import of it from the runtime: it is one app among others, loaded where it is served
(``mesh worker`` without ``--app``) and where its flow is run. The flow between the agents is the
pipeline ``builtin.yaml``, which ``MeshClient.submit`` (``mesh submit``) runs, loading this module at
its first call."""

from __future__ import annotations

from pathlib import Path

from mesh.contracts import Findings, Plan, PlannerInput, Receipt, ResearchInput, ToolCall
from mesh.contracts.tools import HttpPostArgs, NoteArgs

from .app import App
from .context import Context
from .tools import http_post, verify_note, verify_post, write_note
from .tools.http_post import target as http_post_target

app = App("mesh")

# ``note`` writes to the mesh's own store (no dependency of its own, no breaker); ``http_post``
# reaches the URL's host:port, which names its breaker. ``note`` verifies by reading the note back;
# ``http_post`` by a GET of its ``verify_url`` when the call gives one (else it shows unverified).
app.tool(write_note, name="note", args=NoteArgs, dependency=None, verify=verify_note)
app.tool(http_post, name="http_post", args=HttpPostArgs, dependency=http_post_target, verify=verify_post)


@app.agent(name="planner", timeout_retries=1)
def planner(ctx: Context, task: PlannerInput) -> Plan:
    """Turns a goal into research and action steps (a model call: a timed-out one is retried once)."""
    plan = ctx.model.plan(task.goal, timeout_s=ctx.deadline_left_s())
    ctx.progress(f"{ctx.model.name} answered with {len(plan.steps)} steps")
    return plan


@app.agent(name="researcher", timeout_retries=1)
def researcher(ctx: Context, task: ResearchInput) -> Findings:
    """Answers one research question with sourced findings."""
    findings = ctx.model.research(task.question, timeout_s=ctx.deadline_left_s())
    ctx.progress(f"{ctx.model.name} answered with {len(findings.findings)} findings")
    return findings


@app.agent(name="executor", tools=["note", "http_post"])
def executor(ctx: Context, call: ToolCall) -> Receipt:
    """Calls one tool; its timeouts fail fast (the tool may have acted before timing out)."""
    receipt: Receipt = ctx.call(call.tool, call.typed_args())
    return receipt


#: The flow itself, a declared pipeline (``builtin.yaml``): ``MeshClient.submit`` runs it.
PIPELINE = app.pipeline(Path(__file__).with_name("builtin.yaml"))
