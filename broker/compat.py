"""dramatiq's actor options on the mesh: the ones routing honours, the ones it refuses, and why.

A :class:`~mesh.broker.mesh_broker.MeshBroker` runs actors through the mesh's own stack: the
FailureRouter replaces dramatiq's ``Retries``, the envelope's deadline replaces ``AgeLimit``, a
pipeline replaces ``Callbacks`` and ``Pipelines``, the job record replaces ``Results``. An option
only those middleware read would be accepted and then mean nothing, so a MeshBroker refuses an
actor declared with one (at declaration, :func:`check_options`), naming what the mesh does instead.
What maps onto routing keeps its dramatiq meaning:

    throws          an exception listed there is ``permanent``: dead-lettered at once, never retried
                    (a mesh error keeps its own class: it already says how it is routed)
    Retry(delay=)   raised by a handler: a deferral of that many ms (class ``rate_limited``; no retry
                    budget spent, bounded by MESH_MAX_DEFERS and the deadline); ``Retry()`` without
                    a delay is an ``unknown`` failure: retried within the budget, with backoff
    max_retries     the retry budget of the retried classes (brownout, invalid_output, unknown)
    time_limit      one of the limits the Deadline middleware takes the smallest of

docs/design/dramatiq-compat.md holds the whole table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mesh.contracts import ConfigError, MeshError

#: The dramatiq actor options a MeshBroker refuses, each with what the mesh does instead.
REFUSED: Mapping[str, str] = {
    "min_backoff": "retries back off from MESH_RETRY_MIN_BACKOFF_MS (a pipeline step's retry_policy.backoff "
                   "picks the curve); for one named wait, raise dramatiq.Retry(delay=ms)",
    "max_backoff": "retries back off up to MESH_RETRY_MAX_BACKOFF_MS (a pipeline step's retry_policy.backoff "
                   "picks the curve)",
    "retry_when": "the failure class decides: raise a mesh error of the class you mean (PermanentFailure is "
                  "never retried) or list the exception in throws; max_retries bounds the retries",
    "on_retry_exhausted": "a message out of retries goes to the mesh DLQ (mesh dlq list / replay)",
    "max_age": "a message past its envelope's deadline (MESH_JOB_DEADLINE_S) is dead-lettered as deadline",
    "on_failure": "a failed message goes to the mesh DLQ with its error; follow-up work is a pipeline step",
    "on_success": "follow-up work is a pipeline step that depends_on this one",
    "pipe_target": "chain agents with a pipeline's depends_on",
    "pipe_ignore": "a pipeline step's input: says which upstream output it reads",
    "store_results": "the result is on the job record (mesh status, MeshClient.wait)",
    "result_ttl": "job records are kept MESH_JOB_RETENTION_S after the job ends",
}


def check_options(actor_name: str, options: Mapping[str, Any], declared: Iterable[str] = ()) -> None:
    """ConfigError when ``options`` hold a refused option that no middleware of the broker
    (``declared``: their options) gives a meaning, or a ``throws`` that is not exception classes."""
    meant = set(declared)
    refused = [name for name in options if name in REFUSED and name not in meant]
    if refused:
        lines = "; ".join(f"{name}: {REFUSED[name]}" for name in refused)
        raise ConfigError(f"actor {actor_name!r}: dramatiq option(s) {', '.join(refused)} mean nothing on the "
                          f"mesh, which has no middleware that reads them; instead, {lines} "
                          "(docs/design/dramatiq-compat.md)", actor=actor_name, options=refused)
    throws = options.get("throws")
    if throws is not None and not _exception_classes(throws):
        raise ConfigError(f"actor {actor_name!r}: throws is {throws!r}; give an exception class or a tuple of them",
                          actor=actor_name)


def thrown(exception: BaseException, throws: Any) -> bool:
    """Whether ``exception`` is one its actor's ``throws`` lists, and so ``permanent``: a mesh error
    keeps its own class (the built-in agents list MeshError for quiet logs, not to stop retries)."""
    return (not isinstance(exception, MeshError) and _exception_classes(throws)
            and isinstance(exception, throws))


def _exception_classes(value: Any) -> bool:
    items = value if isinstance(value, tuple) else (value,)
    return bool(items) and all(isinstance(c, type) and issubclass(c, BaseException) for c in items)
