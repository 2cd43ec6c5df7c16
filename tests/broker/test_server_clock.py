"""ServerClock reads the Redis server's time through a skewed local clock, and DelayClock turns a
delayed message's eta (server time) into the consuming host's clock. The skewed host is injected
(``local=``, ``MeshBroker(clock=...)``), over the real Redis."""

from __future__ import annotations

import socket

import redis
from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis
from dramatiq.message import Message
from redis.backoff import NoBackoff
from redis.retry import Retry

from mesh.broker.clock import DelayClock, ServerClock, server_ms, server_now_ms
from mesh.broker.mesh_broker import MeshBroker

SKEW_MS = 30_000
#: Room for the round trips between the readings compared (ms).
SLACK_MS = 500


def test_a_host_30s_ahead_reads_the_servers_time(rclient):
    clock = ServerClock(rclient, local=lambda: current_millis() + SKEW_MS)
    assert abs(clock.now_ms() - server_ms(rclient)) < SLACK_MS
    assert abs(clock.offset_ms() + SKEW_MS) < SLACK_MS


def test_without_redis_the_clock_falls_back_to_the_local_one_instead_of_failing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    # No retries: redis-py's default three, with backoff, only made the test wait 4 s for the same error.
    dead = redis.Redis(port=port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    clock = ServerClock(dead, local=lambda: 1_000)
    assert clock.now_ms() == 1_000


def test_a_delayed_message_due_on_the_servers_clock_waits_as_long_on_a_host_30s_behind(settings):
    behind = MeshBroker(settings, clock=lambda: current_millis() - SKEW_MS, middleware=[])
    try:
        due = server_now_ms(behind) + 100
        message = MessageProxy(Message(queue_name="q.DQ", actor_name="a", args=(), kwargs={},
                                       options={"eta": due}))
        DelayClock().before_delay_message(behind, message)
        waits_ms = message.options["eta"] - behind.clock()
    finally:
        behind.close()
    assert 100 - SLACK_MS < waits_ms <= 100 + SLACK_MS  # not 30 s more
