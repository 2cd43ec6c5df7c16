"""The async paths under ``async def`` handlers and tools, against real loopback servers: the
OpenAI-compatible provider's ``acomplete`` (the same request, classification, breaker and metering
as ``complete``), ``asend_request`` and ``ctx.ahttp`` (the same allowlist, headers, body bound and
classification as ``send_request``), and an ``async def`` verifier."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from mesh import App, asend_request
from mesh.agents.effects import check
from mesh.agents.providers.meter import Meter
from mesh.agents.providers.openai import OpenAIProvider
from mesh.agents.tools.base import ToolContext
from mesh.broker.breaker import Breakers
from mesh.broker.keys import Keys
from mesh.broker.settings import MeshSettings
from mesh.contracts import (
    BreakerOpen,
    Brownout,
    DependencyTimeout,
    PermanentFailure,
    RateLimited,
    Receipt,
    ToolRefused,
)
from mesh.contracts.effects import Verdict
from tests.agents.openai_server import FakeOpenAI, completion
from tests.httpserver import RecordingServer


class Pay(BaseModel):
    cents: int


class Triage(BaseModel):
    queue: str
    confidence: float


def _settings(url: str, **extra: Any) -> MeshSettings:
    return MeshSettings(**{"model_provider": "openai", "model_url": url, "model_name": "gpt-test",
                           "model_api_key": "sk-test-key", "model_timeout_s": 5.0, **extra})


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


class Counting(Meter):
    """A meter that keeps each call it charged (outside a worker it charges the call only)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def charge(self, call: Any, tokens_in: int, tokens_out: int) -> None:
        self.calls.append(call)
        super().charge(call, tokens_in, tokens_out)


def test_acomplete_asks_as_complete_does_and_meters_its_tokens(api: FakeOpenAI) -> None:
    api.responder = lambda request: (200, completion(json.dumps({"queue": "billing", "confidence": 0.8}),
                                                     usage=(12, 3)), {})
    meter = Counting()
    provider = OpenAIProvider(_settings(api.url), meter=meter)

    answer = asyncio.run(provider.acomplete("Route: my invoice", Triage, system="Route tickets."))
    assert answer == Triage(queue="billing", confidence=0.8)
    assert provider.complete("Route: my invoice", Triage, system="Route tickets.") == answer
    first, second = api.requests[0], api.requests[1]
    assert first["json"] == second["json"]  # the same request from either path
    assert first["json"]["response_format"]["type"] == "json_schema"
    assert first["headers"]["authorization"] == "Bearer sk-test-key"
    assert [(c.model, c.tokens_in, c.tokens_out) for c in meter.calls] == [("gpt-test", 12, 3)] * 2


def test_acomplete_repairs_an_invalid_answer_and_counts_the_repair(api: FakeOpenAI) -> None:
    replies = ["not json", json.dumps({"queue": "ops", "confidence": 0.5})]
    api.responder = lambda request: (200, completion(replies.pop(0), usage=(4, 2)), {})
    meter = Counting()
    provider = OpenAIProvider(_settings(api.url), meter=meter)
    answer = asyncio.run(provider.acomplete("Route", Triage))
    assert answer.queue == "ops" and len(api.requests) == 2
    assert "Your reply is invalid: not JSON" in api.requests[1]["json"]["messages"][-1]["content"]
    call = meter.calls[-1]
    assert call.repairs == 1 and (call.tokens_in, call.tokens_out) == (8, 4)


def test_acomplete_429_is_rate_limited_with_retry_after_so_the_message_is_deferred(api: FakeOpenAI) -> None:
    api.responder = lambda request: (429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
    provider = OpenAIProvider(_settings(api.url))
    with pytest.raises(RateLimited) as info:
        asyncio.run(provider.acomplete("Route", Triage))
    assert info.value.retry_after_s == 2 and info.value.failure_class == "rate_limited"


@pytest.mark.parametrize(("status", "error"), [(503, Brownout), (401, PermanentFailure)])
def test_acomplete_http_errors_are_the_mesh_classes(api: FakeOpenAI, status: int, error: type[Exception]) -> None:
    api.responder = lambda request: (status, {"error": {"message": "no"}}, {})
    with pytest.raises(error):
        asyncio.run(OpenAIProvider(_settings(api.url)).acomplete("Route", Triage))


def test_acomplete_falls_back_to_json_object_when_json_schema_is_refused(api: FakeOpenAI) -> None:
    def responder(request: dict[str, Any]) -> Any:
        if request["response_format"]["type"] == "json_schema":
            return 400, {"error": {"message": "response_format json_schema is not supported"}}, {}
        return 200, completion(json.dumps({"queue": "q", "confidence": 0.1})), {}

    api.responder = responder
    provider = OpenAIProvider(_settings(api.url))
    assert asyncio.run(provider.acomplete("Route", Triage)).queue == "q"
    assert provider.structured == "json_object"
    assert [r["json"]["response_format"]["type"] for r in api.requests] == ["json_schema", "json_object"]


def test_acomplete_slow_server_is_dependency_timeout(api: FakeOpenAI) -> None:
    import threading

    release = threading.Event()

    def slow(request: dict[str, Any]) -> Any:
        release.wait(5)
        return 200, completion("{}"), {}

    api.responder = slow
    try:
        with pytest.raises(DependencyTimeout):
            asyncio.run(OpenAIProvider(_settings(api.url, model_timeout_s=0.2)).acomplete("Route", Triage))
    finally:
        release.set()


def test_acomplete_503s_open_the_breaker_shared_with_the_sync_path(api: FakeOpenAI, make_settings: Any,
                                                                     rclient: Any) -> None:
    api.responder = lambda request: (503, {"error": {"message": "overloaded"}}, {})
    settings = make_settings(model_provider="openai", model_url=api.url, breaker_failures=2)
    provider = OpenAIProvider(settings, breakers=Breakers(settings, rclient))
    for _ in range(2):
        with pytest.raises(Brownout):
            asyncio.run(provider.acomplete("Route", Triage))
    with pytest.raises(BreakerOpen):
        asyncio.run(provider.acomplete("Route", Triage))
    with pytest.raises(BreakerOpen):
        provider.complete("Route", Triage)  # one breaker, whichever path calls
    assert len(api.requests) == 2


def _tool_ctx(settings: Any, **extra: Any) -> ToolContext:
    return ToolContext(key="k-1", job_id="job-1", trace_id="1" * 32, fencing_token=7, settings=settings,
                       redis=None, keys=Keys(settings.namespace, settings.shard), client=httpx.Client(), **extra)  # type: ignore[arg-type]


def test_asend_request_carries_the_key_token_and_trace_to_an_allowed_host(make_settings: Any) -> None:
    with RecordingServer() as server:
        ctx = _tool_ctx(make_settings(http_allow=server.host_port))
        response = asyncio.run(asend_request(ctx, "POST", server.url("/do"), json={"n": 1}))
    assert response.json() == {"ok": True}
    headers = server.requests[0]["headers"]
    assert headers["idempotency-key"] == "k-1" and headers["x-mesh-fencing-token"] == "7"
    assert headers["traceparent"].split("-")[1] == "1" * 32


def test_asend_request_refuses_a_host_not_allowed_and_classifies_errors_as_send_request_does(
        make_settings: Any) -> None:
    with RecordingServer() as server:
        refused = _tool_ctx(make_settings(http_allow="127.0.0.1:1"))
        with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
            asyncio.run(asend_request(refused, "POST", server.url(), json={}))
    assert server.requests == []
    answers = {1: (429, {}, {"Retry-After": "3"}), 2: (503, {}), 3: (302, {}, {"Location": "http://x/"})}
    with RecordingServer(lambda n, r: answers[n]) as server:
        ctx = _tool_ctx(make_settings(http_allow=server.host_port))
        with pytest.raises(RateLimited) as limited:
            asyncio.run(asend_request(ctx, "POST", server.url(), json={}))
        with pytest.raises(Brownout):
            asyncio.run(asend_request(ctx, "POST", server.url(), json={}))
        with pytest.raises(PermanentFailure, match="redirects are not followed"):
            asyncio.run(asend_request(ctx, "POST", server.url(), json={}))
    assert limited.value.retry_after_s == 3


def test_asend_request_refuses_a_body_over_the_limit(make_settings: Any) -> None:
    with RecordingServer(lambda n, r: (200, {"big": "x" * 5000})) as server:
        ctx = _tool_ctx(make_settings(http_allow=server.host_port, max_response_bytes=1024))
        with pytest.raises(PermanentFailure, match="over MESH_MAX_RESPONSE_BYTES"):
            asyncio.run(ctx.ahttp.post(server.url(), json={}))


def test_ahttp_post_posts_what_http_post_posts_and_gives_the_same_receipt(make_settings: Any) -> None:
    from mesh.agents.tools import ahttp_post, http_post
    from mesh.contracts.tools import HttpPostArgs

    with RecordingServer() as server:
        ctx = _tool_ctx(make_settings(http_allow=server.host_port))
        args = HttpPostArgs.model_validate({"url": server.url("/orders"), "json": {"order": 7}})
        awaited = asyncio.run(ahttp_post(ctx, args))
        synced = http_post(ctx, args)
        refused = _tool_ctx(make_settings(http_allow="127.0.0.1:1"))
        with pytest.raises(ToolRefused):
            asyncio.run(ahttp_post(refused, args))
    assert awaited == synced and awaited.detail["status"] == 200
    first, second = server.requests
    assert first["json"] == second["json"] == {"order": 7}
    assert first["headers"]["idempotency-key"] == second["headers"]["idempotency-key"] == "k-1"
    assert len(server.requests) == 2


def test_an_async_verifier_is_awaited_by_the_effect_check(make_settings: Any) -> None:
    app = App("t")

    async def found(ctx: Any, args: Any, result: Any) -> Receipt:
        await asyncio.sleep(0)
        return Receipt(tool="pay", effect_id="found")

    @app.tool(verify=found)
    async def pay(ctx: Any, args: Pay) -> Receipt:
        return Receipt(tool="pay", effect_id="e1")

    got = check(app.tools["pay"], _tool_ctx(make_settings()), Pay(cents=1), None)
    assert got.verdict is Verdict.VERIFIED and got.result == Receipt(tool="pay", effect_id="found")
