"""The providers on the vendors' SDKs (``openai_sdk``, ``anthropic``) against a real loopback server
speaking each wire format, reached through the SDK's ``base_url``: a success with its token usage
metered, a 429 with Retry-After, a 500, an answer slower than the timeout and an answer that is no
JSON each end as the mesh's own class after exactly one request (the SDK's retries are off), in
``complete`` and in ``acomplete``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel

from mesh.agents.context import StepModel
from mesh.agents.providers import provider_for
from mesh.agents.providers.anthropic_sdk import AnthropicProvider
from mesh.agents.providers.meter import Call, Meter
from mesh.agents.providers.openai_sdk import OpenAISDKProvider
from mesh.agents.providers.sdk import SDKProvider
from mesh.broker.breaker import Breakers
from mesh.broker.settings import MeshSettings
from mesh.contracts import BreakerOpen, Brownout, ConfigError, DependencyTimeout, InvalidOutput, RateLimited
from tests.agents.openai_server import completion
from tests.httpserver import RecordingServer


class Verdict(BaseModel):
    approved: bool
    reason: str


VALID = {"approved": True, "reason": "tests pass"}


class Wire:
    """One wire format: the path the SDK posts to, and the bodies the server answers."""

    def __init__(self, provider: str, path: str, base: Callable[[RecordingServer], str]) -> None:
        self.provider, self.path, self.base = provider, path, base

    def answer(self, data: Any, usage: tuple[int, int]) -> dict[str, Any]:
        """A success carrying ``data`` (a dict: the structured answer; a str: text as the model wrote it)."""
        if self.provider == "openai_sdk":
            return completion(data if isinstance(data, str) else json.dumps(data), usage=usage)
        block = ({"type": "text", "text": data} if isinstance(data, str)
                 else {"type": "tool_use", "id": "toolu_1", "name": "Verdict", "input": data})
        return {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [block],
                "stop_reason": "tool_use", "stop_sequence": None,
                "usage": {"input_tokens": usage[0], "output_tokens": usage[1]}}


WIRES = [Wire("openai_sdk", "/v1/chat/completions", lambda s: s.url("/v1")),
         Wire("anthropic", "/v1/messages", lambda s: s.url(""))]


class Counted(Meter):
    """A meter that keeps what each request was charged (injected, as a worker injects its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.charged: list[tuple[str, int, int]] = []

    def charge(self, call: Call, tokens_in: int, tokens_out: int) -> None:
        self.charged.append((call.model, tokens_in, tokens_out))
        super().charge(call, tokens_in, tokens_out)


def make(wire: Wire, server: RecordingServer, meter: Meter | None = None, **overrides: Any) -> SDKProvider:
    settings = MeshSettings(**{"model_provider": wire.provider, "model_url": wire.base(server),
                               "model_api_key": "sk-test-key-0123", "model_timeout_s": 5.0, **overrides})
    provider = provider_for(settings, meter=meter)
    assert isinstance(provider, SDKProvider)
    return provider


def ask(provider: SDKProvider, mode: str, model: str | None = "claude-3-5-sonnet") -> Verdict:
    if mode == "async":
        return asyncio.run(provider.acomplete("review the diff", Verdict, system="You review.", model=model))
    return provider.complete("review the diff", Verdict, system="You review.", model=model)


@pytest.fixture(params=WIRES, ids=[w.provider for w in WIRES])
def wire(request: pytest.FixtureRequest) -> Wire:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def test_a_structured_answer_is_validated_and_its_tokens_metered(wire: Wire, mode: str) -> None:
    meter = Counted()
    with RecordingServer(lambda n, r: (200, wire.answer(VALID, (11, 7)))) as server:
        provider = make(wire, server, meter)
        assert ask(provider, mode) == Verdict(**VALID)
    assert meter.charged == [("claude-3-5-sonnet", 11, 7)]
    [sent] = server.requests
    assert sent["path"] == wire.path and sent["json"]["model"] == "claude-3-5-sonnet"
    body = sent["json"]
    if wire.provider == "openai_sdk":
        assert sent["headers"]["authorization"] == "Bearer sk-test-key-0123"
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"] == Verdict.model_json_schema()
    else:
        assert "sk-test-key-0123" in (sent["headers"].get("x-api-key") or sent["headers"]["authorization"])
        assert body["tool_choice"] == {"type": "tool", "name": "Verdict"}
        assert body["tools"][0]["input_schema"] == Verdict.model_json_schema()
        assert body["max_tokens"] == 4096 and "You review." in body["system"]


def test_a_429_is_rate_limited_with_its_retry_after_after_one_request(wire: Wire, mode: str) -> None:
    limited = RecordingServer(lambda n, r: (429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}))
    with limited as server, pytest.raises(RateLimited) as caught:
        ask(make(wire, server), mode)
    assert caught.value.retry_after_s == 7
    assert len(server.requests) == 1  # the SDK retried nothing: the mesh defers


def test_a_500_is_a_brownout_of_the_endpoint_after_one_request(wire: Wire, mode: str) -> None:
    with RecordingServer(lambda n, r: (500, {"error": {"message": "overloaded"}})) as server:
        provider = make(wire, server)
        with pytest.raises(Brownout) as caught:
            ask(provider, mode)
    assert caught.value.dependency == server.host_port and "500" in str(caught.value)
    assert len(server.requests) == 1


def test_an_answer_slower_than_the_timeout_is_a_dependency_timeout(wire: Wire, mode: str) -> None:
    slow = RecordingServer(lambda n, r: (200, wire.answer(VALID, (1, 1))), hold=True)
    with slow as server, pytest.raises(DependencyTimeout, match=r"within 0\.3s"):
        ask(make(wire, server, model_timeout_s=0.3), mode)
    assert len(server.requests) == 1


def test_an_answer_that_is_no_json_is_sent_back_then_invalid_output(wire: Wire, mode: str) -> None:
    meter = Counted()
    replies = [wire.answer("sure, it is fine", (5, 3)), wire.answer(VALID, (9, 4))]
    with RecordingServer(lambda n, r: (200, replies[min(n, 2) - 1])) as server:
        assert ask(make(wire, server, meter), mode) == Verdict(**VALID)  # repaired once
    assert [c[1:] for c in meter.charged] == [(5, 3), (9, 4)]
    repair = server.requests[1]["json"]["messages"][-1]["content"]
    assert "Your reply is invalid: not JSON" in repair

    prose = RecordingServer(lambda n, r: (200, wire.answer("sure, it is fine", (5, 3))))
    with prose as server, pytest.raises(InvalidOutput, match="not JSON"):
        ask(make(wire, server, model_repairs=0), mode)
    assert len(server.requests) == 1


def test_the_model_is_the_calls_else_mesh_model_name_never_one_of_the_meshs(wire: Wire) -> None:
    with RecordingServer(lambda n, r: (200, wire.answer(VALID, (1, 1)))) as server:
        with pytest.raises(ConfigError, match="set MESH_MODEL_NAME"):
            ask(make(wire, server), "sync", model=None)
        assert server.requests == []
        ask(make(wire, server, model_name="claude-3-opus"), "sync", model=None)
    assert server.requests[0]["json"]["model"] == "claude-3-opus"


def test_settings_select_the_provider_and_local_stays_the_default() -> None:
    with RecordingServer() as server:
        assert isinstance(make(WIRES[0], server), OpenAISDKProvider)
        assert isinstance(make(WIRES[1], server), AnthropicProvider)
    assert provider_for(MeshSettings()).name == "local"


@pytest.mark.parametrize(("provider", "module"), [("openai_sdk", "openai"), ("anthropic", "anthropic")])
def test_a_missing_sdk_is_a_config_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch, provider: str,
                                                         module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import` finds when the SDK is not installed
    with pytest.raises(ConfigError, match=rf"needs the {module} SDK: pip install 'agent-mesh\[{module}\]'"):
        provider_for(MeshSettings(model_provider=provider, model_name="m"))  # type: ignore[arg-type]


def test_5xx_open_the_endpoints_breaker_and_then_no_request_reaches_it(wire: Wire, mode: str, make_settings: Any,
                                                                       rclient: Any) -> None:
    """Through the breaker every worker shares (a real Redis): in acomplete its bookkeeping runs on
    a thread while the request runs on the event loop."""
    with RecordingServer(lambda n, r: (503, {"error": {"message": "overloaded"}})) as server:
        settings = make_settings(model_provider=wire.provider, model_url=wire.base(server), model_name="m",
                                 model_api_key="sk-test-key-0123", breaker_failures=2, breaker_cooldown_s=30)
        provider = provider_for(settings, breakers=Breakers(settings, rclient))
        assert isinstance(provider, SDKProvider)
        for _ in range(2):
            with pytest.raises(Brownout):
                ask(provider, mode)
        with pytest.raises(BreakerOpen) as caught:
            ask(provider, mode)
    assert len(server.requests) == 2
    assert caught.value.dependency == server.host_port and caught.value.retry_after_s > 25


def test_a_steps_model_reaches_acomplete_as_it_reaches_complete(wire: Wire) -> None:
    """``ctx.model`` in a pipeline step defaults to the step's ``model:`` (the seed file's
    ``claude-3-opus``) in ``acomplete`` too."""
    with RecordingServer(lambda n, r: (200, wire.answer(VALID, (1, 1)))) as server:
        step_model = StepModel(make(wire, server), "claude-3-opus")
        assert asyncio.run(step_model.acomplete("review", Verdict)) == Verdict(**VALID)
        assert step_model.complete("review", Verdict, model="claude-3-5-sonnet") == Verdict(**VALID)
    assert [r["json"]["model"] for r in server.requests] == ["claude-3-opus", "claude-3-5-sonnet"]


def _limited_headers(wire: Wire) -> dict[str, str]:
    """A 429's rate headers as each vendor sends them (no Retry-After: the reset says how long)."""
    import datetime

    if wire.provider == "anthropic":
        reset = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3)
        return {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z"),
                "anthropic-ratelimit-tokens-remaining": "9000"}
    return {"x-ratelimit-limit-requests": "50", "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "3s", "x-ratelimit-remaining-tokens": "9000"}


def test_a_model_429_lowers_the_rates_governing_model_calls_for_the_fleet(wire: Wire, mode: str, settings: Any,
                                                                           client: Any) -> None:
    """A step of an agent declaring ``rate: {requests, tokens}`` takes its limit; its model call is
    answered 429 with the vendor's rate headers: the agent's rate (which the call's tokens were
    reserved on) and the endpoint's declared dependency limit are halved for the fleet and paused for
    the reset the headers named; a tool's dependency limit the step also took is left alone."""
    from mesh.broker.limits import Held, Limiter, limit_states, set_current
    from mesh.contracts.flow import FlowLimits

    with RecordingServer(lambda n, r: (429, {"error": {"message": "slow down"}}, _limited_headers(wire))) as server:
        agent, model_dep, tool_dep = "agent:reviewer", f"dependency:{server.host_port}", "dependency:tickets:443"
        limiter = Limiter(settings, client.redis, {
            agent: FlowLimits.model_validate({"rate": {"requests": "10/s", "tokens": "600000/min"}}),
            model_dep: FlowLimits.model_validate({"rate": "20/s"}),
            tool_dep: FlowLimits.model_validate({"rate": "20/s"})})
        held = Held("holder")
        for name in (agent, tool_dep):
            assert limiter.take(name, None, held.holder, "m").admitted
            held.limits.append((name, None))
        set_current((limiter, held))
        try:
            with pytest.raises(RateLimited) as caught:
                ask(make(wire, server), mode)
        finally:
            set_current(None)
    assert caught.value.retry_after_s is not None and 2 <= caught.value.retry_after_s <= 4.5
    assert getattr(caught.value, "mesh_limits_lowered", False)  # the step's end does not lower them again
    states = {s.name: s for s in limit_states(client.redis, client.keys, [agent, model_dep, tool_dep])}
    for name in (agent, model_dep):
        assert 0.49 <= states[name].factor < 0.5 + 0.01 and states[name].rejected == 1, states[name]
        assert states[name].ahead_ms >= 1500, states[name]  # paused for the reset
    assert states[agent].tokens_ahead_ms >= 1500  # its tokens too: no model call is admitted meanwhile
    assert states[tool_dep].factor == 1 and states[tool_dep].rejected == 0
