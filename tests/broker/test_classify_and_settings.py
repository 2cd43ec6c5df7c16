"""Pure failure classification, Retry-After parsing, backoff bounds and settings loading."""

from __future__ import annotations

import email.utils
from typing import Any

import httpx
import pydantic
import pytest
from dramatiq.middleware import TimeLimitExceeded

from mesh.broker.classify import classify, error_for_response, parse_retry_after
from mesh.broker.router import full_jitter_ms
from mesh.broker.settings import MeshSettings
from mesh.contracts import (
    Brownout,
    ConfigError,
    ContractError,
    CycleDetected,
    DeadlineExceeded,
    DependencyTimeout,
    FailureClass,
    IllegalTransition,
    InvalidOutput,
    MeshError,
    PermanentFailure,
    PlannerInput,
    PoisonMessage,
    RateLimited,
    ToolRefused,
    UnknownAgent,
)

NOW = 1_700_000_000.0
REQUEST = httpx.Request("POST", "http://model.local:8080/v1/chat/completions")


def response(status: int, headers: dict[str, str] | list[tuple[bytes, bytes]] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=REQUEST)


# --- classify -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (MeshError("m"), FailureClass.UNKNOWN),
        (ConfigError("c"), FailureClass.PERMANENT),
        (ContractError("c"), FailureClass.INVALID_INPUT),
        (PoisonMessage("p", raw=b"\x80"), FailureClass.INVALID_INPUT),
        (InvalidOutput("o"), FailureClass.INVALID_OUTPUT),
        (DependencyTimeout("t"), FailureClass.TIMEOUT),
        (Brownout("b", dependency="model"), FailureClass.BROWNOUT),
        (PermanentFailure("p"), FailureClass.PERMANENT),
        (ToolRefused("r"), FailureClass.PERMANENT),
        (IllegalTransition("StepRecord", "succeeded", "running"), FailureClass.PERMANENT),
        (DeadlineExceeded("d"), FailureClass.DEADLINE),
        (CycleDetected("c"), FailureClass.CYCLE),
        (UnknownAgent("poet", ["planner"]), FailureClass.PERMANENT),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_classify_mesh_errors_by_their_failure_class(exc: MeshError, expected: FailureClass) -> None:
    assert classify(exc) == (expected, None)


def test_classify_rate_limited_carries_retry_after() -> None:
    assert classify(RateLimited("429", retry_after_s=2.5)) == (FailureClass.RATE_LIMITED, 2.5)
    assert classify(RateLimited("429")) == (FailureClass.RATE_LIMITED, None)


def test_classify_dramatiq_time_limit_is_timeout() -> None:
    assert classify(TimeLimitExceeded()) == (FailureClass.TIMEOUT, None)


def test_classify_httpx_read_timeout_is_timeout() -> None:
    assert classify(httpx.ReadTimeout("slow", request=REQUEST)) == (FailureClass.TIMEOUT, None)


def test_classify_httpx_connect_error_is_brownout() -> None:
    assert classify(httpx.ConnectError("refused", request=REQUEST)) == (FailureClass.BROWNOUT, None)


def test_classify_builtin_connection_error_is_brownout() -> None:
    assert classify(ConnectionResetError()) == (FailureClass.BROWNOUT, None)


def test_classify_pydantic_validation_error_is_invalid_output() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        PlannerInput.model_validate({"goal": ""})
    assert classify(info.value) == (FailureClass.INVALID_OUTPUT, None)


def test_classify_plain_exception_is_unknown() -> None:
    assert classify(Exception("?")) == (FailureClass.UNKNOWN, None)
    assert classify(KeyError("k")) == (FailureClass.UNKNOWN, None)


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, FailureClass.RATE_LIMITED), (503, FailureClass.BROWNOUT), (504, FailureClass.TIMEOUT),
     (404, FailureClass.PERMANENT)],
)
def test_classify_http_status_error_uses_its_response(status: int, expected: FailureClass) -> None:
    exc = httpx.HTTPStatusError("bad", request=REQUEST, response=response(status))
    assert classify(exc)[0] is expected


def test_classify_http_status_error_keeps_retry_after() -> None:
    exc = httpx.HTTPStatusError("bad", request=REQUEST, response=response(429, {"Retry-After": "7"}))
    assert classify(exc) == (FailureClass.RATE_LIMITED, 7.0)


# --- error_for_response ---------------------------------------------------------------------------

def test_429_with_delta_seconds_retry_after() -> None:
    err = error_for_response(response(429, {"Retry-After": "2"}), dependency="model", now=NOW)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 2
    assert err.context["dependency"] == "model"


def test_429_with_http_date_retry_after_is_seconds_from_given_now() -> None:
    date = email.utils.formatdate(NOW + 5, usegmt=True)
    err = error_for_response(response(429, {"Retry-After": date}), dependency="model", now=NOW)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 5


def test_429_with_http_date_in_the_past_waits_zero() -> None:
    date = email.utils.formatdate(NOW - 60, usegmt=True)
    err = error_for_response(response(429, {"Retry-After": date}), dependency="model", now=NOW)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 0.0


def test_429_without_retry_after_header_has_none() -> None:
    err = error_for_response(response(429), dependency="model", now=NOW)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s is None


def test_429_with_non_ascii_digit_retry_after_is_none_not_a_crash() -> None:
    # "²".isdigit() is True but float("²") fails: a server may send it as UTF-8 bytes.
    err = error_for_response(response(429, [(b"Retry-After", "²".encode())]), dependency="model", now=NOW)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s is None


@pytest.mark.parametrize("status", [500, 502, 503, 599])
def test_5xx_is_brownout(status: int) -> None:
    err = error_for_response(response(status), dependency="model")
    assert isinstance(err, Brownout)
    assert err.dependency == "model"
    assert err.context["status"] == status


@pytest.mark.parametrize("status", [408, 504])
def test_408_and_504_are_dependency_timeout(status: int) -> None:
    err = error_for_response(response(status), dependency="model")
    assert isinstance(err, DependencyTimeout)
    assert err.context["status"] == status


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 418])
def test_4xx_is_permanent_failure(status: int) -> None:
    err = error_for_response(response(status), dependency="model")
    assert type(err) is PermanentFailure
    assert str(status) in str(err)


@pytest.mark.parametrize("value", ["soon", "1.5", "-3", "", "   ", "Wed, 21 Oct 2015 07:28:00", "²", "99 bottles"])
def test_parse_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after({"Retry-After": value}, now=NOW) is None


def test_parse_retry_after_absent_header_is_none() -> None:
    assert parse_retry_after({}, now=NOW) is None


def test_parse_retry_after_reads_header_case_insensitively() -> None:
    assert parse_retry_after(httpx.Headers({"RETRY-AFTER": " 3 "}), now=NOW) == 3.0


# --- full_jitter_ms -------------------------------------------------------------------------------

LOW, HIGH = (lambda: 0.0), (lambda: 0.999_999_999)


@pytest.mark.parametrize("n", range(0, 12))
def test_full_jitter_stays_within_min_and_capped_exponential_ceiling(n: int) -> None:
    min_ms, max_ms = 200, 30_000
    ceiling = min(max_ms, min_ms * 2**n)
    for rng in (LOW, HIGH, lambda: 0.5):
        assert min_ms <= full_jitter_ms(n, min_ms, max_ms, rng) <= ceiling
    assert full_jitter_ms(n, min_ms, max_ms, LOW) == min_ms


def test_full_jitter_upper_bound_grows_with_retries_until_capped() -> None:
    highs = [full_jitter_ms(n, 200, 30_000, HIGH) for n in range(10)]
    assert highs[0] == 200
    assert highs == sorted(highs)
    assert highs[1] < highs[2] < highs[3] < highs[4] < highs[5] < highs[6] < highs[7]
    assert highs[-1] <= 30_000
    assert highs[-1] >= 29_999


def test_full_jitter_huge_retry_count_does_not_overflow_cap() -> None:
    assert full_jitter_ms(10_000, 200, 30_000, HIGH) <= 30_000


# --- MeshSettings.from_env ------------------------------------------------------------------------

def test_from_env_with_no_vars_gives_defaults() -> None:
    settings = MeshSettings.from_env({})
    assert settings.namespace == "mesh"
    assert settings.max_retries == 3
    assert settings.model_provider is None  # decided by MESH_MODEL_URL: local without it


def test_a_model_url_alone_selects_the_openai_provider_and_an_explicit_choice_wins() -> None:
    from mesh.agents.providers import LocalProvider, provider_for

    assert isinstance(provider_for(MeshSettings.from_env({})), LocalProvider)
    with_url = provider_for(MeshSettings.from_env({"MESH_MODEL_URL": "http://127.0.0.1:9/v1"}))
    assert type(with_url).__name__ == "OpenAIProvider"
    explicit = MeshSettings.from_env({"MESH_MODEL_URL": "http://127.0.0.1:9/v1", "MESH_MODEL_PROVIDER": "local"})
    assert isinstance(provider_for(explicit), LocalProvider)


def test_from_env_accepts_known_vars_and_coerces_types() -> None:
    env = {"MESH_REDIS_URL": "redis://h:1/2", "MESH_NAMESPACE": "ns-1", "MESH_MAX_RETRIES": "5",
           "MESH_RETRY_MIN_BACKOFF_MS": "50", "MESH_MODEL_PROVIDER": "openai", "MESH_MODEL_API_KEY": "sk-x",
           "MESH_HTTP_ALLOW": "Host:80, other:443,", "MESH_JOB_DEADLINE_S": "12.5"}
    settings = MeshSettings.from_env(env)
    assert settings.redis_url == "redis://h:1/2"
    assert settings.namespace == "ns-1"
    assert settings.max_retries == 5
    assert settings.retry_min_backoff_ms == 50
    assert settings.model_provider == "openai"
    assert settings.model_api_key is not None
    assert settings.model_api_key.get_secret_value() == "sk-x"
    assert "sk-x" not in repr(settings)
    assert settings.http_allowlist == frozenset({"host:80", "other:443"})
    assert settings.job_deadline_s == 12.5


def test_from_env_ignores_variables_without_mesh_prefix() -> None:
    assert MeshSettings.from_env({"PATH": "/bin", "REDIS_URL": "x"}).namespace == "mesh"


def test_from_env_rejects_unknown_mesh_variable_naming_it() -> None:
    with pytest.raises(ConfigError, match="MESH_FOO"):
        MeshSettings.from_env({"MESH_FOO": "1", "MESH_NAMESPACE": "ok"})


@pytest.mark.parametrize(
    ("name", "value"),
    [("MESH_MAX_RETRIES", "lots"), ("MESH_MAX_RETRIES", "-1"), ("MESH_MODEL_PROVIDER", "magic"),
     ("MESH_NAMESPACE", "has space"), ("MESH_JOB_DEADLINE_S", "0"), ("MESH_WORKER_THREADS", "1000")],
)
def test_from_env_rejects_bad_value_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        MeshSettings.from_env({name: value})


def test_from_env_overrides_win_over_environment() -> None:
    assert MeshSettings.from_env({"MESH_NAMESPACE": "env"}, namespace="override").namespace == "override"


def test_from_env_does_not_read_process_environment_when_given_a_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_NAMESPACE", "from-process")
    assert MeshSettings.from_env({}).namespace == "mesh"


@pytest.mark.parametrize(("field", "value"), [("namespace", "other"), ("max_retries", 9)])
def test_settings_are_frozen(field: str, value: Any) -> None:
    settings = MeshSettings.from_env({})
    with pytest.raises(pydantic.ValidationError):
        setattr(settings, field, value)
    assert getattr(settings, field) != value


@pytest.mark.parametrize(("headers", "wait_s"), [
    ({"Retry-After": "9" * 400}, 86_400.0),                          # more digits than a float holds
    ({"Retry-After": "315360000"}, 86_400.0),                        # ten years
    ({"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}, 86_400.0),    # a date decades ahead
    ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),         # a date gone by
    ({"Retry-After": "-5"}, None),
    ({"Retry-After": "garbage"}, None),
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "nan"}, None),
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "inf"}, 86_400.0),
    ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1e400"}, 86_400.0),
])
def test_an_absurd_429_wait_is_read_as_at_most_a_day_and_routed(headers: dict[str, str], wait_s: float | None
                                                                 ) -> None:
    """A 429 naming an absurd wait is deferred or dead-lettered clearly, never a crash of the router."""
    from mesh.broker.router import Route, route

    err = error_for_response(response(429, headers), dependency="model", now=NOW)
    assert isinstance(err, RateLimited) and err.retry_after_s == wait_s
    failure_class, named = classify(err)
    routing = route(failure_class, named, attempt=1, defers=0, remaining_s=600, timeout_retries=0,
                    settings=MeshSettings())
    assert routing.route is (Route.DEAD_LETTER if wait_s and wait_s > 600 else Route.DEFER)


@pytest.mark.parametrize("raised", [float("inf"), float("nan"), -1.0, 1e300])
def test_a_rate_limited_error_raised_with_an_absurd_wait_is_routed(raised: float) -> None:
    from mesh.broker.router import route

    failure_class, named = classify(RateLimited("slow down", retry_after_s=raised))
    assert named is None or 0 <= named <= 86_400
    route(failure_class, named, attempt=1, defers=0, remaining_s=600, timeout_retries=0, settings=MeshSettings())
