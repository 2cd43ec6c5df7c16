"""``http_post``: POST JSON to an allow-listed host:port, carrying the message key and the trace."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import httpx

from mesh.broker.classify import error_for_response
from mesh.contracts import Brownout, DependencyTimeout, Receipt, ToolRefused, traceparent
from mesh.contracts.tools import HttpPostArgs

from .base import ToolContext, effect_id

logger = logging.getLogger(__name__)


def host_port(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{(parts.hostname or '').lower()}:{port}"


def http_post(ctx: ToolContext, args: HttpPostArgs) -> Receipt:
    try:
        dependency = host_port(args.url)
    except ValueError as exc:  # e.g. a non-numeric or out-of-range port: no retry can cure it
        raise ToolRefused(f"http_post to {args.url} refused: {exc}", url=args.url) from None
    if dependency not in ctx.settings.http_allowlist:
        raise ToolRefused(f"http_post to {dependency} refused: not in MESH_HTTP_ALLOW", dependency=dependency)
    body = dict(args.json_body)
    if args.findings:
        body["findings"] = args.findings
    headers = {
        "Idempotency-Key": ctx.key,
        "traceparent": traceparent(ctx.trace_id),
        "X-Mesh-Fencing-Token": str(ctx.fencing_token),
    }
    timeout = ctx.timeout_s(ctx.settings.http_timeout_s)

    def send() -> httpx.Response:
        try:
            response = ctx.http.post(args.url, json=body, headers=headers, timeout=timeout)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing was sent: safe to treat like a dependency that is down.
            raise Brownout(f"{dependency} not reachable in time: {exc}", dependency=dependency) from exc
        except httpx.TimeoutException as exc:
            # The request may have been applied: the effect cannot be proven either way.
            raise DependencyTimeout(f"{dependency} timed out after {timeout:g}s: {exc}", dependency=dependency,
                                    effect_unknown=True) from exc
        except httpx.TransportError as exc:
            raise Brownout(f"{dependency} unreachable: {exc}", dependency=dependency) from exc
        if not response.is_success:
            raise error_for_response(response, dependency=dependency)
        return response

    response = ctx.guarded(dependency, send)
    logger.info("http_post done", extra={"dependency": dependency, "status": response.status_code})
    return Receipt(tool="http_post", effect_id=effect_id(ctx.key),
                   detail={"url": args.url, "status": response.status_code, "response": response.text[:500]})
