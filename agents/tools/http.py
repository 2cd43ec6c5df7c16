"""HTTP for tools and handlers: the message key, fencing token and trace on every request, the
timeout cut to the deadline, and failures raised as the mesh's classes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from mesh.broker.classify import error_for_response
from mesh.contracts import Brownout, DependencyTimeout, traceparent

from .base import ToolContext


def host_port(url: str) -> str:
    """``host:port`` of ``url``: the identity of its dependency (and of its circuit breaker)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def send_request(tool: ToolContext, method: str, url: str, *, timeout_s: float | None = None,
                 **kwargs: Any) -> httpx.Response:
    """One HTTP request carrying the message key (``Idempotency-Key``), the fencing token and the
    trace, its timeout cut to the deadline, its failures raised as the mesh's classes (a 429
    rate_limited, a 503 brownout, a 400 permanent). No breaker here: the caller guards the call."""
    dependency = host_port(url)
    timeout = tool.timeout_s(timeout_s or tool.settings.http_timeout_s)
    headers = {"Idempotency-Key": tool.key, "X-Mesh-Fencing-Token": str(tool.fencing_token),
               "traceparent": traceparent(tool.trace_id), **kwargs.pop("headers", {})}
    try:
        response = tool.http.request(method, url, headers=headers, timeout=timeout, **kwargs)
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # Nothing was sent: safe to treat like a dependency that is down.
        raise Brownout(f"{dependency} not reachable in time: {exc}", dependency=dependency) from exc
    except httpx.TimeoutException as exc:
        # The request may have been applied: the effect cannot be proven either way.
        raise DependencyTimeout(f"{dependency} timed out after {timeout:g}s: {exc}", dependency=dependency,
                                effect_unknown=method.upper() not in ("GET", "HEAD")) from exc
    except httpx.TransportError as exc:
        raise Brownout(f"{dependency} unreachable: {exc}", dependency=dependency) from exc
    if not response.is_success:
        raise error_for_response(response, dependency=dependency)
    return response
