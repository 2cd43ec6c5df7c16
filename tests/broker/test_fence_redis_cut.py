"""Redis unreachable at the moment of the check before an effect: the call is not made, and the
message is not lost: once Redis answers again it runs and its effect is applied once.

Real processes: a ``mesh worker`` reaches Redis through a loopback TCP relay the test can cut; its
handler waits at a gate made of files (tests/apps/filegated.py) right before its effectful call;
the relay is cut (every connection closed, new ones refused), the gate opened, and the handler's
call finds Redis unreachable."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest
from conftest import wait_for

from mesh.broker import MeshClient
from mesh.broker.connection import where
from mesh.contracts import State
from tests.apps.filegated import app
from tests.httpserver import RecordingServer


class Relay:
    """Forwards loopback TCP connections on ``port`` to ``target``; ``cut`` closes every one and
    refuses new ones until ``restore``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self.listener is not None
        # shutdown wakes the accepting thread: a bare close leaves a blocked accept() taking connections
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.slow
@pytest.mark.no_cluster("the worker reaches Redis through a TCP relay in front of one server; a cluster client "
                        "connects to each node at the address CLUSTER SLOTS names, around the relay")
def test_a_call_whose_lease_check_finds_redis_unreachable_is_not_made_and_the_message_runs_later(
        settings, rclient, worker_process, tmp_path: Path):
    host, _, port = where(rclient)["address"].rpartition(":")  # the server, or the master Sentinel names now
    relay = Relay((host, int(port)))
    db = rclient.connection_pool.connection_kwargs.get("db", 0)
    with RecordingServer() as server:
        client = MeshClient(settings, client=rclient, app=app)
        # MESH_REDIS_RETRIES=2: the check gives up on the cut Redis after two re-sends (about 0.15 s),
        # not the default 8 (about 4 s) the test would otherwise wait out.
        worker = worker_process("--app", "tests.apps.filegated:app", "--threads", "1", TEST_GATE_DIR=str(tmp_path),
                                MESH_HTTP_ALLOW=server.host_port, MESH_REDIS_RETRIES="2",
                                MESH_REDIS_URL=f"redis://127.0.0.1:{relay.port}/{db}")
        ref = client.send("filegated_poster", {"url": server.url(), "n": 1}, key="cut-at-check")
        wait_for(lambda: (tmp_path / "arrived-1").exists(), timeout_s=60)

        relay.cut()
        try:
            (tmp_path / "open").touch()
            wait_for(lambda: (tmp_path / "passed-1").exists(), timeout_s=120)
            assert server.requests == []  # not sent unconfirmed
        finally:
            relay.restore()
        record = client.wait(ref.id, timeout_s=120)

    assert record.state is State.SUCCEEDED, record.error
    assert len(server.requests) == 1  # run again once Redis answered: applied once
    log = worker.log_path.read_text()  # type: ignore[attr-defined]
    # It was the check that found Redis away (the lease confirmed in fence.py), routed as a deferral.
    assert 'fence.py\\", line' in log and '"failure_class":"mesh_unavailable","route":"defer"' in log
