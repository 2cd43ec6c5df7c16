"""``http_post``: POST JSON to an allow-listed host:port, carrying the message key and the trace."""

from __future__ import annotations

import logging

from mesh.contracts import Receipt
from mesh.contracts.tools import HttpPostArgs

from .allow import pin
from .base import ToolContext, effect_id
from .http import host_port, send_request

logger = logging.getLogger(__name__)


def target(args: HttpPostArgs) -> str:
    """The dependency (and breaker) a call reaches: the URL's ``host:port``."""
    return host_port(args.url)


def http_post(ctx: ToolContext, args: HttpPostArgs) -> Receipt:
    """POST ``args.json`` (and the findings, when given) to ``args.url``; the host:port must be in
    the tool's allowlist (MESH_HTTP_ALLOW unless declared with ``allow=``), and the request connects
    to the address that was checked (see :mod:`mesh.agents.tools.allow`). The endpoint gets
    ``Idempotency-Key``, ``X-Mesh-Fencing-Token`` and ``traceparent``."""
    pinned = pin(args.url, ctx.allowlist, ctx.resolve, listed_in=ctx.allowlist_name)
    body = dict(args.json_body)
    if args.findings:
        body["findings"] = args.findings
    response = send_request(ctx, "POST", args.url, json=body, via=pinned)
    logger.info("http_post done", extra={"dependency": pinned.dependency, "address": pinned.address,
                                         "status": response.status_code})
    return Receipt(tool="http_post", effect_id=effect_id(ctx.key),
                   detail={"url": args.url, "status": response.status_code, "response": response.text[:500]})
