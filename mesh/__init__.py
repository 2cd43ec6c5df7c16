"""The agent mesh: one import package for apps.

    from mesh import MeshClient, MeshSettings

The repository's folders are its subpackages: ``mesh.contracts`` (the typed language),
``mesh.broker`` (Redis, middleware, client), ``mesh.agents`` (the agent runtime), ``mesh.dlq``
(dead letters) and ``mesh.ops`` (the ``mesh`` command).
"""

from __future__ import annotations

from mesh.broker import JobRef, MeshClient, MeshSettings, WaitTimeout
from mesh.contracts import FailureClass, MeshError, State

__all__ = ["FailureClass", "JobRef", "MeshClient", "MeshError", "MeshSettings", "State", "WaitTimeout"]
