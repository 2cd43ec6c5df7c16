"""The agent mesh: one import package for apps.

    from mesh import App, Context, MeshClient

``App`` declares agents and tools (``@app.agent``, ``@app.tool``); ``Context`` is what a handler
is given; ``ToolContext`` what a tool is given; ``MeshClient`` sends work and follows jobs. The
repository's folders are its subpackages: ``mesh.contracts`` (the typed language), ``mesh.broker``
(Redis, middleware, client), ``mesh.agents`` (the agent runtime), ``mesh.dlq`` (dead letters) and
``mesh.ops`` (the ``mesh`` command).
"""

from __future__ import annotations

from mesh.agents import builtin as _builtin  # noqa: F401  (registers the flow ``MeshClient.submit`` runs)
from mesh.agents.app import AgentSpec, App, ToolSpec, load_app
from mesh.agents.context import Context
from mesh.agents.tools.base import ToolContext
from mesh.agents.tools.http import host_port, send_request
from mesh.broker import JobRef, MeshClient, MeshSettings, WaitTimeout
from mesh.contracts import FailureClass, MeshError, Receipt, State

__all__ = ["AgentSpec", "App", "Context", "FailureClass", "JobRef", "MeshClient", "MeshError", "MeshSettings",
           "Receipt", "State", "ToolContext", "ToolSpec", "WaitTimeout", "host_port", "load_app", "send_request"]
