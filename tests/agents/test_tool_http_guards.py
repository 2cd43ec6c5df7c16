"""Every request a tool makes through the mesh's HTTP helpers (``send_request``, ``ctx.http``) goes
through the allowlist (MESH_HTTP_ALLOW or the tool's ``allow=``), DNS pinning and redirect refusal;
and every spelling of one address shares one circuit breaker. Real loopback servers, real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mesh import App
from mesh.agents.builtin import app as builtin
from mesh.agents.tools import send_request
from mesh.agents.tools.base import ToolContext
from mesh.agents.tools.http import host_port
from mesh.broker.breaker import BreakerOpen, Breakers
from mesh.broker.keys import Keys
from mesh.contracts import Brownout, ConfigError, PermanentFailure, ToolRefused
from mesh.contracts.tools import HttpPostArgs
from tests.httpserver import RecordingServer


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def tool_ctx(settings: Any, http: httpx.Client, **extra: Any) -> ToolContext:
    return ToolContext(key="k-1", job_id="job-1", trace_id="1" * 32, fencing_token=1, settings=settings,
                       redis=None, keys=Keys(settings.namespace, settings.shard), client=http, **extra)  # type: ignore[arg-type]


def port_of(server: RecordingServer) -> int:
    return int(server.host_port.rsplit(":", 1)[1])


def test_send_request_from_a_users_tool_refuses_a_host_not_in_mesh_http_allow(make_settings, http):
    with RecordingServer() as server:
        ctx = tool_ctx(make_settings(http_allow=""), http)
        with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
            send_request(ctx, "POST", server.url(), json={"n": 1})
    assert server.requests == []


def test_a_tools_ctx_http_refuses_a_host_not_in_mesh_http_allow(make_settings, http):
    with RecordingServer() as server:
        ctx = tool_ctx(make_settings(http_allow="127.0.0.1:1"), http)
        with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
            ctx.http.post(server.url(), json={"n": 1})
    assert server.requests == []


def test_a_tools_ctx_http_reaches_an_allowed_host_with_the_messages_key(make_settings, http):
    with RecordingServer() as server:
        ctx = tool_ctx(make_settings(http_allow=server.host_port), http)
        assert ctx.http.post(server.url(), json={"n": 1}).status_code == 200
    assert server.requests[0]["headers"]["idempotency-key"] == "k-1"


def test_a_name_is_pinned_to_the_address_checked_and_a_loopback_one_needs_its_address_listed(make_settings, http):
    def resolve(_host: str, _port: int) -> list[str]:
        return ["127.0.0.1"]

    with RecordingServer() as server:
        port = port_of(server)
        named = f"http://tickets.test:{port}/hook"
        ctx = tool_ctx(make_settings(http_allow=f"tickets.test:{port}"), http, resolve=resolve)
        with pytest.raises(ToolRefused, match="non-public address"):
            send_request(ctx, "POST", named, json={})
        assert server.requests == []
        ctx = tool_ctx(make_settings(http_allow=f"tickets.test:{port},127.0.0.1:{port}"), http, resolve=resolve)
        send_request(ctx, "POST", named, json={})
    assert server.requests[0]["headers"]["host"] == f"tickets.test:{port}"


def test_a_redirect_from_an_allowed_host_is_not_followed(make_settings, http):
    with RecordingServer() as target, RecordingServer(lambda n, r: (302, {}, {"Location": target.url()})) as hop:
        ctx = tool_ctx(make_settings(http_allow=hop.host_port), http)
        with pytest.raises(PermanentFailure, match="redirects are not followed"):
            send_request(ctx, "POST", hop.url(), json={})
    assert target.requests == []


def test_a_pinned_address_passed_in_is_checked_against_the_allowlist(make_settings, http):
    from mesh.agents.tools.allow import Pinned

    with RecordingServer() as server:
        ctx = tool_ctx(make_settings(http_allow=f"tickets.test:{port_of(server)}"), http)
        forged = Pinned("http", "tickets.test", port_of(server), "127.0.0.1")
        with pytest.raises(ToolRefused):
            send_request(ctx, "POST", f"http://tickets.test:{port_of(server)}/", via=forged)
    assert server.requests == []


def test_a_tools_allow_list_replaces_mesh_http_allow_and_a_function_widens_or_narrows_it(make_settings, http):
    app = App("allow-test")

    @app.tool(allow=["127.0.0.1:1"], effect=False)
    def exact(ctx: ToolContext, args: HttpPostArgs) -> None: ...

    @app.tool(allow=lambda base: base | {"Example.COM.:443"}, effect=False)
    def wider(ctx: ToolContext, args: HttpPostArgs) -> None: ...

    @app.tool(allow=lambda base: base - {"127.0.0.1:2"}, effect=False)
    def narrower(ctx: ToolContext, args: HttpPostArgs) -> None: ...

    settings = make_settings(http_allow="127.0.0.1:2,127.0.0.1:3")
    assert app.tools["exact"].allowlist(settings) == {"127.0.0.1:1"}
    assert app.tools["wider"].allowlist(settings) == {"127.0.0.1:2", "127.0.0.1:3", "example.com:443"}
    assert app.tools["narrower"].allowlist(settings) == {"127.0.0.1:3"}
    with pytest.raises(ConfigError, match=r"127\.1"):
        app.tool(allow=["127.1:80"])(lambda ctx, args: None)


def test_a_tools_allow_widens_mesh_http_allow_for_that_tool_only(make_settings, http):
    with RecordingServer() as server:
        settings = make_settings(http_allow="")
        widened = tool_ctx(settings, http, allow=frozenset({server.host_port}))
        assert send_request(widened, "POST", server.url(), json={}).status_code == 200
        with pytest.raises(ToolRefused):
            send_request(tool_ctx(settings, http), "POST", server.url(), json={})
    assert len(server.requests) == 1


@pytest.mark.parametrize("spelling", ["127.0.0.1.", "[::ffff:127.0.0.1]", "[::FFFF:7f00:1]"])
def test_every_spelling_of_an_address_names_the_one_breaker_of_its_normal_form(spelling):
    assert host_port(f"http://{spelling}:18080/x") == "127.0.0.1:18080"


@pytest.mark.parametrize("spelling", ["127.0.0.1.", "[::ffff:127.0.0.1]"])
def test_an_open_breaker_holds_http_post_to_another_spelling_of_its_address(make_settings, rclient, http, spelling):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port, breaker_failures=1, breaker_cooldown_s=60)
        breakers = Breakers(settings, rclient)

        def down() -> None:
            raise Brownout("503", dependency=server.host_port)

        with pytest.raises(Brownout):
            breakers.call(server.host_port, down)
        spec = builtin.tools["http_post"]
        args = HttpPostArgs.model_validate({"url": f"http://{spelling}:{port_of(server)}/hook", "json": {}})
        ctx = tool_ctx(settings, http, breakers=breakers)
        with pytest.raises(BreakerOpen):
            # As ctx.call runs a tool: through the breaker its declared dependency names.
            ctx.guarded(spec.target(args), lambda: spec.run(ctx, args))
        assert server.requests == []
        assert [b.name for b in breakers.list()] == [server.host_port]


def test_a_handlers_ctx_http_is_held_by_the_breaker_of_the_pinned_address(make_settings, rclient, http):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port, breaker_failures=1, breaker_cooldown_s=60)
        breakers = Breakers(settings, rclient)

        def down() -> None:
            raise Brownout("503", dependency=server.host_port)

        with pytest.raises(Brownout):
            breakers.call(server.host_port, down)
        with pytest.raises(BreakerOpen):
            tool_ctx(settings, http, breakers=breakers).http.get(f"http://[::ffff:127.0.0.1]:{port_of(server)}/")
    assert server.requests == []


def test_the_model_endpoints_breaker_is_named_in_the_same_normal_form():
    from mesh.agents.providers.openai import OpenAIProvider
    from mesh.broker.settings import MeshSettings

    provider = OpenAIProvider(MeshSettings(model_provider="openai", model_url="http://[::ffff:127.0.0.1]:8000/v1"))
    try:
        assert provider.dependency == "127.0.0.1:8000"
    finally:
        provider.close()


def test_a_refusal_names_the_list_that_refused(make_settings, http):
    settings = make_settings(http_allow="")
    with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
        send_request(tool_ctx(settings, http), "GET", "http://127.0.0.1:9/")
    with pytest.raises(ToolRefused, match="not in the tool's allow="):
        send_request(tool_ctx(settings, http, allow=frozenset({"127.0.0.1:1"})), "GET", "http://127.0.0.1:9/")
