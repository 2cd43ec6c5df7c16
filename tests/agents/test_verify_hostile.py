"""``http_post``'s verifier against hostile verify endpoints: one that echoes back whatever it was
sent (headers, URL) proves nothing, a redirect proves nothing, and a verify URL the allowlist
refuses is refused before the POST goes out (not after, leaving an effect nobody can prove).
Real loopback servers; the verifier is run as the worker and ``mesh verify`` run it (``check``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mesh.agents.builtin import app as builtin
from mesh.agents.effects import check
from mesh.agents.tools.base import ToolContext
from mesh.broker.keys import Keys
from mesh.contracts import ToolRefused
from mesh.contracts.effects import Verdict
from mesh.contracts.tools import HttpPostArgs
from tests.httpserver import RecordingServer


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def tool_ctx(settings: Any, http: httpx.Client) -> ToolContext:
    return ToolContext(key="order-7", job_id="job-1", trace_id="1" * 32, fencing_token=1, settings=settings,
                       redis=None, keys=Keys(settings.namespace, settings.shard), client=http)  # type: ignore[arg-type]


def echo_everything(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
    """An echo service (an httpbin /anything): it has no resource, it answers with the request."""
    return 200, {"url": request["path"], "headers": request["headers"]}


def echo_in_headers(_n: int, request: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    return 200, {"ok": True}, {f"X-Echo-{k}": v for k, v in request["headers"].items() if k != "host"}


def verdict(settings: Any, http: httpx.Client, args: HttpPostArgs) -> Verdict:
    spec = builtin.tools["http_post"]
    return check(spec, tool_ctx(settings, http), args, None).verdict


@pytest.mark.parametrize("responder", [echo_everything, echo_in_headers])
def test_an_endpoint_echoing_the_request_back_proves_no_effect(make_settings, http, responder):
    with RecordingServer(get=responder) as server:
        settings = make_settings(http_allow=server.host_port)
        args = HttpPostArgs(url=server.url("/orders"), verify_url=server.url("/anything"))
        found = verdict(settings, http, args)
    assert server.gets  # it was asked, and answered 200 with the key in it
    assert found is not Verdict.VERIFIED


def test_an_endpoint_echoing_a_verify_url_that_names_the_key_proves_no_effect(make_settings, http):
    def echo_url(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"you_asked_for": request["path"]}

    with RecordingServer(get=echo_url) as server:
        settings = make_settings(http_allow=server.host_port)
        args = HttpPostArgs(url=server.url("/orders"), verify_url=server.url("/orders?key=order-7"))
        found = verdict(settings, http, args)
    assert found is not Verdict.VERIFIED


def test_a_lookup_that_has_the_resource_still_verifies(make_settings, http):
    def lookup(_n: int, request: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"orders": [{"idempotency_key": request["headers"]["idempotency-key"]}]}

    with RecordingServer(get=lookup) as server:
        settings = make_settings(http_allow=server.host_port)
        args = HttpPostArgs(url=server.url("/orders"), verify_url=server.url("/orders/by-key"))
        assert verdict(settings, http, args) is Verdict.VERIFIED


def test_a_redirect_from_the_verify_url_proves_nothing_either_way(make_settings, http):
    def redirect(_n: int, request: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 302, {"key": request["headers"]["idempotency-key"]}, {
            "Location": f"http://elsewhere.example/?key={request['headers']['idempotency-key']}"}

    with RecordingServer(get=redirect) as server:
        settings = make_settings(http_allow=server.host_port)
        args = HttpPostArgs(url=server.url("/orders"), verify_url=server.url("/orders/by-key"))
        assert verdict(settings, http, args) is Verdict.UNKNOWN


def test_a_verify_url_outside_the_allowlist_is_refused_before_the_post_goes_out(make_settings, http):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        args = HttpPostArgs(url=server.url("/orders"), verify_url="http://127.0.0.1:1/orders/by-key")
        spec = builtin.tools["http_post"]
        with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
            spec.run(tool_ctx(settings, http), args)
    assert server.requests == []  # no effect made that no check could ever prove
