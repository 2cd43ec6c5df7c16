"""``mesh ops console-bench``: how long each console page takes and how many Redis commands it sends,
with many jobs and dead letters (10,000 of each by default), in a throw-away namespace.

Each page is served by a real server on loopback and fetched a few times; the time is the median
of the server's answers as the client sees them (loopback: the server's own time and a fraction of
a millisecond). Commands are counted on the server's own Redis connections (every command of a
pipeline or transaction counted), so other clients of the same Redis do not blur them. Run at two
sizes, the counts show whether a page's work grows with the data: it must not.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis

from mesh.broker import MeshClient, MeshSettings
from mesh.broker.client import trace_id_of
from mesh.broker.connection import connect, parse_url
from mesh.broker.trace import operator
from mesh.ops.namespaces import delete_namespace

#: Fetches per page (the median is reported).
REPEATS = 5

#: Jobs sent per send_many call while filling.
CHUNK = 1_000


class Counting(redis.Connection):
    """A Redis connection that counts the commands it sends (all of its kind together)."""

    lock = threading.Lock()
    commands = 0

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        with Counting.lock:
            Counting.commands += 1
        super().send_command(*args, **kwargs)

    def pack_commands(self, commands: Any) -> Any:
        commands = list(commands)
        with Counting.lock:
            Counting.commands += len(commands)
        return super().pack_commands(commands)


#: A trace id no job has.
NO_TRACE = "f" * 32


def pages(job_id: str, key: str, entry_id: str) -> list[str]:
    """The pages measured: every list page, a job, a search by key, by the job's trace id and by a
    trace id no job has, filtered DLQ walks and an entry. (Not ``/login``, which reads nothing and,
    served without users as here, only redirects; nor a job's event stream, whose reads are the
    server's one shared trace reader's, not the request's.)"""
    return ["/", "/jobs", "/jobs?state=succeeded", f"/jobs/{job_id}", f"/jobs?q={key}",
            f"/jobs?q={trace_id_of(job_id)}", f"/jobs?q={NO_TRACE}", "/dlq", "/dlq?grep=no-such-error",
            "/dlq?key=no-such-key*", f"/dlq/{entry_id}", f"/dlq/{entry_id}/replay", "/approvals", "/breakers",
            "/limits"]


def fill(client: MeshClient, jobs: int, dead_letters: int) -> tuple[str, str, str]:
    """``jobs`` one-step jobs (sent, not run) and ``dead_letters`` entries; (a job id, its key, an entry id)."""
    from mesh.dlq import DeadLetterStore
    from mesh.ops.bench import _fill_dlq

    run = uuid.uuid4().hex[:6]
    last = None
    for start in range(0, jobs, CHUNK):
        items = [({"tool": "note", "args": {"title": f"t{i}"}}, f"cb-{run}-{i}")
                 for i in range(start, min(jobs, start + CHUNK))]
        last = client.send_many("executor", items)[-1]
    # the first shard's DLQ: with several (MESH_SHARDS), client.keys are shard 0's, which the console never reads
    store = DeadLetterStore(client.redis, client.shards.home)
    _fill_dlq(store, dead_letters)
    [entry] = store.newest(1)
    assert last is not None
    return last.id, last.key, entry.entry_id


@contextmanager
def _served(settings: MeshSettings) -> Iterator[str]:
    from mesh.ops.server import OpsServer
    from mesh.ops.web.auth import Access

    # a cluster's client counts on every node's connections (redis-py's URLs take no cluster's)
    counted = connect(settings, connection_class=Counting) if parse_url(settings.redis_url).cluster else \
        redis.Redis.from_url(settings.redis_url, connection_class=Counting)
    server = OpsServer(MeshClient(settings, client=counted), "127.0.0.1", 0,
                       access=Access(users={}, host="127.0.0.1", local=operator()))
    thread = server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(10)
        counted.close()


def measure(settings: MeshSettings, paths: list[str], repeats: int = REPEATS) -> dict[str, dict[str, float]]:
    """Per page: the median time (ms) and the Redis commands of one fetch."""
    out: dict[str, dict[str, float]] = {}
    with _served(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
        http.get("/")  # the session cookie, the templates compiled, the connections made
        for path in paths:
            times, commands = [], []
            for _ in range(repeats):
                before = Counting.commands
                started = time.perf_counter()
                answer = http.get(path)
                times.append((time.perf_counter() - started) * 1000)
                commands.append(Counting.commands - before)
                if answer.status_code not in (200, 303, 404):  # a search redirects to its job, or finds none
                    raise RuntimeError(f"{path} answered {answer.status_code}")
            out[path] = {"ms": round(statistics.median(times), 1), "commands": max(commands)}
    return out


def run(settings: MeshSettings, sizes: list[tuple[int, int]],
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Each size (jobs, dead letters) in a namespace of its own, removed afterwards."""
    results = []
    for jobs, dead in sizes:
        ns = f"console-bench-{uuid.uuid4().hex[:8]}"
        s = settings.model_copy(update={"namespace": ns})
        client = MeshClient(s)
        try:
            progress(f"{ns}: {jobs:,} jobs, {dead:,} dead letters")
            job_id, key, entry_id = fill(client, jobs, dead)
            paths = pages(job_id, key, entry_id)
            measured = measure(s, paths)
            results.append({"jobs": jobs, "dead_letters": dead,
                            "pages": {_label(p, job_id, key, entry_id): v for p, v in measured.items()}})
        finally:
            delete_namespace(client.redis, ns)
            client.close()
    return {"sizes": results, "repeats": REPEATS}


def _label(path: str, job_id: str, key: str, entry_id: str) -> str:
    return (path.replace(job_id, "JOB").replace(key, "KEY").replace(entry_id, "ENTRY")
            .replace(trace_id_of(job_id), "TRACE").replace(NO_TRACE, "NO-TRACE"))


