"""Small agents named as the issue's pipeline file expects: researcher, coder, reviewer, deployer.

Their output models are the file's ``output_schema`` names in CamelCase (``research_result`` is
``ResearchResult``): coder's output has the ``confidence`` reviewer's gate reads, reviewer's the
``approved`` deployer's gate reads. ``Findings`` carries a list for ``for_each`` tests.

Their behaviour follows the run's input, so tests steer a run without other knobs: the researcher
passes ``confidence`` on and the coder answers it. Every execution is counted per step key in the
hash ``{ns}:test.runs``; a step key listed in the set ``{ns}:test.fail`` fails permanently, one in
``{ns}:test.flaky`` with an error that is retried, one in ``{ns}:test.timeout`` with a timeout.

For ``for_each`` tests: ``scout`` lists ``count`` sources, ``fetch`` runs once per source (counting
how many run at once in ``{ns}:test.inflight``, the most ever in the sorted set ``{ns}:test.peak``)
and ``digest`` joins the pages.

For crash tests: ``hold`` writes its process id to ``{ns}:test.holder`` and waits (at most 60 s)
until ``{ns}:test.release`` exists, so a test can SIGKILL the worker that holds the step.
"""

from __future__ import annotations

import os
import time

import httpx
from pydantic import BaseModel, ConfigDict

from mesh import App, Context
from mesh.broker.keys import prefix
from mesh.contracts import PermanentFailure

app = App("orchestration")


class Task(BaseModel):
    goal: str
    #: The confidence the coder will answer.
    confidence: float = 0.9
    #: How many sources ``scout`` lists.
    count: int = 0


class Source(BaseModel):
    url: str
    score: float


class ResearchResult(BaseModel):
    summary: str
    sources: list[Source] = []
    confidence: float = 0.9


class CodeDiff(BaseModel):
    diff: str
    confidence: float


class ReviewResult(BaseModel):
    approved: bool
    comments: str = ""


class Deployment(BaseModel):
    url: str


class Page(BaseModel):
    url: str
    words: int


class Gathered(BaseModel):
    """A for_each step's output: its successful items' outputs and the failed items' errors."""

    items: list[Page]
    failed: dict[str, str] = {}


class Digest(BaseModel):
    pages: int
    words: int


class Parts(BaseModel):
    """Several upstream outputs, keyed by step id."""

    model_config = ConfigDict(extra="allow")


class Given(BaseModel):
    """Whatever a step is given: the run's input (its dependencies skipped) or an upstream output."""

    model_config = ConfigDict(extra="allow")


def _ran(ctx: Context) -> None:
    """Count this execution; fail for good while the step's key is listed to fail."""
    runtime, ns = ctx.runtime, ctx.runtime.settings.namespace
    runtime.redis.hincrby(f"{prefix(ns)}:test.runs", ctx.key, 1)
    if runtime.redis.sismember(f"{prefix(ns)}:test.fail", ctx.key):
        raise PermanentFailure(f"step {ctx.step_id} told to fail")
    if runtime.redis.sismember(f"{prefix(ns)}:test.flaky", ctx.key):
        raise RuntimeError(f"step {ctx.step_id} told to fail, retryably")
    if runtime.redis.sismember(f"{prefix(ns)}:test.timeout", ctx.key):
        raise httpx.ReadTimeout(f"step {ctx.step_id} told to time out")


@app.agent
def researcher(ctx: Context, task: Task) -> ResearchResult:
    """Researches the goal."""
    _ran(ctx)
    return ResearchResult(summary=f"notes on {task.goal}", confidence=task.confidence)


@app.agent
def combine(ctx: Context, parts: Parts) -> ResearchResult:
    """Merges several research results into one."""
    _ran(ctx)
    found = [ResearchResult.model_validate(v) for v in (parts.model_extra or {}).values()]
    return ResearchResult(summary="; ".join(r.summary for r in found), confidence=min(r.confidence for r in found))


@app.agent
def jot(ctx: Context, given: Given) -> ResearchResult:
    """Notes which fields it was given (a run's input or an upstream output: it takes either)."""
    _ran(ctx)
    return ResearchResult(summary=", ".join(sorted(given.model_extra or {})))


@app.agent
def coder(ctx: Context, research: ResearchResult) -> CodeDiff:
    """Writes a diff from the research."""
    _ran(ctx)
    return CodeDiff(diff=f"+ {research.summary}", confidence=research.confidence)


@app.agent
def reviewer(ctx: Context, diff: CodeDiff) -> ReviewResult:
    """Approves a confident diff."""
    _ran(ctx)
    return ReviewResult(approved=diff.confidence >= 0.85)


@app.agent
def deployer(ctx: Context, review: ReviewResult) -> Deployment:
    """Deploys an approved change."""
    _ran(ctx)
    return Deployment(url="https://example.invalid/deploy/1")


@app.agent
def scout(ctx: Context, task: Task) -> ResearchResult:
    """Lists ``task.count`` sources."""
    _ran(ctx)
    return ResearchResult(summary=task.goal, sources=[Source(url=f"https://example.invalid/{i}", score=i)
                                                      for i in range(task.count)])


@app.agent
def fetch(ctx: Context, source: Source) -> Page:
    """Fetches one source; counts how many fetches run at once."""
    runtime, ns = ctx.runtime, ctx.runtime.settings.namespace
    now = runtime.redis.incr(f"{prefix(ns)}:test.inflight")
    try:
        runtime.redis.zadd(f"{prefix(ns)}:test.peak", {"peak": now}, gt=True)
        time.sleep(0.02)  # the fetch takes a moment, so fetches overlap when allowed to
        _ran(ctx)
        return Page(url=source.url, words=int(source.score) * 10)
    finally:
        runtime.redis.decr(f"{prefix(ns)}:test.inflight")


@app.agent
def digest(ctx: Context, gathered: Gathered) -> Digest:
    """Joins the fetched pages."""
    _ran(ctx)
    return Digest(pages=len(gathered.items), words=sum(p.words for p in gathered.items))


@app.agent
def hold(ctx: Context, diff: CodeDiff) -> CodeDiff:
    """Passes the diff on once released; says which process holds it while it waits."""
    runtime, ns = ctx.runtime, ctx.runtime.settings.namespace
    _ran(ctx)
    runtime.redis.set(f"{prefix(ns)}:test.holder", os.getpid())
    deadline = time.monotonic() + 60
    while not runtime.redis.exists(f"{prefix(ns)}:test.release") and time.monotonic() < deadline:
        time.sleep(0.05)  # a stand-in for slow work: the test releases it
    return diff
