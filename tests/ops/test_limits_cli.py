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
    assert limiter.take("agent:writer", None, held.holder, "m").admitted
    held.limits.append(("agent:writer", None))
    set_current((limiter, held))
    try:
        meter, call = Meter(), Call("test-model")
        meter.admit()
        reserved = _ahead(limiter)
        assert EXPECTED_TOKENS - 50 <= reserved <= EXPECTED_TOKENS  # the expected tokens, booked ahead
        meter.charge(call, 150, 50)
        assert 150 <= _ahead(limiter) <= 200  # what the call spent replaced the reservation
        meter.admit()  # the next call reserves what calls spend on average
        assert _ahead(limiter) > 200
    finally:
        set_current(None)
    over = limiter.take("agent:writer", None, "other", "m2")
    assert not over.admitted and over.reason == "tokens"


def limiter_client(limiter: Limiter) -> MeshClient:
    return MeshClient(limiter.settings, client=limiter.client)


def _tokens(rate: str) -> Any:
    from mesh.contracts.flow import FlowLimits

    return FlowLimits.model_validate({"rate": {"tokens": rate}})


def _ahead(limiter: Limiter) -> int:
    state = limiter.keys.limit("agent:writer", None)
    tat, now = limiter.client.hget(state, "ttat"), limiter.client.time()
    return int(float(tat) - (now[0] * 1000 + now[1] // 1000))
