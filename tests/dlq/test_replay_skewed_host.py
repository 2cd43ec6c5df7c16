"""``mesh dlq`` run on a host whose wall clock is off: the replayed message's fresh deadline
is set on the Redis server's clock, where workers check it, as a new job's is. A replay host an
hour behind must not send a message whose deadline passed before it was sent (dead-lettered again
at once as ``deadline``), nor one an hour ahead a budget an hour too long. And ``--since 15m`` means the last 15
minutes of the dead letters' own clock (the server's), not 15 minutes before this host's time."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ROOT

from mesh.broker import MeshClient
from mesh.broker.clock import server_ms
from mesh.contracts import loads
from tests.dlq.bulk import agent_of, class_of, generate, nth_id

SKEW_S = 3600


@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S], ids=["replay-host-behind", "replay-host-ahead"])
def test_a_replay_from_a_skewed_host_sets_the_deadline_on_the_redis_clock(cli, client: MeshClient, settings,
                                                                          skew_s):
    generate(client.redis, client.keys, 1, time.time() - 60)
    skewed = {"PYTHONPATH": f"{ROOT / 'tests' / 'skewed'}:{ROOT}", "SKEWED_CLOCK_S": str(skew_s)}
    before_s = server_ms(client.redis) / 1000
    done = cli("dlq", "replay", nth_id(0), "--yes", **skewed)
    after_s = server_ms(client.redis) / 1000
    assert done.returncode == 0, done.stderr
    bodies = client.redis.hvals(client.keys.messages(agent_of(0)))
    assert len(bodies) == 1
    deadline = loads(bodies[0])["args"][0]["deadline"]
    # a fresh budget, counted from the server's now (a second's slack for the round trips)
    assert before_s + settings.job_deadline_s - 1 <= deadline <= after_s + settings.job_deadline_s + 1


@pytest.mark.parametrize("skew_s", [-SKEW_S, SKEW_S], ids=["host-behind", "host-ahead"])
def test_dlq_since_15m_on_a_skewed_host_selects_by_the_redis_clock_the_dead_letters_are_timed_on(
        cli, client: MeshClient, skew_s):
    # Dead letters are timed by the settle script (TIME): one a minute ago, one half an hour ago.
    now_s = server_ms(client.redis) / 1000
    generate(client.redis, client.keys, 2, now_s - 60)
    old, old_ms = nth_id(1), int((now_s - 1800) * 1000)
    for index in (client.keys.dlq, client.keys.dlq_by_agent(agent_of(1)), client.keys.dlq_by_class(class_of(1))):
        client.redis.zadd(index, {old: old_ms}, xx=True)
    skewed = {"PYTHONPATH": f"{ROOT / 'tests' / 'skewed'}:{ROOT}", "SKEWED_CLOCK_S": str(skew_s)}
    listed = cli("dlq", "list", "--since", "15m", "--json", **skewed)
    assert listed.returncode == 0, listed.stderr
    assert [e["entry_id"] for e in json.loads(listed.stdout)] == [nth_id(0)]
