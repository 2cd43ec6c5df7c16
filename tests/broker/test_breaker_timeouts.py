"""A dependency that hangs trips its breaker, and the messages an open breaker defers come back
spread out, not as a herd: a real loopback server that never answers, the real ``http_post`` tool,
breakers over the real Redis, and the due times read back from the delay queue."""

from __future__ import annotations

import math
import random

import httpx
import pytest
from conftest import wait_for

from mesh.agents.tools.base import ToolContext
from mesh.agents.tools.http_post import http_post
from mesh.broker import MeshClient, MeshSettings
from mesh.broker.breaker import Breakers
from mesh.broker.keys import Keys
from mesh.broker.router import Route, route
from mesh.contracts import BreakerOpen, Brownout, DependencyTimeout, FailureClass, loads
from mesh.contracts.tools import HttpPostArgs
from tests.httpserver import RecordingServer

FAILURES = 3


def raising(exc: Exception):
    def call() -> None:
        raise exc
    return call


def tool_context(settings, rclient, http: httpx.Client, n: int) -> ToolContext:
    return ToolContext(key=f"k-{n}", job_id=f"job-{n}", trace_id="0" * 32, fencing_token=1, settings=settings,
                       redis=rclient, keys=Keys(settings.namespace, settings.shard), client=http,
                       breakers=Breakers(settings, rclient))


def test_timeouts_of_a_hanging_dependency_trip_its_breaker_and_then_no_call_reaches_it(make_settings, rclient):
    with RecordingServer(hold=True) as server, httpx.Client() as http:
        settings = make_settings(http_allow=server.host_port, http_timeout_s=0.2, breaker_failures=FAILURES,
                                 breaker_cooldown_s=60)
        args = HttpPostArgs(url=server.url())
        outcomes = []
        for n in range(10):
            ctx = tool_context(settings, rclient, http, n)
            # As ctx.call runs a declared tool: through the breaker of the dependency it names.
            with pytest.raises((DependencyTimeout, BreakerOpen)) as info:
                ctx.guarded(server.host_port, lambda ctx=ctx: http_post(ctx, args))
            outcomes.append(type(info.value).__name__)
        requests = len(server.requests)

    # Each timeout still fails its own message fast (no retry_after: not deferred); the breaker counts it.
    assert outcomes == ["DependencyTimeout"] * FAILURES + ["BreakerOpen"] * (10 - FAILURES)
    assert requests == FAILURES  # counted at the server: once open, nothing reaches it
    [state] = Breakers(settings, rclient).list()
    assert (state.name, state.state, state.trips) == (server.host_port, "open", 1)
    assert "timed out" in (state.last_error or "")


def test_timeouts_and_brownouts_count_together_and_a_timeout_is_not_deferred(make_settings, rclient):
    breakers = Breakers(make_settings(breaker_failures=FAILURES, breaker_cooldown_s=60), rclient)

    with pytest.raises(Brownout):
        breakers.call("dep:1", raising(Brownout("503", dependency="dep:1")))
    with pytest.raises(httpx.ReadTimeout):
        breakers.call("dep:1", raising(httpx.ReadTimeout("read timed out")))  # a raw httpx timeout counts too
    with pytest.raises(DependencyTimeout) as info:
        breakers.call("dep:1", raising(DependencyTimeout("504", dependency="dep:1")))
    assert not hasattr(info.value, "retry_after_s")  # its route stays fail-fast
    [state] = breakers.list()
    assert state.state == "open"


def test_an_open_breaker_defers_in_a_window_that_grows_with_the_wait():
    s = MeshSettings()
    rng = random.Random(7)

    def delays(wait_s: float) -> list[int]:
        out = []
        for _ in range(2000):
            got = route(FailureClass.BROWNOUT, wait_s, attempt=1, defers=0, remaining_s=math.inf,
                        timeout_retries=0, settings=s, rng=rng.random)
            assert got.route is Route.DEFER
            out.append(got.delay_ms)
        return out

    long_wait = delays(20.0)
    assert min(long_wait) >= 20_000  # never before the reopen time
    assert max(long_wait) - min(long_wait) >= 9_000  # spread over half the wait (10 s), not 250 ms
    short_wait = delays(0.1)
    assert min(short_wait) >= 100 and max(short_wait) - min(short_wait) >= 200  # never less than 250 ms
    assert max(delays(3600.0)) - 3_600_000 <= 60_000  # capped
    # The spread never passes a deadline the reopen time itself is within.
    near = route(FailureClass.BROWNOUT, 20.0, attempt=1, defers=0, remaining_s=21.0, timeout_retries=0,
                 settings=s, rng=lambda: 1.0)
    assert near.route is Route.DEFER and 20_000 <= near.delay_ms < 21_000


def test_messages_deferred_on_an_open_breaker_come_back_spread_over_a_window(make_settings, rclient, start_worker):
    n, cooldown_s = 40, 20
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port, breaker_failures=1, breaker_cooldown_s=cooldown_s)
        breakers = Breakers(settings, rclient)
        with pytest.raises(Brownout):
            breakers.call(server.host_port, raising(Brownout("503", dependency=server.host_port)))
        [state] = breakers.list()
        assert state.state == "open" and state.reopen_at is not None
        start_worker(settings, ("executor",))
        client = MeshClient(settings, client=rclient)
        client.send_many("executor", [({"tool": "http_post", "args": {"url": server.url()}}, f"herd-{i}")
                                      for i in range(n)])
        keys = Keys(settings.namespace, settings.shard)
        wait_for(lambda: int(rclient.hget(keys.stats, "deferred") or 0) == n, timeout_s=30)
        etas = sorted(loads(raw)["options"]["eta"] for raw in rclient.hvals(keys.delayed_messages("executor")))
        assert server.requests == []  # the open breaker let nothing through

    assert len(etas) == n
    reopen_ms = state.reopen_at * 1000
    assert etas[0] >= reopen_ms - 50  # none before the reopen time (50 ms: the hosts' clock readings)
    # The window is half the wait (about 10 s): the deferred copies spread over at least half of it,
    # where a 250 ms jitter put them all within a quarter second of each other.
    assert etas[-1] - etas[0] >= 5_000
    busiest = max(sum(1 for e in etas if start <= e < start + 250) for start in etas)
    assert busiest <= n // 4, f"{busiest} of {n} messages due within the same 250 ms"
