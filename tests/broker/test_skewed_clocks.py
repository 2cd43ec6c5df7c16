"""Due times and deadlines are on the Redis server's clock: a failing host whose clock runs ahead
does not make a short retry wait as long as its skew, nor does a delay-queue consumer whose clock
runs behind; a worker ahead or a sender behind does not find a live deadline passed. Real
``mesh worker`` and ``mesh send`` processes, one with a skewed wall clock
(tests/skewed/sitecustomize.py: the process's ``time.time`` runs off, as on a host whose clock is
off), over the real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from email.utils import formatdate
from typing import Any

import pytest
from conftest import ROOT, mesh_env, wait_for, wait_started

from mesh.broker import MeshClient
from mesh.broker.clock import server_ms
from mesh.contracts import State, loads
from tests.apps import gated
from tests.httpserver import RecordingServer

#: Far more than the retry's wait, and than the time a takeover needs.
SKEW_S = 60
#: The retry's wait (MESH_RETRY_MIN/MAX_BACKOFF_MS): long enough to stop the failing host before it
#: moves the copy on itself.
DELAY_MS = 2_000
HEARTBEAT_TIMEOUT_S = 3
#: How far off the Redis clock as a worker reads it may be: its offset is measured with one TIME round
#: trip, off by up to half of it (91 ms seen at a load average of 7); far under the skews.
CLOCK_SLACK_MS = 1_000


def skewed(skew_s: int) -> dict[str, str]:
    """The environment of a worker whose wall clock runs ``skew_s`` seconds off."""
    if not skew_s:
        return {}
    return {"PYTHONPATH": f"{ROOT / 'tests' / 'skewed'}{os.pathsep}{ROOT}", "SKEWED_CLOCK_S": str(skew_s)}


def fails_once(n: int, _request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return (503, {"error": "busy"}) if n == 1 else (200, {"ok": True})


def delayed_eta(client: MeshClient, queue: str) -> int | None:
    """The due time (ms) of the one message waiting on ``queue``'s delay queue, or None."""
    bodies = client.redis.hvals(client.keys.messages(f"{queue}.DQ"))
    return int(loads(bodies[0])["options"]["eta"]) if bodies else None


@pytest.mark.slow
@pytest.mark.parametrize(("failing_skew_s", "consumer_skew_s"), [(SKEW_S, 0), (0, -SKEW_S)],
                         ids=["failing-host-ahead", "delay-consumer-behind"])
def test_a_retry_comes_due_after_its_wait_on_the_redis_clock_whatever_each_hosts_clock_says(
        make_settings, rclient, worker_process, failing_skew_s, consumer_skew_s):
    with RecordingServer(fails_once) as server:
        settings = make_settings(http_allow=server.host_port, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
        client = MeshClient(settings, client=rclient)
        env = {"MESH_HTTP_ALLOW": server.host_port, "MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
               "MESH_RETRY_MIN_BACKOFF_MS": str(DELAY_MS), "MESH_RETRY_MAX_BACKOFF_MS": str(DELAY_MS)}
        failing = worker_process("--agents", "executor", "--threads", "1", **env, **skewed(failing_skew_s))
        wait_started(failing)
        sent_ms = server_ms(rclient)
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}}, key="skewed-retry")

        eta = wait_for(lambda: delayed_eta(client, "executor"), timeout_s=60)  # the 503 was routed: retry
        now = server_ms(rclient)
        # Gone before the copy is due: the waiting is left to another host (with its own clock).
        os.kill(failing.pid, signal.SIGKILL)
        failing.wait()
        # Routed between the send and now, its wait counted on the Redis clock (as the worker reads it).
        assert sent_ms + DELAY_MS - CLOCK_SLACK_MS <= eta <= now + DELAY_MS + CLOCK_SLACK_MS, (
            f"due {(eta - now) / 1000:.3f}s from now, {(eta - sent_ms) / 1000:.3f}s after the send")

        consumer = worker_process("--agents", "executor", **env, **skewed(consumer_skew_s))
        wait_started(consumer)  # its start (seconds on a loaded machine) is not the retry's wait
        # Well inside the skew: the retry waits its 2 s (plus the takeover), not a minute.
        record = client.wait(ref.id, timeout_s=SKEW_S / 2)

    assert record.state is State.SUCCEEDED
    assert len(server.requests) == 2


@pytest.mark.slow
@pytest.mark.parametrize(("sender_skew_s", "worker_skew_s"), [(0, SKEW_S), (-SKEW_S, 0)],
                         ids=["worker-ahead", "sender-behind"])
def test_a_message_runs_while_its_deadline_is_ahead_on_the_redis_clock_whatever_each_hosts_clock_says(
        make_settings, rclient, worker_process, cli, sender_skew_s, worker_skew_s):
    deadline_s = SKEW_S // 2  # passed already on the skewed host's clock, if it were trusted
    client = MeshClient(make_settings(), client=rclient)
    worker_process("--agents", "researcher", **skewed(worker_skew_s))
    sent = cli("send", "researcher", "--payload", '{"question": "what is a DLQ?"}', "--json",
               MESH_JOB_DEADLINE_S=str(deadline_s), **skewed(sender_skew_s))
    assert sent.returncode == 0, sent.stderr
    record = client.wait(loads(sent.stdout)[0]["job_id"], timeout_s=60)
    assert record.state is State.SUCCEEDED, record.error


@pytest.mark.slow
def test_a_step_just_picked_up_by_a_worker_whose_clock_runs_behind_is_not_reported_stuck(
        make_settings, rclient, worker_process):
    settings = make_settings(stuck_after_s=SKEW_S / 2)
    client = MeshClient(settings, client=rclient, app=gated.app)
    with RecordingServer() as server:
        worker_process("--app", "tests.apps.gated:app", MESH_HTTP_ALLOW=server.host_port, **skewed(-SKEW_S))
        ref = client.send("poster", {"url": server.url(), "n": 1}, key="behind-progress")
        wait_for(lambda: rclient.get(gated.arrived_key(settings.namespace)), timeout_s=60)  # it runs
        # the record says running within the pick-up's write bound (agents/pickup.py: 30 ms)
        record = wait_for(lambda: (r := client.status(ref.id)).state is State.RUNNING and r, timeout_s=10)
        assert client.stuck(record) == {}  # its progress is seconds old, not a minute

        rclient.set(gated.gate_key(settings.namespace), 1)
        assert client.wait(ref.id, timeout_s=60).state is State.SUCCEEDED


#: A producer that sends one message with dramatiq's ``delay`` through the mesh's broker.
DELAYED_SEND = """
from dramatiq.message import Message
from mesh.broker.mesh_broker import MeshBroker
from mesh.broker.settings import MeshSettings

broker = MeshBroker(MeshSettings.from_env())
broker.enqueue(Message(queue_name="later", actor_name="later", args=(), kwargs={}, options={}), delay=%d)
broker.close()
"""


@pytest.mark.slow
def test_a_message_sent_with_dramatiqs_delay_from_a_host_ahead_is_due_after_its_delay_on_the_redis_clock(
        make_settings, rclient):
    settings = make_settings()
    client = MeshClient(settings, client=rclient)
    before = server_ms(rclient)
    subprocess.run([sys.executable, "-c", DELAYED_SEND % DELAY_MS], env=mesh_env(settings, **skewed(SKEW_S)),
                   cwd=ROOT, check=True, timeout=60)
    eta, after = delayed_eta(client, "later"), server_ms(rclient)
    assert eta is not None
    # Sent between the two readings of the server's clock, due DELAY_MS after that.
    assert before + DELAY_MS <= eta <= after + DELAY_MS, f"due {(eta - after) / 1000:.1f}s from now"


#: The endpoint's Retry-After (s), as an HTTP-date: far more than a deferral's jitter, far less than the skew.
RETRY_AFTER_S = 30


def rate_limited_until_a_date(_n: int, _request: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """429 with ``Retry-After`` an HTTP-date on the endpoint's clock (its ``Date`` header is on it too)."""
    return 429, {"error": "slow down"}, {"Retry-After": formatdate(time.time() + RETRY_AFTER_S, usegmt=True)}


@pytest.mark.slow
@pytest.mark.parametrize("worker_skew_s", [SKEW_S, -SKEW_S], ids=["worker-ahead", "worker-behind"])
def test_a_retry_after_http_date_waits_what_the_endpoint_asked_whatever_the_workers_clock_says(
        make_settings, rclient, worker_process, worker_skew_s):
    """The date is on the endpoint's clock, as its ``Date`` header is: their difference is the wait.
    Read against a worker's clock a minute ahead, it would be no wait (a retry storm against a rate
    limit); a minute behind, a wait of a minute and a half."""
    with RecordingServer(rate_limited_until_a_date) as server:
        settings = make_settings(http_allow=server.host_port)
        client = MeshClient(settings, client=rclient)
        worker_process("--agents", "executor", "--threads", "1", MESH_HTTP_ALLOW=server.host_port,
                       **skewed(worker_skew_s))
        client.send("executor", {"tool": "http_post", "args": {"url": server.url()}}, key="retry-after-date")
        eta = wait_for(lambda: delayed_eta(client, "executor"), timeout_s=60)  # the 429 was deferred
        left_s = (eta - server_ms(rclient)) / 1000
    assert RETRY_AFTER_S - 5 < left_s <= RETRY_AFTER_S + 1, f"due {left_s:.1f}s from now"
