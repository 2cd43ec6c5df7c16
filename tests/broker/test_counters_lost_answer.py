"""The step counters' batch whose answer is lost with its connection (a relay in front of the real Redis
lets Redis run the call, then drops the answer and the connection), or whose writes fail over and over:
each count lands once, none lost."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import redis

from mesh.broker import MeshClient
from mesh.broker.keys import Keys
from mesh.broker.observe import Counters
from tests.broker.test_send_retry import Relay, relay  # noqa: F401  (the fixture)


def _succeeded(r: redis.Redis, keys: Keys) -> int:
    return int(r.hget(keys.outcomes, "relayed:succeeded") or 0)


@pytest.mark.no_cluster("the client reaches Redis through a TCP relay in front of one server (test_send_retry.py)")
@pytest.mark.parametrize("cuts", [1, 5])
def test_a_batch_whose_answer_was_lost_lands_once(relay: Relay, make_settings: Any, rclient: redis.Redis,  # noqa: F811
                                                  cuts: int):
    settings = make_settings(redis_url=f"redis://127.0.0.1:{relay.port}/0")
    keys = Keys(settings.namespace, settings.shard)
    counters = Counters(MeshClient(settings).redis, keys, 60)
    counters.hincrby(keys.outcomes, "relayed:succeeded", 1)
    counters.flush()  # the script loaded, the connection made
    relay.cuts = cuts
    for _ in range(cuts):  # each try's answer lost; counts added meanwhile
        counters.hincrby(keys.outcomes, "relayed:succeeded", 10)
        with contextlib.suppress(redis.RedisError):
            counters.flush()
    while relay.cuts:
        with contextlib.suppress(redis.RedisError):
            counters.flush()
    counters.flush()
    assert relay.cut_done == cuts
    assert _succeeded(rclient, keys) == 1 + 10 * cuts
    counters.close()
