"""Small agents named as the issue's pipeline file expects: researcher, coder, reviewer, deployer.

Their output models are the file's ``output_schema`` names in CamelCase (``research_result`` is
``ResearchResult``): coder's output has the ``confidence`` reviewer's gate reads, reviewer's the
``approved`` deployer's gate reads. ``Findings`` carries a list for ``for_each`` tests.
"""

from __future__ import annotations

from pydantic import BaseModel

from mesh import App, Context

app = App("orchestration")


class Task(BaseModel):
    goal: str


class Source(BaseModel):
    url: str
    score: float


class ResearchResult(BaseModel):
    summary: str
    sources: list[Source] = []


class CodeDiff(BaseModel):
    diff: str
    confidence: float


class ReviewResult(BaseModel):
    approved: bool
    comments: str = ""


class Deployment(BaseModel):
    url: str


@app.agent
def researcher(ctx: Context, task: Task) -> ResearchResult:
    """Researches the goal."""
    return ResearchResult(summary=f"notes on {task.goal}")


@app.agent
def coder(ctx: Context, research: ResearchResult) -> CodeDiff:
    """Writes a diff from the research."""
    return CodeDiff(diff=f"+ {research.summary}", confidence=0.9)


@app.agent
def reviewer(ctx: Context, diff: CodeDiff) -> ReviewResult:
    """Approves a confident diff."""
    return ReviewResult(approved=diff.confidence >= 0.85)


@app.agent
def deployer(ctx: Context, review: ReviewResult) -> Deployment:
    """Deploys an approved change."""
    return Deployment(url="https://example.invalid/deploy/1")
