"""The agent mesh: one import package for apps.

    from mesh import App, Context, MeshClient, PermanentFailure

Every name an app uses is here (``mesh.__all__``, each one on the Python API reference page):
``App`` declares agents and tools (``@app.agent``, ``@app.tool``, which return an ``Agent`` and a
``Tool``: the function still, typed by its models); ``Context`` is what a handler is given
(``AsyncContext`` an ``async def`` one); ``ToolContext`` what a tool is given; ``Pipeline`` and
``load_pipeline`` declare pipelines; ``Credential`` and ``CredentialScope`` are what a tool's credential
minter (``@app.tool(mint=...)``) returns and is given; ``MeshClient`` sends work and follows jobs; the errors are
those a handler or tool raises (``PermanentFailure``, ``RateLimited``, ...) and those a send or a
decision raises (``ContractError``, ``AlreadyDecided``, ...). The repository's folders are its subpackages:
``mesh.contracts`` (the typed language), ``mesh.broker`` (Redis, middleware, client),
``mesh.agents`` (the agent runtime), ``mesh.dlq`` (dead letters) and ``mesh.ops`` (the ``mesh``
command); ``mesh.testing`` is what an app's tests use (``TestContext``, ``TestModel``,
``run_pipeline``), imported only by them. The built-in planner → researchers → executor
(:mod:`mesh.agents.builtin`) is one app among others: ``import mesh`` does not load it; a worker
serving it and ``MeshClient.submit`` (which runs its flow) do.
"""

from __future__ import annotations

from mesh.agents.app import Agent, AgentSpec, App, Tool, ToolSpec, load_app
from mesh.agents.async_context import AsyncContext
from mesh.agents.context import Context
from mesh.agents.credentials import Credential, CredentialScope
from mesh.agents.pipelines import Pipeline, PipelineError, PipelineSpec, load_pipeline
from mesh.agents.pipelines import jobctl as _jobctl  # noqa: F401  (registers MeshClient.cancel and .rerun)
from mesh.agents.pipelines import waits as _waits  # noqa: F401  (registers MeshClient.signal and .emit)
from mesh.agents.tools.base import ToolContext, effect_id
from mesh.agents.tools.http import AsyncGuardedHttp, asend_request, host_port, send_request
from mesh.agents.tools.mcp import McpResult, McpServer, McpToolError
from mesh.broker import JobNotFound, JobRef, MeshClient, MeshSettings, NotReplicated, WaitTimeout
from mesh.broker.approvals import (
    AlreadyDecided,
    ApprovalError,
    ApprovalExpired,
    InvalidDecision,
    NotAnApprover,
    NotAwaiting,
)
from mesh.broker.client import on_submit as _on_submit
from mesh.contracts import (
    Brownout,
    ConfigError,
    ContractError,
    DependencyTimeout,
    FailureClass,
    InvalidOutput,
    JobRecord,
    KeyConflict,
    LimitExceeded,
    MeshError,
    NoOutput,
    PermanentFailure,
    RateLimited,
    Receipt,
    State,
    StepRecord,
    ToolRefused,
    UnknownAgent,
)
from mesh.contracts.effects import Verdict
from mesh.contracts.errors import EffectRefuted, EffectUnknown


def _builtin_flow() -> PipelineSpec:
    """The pipeline ``MeshClient.submit`` runs, loaded with the built-in app at the first submit."""
    from mesh.agents.builtin import PIPELINE

    return PIPELINE


_on_submit(_builtin_flow)

__all__ = [
    "Agent", "AgentSpec", "AlreadyDecided", "App", "ApprovalError", "ApprovalExpired", "AsyncContext",
    "AsyncGuardedHttp", "Brownout", "ConfigError", "Context", "ContractError", "Credential", "CredentialScope",
    "DependencyTimeout", "EffectRefuted",
    "EffectUnknown", "FailureClass", "InvalidDecision", "InvalidOutput", "JobNotFound", "JobRecord", "JobRef",
    "KeyConflict", "LimitExceeded", "McpResult", "McpServer", "McpToolError", "MeshClient", "MeshError",
    "MeshSettings", "NoOutput", "NotAnApprover",
    "NotAwaiting", "NotReplicated", "PermanentFailure", "Pipeline", "PipelineError", "PipelineSpec", "RateLimited",
    "Receipt", "State", "StepRecord", "Tool", "ToolContext", "ToolRefused", "ToolSpec", "UnknownAgent", "Verdict",
    "WaitTimeout", "asend_request", "effect_id",
    "host_port", "load_app", "load_pipeline", "send_request"
]
