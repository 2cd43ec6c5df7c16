"""http_post cannot walk around MESH_HTTP_ALLOW: redirects, DNS rebinding, numeric and IPv6 spellings,
and a response body larger than MESH_MAX_RESPONSE_BYTES, against real loopback servers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from mesh.agents.tools import http_post
from mesh.agents.tools.allow import normal_host, parse_allowlist
from mesh.agents.tools.base import ToolContext
from mesh.broker.keys import Keys
from mesh.contracts import Brownout, ConfigError, PermanentFailure, State, ToolRefused
from mesh.contracts.tools import HttpPostArgs
from mesh.dlq import DeadLetterStore
from tests.httpserver import RecordingServer


def call(settings, url: str, resolve: Any = None, http: httpx.Client | None = None) -> Any:
    """Run the http_post tool once, as the executor would, with ``resolve`` as the resolver."""
    extra = {"resolve": resolve} if resolve is not None else {}
    with http or httpx.Client() as client:
        ctx = ToolContext(key="k-1", job_id="job-1", trace_id="1" * 32, fencing_token=1, settings=settings,
                          redis=None, keys=Keys(settings.namespace, settings.shard), client=client, **extra)  # type: ignore[arg-type]
        return http_post(ctx, HttpPostArgs.model_validate({"url": url, "json": {"n": 1}}))


def port_of(server: RecordingServer) -> int:
    return int(server.host_port.rsplit(":", 1)[1])


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f.1", "127.1", "127.000.000.001", "0177.0.0.1",
                                      "0x7f000001", "127.0.0.01", "127.0.0.256"])
def test_numeric_spellings_of_an_allowed_address_are_refused_and_nothing_is_sent(make_settings, spelling):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        with pytest.raises(ToolRefused, match="dotted-quad"):
            call(settings, f"http://{spelling}:{port_of(server)}/x")
    assert server.requests == []


def test_hosts_are_compared_in_one_normal_form():
    assert normal_host("[0:0:0:0:0:0:0:1]") == "::1"
    assert normal_host("[::ffff:127.0.0.1]") == "127.0.0.1"
    assert normal_host("Example.COM.") == "example.com"
    assert parse_allowlist(["[0::1]:80", "LOCALHOST:8080", "127.0.0.1:1"]) == {"[::1]:80", "localhost:8080",
                                                                              "127.0.0.1:1"}
    with pytest.raises(ConfigError, match=r"127\.1"):
        parse_allowlist(["127.1:80"])
    with pytest.raises(ValueError, match="zone"):
        normal_host("[fe80::1%eth0]")


def test_ipv4_mapped_ipv6_spelling_reaches_the_allowed_ipv4_address(make_settings):
    with RecordingServer() as server:
        settings = make_settings(http_allow=server.host_port)
        receipt = call(settings, f"http://[::ffff:127.0.0.1]:{port_of(server)}/mapped")
    assert receipt.detail["status"] == 200 and [r["path"] for r in server.requests] == ["/mapped"]


@contextmanager
def ipv6_server() -> Iterator[tuple[int, list[str]]]:
    """A loopback IPv6 server answering every POST 200; yields its port and the paths it saw."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    class Server6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server = Server6(("::1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_ipv6_literal_is_matched_in_compressed_form_and_reached(make_settings):
    with ipv6_server() as (port, seen):
        settings = make_settings(http_allow=f"[::1]:{port}")
        receipt = call(settings, f"http://[0:0:0:0:0:0:0:1]:{port}/six")
        assert receipt.detail["status"] == 200 and seen == ["/six"]
        with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
            call(make_settings(http_allow=f"127.0.0.1:{port}"), f"http://[::1]:{port}/six")
    assert seen == ["/six"]


def test_a_name_is_not_its_address_localhost_is_refused_when_only_127_0_0_1_is_allowed(make_settings):
    with RecordingServer() as server:
        port = port_of(server)
        with pytest.raises(ToolRefused, match="not in MESH_HTTP_ALLOW"):
            call(make_settings(http_allow=f"127.0.0.1:{port}"), f"http://localhost:{port}/x")
        # Listed by name, it resolves to loopback, which is not listed: refused too.
        with pytest.raises(ToolRefused, match="non-public address"):
            call(make_settings(http_allow=f"localhost:{port}"), f"http://localhost:{port}/x")
        receipt = call(make_settings(http_allow=f"localhost:{port},127.0.0.1:{port}"), f"http://localhost:{port}/y")
    assert receipt.detail["status"] == 200
    assert [(r["path"], r["headers"]["host"]) for r in server.requests] == [("/y", f"localhost:{port}")]


def test_a_name_that_rebinds_to_a_loopback_address_not_listed_is_refused(make_settings):
    asked: list[tuple[str, int]] = []

    def rebinding(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    with RecordingServer() as server:
        port = port_of(server)
        with pytest.raises(ToolRefused, match=r"resolves to 127\.0\.0\.1"):
            call(make_settings(http_allow=f"hooks.example.com:{port}"), f"http://hooks.example.com:{port}/x",
                 resolve=rebinding)
    assert server.requests == [] and asked == [("hooks.example.com", port)]


def test_the_request_connects_to_the_address_that_was_checked_not_a_second_lookup(make_settings):
    answers = iter([["10.0.0.7", "127.0.0.1"], ["169.254.169.254"]])  # a second lookup would rebind
    asked = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    with RecordingServer() as server:
        port = port_of(server)
        # Only 127.0.0.1 is listed as an address: 10.0.0.7 (private, unlisted) is passed over.
        settings = make_settings(http_allow=f"svc.mesh.invalid:{port},127.0.0.1:{port}")
        receipt = call(settings, f"http://svc.mesh.invalid:{port}/pinned", resolve=resolver)
    assert receipt.detail["status"] == 200 and asked == ["svc.mesh.invalid"]
    [request] = server.requests  # `.invalid` never resolves in DNS: only the pinned address was reached
    assert request["path"] == "/pinned" and request["headers"]["host"] == f"svc.mesh.invalid:{port}"


def test_a_name_that_does_not_resolve_is_a_brownout(make_settings):
    def nothing(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(Brownout, match="does not resolve"):
        call(make_settings(http_allow="gone.mesh.invalid:80"), "http://gone.mesh.invalid:80/x", resolve=nothing)


def test_redirects_are_not_followed_even_to_an_allowed_host_and_the_step_is_dead_lettered(
        client, make_settings, start_worker):
    with RecordingServer() as target, RecordingServer(
            lambda n, r: (302, {}, {"Location": target.url("/elsewhere")})) as server:
        settings = make_settings(http_allow=f"{server.host_port},{target.host_port}", max_retries=3)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url("/start")}})
        record = client.wait(ref.id, timeout_s=20)
        # Not even a client built to follow redirects follows one.
        with pytest.raises(PermanentFailure, match="redirects are not followed"):
            call(settings, server.url("/direct"), http=httpx.Client(follow_redirects=True))
        assert len(server.requests) == 2 and target.requests == []

    assert record.state is State.DEAD_LETTERED and record.failure_class == "permanent"
    step = record.steps["executor"]
    assert "302" in step.error and "redirects are not followed" in step.error and "/elsewhere" in step.error


def test_a_response_body_over_the_limit_fails_the_call_and_the_post_is_unknown_not_succeeded(
        client, make_settings, start_worker):
    with RecordingServer(lambda n, r: (200, {"blob": "x" * 5000})) as server:
        settings = make_settings(http_allow=server.host_port, max_response_bytes=4096)
        start_worker(settings, ("executor",))
        ref = client.send("executor", {"tool": "http_post", "args": {"url": server.url()}})
        record = client.wait(ref.id, timeout_s=20)

    assert len(server.requests) == 1
    assert record.state is State.UNKNOWN and record.failure_class == "permanent"
    assert "MESH_MAX_RESPONSE_BYTES (4096)" in record.steps["executor"].error
    store = DeadLetterStore(client.redis, client.keys)
    assert store.count() == 1


@contextmanager
def endless_server() -> Iterator[tuple[str, list[int]]]:
    """Answers 200 with no Content-Length and a body that goes on until the client hangs up; yields
    its host:port and, per request, how many bytes it managed to write."""
    written: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.end_headers()
            n = 0
            try:
                while n < 64 * 1024 * 1024:
                    self.wfile.write(b"x" * 65536)
                    n += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
            written.append(n)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", written
    finally:
        server.shutdown()
        server.server_close()


def test_a_body_without_length_is_read_only_up_to_the_limit(make_settings):
    with endless_server() as (host_port, written):
        settings = make_settings(http_allow=host_port, max_response_bytes=100_000)
        with pytest.raises(PermanentFailure, match=r"more than 100000 bytes, over MESH_MAX_RESPONSE_BYTES"):
            call(settings, f"http://{host_port}/x")
    # The client hung up: the server could not write its 64 MiB (server_close waited for its thread).
    assert len(written) == 1 and written[0] < 64 * 1024 * 1024
