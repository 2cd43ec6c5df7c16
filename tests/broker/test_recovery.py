"""A worker killed with SIGKILL loses nothing: what it held goes back within the heartbeat bound."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from contracts import State
from tests.conftest import wait_for

HEARTBEAT_TIMEOUT_S = 3


class SlowHook:
    """Answers every POST after ``delay_s``; records each request's Idempotency-Key."""

    def __init__(self, delay_s: float) -> None:
        self.keys: list[str] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    hook.keys.append(self.headers["Idempotency-Key"])
                time.sleep(delay_s)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the worker that asked was killed meanwhile

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.keys)


def test_killed_workers_in_flight_messages_are_processed_by_the_survivor_within_the_heartbeat_bound(
    make_settings, worker_process, rclient
):
    from broker import MeshClient

    hook = SlowHook(delay_s=1.0)
    settings = make_settings(http_allow=hook.address, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    client = MeshClient(settings, client=rclient)
    env = {"MESH_HTTP_ALLOW": hook.address, "MESH_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    victim = worker_process("--agents", "executor", "--threads", "2", **env)
    refs = client.send_many("executor", [({"tool": "http_post", "args": {"url": f"http://{hook.address}/h"}},
                                          f"rec-{i}") for i in range(6)])
    wait_for(lambda: hook.count() >= 2, timeout_s=20)
    held = client.queues()["executor"]["in_flight"]
    assert held >= 2
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()

    worker_process("--agents", "executor", "--threads", "4", **env)
    records = [client.wait(ref.id, timeout_s=HEARTBEAT_TIMEOUT_S + 20) for ref in refs]
    recovered_in = time.monotonic() - killed_at

    assert all(r.state is State.SUCCEEDED for r in records)
    assert int(rclient.hget(client.keys.stats, "recovered") or 0) >= 1
    repeats = Counter(hook.keys)
    assert set(repeats) == {f"rec-{i}" for i in range(6)}
    # Only messages the killed worker held can have been posted twice, each with its own key.
    assert sum(n - 1 for n in repeats.values()) <= held
    assert client.queues()["executor"] == {"ready": 0, "delayed": 0, "in_flight": 0}
    print(f"recovered and finished {len(refs)} jobs {recovered_in:.1f}s after SIGKILL (held {held})")
