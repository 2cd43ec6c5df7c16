"""``mesh limits`` lists each limit with its use and what waits; ``set`` changes one for the fleet,
over the declaration, until ``reset``. A model call reserves its expected tokens and settles them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mesh.agents.flow import flow_plan
from mesh.agents.providers.meter import Call, Meter
from mesh.broker import MeshClient
from mesh.broker.limits import EXPECTED_TOKENS, Held, Limiter, set_current
from mesh.broker.settings import MeshSettings
from mesh.ops.metrics import MeshCollector
from tests.apps.limited import app


@pytest.fixture
def limiter(settings: MeshSettings, client: MeshClient) -> Limiter:
    declared, _ = flow_plan(app)
    limiter = Limiter(settings, client.redis, declared)
    limiter.publish()
    return limiter


def test_limits_lists_use_and_waiting_and_set_changes_it_for_the_fleet(limiter: Limiter, cli: Any) -> None:
    for n in range(2):
        assert limiter.take("agent:slow", "acme", f"h{n}", f"m{n}").admitted
    third = limiter.take("agent:slow", "acme", "h2", "m2")
    assert not third.admitted and third.reason == "concurrency"

    shown = cli("limits")
    assert shown.returncode == 0, shown.stderr
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    (row,) = [line for line in shown.stdout.splitlines() if "agent:slow" in line]
    assert [c for c in row.split() if c != "│"][1:5] == ["acme", "-", "2/2", "1"]  # key, rate, in use of max, waiting
    listed = {(s["name"], s["flow_key"]): s for s in json.loads(cli("limits", "--json").stdout)}
    assert listed[("agent:slow", "acme")]["waiting"] == 1
    assert "admitted" in cli("limits", "--wide").stdout
    metrics = {f.name: f for f in MeshCollector(limiter_client(limiter)).collect()}
    (held,) = [x.value for x in metrics["mesh_limit_in_use"].samples if x.labels == {"limit": "agent:slow"}]
    (waits,) = [x.value for x in metrics["mesh_limit_waiting"].samples if x.labels == {"limit": "agent:slow"}]
    assert (held, waits) == (2, 1)

    done = cli("limits", "set", "agent:sl", "--max", "3")
    assert done.returncode == 0, done.stderr
    assert "max 3" in done.stdout
    limiter._overrides = (-10.0, {})  # past the process's one-second cache
    assert limiter.take("agent:slow", "acme", "h2", "m2").admitted  # the waiter first, in arrival order
    assert "agent:slow*" in cli("limits").stdout

    assert cli("limits", "reset", "agent:slow").returncode == 0
    limiter._overrides = (-10.0, {})
    assert limiter.effective("agent:slow").max == 2
    assert cli("limits", "reset", "agent:slow").returncode == 2  # nothing set any more
    assert cli("limits", "set", "nothing:here", "--max", "1").returncode == 2
    assert cli("limits", "set", "agent:slow", "--requests", "fast").returncode == 2


def test_a_model_call_reserves_its_expected_tokens_and_settles_what_it_spent(
        settings: MeshSettings, client: MeshClient) -> None:
    limiter = Limiter(settings, client.redis, {"agent:writer": _tokens("60000/min")})  # a token a millisecond
    held = Held("holder")
    verdict = limiter.take("agent:writer", None, held.holder, "m")
    assert verdict.admitted
    held.took("agent:writer", None, verdict)
    reserved = _ahead(limiter)
    assert EXPECTED_TOKENS - 50 <= reserved <= EXPECTED_TOKENS  # the expected tokens, booked on admission
    set_current((limiter, held))
    try:
        meter, call = Meter(), Call("test-model")
        meter.admit()  # the first call: its admission booked its tokens
        assert EXPECTED_TOKENS - 100 <= _ahead(limiter) <= EXPECTED_TOKENS
        meter.charge(call, 150, 50)
        assert 150 <= _ahead(limiter) <= 200  # what the call spent replaced the reservation
        meter.admit()  # the next call reserves what calls spend on average
        assert _ahead(limiter) > 200
    finally:
        set_current(None)
    over = limiter.take("agent:writer", None, "other", "m2")
    assert not over.admitted and over.reason == "rate"  # its tokens reserved: back at its turn


def limiter_client(limiter: Limiter) -> MeshClient:
    return MeshClient(limiter.settings, client=limiter.client)


def _tokens(rate: str) -> Any:
    from mesh.contracts.flow import FlowLimits

    return FlowLimits.model_validate({"rate": {"tokens": rate}})


def _ahead(limiter: Limiter) -> int:
    state = limiter.keys.limit("agent:writer", None)
    tat, now = limiter.client.hget(state, "ttat"), limiter.client.time()
    return int(float(tat) - (now[0] * 1000 + now[1] // 1000))


@pytest.mark.parametrize("given", [
    ("--max", "99999999999999999999999"),  # beyond a 64-bit integer: it crashed writing the override
    ("--max", "5000000"),                  # beyond what a declaration may say
    ("--requests", "0.000000001/s"),       # one in 31 years: a message would wait decades
    ("--requests", "nan/s"), ("--tokens", "0/s"), ("--max", "0"),
])
def test_limits_set_refuses_what_no_declaration_may_say(limiter: Limiter, cli: Any, given: tuple[str, str]) -> None:
    done = cli("limits", "set", "agent:slow", *given)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    assert cli("limits", "reset", "agent:slow").returncode == 2  # nothing was set


def test_limits_lists_any_key_within_80_columns_and_on_its_own_line(limiter: Limiter, cli: Any) -> None:
    """A flow key is an input's value: the longest (128 characters, or 128 wide ones), one of line
    breaks that would forge a row of its own: each is listed within 80 columns, its line breaks
    escaped; ``--json`` gives every key whole."""
    keys = ["x" * 128, "漢" * 128, "evil\nlimit:   agent:forged"]
    for n, key in enumerate(keys):
        assert limiter.take("agent:slow", key, f"h{n}", f"m{n}").admitted
    shown = cli("limits")
    assert shown.returncode == 0, shown.stderr
    assert all(len(line) <= 80 for line in shown.stdout.splitlines()), shown.stdout
    assert not any(line.startswith("limit:   agent:forged") or line.strip().startswith("agent:forged")
                   for line in shown.stdout.splitlines()), shown.stdout
    assert "evil\\nlimit:" in shown.stdout
    listed = {s["flow_key"] for s in json.loads(cli("limits", "--json").stdout)}
    assert set(keys) <= listed


def test_model_calls_side_by_side_each_settle_what_they_spent(settings: MeshSettings, client: MeshClient) -> None:
    """An async handler's two model calls in flight together: each reserves its expected tokens and
    settles what it spent, so both are charged (the second call's tokens went uncounted)."""
    limiter = Limiter(settings, client.redis, {"agent:writer": _tokens("60000/min")})  # a token a millisecond
    held = Held("holder")
    verdict = limiter.take("agent:writer", None, held.holder, "m")
    assert verdict.admitted
    held.took("agent:writer", None, verdict)
    set_current((limiter, held))
    try:
        meter, first, second = Meter(), Call("test-model"), Call("test-model")
        meter.admit()
        meter.admit()
        assert 2 * EXPECTED_TOKENS - 100 <= _ahead(limiter) <= 2 * EXPECTED_TOKENS
        meter.charge(first, 300, 0)
        meter.charge(second, 400, 0)
        assert 600 <= _ahead(limiter) <= 700
    finally:
        set_current(None)
    assert held.reserved == {}


def test_limits_set_says_what_it_did_within_80_columns(limiter: Limiter, cli: Any) -> None:
    done = cli("limits", "set", "dependency:", "--requests", "20/s")
    assert done.returncode == 0, done.stderr
    assert "requests 20/s" in done.stdout and "mesh limits reset dependency:" in done.stdout
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout


def test_concurrent_limits_set_of_different_numbers_keep_both(client: MeshClient) -> None:
    """Two operators set different numbers of one limit at the same moment, 100 times over: every time
    the override holds both (a read, merge and write back lost one of them most times)."""
    import threading

    from mesh.broker.limits import overrides, reset_override, set_override

    lost = 0
    for _ in range(100):
        reset_override(client.redis, client.keys, "agent:slow")
        barrier = threading.Barrier(2)

        def set_rate(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            set_override(client.redis, client.keys, "agent:slow", requests="10/s")

        def set_max(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            set_override(client.redis, client.keys, "agent:slow", max=3)

        threads = [threading.Thread(target=set_rate), threading.Thread(target=set_max)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if overrides(client.redis, client.keys)["agent:slow"] != {"requests": "10/s", "max": 3}:
            lost += 1
    assert lost == 0


# Arabic-Indic, full-width and Bengali digits: str.isdigit() and \d take them, float() reads them.
@pytest.mark.parametrize("given", ["\u0665\u0660/s", "\uff15\uff10/s", "50/\u0662s", "5\u09e6/min"])
def test_limits_set_refuses_a_rate_in_digits_other_than_ascii(limiter: Limiter, cli: Any, given: str) -> None:
    done = cli("limits", "set", "agent:slow", "--requests", given)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert cli("limits", "reset", "agent:slow").returncode == 2  # nothing was set


@pytest.mark.parametrize(("given", "stored"), [("   5 / 2 s  ", "5/2s"), ("50/S", "50/s"), ("600 /1min", "600/min")])
def test_limits_set_stores_a_rate_in_its_canonical_form(limiter: Limiter, cli: Any, client: MeshClient,
                                                        given: str, stored: str) -> None:
    from mesh.broker.limits import overrides

    done = cli("limits", "set", "agent:slow", "--requests", given)
    assert done.returncode == 0, done.stderr
    assert overrides(client.redis, client.keys)["agent:slow"] == {"requests": stored}


def test_the_limit_metrics_move_when_a_429_lowers_a_rate(limiter: Limiter) -> None:
    """``mesh_limit_rate_factor`` and ``mesh_limit_rejected_total``: 1 and 0 before; a tool dependency's
    429 and a model's 429 (for a step that took the agent's rate) each halve their limit's factor and
    count one rejection."""
    from mesh.contracts import RateLimited
    from mesh.contracts.flow import FlowLimits

    limiter.declared["agent:asker"] = FlowLimits.model_validate({"rate": {"requests": "10/s", "tokens": "60000/min"}})
    limiter.publish()
    dependency = next(name for name in limiter.declared if name.startswith("dependency:"))

    def samples() -> dict[tuple[str, str], float]:
        families = MeshCollector(limiter_client(limiter)).collect()
        return {(s.name, s.labels["limit"]): s.value for f in families if f.name.startswith("mesh_limit_")
                for s in f.samples if "limit" in s.labels}

    before = samples()
    for name in ("agent:asker", dependency):
        assert before[("mesh_limit_rate_factor", name)] == 1
        assert before[("mesh_limit_rejected_total", name)] == 0
    limiter.penalize(dependency.removeprefix("dependency:"), 2.0)
    held = Held("holder")
    assert limiter.take("agent:asker", None, held.holder, "m").admitted
    held.limits.append(("agent:asker", None))
    set_current((limiter, held))
    try:
        from mesh.broker import limits

        limits.model_refused(RateLimited("model answered 429", retry_after_s=1.0, dependency="models.example:443"))
    finally:
        set_current(None)
    after = samples()
    for name in ("agent:asker", dependency):
        assert 0.45 < after[("mesh_limit_rate_factor", name)] < 0.55, after
        assert after[("mesh_limit_rejected_total", name)] == 1, after
