"""HTTP for tools and handlers: the message key, fencing token and trace on every request, the
timeout cut to the deadline, and failures raised as the mesh's classes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from mesh.broker.classify import error_for_response
from mesh.contracts import Brownout, DependencyTimeout, PermanentFailure, traceparent

from .allow import Pinned
from .base import ToolContext


def host_port(url: str) -> str:
    """``host:port`` of ``url``: the identity of its dependency (and of its circuit breaker)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def send_request(tool: ToolContext, method: str, url: str, *, timeout_s: float | None = None,
                 via: Pinned | None = None, **kwargs: Any) -> httpx.Response:
    """One HTTP request carrying the message key (``Idempotency-Key``), the fencing token and the
    trace, its timeout cut to the deadline, its failures raised as the mesh's classes (a 429
    rate_limited, a 503 brownout, a 400 permanent). No breaker here: the caller guards the call.

    Redirects are not followed: a 3xx is a permanent failure naming where it pointed. The body is
    read up to MESH_MAX_RESPONSE_BYTES; a longer one fails the call (permanent; the effect of a
    request other than GET/HEAD is unknown). ``via``: connect to that checked address
    (:func:`mesh.agents.tools.allow.pin`), the URL's host going in ``Host`` and TLS SNI."""
    dependency = host_port(url) if via is None else via.dependency
    timeout = tool.timeout_s(timeout_s or tool.settings.http_timeout_s)
    headers = {"Idempotency-Key": tool.key, "X-Mesh-Fencing-Token": str(tool.fencing_token),
               "traceparent": traceparent(tool.trace_id), **kwargs.pop("headers", {})}
    if via is not None:
        headers["Host"] = urlsplit(url).netloc.rsplit("@", 1)[-1]
        if via.scheme == "https":
            kwargs["extensions"] = {**kwargs.get("extensions", {}), "sni_hostname": via.host}
        url = via.url(url)
    effect_unknown = method.upper() not in ("GET", "HEAD")
    try:
        request = tool.http.build_request(method, url, headers=headers, timeout=timeout, **kwargs)
        response = tool.http.send(request, stream=True, follow_redirects=False)
        try:
            response = _bounded(response, tool.settings.max_response_bytes, dependency, effect_unknown)
        finally:
            response.close()
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        # Nothing was sent: safe to treat like a dependency that is down.
        raise Brownout(f"{dependency} not reachable in time: {exc}", dependency=dependency) from exc
    except httpx.TimeoutException as exc:
        # The request may have been applied: the effect cannot be proven either way.
        raise DependencyTimeout(f"{dependency} timed out after {timeout:g}s: {exc}", dependency=dependency,
                                effect_unknown=effect_unknown) from exc
    except httpx.TransportError as exc:
        raise Brownout(f"{dependency} unreachable: {exc}", dependency=dependency) from exc
    if response.is_redirect:
        # Following it could leave the allowlist; a 303 answers a request that was applied.
        raise PermanentFailure(f"{dependency} answered {response.status_code} redirecting to "
                               f"{response.headers.get('location', '?')}: redirects are not followed",
                               dependency=dependency, status=response.status_code,
                               effect_unknown=effect_unknown and response.status_code == 303)
    if not response.is_success:
        raise error_for_response(response, dependency=dependency)
    return response


def _bounded(response: httpx.Response, limit: int, dependency: str, effect_unknown: bool) -> httpx.Response:
    """``response`` with its body read, refused past ``limit`` bytes without reading further."""
    def too_big(size: str) -> PermanentFailure:
        return PermanentFailure(f"{dependency} answered {response.status_code} with a body of {size}, over "
                                f"MESH_MAX_RESPONSE_BYTES ({limit}): not read", dependency=dependency,
                                status=response.status_code, effect_unknown=effect_unknown)

    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big(f"{declared} bytes")
    body, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise too_big(f"more than {limit} bytes")
        body.append(chunk)
    # The body is decoded already: the headers that described its coding on the wire go.
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=b"".join(body),
                          request=response.request, extensions=response.extensions)
