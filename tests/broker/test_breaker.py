"""The fleet-wide circuit breaker, transition by transition, against the real Redis."""

from __future__ import annotations

import time

import pytest
from conftest import wait_for

from mesh.broker.breaker import Breakers
from mesh.contracts import BreakerOpen, Brownout, DependencyTimeout, PermanentFailure

DEP = "api.example:443"


@pytest.fixture
def breakers(make_settings, rclient) -> Breakers:
    return Breakers(make_settings(breaker_failures=3, breaker_window_s=30, breaker_cooldown_s=0.3,
                                  breaker_max_cooldown_s=1.0, breaker_probe_ttl_s=5), rclient)


def fail(breakers: Breakers, exc: Exception | None = None) -> BaseException:
    def call() -> None:
        raise exc or Brownout("503", dependency=DEP)

    with pytest.raises((Brownout, DependencyTimeout, PermanentFailure)) as info:
        breakers.call(DEP, call)
    return info.value


def state(breakers: Breakers):
    [b] = breakers.list()
    return b


def wait_reopen(breakers: Breakers) -> None:
    """Until the open breaker's reopen time (read, not asked: asking would take the probe)."""
    reopen_at = state(breakers).reopen_at
    assert reopen_at is not None
    wait_for(lambda: time.time() >= reopen_at + 0.005, timeout_s=5)


def admit(breakers: Breakers, owner: str = "x") -> str:
    return breakers._call("admit", DEP, owner)[0].decode()


def test_breaker_stays_closed_below_the_threshold_and_opens_at_it(breakers):
    for _ in range(2):
        assert isinstance(fail(breakers), Brownout)
    assert (state(breakers).state, state(breakers).failures) == ("closed", 2)
    third = fail(breakers)
    assert isinstance(third, Brownout) and third.retry_after_s == pytest.approx(0.3)  # to the reopen time
    b = state(breakers)
    assert (b.state, b.trips) == ("open", 1) and b.reopen_at is not None and "503" in (b.last_error or "")


def test_while_open_no_call_is_made(breakers):
    for _ in range(3):
        fail(breakers)
    calls = []
    with pytest.raises(BreakerOpen) as info:
        breakers.call(DEP, lambda: calls.append(1))
    assert calls == [] and 0 < info.value.retry_after_s <= 0.3 and info.value.state == "open"


def test_after_the_cooldown_exactly_one_probe_is_admitted_and_its_success_closes(breakers):
    for _ in range(3):
        fail(breakers)
    wait_for(lambda: admit(breakers, "probe-1") == "probe", timeout_s=3)
    assert [admit(breakers, f"other-{i}") for i in range(3)] == ["half_open"] * 3
    assert breakers._call("success", DEP, "probe-1") == b"closed"
    assert breakers.call(DEP, lambda: "ok") == "ok"
    assert (state(breakers).state, state(breakers).failures) == ("closed", 0)


def test_a_failed_probe_reopens_with_double_the_cooldown_capped(breakers):
    for _ in range(3):
        fail(breakers)
    cooldowns = []
    for _ in range(3):
        wait_reopen(breakers)
        exc = fail(breakers)  # this call is the probe: admitted, fails
        cooldowns.append(exc.retry_after_s)  # type: ignore[attr-defined]
    assert cooldowns == [pytest.approx(0.6), pytest.approx(1.0), pytest.approx(1.0)]
    assert state(breakers).trips == 4


def test_a_probe_that_times_out_reopens_but_a_probe_answered_with_400_closes(breakers):
    for _ in range(3):
        fail(breakers)
    wait_reopen(breakers)
    fail(breakers, DependencyTimeout("slow", dependency=DEP))
    assert state(breakers).state == "open"
    wait_reopen(breakers)
    fail(breakers, PermanentFailure("400"))
    assert state(breakers).state == "closed"


def test_permanent_errors_do_not_count_against_a_closed_breaker(breakers):
    for _ in range(5):
        fail(breakers, PermanentFailure("400"))
    assert breakers.list() == []  # no breaker was ever needed


def test_timeouts_count_against_a_closed_breaker_like_brownouts(breakers):
    fail(breakers, DependencyTimeout("slow", dependency=DEP))
    fail(breakers)
    assert (state(breakers).state, state(breakers).failures) == ("closed", 2)
    fail(breakers, DependencyTimeout("slow", dependency=DEP))
    assert state(breakers).state == "open"


def test_a_probe_whose_worker_died_frees_its_slot_after_the_probe_ttl(make_settings, rclient):
    breakers = Breakers(make_settings(breaker_failures=1, breaker_cooldown_s=0.1, breaker_probe_ttl_s=0.3), rclient)
    fail(breakers)
    wait_for(lambda: admit(breakers, "dies") == "probe", timeout_s=3)
    assert admit(breakers, "waits") == "half_open"
    assert wait_for(lambda: admit(breakers, "next") == "probe", timeout_s=3)


def test_reset_closes_an_open_breaker_and_unknown_names_are_refused(breakers):
    for _ in range(3):
        fail(breakers)
    assert breakers.reset(DEP) is True
    assert state(breakers).state == "closed" and breakers.call(DEP, lambda: 1) == 1
    assert breakers.reset("nope:1") is False


def test_failures_older_than_the_window_do_not_count(make_settings, rclient):
    breakers = Breakers(make_settings(breaker_failures=2, breaker_window_s=0.2), rclient)
    fail(breakers)
    wait_for(lambda: state(breakers).failures == 0, timeout_s=3)  # the window slid past it
    fail(breakers)
    assert state(breakers).state == "closed"


def test_the_probes_own_admit_sent_again_is_still_the_probe(breakers):
    for _ in range(3):
        fail(breakers)
    wait_reopen(breakers)
    assert admit(breakers, "p") == "probe"
    assert admit(breakers, "p") == "probe"  # a re-send after a lost reply
    assert admit(breakers, "q") == "half_open"


def test_a_probe_stopped_by_the_time_limit_reopens_the_breaker_instead_of_closing_it(breakers):
    from dramatiq.middleware import TimeLimitExceeded

    for _ in range(3):
        fail(breakers)
    wait_reopen(breakers)

    def hung() -> None:
        raise TimeLimitExceeded()

    with pytest.raises(TimeLimitExceeded):
        breakers.call(DEP, hung)
    assert state(breakers).state == "open"
