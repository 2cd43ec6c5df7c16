"""A user's app whose tools call a dependency with a credential minted for each call. The minters
(one sync, one ``async def``) ask a token server (``MINT_TOKEN_URL``) for a token, presenting the
tool's declared secret ``MINT_CLIENT_SECRET``; the tools send it as a bearer token, log it, and
return the dependency's answer (which echoes it). tests/apps/test_minted_credentials.py runs it on
a real worker against loopback servers."""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
from pydantic import BaseModel

from mesh import App, Context, Credential, CredentialScope, ToolContext, asend_request, host_port, send_request

app = App("minting")
logger = logging.getLogger(__name__)


class Call(BaseModel):
    url: str
    n: int


class Job(BaseModel):
    url: str
    first: int
    second: int


class Done(BaseModel):
    answers: list[dict[str, Any]]


def _request(scope: CredentialScope) -> dict[str, Any]:
    auth = f"Basic {scope.secret('MINT_CLIENT_SECRET')}"
    return {"url": os.environ["MINT_TOKEN_URL"], "headers": {"authorization": auth},
            "json": {"tool": scope.tool, "n": scope.args.n, "key": scope.key, "job_id": scope.job_id,  # type: ignore[attr-defined]
                     "step_id": scope.step_id, "attempt": scope.attempt}}


def _credential(answer: httpx.Response) -> Credential:
    if answer.status_code != 200:
        raise RuntimeError(f"token server said {answer.status_code}: {answer.json()['error']}")
    body = answer.json()
    return Credential(body["token"], expires_at=body["expires_at"])


def issue(scope: CredentialScope) -> Credential:
    """Mints through the token server."""
    return _credential(httpx.post(**_request(scope), timeout=scope.timeout_s(5)))


async def aissue(scope: CredentialScope) -> Credential:
    """Mints through the token server, awaited."""
    async with httpx.AsyncClient(timeout=scope.timeout_s(5)) as client:
        return _credential(await client.post(**_request(scope)))


@app.tool(dependency=lambda args: host_port(args.url), secrets=["MINT_CLIENT_SECRET"], mint=issue)
def call_api(ctx: ToolContext, args: Call) -> dict[str, Any]:
    """POSTs with the minted bearer token (and logs it, as careless tools do)."""
    logger.warning("calling %s with token %s", args.url, ctx.credential.token)
    answer: dict[str, Any] = send_request(ctx, "POST", args.url, json={"n": args.n},
                                          headers={"Authorization": f"Bearer {ctx.credential.token}"}).json()
    return answer


@app.tool(dependency=lambda args: host_port(args.url), secrets=["MINT_CLIENT_SECRET"], mint=aissue)
async def acall_api(ctx: ToolContext, args: Call) -> dict[str, Any]:
    """:func:`call_api`, awaited."""
    answer = await asend_request(ctx, "POST", args.url, json={"n": args.n},
                                 headers={"Authorization": f"Bearer {ctx.credential.token}"})
    body: dict[str, Any] = answer.json()
    return body


@app.agent(tools=[call_api, acall_api])
def caller(ctx: Context, job: Job) -> Done:
    """Two calls, each with a credential of its own: the first sync, the second async."""
    first = ctx.call(call_api, Call(url=job.url, n=job.first))
    second = ctx.call(acall_api, Call(url=job.url, n=job.second))
    return Done(answers=[first, second])
