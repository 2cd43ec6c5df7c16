"""MESH_REDIS_URL at its strangest, through the real entry points: a bad URL is one line naming the
problem (exit 2), a Redis not reached or not speaking Redis one line too (exit 3), never a traceback,
and never the password. The servers are real sockets of this test: one that refuses, one that
answers garbage; the shared Redis is only read (a database it does not have is asked for)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from mesh.broker import MeshSettings
from mesh.broker.connection import MAX_SEEDS, masked_url, parse_url
from mesh.contracts import ConfigError
from tests.conftest import ROOT

SECRET = "Hostile-S3cret"


def mesh(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_REDIS_URL=url, MESH_NAMESPACE="url-hostile", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mesh.ops.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess[str], code: int, says: str) -> None:
    shown = res.stdout + res.stderr
    assert res.returncode == code, shown
    assert "Traceback" not in shown
    assert SECRET not in shown
    assert len(res.stderr.strip().splitlines()) == 1, shown
    assert says in res.stderr, shown


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound and not listening: a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def garbage_port() -> Iterator[int]:
    """A server that accepts and answers every request with bytes that are not Redis's protocol."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    conn.sendall(b"\x00\xffnot redis\r\n")
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


@pytest.mark.parametrize(("url", "says"), [
    (f"redis+cluster://u:{SECRET}/x@127.0.0.1:1/7", "a Redis Cluster has database 0 only"),  # '/' in the password
    (f"redis+sentinel://u:1234/{SECRET}@127.0.0.1:1/", "names the master's service"),
    (f"redis+cluster://u:{SECRET}@127.0.0.1:7000, 127.0.0.1:7001/", "a space or a control character"),
    (f"redis://u:{SECRET}@127.0.0.1\n:6379/0", "a space or a control character"),
    (f"redis+cluster://u:{SECRET}@[::1:7000/", "'[' is not closed"),
    (f"redis+cluster://u:{SECRET}@::1:7000/", "an IPv6 address is written in brackets"),
    (f"redis+cluster://u:{SECRET}@a:+7000/", "the port of a must be a number"),
    (f"redis+cluster://u:{SECRET}@a:\u0667\u0660\u0660\u0660/", "the port of a must be a number"),
    (f"redis+cluster://u:{SECRET}@a:7000,redis://b:7001/", "one scheme for the whole URL"),
    (f"redis://u:{SECRET}%ff@a:1/0", "the password is percent-encoded, but its bytes are not UTF-8"),
    (f"redis://u:{SECRET}@{'a' * 300}:1/0", "is not a host name"),
    (f"redis://u:{SECRET}@a:1/{'9' * 30}", "the database must be at most 2147483647"),
    (f"redis+cluster://u:{SECRET}@" + ",".join(f"h{n}:7000" for n in range(MAX_SEEDS + 1)) + "/",
     f"{MAX_SEEDS + 1} hosts; name at most {MAX_SEEDS}"),
])
def test_a_hostile_url_is_a_settings_error_naming_it_without_the_password(url, says):
    with pytest.raises(ConfigError) as caught:
        MeshSettings.from_env({"MESH_REDIS_URL": url})
    assert says in str(caught.value)
    assert SECRET not in str(caught.value)
    assert len(str(caught.value)) < 1000  # a long input is cut short where it is shown


@pytest.mark.parametrize("url", [f"redis+cluster://u:{SECRET}/x@127.0.0.1:1/7",
                                 f"redis://u:{SECRET}@127.0.0.1\n:6379/0"])
def test_mesh_says_a_hostile_url_in_one_line_exit_2_without_the_password(url):
    one_line(mesh(url, "status", "--json"), 2, "invalid settings: MESH_REDIS_URL")


def test_a_password_with_raw_reserved_characters_is_read_whole_and_masked():
    for raw in ("/x", "?x", "#x", "@x", "/1@h:2/3"):
        address = parse_url(f"redis+cluster://u:{SECRET}{raw}@a:1/")
        assert (address.password, address.hosts, address.db) == (SECRET + raw, (("a", 1),), 0)
        assert masked_url(f"redis+cluster://u:{SECRET}{raw}@a:1/") == "redis+cluster://u:***@a:1/"
    with pytest.raises(ConfigError) as caught:
        MeshSettings.from_env({"MESH_REDIS_URL": f"redis://u:{SECRET}/x@a:1/zero"})
    assert SECRET not in str(caught.value) and "u:***@a:1/zero" in str(caught.value)


def test_seeds_named_twice_are_asked_once_and_a_long_input_is_cut_where_shown():
    assert parse_url("redis+cluster://a:1,a:1,[::1]:2,[::1]:2/").hosts == (("a", 1), ("::1", 2))
    with pytest.raises(ConfigError) as caught:
        MeshSettings.from_env({"MESH_REDIS_URL": "redis+cluster://" + "[" * (1 << 20)})
    assert len(str(caught.value)) < 500 and f"({(1 << 20) + 16} characters)" in str(caught.value)


def test_a_cluster_seed_that_refuses_is_exit_3_for_status_and_migrate(refusing_port):
    url = f"redis+cluster://u:{SECRET}@127.0.0.1:{refusing_port},127.0.0.1:{refusing_port}/"
    for args in (("status", "--json"), ("migrate", "--dry-run")):
        one_line(mesh(url, *args), 3, f"cannot reach Redis at redis+cluster://u:***@127.0.0.1:{refusing_port},")


def test_a_plain_redis_as_a_cluster_seed_is_exit_3(redis_url):
    if parse_url(redis_url).cluster:
        pytest.skip("the tests' Redis is a cluster")
    address = parse_url(redis_url)
    host, port = address.hosts[0]
    one_line(mesh(f"redis+cluster://{host}:{port}/", "status"), 3, "Cluster mode is not enabled")


def test_a_seed_that_answers_garbage_is_exit_3_in_every_form(garbage_port):
    for url in (f"redis://u:{SECRET}@127.0.0.1:{garbage_port}/0",
                f"redis+cluster://u:{SECRET}@127.0.0.1:{garbage_port}/",
                f"redis+sentinel://u:{SECRET}@127.0.0.1:{garbage_port}/mymaster"):
        one_line(mesh(url, "status"), 3, "Protocol error")


def test_a_database_the_server_does_not_have_is_exit_2(redis_url):
    address = parse_url(redis_url)
    if address.cluster or address.sentinel:
        pytest.skip("a single server's database")
    url = redis_url.rsplit("/", 1)[0] + "/2147483647"
    one_line(mesh(url, "status"), 2, "the server has no database 2147483647")


@pytest.mark.slow
def test_a_worker_starting_on_an_unreachable_cluster_is_exit_3(refusing_port):
    res = mesh(f"redis+cluster://u:{SECRET}@127.0.0.1:{refusing_port}/", "worker")
    one_line(res, 3, "cannot reach Redis at redis+cluster://u:***@")


@pytest.mark.parametrize("url", [f"redis://127.0.0.1:6379/0?password={SECRET}",
                                 f"redis://localhost?password={SECRET}",  # no path: the query was read as a host
                                 f"localhost:6379?password={SECRET}",  # no scheme
                                 f"redis://u:pw@127.0.0.1:6379/0?socket_timeout=1&password={SECRET}",
                                 f"redis+sentinel://s1:26379/mymaster?sentinel_password={SECRET}",
                                 f"rediss+cluster://a:1,b:2/?password={SECRET}#x"])
def test_a_password_given_as_a_query_parameter_as_redis_py_takes_it_is_masked_too(url):
    with pytest.raises(ConfigError) as caught:
        MeshSettings.from_env({"MESH_REDIS_URL": url})
    assert ("query parameters are not taken" if "://" in url else "the scheme must be one of") in str(caught.value)
    assert SECRET not in str(caught.value) and "password=***" in str(caught.value)
    assert SECRET not in masked_url(url)
