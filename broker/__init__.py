"""Everything between Redis and an agent: broker, middleware, settings, client for apps."""

from __future__ import annotations

from .client import JobRef, MeshClient, WaitTimeout, job_id_for
from .connection import NotReplicated
from .jobs import JobNotFound, JobStore
from .keys import Keys
from .settings import MeshSettings

__all__ = ["JobNotFound", "JobRef", "JobStore", "Keys", "MeshClient", "MeshSettings", "NotReplicated", "WaitTimeout",
           "job_id_for"]
