"""What a tool is given and what it must return."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import httpx
import redis

from mesh.broker.breaker import Breakers
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.contracts import ToolRefused

from .allow import Resolver, parse_allowlist, system_resolver

if TYPE_CHECKING:
    from mesh.agents.credentials import Credential

    from .http import AsyncGuardedHttp, GuardedHttp

T = TypeVar("T")


@dataclass(frozen=True)
class ToolContext:
    """Everything a tool may use. ``key`` is the message key: effects are applied once per key."""

    key: str
    job_id: str
    trace_id: str
    fencing_token: int
    settings: MeshSettings
    redis: redis.Redis
    keys: Keys
    #: The worker's HTTP client, raw: :func:`~mesh.agents.tools.http.send_request` sends through it.
    #: A tool uses ``ctx.http`` or ``send_request``; calling this directly skips every guard.
    client: httpx.Client
    #: The message's deadline (absolute, s, on the Redis server's clock): no call may outlast it.
    deadline: float = math.inf
    #: The clock the deadline is read with (s): the worker's view of the Redis server's clock.
    clock: Callable[[], float] = time.time
    breakers: Breakers | None = None
    #: The secrets this tool declared, read at run time; no other code is handed them.
    secrets: Mapping[str, str] = field(default_factory=dict)
    #: How host names are resolved (``(host, port) -> addresses``); the request connects to the one checked.
    resolve: Resolver = system_resolver
    #: The ``host:port`` entries (normal form) this tool may reach; None: MESH_HTTP_ALLOW.
    allow: frozenset[str] | None = None
    #: The dependency the tool's own breaker guards (``@app.tool(dependency=...)``); None when no
    #: breaker guards the call already, so ``ctx.http`` guards each request by its ``host:port``.
    dependency: str | None = None
    #: The credential minted for this call (``@app.tool(mint=...)``); read it as :attr:`credential`.
    minted: Credential | None = field(default=None, repr=False)
    #: The client ``ahttp`` sends through; None: the running loop's (a test gives its own).
    aclient: httpx.AsyncClient | None = None

    @property
    def allowlist(self) -> frozenset[str]:
        """What this tool's requests may reach: its ``allow=``, else MESH_HTTP_ALLOW (normal form)."""
        return parse_allowlist(self.settings.http_allowlist) if self.allow is None else self.allow

    @property
    def allowlist_name(self) -> str:
        """How refusals name the list: ``MESH_HTTP_ALLOW``, or the tool's ``allow=``."""
        return "MESH_HTTP_ALLOW" if self.allow is None else "the tool's allow="

    @property
    def http(self) -> GuardedHttp:
        """HTTP with the mesh's guards: the allowlist, DNS pinning, no redirects, a bounded body."""
        from .http import GuardedHttp

        return GuardedHttp(self)

    @property
    def ahttp(self) -> AsyncGuardedHttp:
        """:attr:`http` for an ``async def`` tool: each request awaited, with the same guards."""
        from .http import AsyncGuardedHttp

        return AsyncGuardedHttp(self, client=self.aclient)

    def secret(self, name: str) -> str:
        """The value of a secret this tool declared (``@app.tool(secrets=[...])``)."""
        try:
            return self.secrets[name]
        except KeyError:
            raise ToolRefused(f"secret {name} was not declared by this tool; it declared "
                              f"{sorted(self.secrets) or 'none'}") from None

    @property
    def credential(self) -> Credential:
        """The short-lived credential minted for this call by the tool's ``mint=``: fresh for every call
        and every attempt, masked like a secret, never stored by the mesh."""
        if self.minted is None:
            raise ToolRefused("this tool declared no credential minter (@app.tool(mint=...)): it has no ctx.credential")
        return self.minted

    def timeout_s(self, configured: float) -> float:
        """``configured``, cut to what is left of the deadline (at least a millisecond)."""
        return max(0.001, min(configured, self.deadline - self.clock()))

    def guarded(self, dependency: str, call: Callable[[], T]) -> T:
        """``call`` through ``dependency``'s circuit breaker (straight through without breakers)."""
        return call() if self.breakers is None else self.breakers.call(dependency, call)

    async def aguarded(self, dependency: str, call: Callable[[], Awaitable[T]]) -> T:
        """:meth:`guarded` for a coroutine function."""
        return await call() if self.breakers is None else await self.breakers.acall(dependency, call)


def effect_id(key: str) -> str:
    """The id of the effect a key produces: the same key always names the same effect."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]
