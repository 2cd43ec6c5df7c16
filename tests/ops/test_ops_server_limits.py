"""The ops server against clients that hold connections: half-sent requests, a client dripping its
request head a byte at a time, and idle connections up to the process's descriptor limit. Real
sockets on loopback; the server in a thread (as the other ops tests run it) or as `mesh ops serve`
in a process with a 100-descriptor limit."""

from __future__ import annotations

import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from conftest import ROOT, mesh_env, ops_server, wait_for

from mesh.broker import MeshClient, MeshSettings

#: MESH_OPS_REQUEST_TIMEOUT_S for the servers these tests start in a thread (its default is 10 s): short,
#: so a test waits seconds for the cut it proves, not the default.
REQUEST_TIMEOUT_S = 2.0

#: How long past the timeout a closed connection may take to be seen (the loop's and the test's polling).
SLACK_S = 10.0


@pytest.fixture
def client(make_settings: Callable[..., MeshSettings], rclient: redis.Redis) -> MeshClient:
    """The test's client, whose settings give the threaded server its request timeout."""
    return MeshClient(make_settings(ops_request_timeout_s=REQUEST_TIMEOUT_S), client=rclient)


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


#: How long a connect waits for its handshake before it is tried again with a new socket.
CONNECT_RETRY_S = 0.1


def connect(port: int, stack: ExitStack) -> socket.socket:
    """A connection to the server, closed with ``stack``. Opened in a tight loop, connections fill the
    listen backlog (8) before the server accepts them; the kernel then drops the next SYN and resends
    it only a second later, which made opening 400 connections take 40 s. A connect that has not
    completed within CONNECT_RETRY_S is given up and tried again at once instead (a retry loop a real
    client could run too), so the test spends its time on the cut it proves."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_RETRY_S)
        try:
            sock.connect(("127.0.0.1", port))
        except TimeoutError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            continue
        sock.settimeout(10)
        return stack.enter_context(sock)


def half_sent(port: int, n: int, stack: ExitStack) -> list[socket.socket]:
    """``n`` connections, each with the first half of a request head and never the rest."""
    socks = []
    for _ in range(n):
        sock = connect(port, stack)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (end of file or reset), without blocking."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, TimeoutError):
        return True


def still_open(socks: list[socket.socket]) -> list[socket.socket]:
    return [s for s in socks if not closed_by_server(s)]


def healthz(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code


def test_400_half_sent_requests_are_closed_within_the_request_timeout_and_healthz_answers_meanwhile(client):
    with ops_server(client) as base, ExitStack() as stack:
        port = port_of(base)
        socks = half_sent(port, 400, stack)
        assert healthz(port) == 200
        left = list(socks)

        def all_closed() -> bool:
            left[:] = still_open(left)
            return not left

        # Every one is closed by the server: those past the connection cap at once, the rest at the timeout.
        wait_for(all_closed, timeout_s=REQUEST_TIMEOUT_S + SLACK_S, interval_s=0.2)
        assert healthz(port) == 200


def test_a_request_head_dripped_a_byte_at_a_time_is_cut_off_at_the_request_timeout(client):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
    stop = threading.Event()
    with ops_server(client) as base, socket.create_connection(("127.0.0.1", port_of(base)), timeout=10) as sock:

        def drip() -> None:
            for byte in head:  # a byte every 100 ms: about 17 minutes for the whole head
                if stop.wait(0.1):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            wait_for(lambda: closed_by_server(sock), timeout_s=REQUEST_TIMEOUT_S + SLACK_S, interval_s=0.2)
        finally:
            stop.set()
            dripper.join(5)
        assert healthz(port_of(base)) == 200


@contextmanager
def serve_with_descriptor_limit(settings: MeshSettings, tmp_path: Path, limit: int) -> Iterator[int]:
    """`mesh ops serve` in a process whose RLIMIT_NOFILE is ``limit``; yields its port (its log is
    ``tmp_path / "ops.log"``)."""
    log = tmp_path / "ops.log"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mesh.ops.cli", "ops", "serve", "--port", "0"],
                                env=mesh_env(settings), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out,
                                preexec_fn=limited)
    try:
        found = wait_for(lambda: re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text()) or proc.poll(),
                         timeout_s=30)
        assert proc.poll() is None, log.read_text()
        yield int(found.group(1))
        proc.terminate()
        assert proc.wait(15) == 0, "SIGTERM is a clean stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_healthz_answers_with_95_idle_connections_under_a_100_descriptor_limit(client: MeshClient, settings,
                                                                               tmp_path):
    with serve_with_descriptor_limit(settings, tmp_path, 100) as port, ExitStack() as stack:
        # As deployed: a probe and a scrape have run, so the server holds its Redis connection too.
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 503  # no worker
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
        for _ in range(95):
            connect(port, stack)
        assert healthz(port) == 200
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
    assert "Too many open files" not in (tmp_path / "ops.log").read_text(), "it never ran out of descriptors"


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="this system has no dual-stack IPv6 sockets")
def test_listening_on_every_ipv6_interface_answers_ipv4_probes_too(client):
    """``mesh ops serve --host ::`` is every interface, as ``0.0.0.0`` is for IPv4: a probe to
    127.0.0.1 is answered (before: the socket was IPv6-only, and the probe's connection refused)."""
    from mesh.ops.server import OpsServer

    server = OpsServer(client, "::", 0)
    thread = server.start()
    try:
        for base in (f"http://127.0.0.1:{server.port}", f"http://[::1]:{server.port}"):
            assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}, base
    finally:
        server.stop()
        thread.join(10)


def test_a_request_head_growing_past_16_kib_is_refused_with_400_before_it_ends(client):
    with ops_server(client) as base, socket.create_connection(("127.0.0.1", port_of(base)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000)  # and more to come
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]


def test_400_connections_dripping_request_heads_leave_healthz_and_the_console_answering_within_a_second(
        client: MeshClient, settings: MeshSettings, tmp_path: Path) -> None:
    """`mesh ops serve` with 256 descriptors, as a small container gives it, and 400 clients each
    sending a request head a byte at a time (which resets a plain uvicorn's timer on every byte, and
    would hold a descriptor each): /healthz and the console's overview still answer within a second."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
    stop = threading.Event()
    with serve_with_descriptor_limit(settings, tmp_path, 256) as port, ExitStack() as stack:
        socks = [connect(port, stack) for _ in range(400)]

        def drip() -> None:
            for byte in head:  # each connection gets the next byte, every 200 ms
                for sock in socks:
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        continue
                if stop.wait(0.2):
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            for _ in range(5):
                for path in ("/healthz", "/"):
                    started = time.monotonic()
                    answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1.0)  # raises past a second
                    assert answer.status_code == 200, path
                    assert time.monotonic() - started < 1.0, path
        finally:
            stop.set()
            dripper.join(5)
    assert "Too many open files" not in (tmp_path / "ops.log").read_text()


def test_responses_are_sent_without_waiting_for_the_clients_delayed_ack(client):
    """Accepted sockets get TCP_NODELAY (asyncio sets it only on sockets made with IPPROTO_TCP): else
    every response's body waits about 40 ms for the client's ACK of its head."""
    from mesh.ops.server import OpsServer

    server = OpsServer(client, "127.0.0.1", 0)
    thread = server.start()
    try:
        with httpx.Client() as http:
            assert http.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200  # kept alive
            # the server's own connections (uvicorn's server state), while the client holds one open
            found = [conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                     for conn in list(server.server.server_state.connections) if not conn.transport.is_closing()]
            assert found and all(found), found
    finally:
        server.stop()
        thread.join(10)


def test_requests_whose_body_never_comes_are_closed_at_the_request_timeout_and_healthz_answers(
        make_settings: Callable[..., MeshSettings], rclient: redis.Redis, tmp_path) -> None:
    """A login form announced and never sent: its head arrived, so only a deadline on the body frees
    the connection (no login is needed to send one)."""
    from mesh.ops.web.auth import write_user

    write_user(tmp_path / "users", "ana", "ana-password-1")
    client = MeshClient(make_settings(ops_request_timeout_s=REQUEST_TIMEOUT_S, ops_max_connections=8,
                                      console_users_file=str(tmp_path / "users")), client=rclient)
    with ops_server(client) as base, ExitStack() as stack:
        port = port_of(base)
        socks = [connect(port, stack) for _ in range(8)]
        for sock in socks:
            sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
                         b"\r\nContent-Length: 1000\r\n\r\ncsrf=")
        left = list(socks)

        def all_closed() -> bool:
            left[:] = still_open(left)
            return not left

        wait_for(all_closed, timeout_s=REQUEST_TIMEOUT_S + SLACK_S, interval_s=0.2)
        assert healthz(port) == 200
