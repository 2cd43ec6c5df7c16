"""OpenAIProvider against a real loopback chat-completions server: success, contract and HTTP failures."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.agents.providers.openai import OpenAIProvider
from mesh.broker.breaker import Breakers
from mesh.broker.settings import MeshSettings
from mesh.contracts import (
    ActionStep,
    BreakerOpen,
    Brownout,
    ConfigError,
    DependencyTimeout,
    Findings,
    InvalidOutput,
    PermanentFailure,
    Plan,
    RateLimited,
    ResearchStep,
)
from tests.agents.openai_server import FakeOpenAI, Reply, completion


def _settings(url: str | None, *, timeout_s: float = 5.0) -> MeshSettings:
    return MeshSettings(
        model_provider="openai", model_url=url, model_name="gpt-test", model_api_key="sk-test-key",
        model_timeout_s=timeout_s,
    )


@pytest.fixture
def api() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def provider(api: FakeOpenAI) -> Iterator[OpenAIProvider]:
    p = OpenAIProvider(_settings(api.url))
    yield p
    p.close()


def _answer(content: str) -> Any:
    return lambda request: (200, completion(content), {})


def test_plan_success_sends_model_auth_and_json_format(api: FakeOpenAI, provider: OpenAIProvider) -> None:
    plan = provider.plan("write a release note")

    assert isinstance(plan, Plan)
    assert plan.goal == "write a release note"
    assert isinstance(plan.steps[0], ResearchStep) and plan.steps[0].step_id == "r1"
    assert isinstance(plan.steps[1], ActionStep) and plan.steps[1].tool == "note"
    assert plan.steps[1].use_findings is True

    assert len(api.requests) == 1
    sent, headers = api.requests[0]["json"], api.requests[0]["headers"]
    assert sent["model"] == "gpt-test"
    assert sent["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "Plan", "schema": Plan.model_json_schema(),
                                                       "strict": False}}
    assert sent["temperature"] == 0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][1]["content"] == "write a release note"
    assert '"research"' in sent["messages"][0]["content"] and "http_post" in sent["messages"][0]["content"]
    assert headers["authorization"] == "Bearer sk-test-key"
    assert provider.name == "openai"


def test_research_success(api: FakeOpenAI, provider: OpenAIProvider) -> None:
    findings = provider.research("what is dramatiq?")

    assert isinstance(findings, Findings)
    assert findings.question == "what is dramatiq?"
    assert findings.findings[0].source == "docs/guide.md#answer"
    assert "researcher" in api.requests[0]["json"]["messages"][0]["content"]


def test_no_auth_header_without_key(api: FakeOpenAI) -> None:
    p = OpenAIProvider(MeshSettings(model_provider="openai", model_url=api.url + "/"))
    p.research("q")
    p.close()
    assert "authorization" not in api.requests[0]["headers"]


def test_content_not_json_is_invalid_output(api: FakeOpenAI, provider: OpenAIProvider) -> None:
    api.responder = _answer("Sure! Here is your plan: step one...")
    with pytest.raises(InvalidOutput, match="not JSON"):
        provider.plan("goal")


def test_json_breaking_contract_is_invalid_output(api: FakeOpenAI, provider: OpenAIProvider) -> None:
    api.responder = _answer(json.dumps({"goal": "g", "steps": [{"kind": "research", "step_id": "R 1"}]}))
    with pytest.raises(InvalidOutput, match="invalid planner output"):
        provider.plan("g")


def test_body_without_choices_is_invalid_output(api: FakeOpenAI, provider: OpenAIProvider) -> None:
    api.responder = lambda request: (200, {"object": "chat.completion"}, {})
    with pytest.raises(InvalidOutput):
        provider.research("q")


def test_429_is_rate_limited_with_retry_after(api: FakeOpenAI, provider: OpenAIProvider) -> None:
    api.responder = lambda request: (429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
    with pytest.raises(RateLimited) as info:
        provider.plan("g")
    assert info.value.retry_after_s == 2


@pytest.mark.parametrize(("status", "error"), [(503, Brownout), (401, PermanentFailure)])
def test_http_status_maps_to_mesh_error(
    api: FakeOpenAI, provider: OpenAIProvider, status: int, error: type[Exception]
) -> None:
    api.responder = lambda request: (status, {"error": {"message": "no"}}, {})
    with pytest.raises(error) as info:
        provider.research("q")
    if isinstance(info.value, Brownout):
        assert info.value.dependency == provider.dependency


@pytest.mark.parametrize(("configured_s", "deadline_left_s", "message"), [
    (0.2, None, r"within 0\.2s"),  # MESH_MODEL_TIMEOUT_S
    # what is left of the message's deadline, when that is less (a few ms have passed by the call)
    (30, 0.2, r"within 0\.(2|1\d?)s"),
], ids=["model-timeout", "deadline-left"])
def test_slow_server_is_dependency_timeout_at_the_lesser_of_timeout_and_deadline(
    api: FakeOpenAI, configured_s: float, deadline_left_s: float | None, message: str
) -> None:
    release = threading.Event()

    def slow(request: dict[str, Any]) -> Reply:
        release.wait(5)
        return 200, completion("{}"), {}

    api.responder = slow
    p = OpenAIProvider(_settings(api.url, timeout_s=configured_s))
    try:
        with pytest.raises(DependencyTimeout, match=message):
            p.plan("g", timeout_s=deadline_left_s)
    finally:
        release.set()
        p.close()


def test_connection_refused_is_brownout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = OpenAIProvider(_settings(f"http://127.0.0.1:{port}/v1", timeout_s=2))
    with pytest.raises(Brownout) as info:
        p.research("q")
    p.close()
    assert info.value.dependency == f"127.0.0.1:{port}"


def test_missing_model_url_is_config_error() -> None:
    with pytest.raises(ConfigError, match="model URL"):
        OpenAIProvider(_settings(None))


def test_model_endpoint_503s_open_its_breaker_and_then_no_call_reaches_it(
    api: FakeOpenAI, make_settings: Any, rclient: Any
) -> None:
    settings = make_settings(model_provider="openai", model_url=api.url, breaker_failures=2,
                             breaker_cooldown_s=30)
    calls: list[int] = []

    def down(request: dict[str, Any]) -> Reply:
        calls.append(1)
        return 503, {"error": {"message": "overloaded"}}, {}

    api.responder = down
    p = OpenAIProvider(settings, breakers=Breakers(settings, rclient))
    try:
        for _ in range(2):
            with pytest.raises(Brownout):
                p.plan("g")
        with pytest.raises(BreakerOpen) as info:
            p.research("q")
    finally:
        p.close()
    assert len(calls) == 2
    assert info.value.dependency == p.dependency and info.value.retry_after_s > 25
