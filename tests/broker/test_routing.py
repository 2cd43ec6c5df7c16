"""The routing policy, exhaustively and without Redis or a clock: every class to its route."""

from __future__ import annotations

import math

import pytest

from mesh.broker.router import Route, route
from mesh.broker.settings import MeshSettings
from mesh.contracts import FailureClass as F

S = MeshSettings(max_retries=2, max_defers=3, retry_min_backoff_ms=100, retry_max_backoff_ms=10_000)


def r(cls: F, retry_after_s: float | None = None, *, attempt: int = 1, defers: int = 0,
      remaining_s: float = math.inf, timeout_retries: int = 0, rng: float = 0.5):
    return route(cls, retry_after_s, attempt=attempt, defers=defers, remaining_s=remaining_s,
                 timeout_retries=timeout_retries, settings=S, rng=lambda: rng)


def test_rate_limited_with_retry_after_defers_that_long_plus_at_most_a_quarter_second():
    assert r(F.RATE_LIMITED, 2.0, rng=0.0).delay_ms == 2000
    got = r(F.RATE_LIMITED, 2.0, rng=1.0)
    assert (got.route, got.failure_class, got.delay_ms) == (Route.DEFER, F.RATE_LIMITED, 2250)


def test_rate_limited_defers_whatever_the_attempt_spending_no_retry_budget():
    assert r(F.RATE_LIMITED, 1.0, attempt=50).route is Route.DEFER


def test_rate_limited_without_retry_after_backs_off_exponentially_with_full_jitter():
    ceilings = [r(F.RATE_LIMITED, defers=n, rng=1.0).delay_ms for n in range(3)]
    assert ceilings == [100, 200, 400]
    assert {r(F.RATE_LIMITED, defers=2, rng=x).delay_ms for x in (0.0, 0.3, 0.9)} == {100, 190, 370}


def test_deferrals_stop_at_max_defers_into_the_dlq_keeping_the_class():
    got = r(F.RATE_LIMITED, 1.0, defers=3)
    assert (got.route, got.failure_class) == (Route.DEAD_LETTER, F.RATE_LIMITED)
    assert "MESH_MAX_DEFERS=3" in got.reason


def test_a_deferral_that_would_pass_the_deadline_is_dead_lettered_as_deadline_now():
    got = r(F.RATE_LIMITED, 30.0, remaining_s=10.0)
    assert (got.route, got.failure_class) == (Route.DEAD_LETTER, F.DEADLINE)
    assert "would pass the deadline" in got.reason


def test_brownout_with_an_open_breaker_defers_to_its_reopen_time_without_budget():
    got = r(F.BROWNOUT, 5.0, attempt=10, rng=0.0)
    assert (got.route, got.delay_ms) == (Route.DEFER, 5000)


def test_brownout_while_the_breaker_is_closed_is_retried_within_the_budget_then_dead_lettered():
    assert [r(F.BROWNOUT, attempt=a).route for a in (1, 2, 3)] == [Route.RETRY, Route.RETRY, Route.DEAD_LETTER]


@pytest.mark.parametrize("cls", [F.INVALID_OUTPUT, F.UNKNOWN])
def test_bounded_retries_with_growing_jittered_backoff_then_dlq(cls):
    assert [r(cls, attempt=a, rng=1.0).delay_ms for a in (1, 2)] == [100, 200]
    last = r(cls, attempt=3)
    assert (last.route, last.failure_class) == (Route.DEAD_LETTER, cls)
    assert "retries exhausted (2 of 2)" in last.reason


def test_timeout_fails_fast_unless_the_actor_allows_one_retry():
    assert r(F.TIMEOUT).route is Route.DEAD_LETTER
    assert [r(F.TIMEOUT, attempt=a, timeout_retries=1).route for a in (1, 2)] == [Route.RETRY, Route.DEAD_LETTER]


@pytest.mark.parametrize("cls", [F.PERMANENT, F.INVALID_INPUT, F.DEADLINE, F.CYCLE])
def test_terminal_classes_are_dead_lettered_at_once_even_with_budget_left(cls):
    got = r(cls, 3.0, attempt=1, timeout_retries=5)
    assert (got.route, got.failure_class, got.reason) == (Route.DEAD_LETTER, cls, "")


def test_a_retry_whose_backoff_would_pass_the_deadline_is_dead_lettered_as_deadline():
    got = r(F.UNKNOWN, remaining_s=0.05, rng=1.0)
    assert (got.route, got.failure_class) == (Route.DEAD_LETTER, F.DEADLINE)


def test_every_class_has_a_route():
    for cls in F:
        assert r(cls, attempt=1).route in set(Route)
