"""The flow-limit script over real Redis, one call at a time: GCRA pacing with reserved slots,
concurrency waiters served in arrival order, a 429 halving the rate and voiding the permits paced
for the old one, the rate climbing back, and every key of a limit in one Cluster hash slot."""

from __future__ import annotations

import itertools

import httpx
from redis.crc import key_slot

from mesh.broker import MeshClient
from mesh.broker.classify import error_for_response, rate_limit_reset
from mesh.broker.limits import Limiter
from mesh.contracts import RateLimited
from mesh.contracts.flow import FlowLimits


def limiter(client: MeshClient, **limits: dict) -> Limiter:
    declared = {name.replace("__", ":"): FlowLimits.model_validate(v) for name, v in limits.items()}
    return Limiter(client.settings, client.redis, declared)


def test_a_rate_reserves_each_late_message_its_own_slot_in_turn(client: MeshClient) -> None:
    lim = limiter(client, dependency__api={"rate": {"requests": "10/s"}})  # 100 ms apart, a burst of 2
    verdicts = [lim.take("dependency:api", None, f"h{n}", f"m{n}") for n in range(6)]
    assert [v.admitted for v in verdicts] == [True, True, False, False, False, False]
    waits = [v.wait_ms for v in verdicts[2:]]
    assert all(v.reason == "rate" for v in verdicts[2:])
    assert waits == sorted(waits) and all(80 <= b - a <= 120 for a, b in itertools.pairwise(waits))
    # A reservation its message cannot use (its deadline comes first) goes to the next message.
    lim.give_back("dependency:api", None)
    assert abs(lim.take("dependency:api", None, "h6", "m6").wait_ms - waits[-1]) <= 20
    # A message back with its permit is admitted without taking another slot.
    permit = [verdicts[2].gen, 1]
    assert lim.take("dependency:api", None, "h2", "m2", permit).admitted


def test_concurrency_waiters_are_served_in_arrival_order(client: MeshClient) -> None:
    lim = limiter(client, agent__a={"concurrency": {"max": 1}})
    assert lim.take("agent:a", None, "h0", "first").admitted
    assert lim.take("agent:a", None, "h1", "second").reason == "concurrency"
    assert lim.take("agent:a", None, "h2", "third").reason == "concurrency"
    client.redis.zrem(f"{client.keys.limit('agent:a', None)}:holders", "h0")  # the first settles
    assert not lim.take("agent:a", None, "h3", "third").admitted  # not before the second
    assert lim.take("agent:a", None, "h4", "second").admitted
    client.redis.zrem(f"{client.keys.limit('agent:a', None)}:holders", "h4")
    assert lim.take("agent:a", None, "h5", "third").admitted


def test_a_429_halves_the_rate_voids_old_permits_and_the_rate_climbs_back(client: MeshClient) -> None:
    lim = limiter(client, dependency__api={"rate": {"requests": "100/s"}})
    for n in range(20):
        lim.take("dependency:api", None, f"h{n}", f"m{n}")
    late = lim.take("dependency:api", None, "late", "late")
    assert late.reason == "rate"
    lim.penalize("api", 1.0)
    state = client.keys.limit("dependency:api", None)
    assert float(client.redis.hget(state, "factor")) == 0.5
    lim.penalize("api", 1.0)  # the same overrun's next 429: counted, not halved again
    assert float(client.redis.hget(state, "factor")) == 0.5
    assert int(client.redis.hget(state, "rejected")) == 2
    again = lim.take("dependency:api", None, "late", "late", [late.gen, 1])
    assert not again.admitted and again.gen == late.gen + 1  # its permit was paced for the old rate
    client.redis.hset(state, "factor_at", int(client.redis.hget(state, "factor_at")) - 10_000)
    lim.take("dependency:api", None, "x", "x")
    assert abs(float(client.redis.hget(state, "factor")) - 0.7) < 0.01  # 2 % of the rate a second


def test_a_limits_keys_share_one_hash_slot_whatever_its_key(client: MeshClient) -> None:
    for flow_key in (None, "acme", "a}b{c", "x" * 200):
        state = client.keys.limit("agent:slow", flow_key)
        slots = {key_slot(k.encode()) for k in (state, f"{state}:holders", f"{state}:waiting", f"{state}:alive")}
        assert len(slots) == 1


def test_a_429s_wait_is_read_from_its_rate_limit_headers() -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s",
               "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "20ms"}
    assert rate_limit_reset(httpx.Headers(headers)) == 90
    assert rate_limit_reset(httpx.Headers({"x-ratelimit-reset-requests": "250ms"})) == 0.25
    assert rate_limit_reset(httpx.Headers({})) is None
    answer = httpx.Response(429, headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"})
    error = error_for_response(answer, dependency="api")
    assert isinstance(error, RateLimited) and error.retry_after_s == 2
