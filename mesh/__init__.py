"""The agent mesh: one import package for apps.

    from mesh import App, Context, MeshClient, PermanentFailure

Every name an app uses is here (``mesh.__all__``, each one on the Python API reference page):
``App`` declares agents and tools (``@app.agent``, ``@app.tool``); ``Context`` is what a handler
is given; ``ToolContext`` what a tool is given; ``Pipeline`` and ``load_pipeline`` declare
pipelines; ``MeshClient`` sends work and follows jobs; the errors are those a handler or tool
raises (``PermanentFailure``, ``RateLimited``, ...) and those a send or a decision raises
(``ContractError``, ``AlreadyDecided``, ...). The repository's folders are its subpackages:
``mesh.contracts`` (the typed language), ``mesh.broker`` (Redis, middleware, client),
``mesh.agents`` (the agent runtime), ``mesh.dlq`` (dead letters) and ``mesh.ops`` (the ``mesh``
command); ``mesh.testing`` is what an app's tests use (``TestContext``, ``TestModel``,
``run_pipeline``), imported only by them. Everything imported here is imported by ``import mesh``
anyway (the built-in flow needs it), so the list costs nothing at import.
"""

from __future__ import annotations

from mesh.agents import builtin as _builtin  # noqa: F401  (registers the flow ``MeshClient.submit`` runs)
from mesh.agents.app import AgentSpec, App, ToolSpec, load_app
from mesh.agents.context import Context
from mesh.agents.pipelines import Pipeline, PipelineError, PipelineSpec, load_pipeline
from mesh.agents.tools.base import ToolContext, effect_id
from mesh.agents.tools.http import host_port, send_request
from mesh.broker import JobNotFound, JobRef, MeshClient, MeshSettings, NotReplicated, WaitTimeout
from mesh.broker.approvals import (
    AlreadyDecided,
    ApprovalError,
    ApprovalExpired,
    InvalidDecision,
    NotAnApprover,
    NotAwaiting,
)
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

__all__ = [
    "AgentSpec", "AlreadyDecided", "App", "ApprovalError", "ApprovalExpired", "Brownout", "ConfigError", "Context",
    "ContractError", "DependencyTimeout", "EffectRefuted", "EffectUnknown", "FailureClass", "InvalidDecision",
    "InvalidOutput", "JobNotFound", "JobRecord", "JobRef", "KeyConflict", "LimitExceeded", "MeshClient",
    "MeshError", "MeshSettings", "NotAnApprover", "NotAwaiting", "NotReplicated", "PermanentFailure", "Pipeline",
    "PipelineError", "PipelineSpec", "RateLimited", "Receipt", "State", "StepRecord", "ToolContext", "ToolRefused",
    "ToolSpec", "UnknownAgent", "Verdict", "WaitTimeout", "effect_id", "host_port", "load_app", "load_pipeline",
    "send_request"
]
