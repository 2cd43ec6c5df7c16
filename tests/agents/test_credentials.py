"""Credentials minted for the call (``@app.tool(mint=...)``): declared, minted afresh for each call,
masked, refused when there is none to use. A TestContext runs the tools as a worker does; the
end-to-end proof on a real worker is tests/apps/test_minted_credentials.py."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from mesh import App, ConfigError, Credential, CredentialScope, FailureClass, ToolContext, ToolRefused
from mesh.broker import redact
from mesh.testing import TestContext


class Ping(BaseModel):
    n: int


def minting_app(mint: Any) -> tuple[App, list[CredentialScope], list[str]]:
    """An app whose tool ``ping`` mints with ``mint(scope)``: the scopes it was given, the tokens the tool saw."""
    app = App("minting")
    scopes: list[CredentialScope] = []
    seen: list[str] = []

    def minter(scope: CredentialScope) -> Any:
        scopes.append(scope)
        return mint(scope)

    @app.tool(secrets=["CLIENT_SECRET"], mint=minter, effect=False)
    def ping(ctx: ToolContext, args: Ping) -> str:
        seen.append(ctx.credential.token)
        return f"sent with {ctx.credential.token}"

    return app, scopes, seen


def fresh(scope: CredentialScope) -> Credential:
    assert scope.secret("CLIENT_SECRET") == "client-secret-value"
    return Credential(f"tok-{secrets.token_hex(12)}", expires_at=time.time() + 60)


def context(app: App, **kw: Any) -> TestContext:
    return TestContext(app, secrets={"CLIENT_SECRET": "client-secret-value"}, key="k-1", job_id="j-1",
                       step_id="s-1", attempt=2, deadline_s=60, **kw)


def test_each_call_mints_its_own_credential_with_the_calls_scope_and_the_token_is_masked_from_then_on() -> None:
    app, scopes, seen = minting_app(fresh)
    ctx = context(app)
    first = ctx.call("ping", {"n": 1})
    ctx.call("ping", {"n": 2})
    assert len(set(seen)) == 2
    assert [(s.tool, s.args, s.job_id, s.key, s.step_id, s.attempt) for s in scopes] == [
        ("ping", Ping(n=1), "j-1", "k-1", "s-1", 2), ("ping", Ping(n=2), "j-1", "k-1", "s-1", 2)]
    assert redact.redact(first) == "sent with [secret]"
    assert 59 < scopes[0].timeout_s(120) <= 60 and scopes[0].timeout_s(5) == 5  # cut to the 60 s deadline
    assert seen[0] not in repr(Credential(seen[0], expires_at=1.0)) and "client-secret" not in repr(scopes[0])


def test_an_async_def_minter_is_awaited() -> None:
    async def mint(scope: CredentialScope) -> Credential:
        return Credential(f"async-{secrets.token_hex(8)}", expires_at=datetime.now(UTC) + timedelta(seconds=30))

    app, _, seen = minting_app(mint)
    context(app).call("ping", {"n": 1})
    assert seen[0].startswith("async-")


def refused(mint: Any) -> tuple[ToolRefused, list[str]]:
    app, scopes, seen = minting_app(mint)
    with pytest.raises(ToolRefused) as caught:
        context(app).call("ping", {"n": 1})
    assert len(scopes) == 1 and seen == []  # minted once, the tool never called
    assert caught.value.failure_class is FailureClass.PERMANENT
    return caught.value, seen


def test_a_minter_that_fails_refuses_the_call_naming_the_tool_and_the_minters_error() -> None:
    def mint(scope: CredentialScope) -> Credential:
        raise RuntimeError("token server said 403: client not allowed")

    exc, _ = refused(mint)
    assert str(exc) == ("tool ping: its credential minter failed: RuntimeError: token server said 403: client not "
                        "allowed; not called")


def test_an_expired_credential_is_refused() -> None:
    exc, _ = refused(lambda scope: Credential("expired-token-123", expires_at=time.time() - 5))
    assert "expired" in str(exc) and "expired-token-123" not in str(exc)


def test_a_token_too_short_to_mask_is_refused_without_showing_it() -> None:
    exc, _ = refused(lambda scope: Credential("tiny7", expires_at=time.time() + 60))
    assert str(exc) == ("tool ping: the credential minted for tool ping is 5 characters long; the mesh masks "
                        "secrets of 8 characters or more and refuses shorter ones; not called")


@pytest.mark.parametrize(("answer", "says"), [
    ("a-bare-string-token", "returned str, not a Credential"),
    (Credential("", expires_at=time.time() + 60), "an empty token"),
    (Credential("no-expiry-token", expires_at="soon"), "expires_at is not a time"),  # type: ignore[arg-type]
])
def test_a_minter_that_returns_no_usable_credential_refuses_the_call(answer: Any, says: str) -> None:
    exc, _ = refused(lambda scope: answer)
    assert says in str(exc)


def test_a_tool_without_a_minter_has_no_credential() -> None:
    app = App("plain")

    @app.tool(effect=False)
    def plain(ctx: ToolContext, args: Ping) -> str:
        return ctx.credential.token

    with pytest.raises(ToolRefused, match="declared no credential minter"):
        TestContext(app).call("plain", {"n": 1})


def two(scope: Any, extra: Any) -> Credential:
    raise AssertionError


async def many(scope: Any) -> Any:
    yield Credential("x" * 10, 0.0)


@pytest.mark.parametrize(("mint", "says"), [
    ("not-a-function", "mint= must be a function (scope) -> Credential, not str"),
    (lambda: None, "must take one argument, the call's CredentialScope; it takes []"),
    (two, "must take one argument, the call's CredentialScope; it takes ['scope', 'extra']"),
    (many, "is a generator; a minter returns one Credential"),
])
def test_a_minter_is_checked_when_the_tool_is_declared(mint: Any, says: str) -> None:
    app = App("bad")
    with pytest.raises(ConfigError) as caught:
        @app.tool(mint=mint, effect=False)
        def tool(ctx: ToolContext, args: Ping) -> None: ...
    assert str(caught.value).startswith("tool 'tool': ") and says in str(caught.value)
    assert "tool" not in app.tools


def test_a_minted_token_is_masked_until_its_time_and_forgotten_after_while_a_secret_stays() -> None:
    gone, kept, secret = (f"{name}-{secrets.token_hex(8)}" for name in ("gone", "kept", "secret"))
    redact.register(secret)
    redact.register(gone, until=time.time() - 1)
    assert redact.redact(gone) == "[secret]"  # masked until the next registration looks at the time
    redact.register(kept, until=time.time() + 60)
    redact.register(secret, until=time.time() - 1)  # a secret registered for good stays masked
    redact.register(f"other-{secrets.token_hex(8)}", until=time.time() + 60)
    assert redact.redact(f"{gone} {kept} {secret}") == f"{gone} [secret] [secret]"
