"""HTTP for tools and handlers: every request checked against the allowlist (MESH_HTTP_ALLOW or the
tool's ``allow=``) and sent to the address that was checked; the message key, fencing token and
trace on every request, the timeout cut to the deadline, and failures raised as the mesh's classes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from mesh.broker.classify import error_for_response
from mesh.contracts import Brownout, DependencyTimeout, PermanentFailure, ToolRefused, traceparent

from .allow import Pinned, host_key, normal_host, pin
from .base import ToolContext


def host_port(url: str) -> str:
    """``host:port`` of ``url`` in the allowlist's normal form (``127.0.0.1.`` and
    ``[::ffff:127.0.0.1]`` are ``127.0.0.1``): the identity of its dependency and circuit breaker,
    so every spelling of one address shares one breaker. A host the allowlist refuses is kept as
    written, lower case (the request itself is refused)."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"{(parts.hostname or '').lower()}:?"
    try:
        return host_key(normal_host(parts.hostname or ""), port)
    except ValueError:
        return f"{(parts.hostname or '').lower()}:{port}"


@dataclass(frozen=True)
class GuardedHttp:
    """``ctx.http`` (a handler's and a tool's): :func:`send_request` for any method. Without a
    breaker already guarding the call (a handler, or a tool that declared no dependency), each
    request goes through the breaker of the ``host:port`` it is pinned to."""

    tool: ToolContext
    #: Called with the method before each request: a handler's confirms the attempt's lease
    #: (raises LeaseLost); a tool's lease was confirmed when ``ctx.call`` ran it.
    confirm: Callable[[str], None] = lambda method: None

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """``method url`` through the allowlist, once ``confirm`` passes; see :class:`GuardedHttp`."""
        pinned = pin(url, self.tool.allowlist, self.tool.resolve, listed_in=self.tool.allowlist_name)
        self.confirm(method)
        if self.tool.dependency is not None:  # the tool's own breaker guards the whole call
            return send_request(self.tool, method, url, via=pinned, **kwargs)
        return self.tool.guarded(pinned.dependency, lambda: send_request(self.tool, method, url, via=pinned, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("PUT", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)


@dataclass(frozen=True)
class AsyncGuardedHttp:
    """``ctx.http`` of an ``async def`` handler, and ``ctx.ahttp`` of a tool: :class:`GuardedHttp`
    whose requests are awaited (:func:`asend_request`, on the running loop's ``httpx.AsyncClient``),
    with the same allowlist, pinning, lease confirmation and breakers."""

    tool: ToolContext
    confirm: Callable[[str], None] = lambda method: None
    client: httpx.AsyncClient | None = None

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """``method url`` through the allowlist, once ``confirm`` passes; see :class:`GuardedHttp`."""
        pinned = pin(url, self.tool.allowlist, self.tool.resolve, listed_in=self.tool.allowlist_name)
        self.confirm(method)

        def send() -> Awaitable[httpx.Response]:
            return asend_request(self.tool, method, url, via=pinned, client=self.client, **kwargs)

        if self.tool.dependency is not None:  # the tool's own breaker guards the whole call
            return await send()
        return await self.tool.aguarded(pinned.dependency, send)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", url, **kwargs)

    async def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", url, **kwargs)


def send_request(tool: ToolContext, method: str, url: str, *, timeout_s: float | None = None,
                 via: Pinned | None = None, **kwargs: Any) -> httpx.Response:
    """One HTTP request carrying the message key (``Idempotency-Key``), the fencing token and the
    trace, its timeout cut to the deadline, its failures raised as the mesh's classes (a 429
    rate_limited, a 503 brownout, a 400 permanent). No breaker here: the caller guards the call.

    The URL's ``host:port`` must be in the tool's allowlist (its ``allow=``, else MESH_HTTP_ALLOW;
    ToolRefused otherwise) and the request connects to the address that was checked
    (:func:`mesh.agents.tools.allow.pin`), the URL's host going in ``Host`` and TLS SNI; ``via``, a
    :class:`Pinned` from ``pin``, is checked again against the same list. Redirects are not
    followed: a 3xx is a permanent failure naming where it pointed. The body is read up to
    MESH_MAX_RESPONSE_BYTES; a longer one fails the call (permanent; the effect of a request other
    than GET/HEAD is unknown)."""
    out = _Outgoing.of(tool, method, url, timeout_s, via, kwargs)
    with out.classified():
        request = tool.client.build_request(out.method, out.url, **out.kwargs)
        response = tool.client.send(request, stream=True, follow_redirects=False)
        try:
            body = out.bounded(response, response.iter_bytes())
        finally:
            response.close()
    return out.answer(response, body)


async def asend_request(tool: ToolContext, method: str, url: str, *, timeout_s: float | None = None,
                        via: Pinned | None = None, client: httpx.AsyncClient | None = None,
                        **kwargs: Any) -> httpx.Response:
    """:func:`send_request` on an ``httpx.AsyncClient`` (``client``, else the running loop's, see
    :func:`mesh.agents.event_loop.http_client`): the same allowlist, pinning, headers, deadline
    cut, body bound and classification."""
    from ..event_loop import http_client

    aclient = client or http_client()
    out = _Outgoing.of(tool, method, url, timeout_s, via, kwargs)
    with out.classified():
        request = aclient.build_request(out.method, out.url, **out.kwargs)
        response = await aclient.send(request, stream=True, follow_redirects=False)
        try:
            chunks = [chunk async for chunk in _bounded_chunks(response.aiter_bytes(), out, response)]
        finally:
            await response.aclose()
    return out.answer(response, b"".join(chunks))


async def _bounded_chunks(chunks: Any, out: _Outgoing, response: httpx.Response) -> Any:
    size = out.declared(response)
    async for chunk in chunks:
        size += len(chunk)
        out.check(response, size)
        yield chunk


@dataclass
class _Outgoing:
    """One request as both clients send it: where it goes, what it carries, how its failures read."""

    method: str
    url: str
    dependency: str
    timeout: float
    effect_unknown: bool
    limit: int
    kwargs: dict[str, Any]

    @classmethod
    def of(cls, tool: ToolContext, method: str, url: str, timeout_s: float | None, via: Pinned | None,
           kwargs: dict[str, Any]) -> _Outgoing:
        via = _checked(tool, url, via)
        timeout = tool.timeout_s(timeout_s or tool.settings.http_timeout_s)
        headers = {"Idempotency-Key": tool.key, "X-Mesh-Fencing-Token": str(tool.fencing_token),
                   "traceparent": traceparent(tool.trace_id), **kwargs.pop("headers", {})}
        headers["Host"] = urlsplit(url).netloc.rsplit("@", 1)[-1]
        if via.scheme == "https":
            kwargs["extensions"] = {**kwargs.get("extensions", {}), "sni_hostname": via.host}
        return cls(method, via.url(url), via.dependency, timeout, method.upper() not in ("GET", "HEAD"),
                   tool.settings.max_response_bytes, {"headers": headers, "timeout": timeout, **kwargs})

    @contextmanager
    def classified(self) -> Iterator[None]:
        """Transport failures raised as the mesh's classes."""
        dependency = self.dependency
        try:
            yield
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing was sent: safe to treat like a dependency that is down.
            raise Brownout(f"{dependency} not reachable in time: {exc}", dependency=dependency) from exc
        except httpx.TimeoutException as exc:
            # The request may have been applied: the effect cannot be proven either way.
            raise DependencyTimeout(f"{dependency} timed out after {self.timeout:g}s: {exc}", dependency=dependency,
                                    effect_unknown=self.effect_unknown) from exc
        except httpx.TransportError as exc:
            raise Brownout(f"{dependency} unreachable: {exc}", dependency=dependency) from exc

    def declared(self, response: httpx.Response) -> int:
        """Refuse a body whose declared length is over the limit, before reading any of it."""
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            raise self.too_big(response, f"{declared} bytes")
        return 0

    def check(self, response: httpx.Response, size: int) -> None:
        if size > self.limit:
            raise self.too_big(response, f"more than {self.limit} bytes")

    def bounded(self, response: httpx.Response, chunks: Iterable[bytes]) -> bytes:
        """The body read, refused past the limit without reading further."""
        size = self.declared(response)
        body = []
        for chunk in chunks:
            size += len(chunk)
            self.check(response, size)
            body.append(chunk)
        return b"".join(body)

    def too_big(self, response: httpx.Response, size: str) -> PermanentFailure:
        return PermanentFailure(f"{self.dependency} answered {response.status_code} with a body of {size}, over "
                                f"MESH_MAX_RESPONSE_BYTES ({self.limit}): not read", dependency=self.dependency,
                                status=response.status_code, effect_unknown=self.effect_unknown)

    def answer(self, response: httpx.Response, body: bytes) -> httpx.Response:
        """The response with its body read; a redirect or an error status raised as the mesh's class."""
        # The body is decoded already: the headers that described its coding on the wire go.
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        response = httpx.Response(response.status_code, headers=headers, content=body,
                                  request=response.request, extensions=response.extensions)
        dependency = self.dependency
        if response.is_redirect:
            # Following it could leave the allowlist; a 303 answers a request that was applied.
            raise PermanentFailure(f"{dependency} answered {response.status_code} redirecting to "
                                   f"{response.headers.get('location', '?')}: redirects are not followed",
                                   dependency=dependency, status=response.status_code,
                                   effect_unknown=self.effect_unknown and response.status_code == 303)
        if not response.is_success:
            raise error_for_response(response, dependency=dependency)
        return response


def _checked(tool: ToolContext, url: str, via: Pinned | None) -> Pinned:
    """Where a request to ``url`` connects: ``via`` when the allowlist admits it for that URL, else
    (``via`` None) the address :func:`pin` checks now; ToolRefused when it may not be reached."""
    allow = tool.allowlist
    if via is None:
        return pin(url, allow, tool.resolve, listed_in=tool.allowlist_name)
    admitted = pin(url, allow, lambda _host, _port: [via.address], listed_in=tool.allowlist_name)
    if admitted != via:
        raise ToolRefused(f"{url} refused: the pinned address {via.address} is not where the URL "
                          "leads under the allowlist", url=url)
    return via
