"""Credentials minted for the call: a short-lived token for one tool call, instead of a standing secret.

    def issue(scope: CredentialScope) -> Credential:                 # called just before each call
        answer = token_server.post(..., auth=scope.secret("CLIENT_SECRET"), json={"key": scope.key},
                                   timeout=scope.timeout_s(5))
        return Credential(answer["token"], expires_at=answer["expires_at"])

    @app.tool(dependency="api.example.com:443", secrets=["CLIENT_SECRET"], mint=issue)
    def charge(ctx: ToolContext, args: Charge) -> Receipt:
        send_request(ctx, "POST", URL, headers={"Authorization": f"Bearer {ctx.credential.token}"})

The worker calls the tool's minter (``@app.tool(mint=...)``, sync or ``async def``) just before each
call with the call's :class:`CredentialScope` (tool, args, job, key, step, attempt and the tool's
declared secrets); the tool reads the result as ``ctx.credential``. Each call mints afresh (a retry,
a replay and a second call of the same step each get their own), the token is registered with
:mod:`mesh.broker.redact` (masked in everything the mesh keeps or prints) and never written anywhere
by the mesh. A minter that raises, returns something other than a :class:`Credential`, an expired
credential or a token too short to mask refuses the call (ToolRefused, ``permanent``): the tool is
not called.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from mesh.broker import redact
from mesh.contracts import ConfigError, ToolRefused

from .event_loop import resolve

if TYPE_CHECKING:
    from mesh.contracts import Envelope

    from .app import ToolSpec
    from .tools.base import ToolContext

#: How long a minted token stays masked after its expiry or its message's deadline, whichever is
#: later (s): by then the attempt that held it has written everything it writes.
MASK_GRACE_S = 300.0
#: The longest a minted token stays masked when its message has no deadline (s).
MASK_AT_MOST_S = 86_400.0


@dataclass(frozen=True)
class Credential:
    """A short-lived credential for one tool call: the ``token`` and when it expires (``expires_at``:
    Unix time, s, compared with the mesh's clock, the Redis server's). Its repr never shows the token."""

    token: str = field(repr=False)
    #: Unix time (s), or an aware ``datetime``.
    expires_at: float | datetime


@dataclass(frozen=True)
class CredentialScope:
    """What a minter is given: the call it mints for, and the secrets its tool declared (e.g. the
    client secret it presents to the token server)."""

    tool: str
    args: BaseModel
    job_id: str
    key: str
    step_id: str
    attempt: int
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: The message's deadline (absolute, s, on :attr:`clock`): minting spends the call's budget too.
    deadline: float = math.inf
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def timeout_s(self, configured: float) -> float:
        """``configured``, cut to what is left of the deadline (at least a millisecond): the minter's
        own request to its token server should not outlast the call it mints for."""
        return max(0.001, min(configured, self.deadline - self.clock()))

    def secret(self, name: str) -> str:
        """The value of a secret the tool declared (``@app.tool(secrets=[...])``)."""
        try:
            return self.secrets[name]
        except KeyError:
            raise ToolRefused(f"secret {name} was not declared by tool {self.tool}; it declared "
                              f"{sorted(self.secrets) or 'none'}", tool=self.tool) from None


#: A tool's ``mint=``: ``fn(scope) -> Credential``, or ``async def``.
Minter = Callable[[CredentialScope], Credential | Awaitable[Credential]]


def check_minter(tool: str, mint: Any) -> None:
    """Refuse, at declaration, a ``mint=`` that is not a function of one argument (the scope)."""
    if not callable(mint):
        raise ConfigError(f"tool {tool!r}: mint= must be a function (scope) -> Credential, not {type(mint).__name__}")
    if inspect.isasyncgenfunction(mint) or inspect.isgeneratorfunction(mint):
        raise ConfigError(f"tool {tool!r}: mint= {getattr(mint, '__qualname__', mint)!r} is a generator; a minter "
                          "returns one Credential")
    try:
        inspect.signature(mint).bind(None)
    except TypeError:
        raise ConfigError(f"tool {tool!r}: mint= {getattr(mint, '__qualname__', mint)!r} must take one argument, "
                          f"the call's CredentialScope; it takes {_params(mint)}") from None
    except ValueError:  # a builtin without a signature: called as it is
        pass


def mint(spec: ToolSpec, args: BaseModel, ctx: ToolContext, env: Envelope) -> Credential:
    """A fresh credential for this call of ``spec`` from its minter, masked from now on; ToolRefused
    (``permanent``, naming the tool and what went wrong, never the token) when there is none to use."""
    assert spec.mint is not None
    scope = CredentialScope(tool=spec.name, args=args, job_id=env.job_id, key=env.key, step_id=env.step_id,
                            attempt=env.attempt, secrets=ctx.secrets, deadline=ctx.deadline, clock=ctx.clock)
    try:
        credential = resolve(spec.mint(scope))
    except Exception as exc:
        error = redact.redact(str(exc) or type(exc).__name__)
        raise ToolRefused(f"tool {spec.name}: its credential minter failed: {type(exc).__name__}: {error}; "
                          "not called", tool=spec.name) from None
    if not isinstance(credential, Credential):
        raise ToolRefused(f"tool {spec.name}: its credential minter returned {type(credential).__name__}, not a "
                          "Credential; not called", tool=spec.name)
    if not isinstance(credential.token, str) or not credential.token:
        raise ToolRefused(f"tool {spec.name}: its credential minter returned an empty token; not called",
                          tool=spec.name)
    expires_at = _seconds(credential.expires_at)
    now = ctx.clock()
    keep = min(max(now if math.isnan(expires_at) else expires_at, env.deadline),
               time.time() + MASK_AT_MOST_S) + MASK_GRACE_S
    try:
        redact.register(credential.token, f"the credential minted for tool {spec.name}", until=keep)
    except redact.SecretTooShort as exc:
        raise ToolRefused(f"tool {spec.name}: {exc}; not called", tool=spec.name) from None
    if not expires_at > now:  # also NaN: an expiry that is not a time is no expiry
        raise ToolRefused(f"tool {spec.name}: its credential minter returned a credential that expired "
                          f"{now - expires_at:.1f} s ago; not called" if not math.isnan(expires_at) else
                          f"tool {spec.name}: its credential's expires_at is not a time (Unix seconds or an aware "
                          "datetime); not called", tool=spec.name)
    return credential


def _seconds(expires_at: Any) -> float:
    """``expires_at`` as Unix time (s): a number, or an aware ``datetime``; NaN when it is neither."""
    if isinstance(expires_at, datetime) and expires_at.tzinfo is not None:
        return expires_at.timestamp()
    if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool):
        return float(expires_at)
    return math.nan


def _params(fn: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except ValueError:
        return []
