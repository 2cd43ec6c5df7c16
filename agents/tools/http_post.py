"""``http_post``: POST JSON to an allow-listed host:port, carrying the message key and the trace."""

from __future__ import annotations

import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

import httpx

from mesh.contracts import PermanentFailure, Receipt
from mesh.contracts.effects import Verdict
from mesh.contracts.errors import EffectRefuted, EffectUnknown
from mesh.contracts.tools import HttpPostArgs

from .allow import Pinned, pin
from .base import ToolContext, effect_id
from .http import asend_request, host_port, send_request

logger = logging.getLogger(__name__)


def target(args: HttpPostArgs) -> str:
    """The dependency (and breaker) a call reaches: the URL's ``host:port``."""
    return host_port(args.url)


def http_post(ctx: ToolContext, args: HttpPostArgs) -> Receipt:
    """POST ``args.json`` (and the findings, when given) to ``args.url``; the host:port must be in
    the tool's allowlist (MESH_HTTP_ALLOW unless declared with ``allow=``), and the request connects
    to the address that was checked (see :mod:`mesh.agents.tools.allow`). The endpoint gets
    ``Idempotency-Key``, ``X-Mesh-Fencing-Token`` and ``traceparent``."""
    pinned, body = _post(ctx, args)
    return _receipt(ctx, args, pinned, send_request(ctx, "POST", args.url, json=body, via=pinned))


async def ahttp_post(ctx: ToolContext, args: HttpPostArgs) -> Receipt:
    """:func:`http_post` awaited (:func:`~mesh.agents.tools.http.asend_request`): for an ``async def``
    tool of an app's own; the same checks, headers and receipt."""
    pinned, body = _post(ctx, args)
    return _receipt(ctx, args, pinned, await asend_request(ctx, "POST", args.url, json=body, via=pinned))


def _post(ctx: ToolContext, args: HttpPostArgs) -> tuple[Pinned, dict[str, Any]]:
    """Where the POST goes (checked now) and its body."""
    pinned = pin(args.url, ctx.allowlist, ctx.resolve, listed_in=ctx.allowlist_name)
    if args.verify_url is not None:
        # Refused now, before the effect, rather than leaving an effect no check can ever prove.
        pin(args.verify_url, ctx.allowlist, ctx.resolve, listed_in=ctx.allowlist_name)
    body = dict(args.json_body)
    if args.findings:
        body["findings"] = args.findings
    return pinned, body


def _receipt(ctx: ToolContext, args: HttpPostArgs, pinned: Pinned, response: httpx.Response) -> Receipt:
    logger.info("http_post done", extra={"dependency": pinned.dependency, "address": pinned.address,
                                         "status": response.status_code})
    return Receipt(tool="http_post", effect_id=effect_id(ctx.key),
                   detail={"url": args.url, "status": response.status_code, "response": response.text[:500]})


def verify_post(ctx: ToolContext, args: HttpPostArgs, result: Receipt | None) -> Receipt | Verdict:
    """``http_post``'s verifier: GET ``args.verify_url`` (allow-listed like the POST, carrying the
    same Idempotency-Key); it must answer 2xx with the key or the receipt's effect id in its body or
    headers. A 404, or a 2xx that names neither, refutes the effect; a verify URL that cannot be
    reached or answers another error leaves it unknown (the error propagates). An answer that
    echoes the request back (it carries the nonce the GET was sent with) proves nothing: unknown;
    and the key written in the verify URL itself does not count when echoed. No ``verify_url``:
    the call shows ``unverified``."""
    if args.verify_url is None:
        return Verdict.UNVERIFIED
    receipt = effect_id(ctx.key)
    nonce = secrets.token_hex(16)
    try:
        response = ctx.http.get(args.verify_url, headers={"X-Mesh-Verify-Nonce": nonce})
    except PermanentFailure as exc:
        if exc.context.get("status") in (404, 410):
            raise EffectRefuted(f"GET {args.verify_url} answered {exc.context['status']}: no such resource") from exc
        raise
    seen = response.text + " ".join(response.headers.values())
    if nonce in seen:
        # It answers with what it was sent (the key went out in the request): no proof either way.
        raise EffectUnknown(f"GET {args.verify_url} echoes the request back: its answer proves nothing")
    asked = urlsplit(args.verify_url)
    for echo in (args.verify_url, asked.path + (f"?{asked.query}" if asked.query else "")):
        seen = seen.replace(echo, "")  # a key named in the verify URL itself, echoed back, proves nothing
    if ctx.key not in seen and receipt not in seen:
        raise EffectRefuted(f"GET {args.verify_url} answered {response.status_code} without the request's "
                            f"Idempotency-Key or effect id {receipt}")
    if result is not None:
        return result
    return Receipt(tool="http_post", effect_id=receipt,
                   detail={"url": args.url, "verified_by": args.verify_url, "status": response.status_code})
