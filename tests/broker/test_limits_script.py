"""The flow-limit script over real Redis, one call at a time: GCRA pacing with reserved slots,
concurrency waiters served in arrival order, a 429 halving the rate and voiding the permits paced
for the old one, the rate climbing back, and every key of a limit in one Cluster hash slot."""

from __future__ import annotations

import itertools
import time

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
    started = time.monotonic()
    verdicts = [lim.take("dependency:api", None, f"h{n}", f"m{n}") for n in range(6)]
    assert [v.admitted for v in verdicts] == [True, True, False, False, False, False]
    waits = [v.wait_ms for v in verdicts[2:]]
    assert all(v.reason == "rate" for v in verdicts[2:])
    # Each wait is counted from its own call: the time between the calls comes off the 100 ms.
    took_ms = (time.monotonic() - started) * 1000
    assert waits == sorted(waits) and all(80 - took_ms <= b - a <= 120 for a, b in itertools.pairwise(waits))
    # A reservation its message cannot use (its deadline comes first) goes to the next message.
    lim.give_back("dependency:api", None)
    before = time.monotonic()
    again = lim.take("dependency:api", None, "h6", "m6").wait_ms
    assert -20 <= waits[-1] - again <= 20 + (time.monotonic() - before + took_ms / 1000) * 1000
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


def test_undoing_a_take_its_permit_admitted_gives_back_no_request(client: MeshClient) -> None:
    """A message back with its permit is admitted without a new request; a later limit turning it
    away undoes the take, which must not give back a request it never took (each such round would
    otherwise move the rate's schedule back one slot: the rate unbounded under contention)."""
    lim = limiter(client, dependency__api={"rate": {"requests": "10/s"}})
    for n in range(2):
        assert lim.take("dependency:api", None, f"h{n}", f"m{n}").admitted
    late = lim.take("dependency:api", None, "h2", "m2")
    assert late.reason == "rate"
    state = client.keys.limit("dependency:api", None)
    booked = float(client.redis.hget(state, "tat"))
    for _ in range(3):  # admitted with its permit, turned away by the next limit, back again
        again = lim.take("dependency:api", None, "h2", "m2", [late.gen, 1])
        assert again.admitted
        lim.untake("dependency:api", None, "h2", again.charged_ms)
    assert float(client.redis.hget(state, "tat")) == booked
    # An admission that did take a request gives back exactly that one.
    fresh = lim.take("dependency:api", None, "h3", "m3")
    assert not fresh.admitted  # the bucket is still booked ahead
    lim.give_back("dependency:api", None)
    assert abs(float(client.redis.hget(state, "tat")) - booked) < 1e-6


def test_a_slot_taken_under_an_override_is_renewed_and_released_after_its_reset(client: MeshClient) -> None:
    """``mesh limits set --max`` on a rate-only limit, then ``reset`` while a message holds a slot
    it took: the slot is still renewed while the message runs and released when it settles (not
    left held until its lease runs out, nor let lapse mid-step)."""
    from mesh.broker.limits import Held, reset_override, set_override

    lim = limiter(client, dependency__api={"rate": {"requests": "1000/s"}})
    set_override(client.redis, client.keys, "dependency:api", max=1)
    held = Held("h0")
    verdict = lim.take("dependency:api", None, held.holder, "m0")
    assert verdict.admitted and verdict.slot
    held.limits.append(("dependency:api", None))
    held.slots.add(("dependency:api", None))
    lim.hold(held)
    reset_override(client.redis, client.keys, "dependency:api")
    lim._overrides = (-10.0, {})  # past the process's one-second cache
    holders = f"{client.keys.limit('dependency:api', None)}:holders"
    client.redis.zadd(holders, {"h0": 1})  # about to lapse: renewal must push it on
    lim.renew()
    assert float(client.redis.zscore(holders, "h0")) > 1
    lim.release(held)
    assert client.redis.zcard(holders) == 0


def test_waiters_arriving_within_one_millisecond_keep_their_arrival_order(client: MeshClient) -> None:
    """Fifty messages turned away by ``max: 1`` within a millisecond or two (one pipeline), their keys
    sorting the other way round: the waiting list holds them in arrival order, not their keys'."""
    lim = limiter(client, agent__a={"concurrency": {"max": 1}})
    assert lim.take("agent:a", None, "h", "holder").admitted
    arrivals = [f"k{99 - n:02d}" for n in range(50)]
    pipe = client.redis.pipeline(transaction=False)
    for n, member in enumerate(arrivals):
        lim.script(keys=lim._limit_keys("agent:a", None), client=pipe, args=[
            "take", f"h{n}", member, lim.lease_ms, 1, 0, 0, 0, 0, -1, 0, 30_000, 0.02, 1000])
    assert all(reply[1] == b"concurrency" for reply in pipe.execute())
    waiting = client.redis.zrange(f"{client.keys.limit('agent:a', None)}:waiting", 0, -1)
    assert [m.decode() for m in waiting] == arrivals


def test_a_waiter_next_in_line_looks_again_well_before_a_usual_hold_has_passed(client: MeshClient) -> None:
    """Slots usually held 10 s: the waiter next in line for a slot looks again within a tenth of that
    (a slot may free long before slots usually do); the one behind it after a round of turnovers."""
    lim = limiter(client, agent__a={"concurrency": {"max": 1}})
    assert lim.take("agent:a", None, "h0", "first").admitted
    client.redis.hset(client.keys.limit("agent:a", None), "hold_ms", 10_000)
    head = lim.take("agent:a", None, "h1", "second")
    behind = lim.take("agent:a", None, "h2", "third")
    assert head.reason == behind.reason == "concurrency"
    assert 20 <= head.wait_ms <= 1_000, head.wait_ms
    assert behind.wait_ms == 20_000, behind.wait_ms


def test_a_rate_raised_by_mesh_limits_set_paces_the_booked_backlog_at_the_new_rate(client: MeshClient) -> None:
    """1/s with 20 requests booked ahead, then ``mesh limits set --requests 100/s``: a new message is
    paced behind the backlog as the new rate would have paced it (0.2 s), not 20 s later; lowered
    back to 1/s, the booked requests count at that rate again."""
    from mesh.broker.limits import set_override

    lim = limiter(client, dependency__api={"rate": {"requests": "1/s"}})
    for n in range(20):
        lim.take("dependency:api", None, f"h{n}", f"m{n}")
    set_override(client.redis, client.keys, "dependency:api", requests="100/s")
    fresh = limiter(client, dependency__api={"rate": {"requests": "1/s"}})  # what a worker reads within 1 s
    raised = fresh.take("dependency:api", None, "h20", "m20")
    assert raised.wait_ms <= 1_000, raised
    set_override(client.redis, client.keys, "dependency:api", requests="1/s")
    lowered = limiter(client, dependency__api={"rate": {"requests": "1/s"}}).take("dependency:api", None, "h21", "m21")
    assert lowered.reason == "rate" and 15_000 <= lowered.wait_ms <= 25_000, lowered


def test_a_token_rate_books_each_messages_expected_tokens_when_it_is_admitted_and_in_turn(client: MeshClient) -> None:
    """1,000 tokens a second, a call expected to spend 1,000: of 20 messages arriving at once one is
    admitted (not all 20 before any call reserved its tokens: 20 s of tokens spent in one burst), and
    the others are each told their own turn, a second apart, in arrival order; the first call uses the
    tokens its admission booked and settles what it really spent."""
    from mesh.broker.limits import Held

    lim = limiter(client, agent__m={"rate": {"tokens": "60000/min"}})
    verdicts = [lim.take("agent:m", None, f"h{n}", f"m{n}") for n in range(20)]
    assert sum(v.admitted for v in verdicts) == 1, verdicts[:3]
    waits = [v.wait_ms for v in verdicts[1:]]
    assert waits == sorted(waits) and waits[-1] - waits[0] >= 17_000, waits
    held = Held("h0")
    held.took("agent:m", None, verdicts[0])
    lim.reserve_tokens(held)  # the first call: its tokens were booked on admission
    assert held.reserved == {("agent:m", None): [1_000]}
    lim.settle_tokens(held, 1_000)
    assert held.reserved == {}
    # Back with its permit, a message is admitted on the tokens it booked.
    back = lim.take("agent:m", None, "h1", "m1", [verdicts[1].gen, 1, verdicts[1].tokens])
    assert back.admitted and back.tokens == 1_000
    # One that cannot wait that long gives its request and tokens back: the next message takes its turn.
    lim.give_back("agent:m", None, verdicts[-1].tokens)
    again = lim.take("agent:m", None, "h20", "m20")
    assert again.reason == "rate" and again.wait_ms <= verdicts[-1].wait_ms + 100, (again, verdicts[-1])


def test_a_step_let_go_before_its_write_is_not_released_again_when_its_message_settles(client: MeshClient) -> None:
    """A step's success gives back what its message took before its write sends the next step
    (``let_go``): its slot freed, its model calls' unsettled tokens given back, its lease no longer
    renewed; the message's settling (FlowControl's after_process_message) releases nothing twice."""
    from mesh.broker.limits import Held, current_held, let_go, set_current

    lim = limiter(client, agent__m={"rate": {"tokens": "60000/min"}, "concurrency": {"max": 1}})
    held = Held("h0")
    verdict = lim.take("agent:m", None, held.holder, "m0")
    assert verdict.admitted and verdict.slot
    held.took("agent:m", None, verdict)
    lim.hold(held)
    lim.reserve_tokens(held)  # the first call: booked on admission
    lim.reserve_tokens(held)  # a second call, never settled: 1,000 tokens more reserved
    state = client.keys.limit("agent:m", None)
    booked = float(client.redis.hget(state, "ttat"))
    set_current((lim, held))
    let_go()
    assert current_held() is None
    assert client.redis.zcard(f"{state}:holders") == 0
    # What both calls reserved and never settled went back (1 ms a token).
    assert abs(booked - float(client.redis.hget(state, "ttat")) - 2_000) < 1
    nxt = lim.take("agent:m", None, "h1", "m1")
    assert nxt.admitted  # the slot is free for the next step
    lim.untake("agent:m", None, "h1", nxt.charged_ms, nxt.tokens_charged_ms)
    before = float(client.redis.hget(state, "ttat"))
    lim.release(held)  # the message settles: nothing given back twice
    assert float(client.redis.hget(state, "ttat")) == before
    lim.renew()  # no longer held by this process: nothing renewed, nothing held again
    assert client.redis.zcard(f"{state}:holders") == 0
