"""The mesh over TLS only (``rediss://``, the server's plain port closed): a CA made by the test
signs the server's certificate, MESH_REDIS_CA_FILE trusts it; a server that asks for client
certificates gets MESH_REDIS_CERT_FILE / MESH_REDIS_KEY_FILE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import wait_for

from mesh.broker import MeshClient
from mesh.contracts import State
from mesh.ops.local_redis import PrivateRedis, _free_port
from tests.broker.deployed import make_certificates, private_redis, run_flows, tls_args

pytestmark = pytest.mark.slow

NOTE = {"tool": "note", "args": {"title": "tls note", "body": "written over TLS"}}
URL = "rediss://127.0.0.1:{port}/0"


@pytest.fixture
def certs(tmp_path) -> dict[str, Path]:
    return make_certificates(tmp_path / "certs")


def tls_server(folder: Path, certs: dict[str, Path], *, auth_clients: bool) -> PrivateRedis:
    probe = {"redis_ca_file": str(certs["ca"])}
    if auth_clients:
        probe |= {"redis_cert_file": str(certs["client"]), "redis_key_file": str(certs["client_key"])}
    port = _free_port()
    return private_redis(folder, tls_args(port, certs, auth_clients=auth_clients), port=port, url=URL, probe=probe)


@pytest.fixture
def server(tmp_path, certs) -> Iterator[PrivateRedis]:
    s = tls_server(tmp_path / "redis", certs, auth_clients=False)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client_cert_server(tmp_path, certs) -> Iterator[PrivateRedis]:
    """A TLS server that wants client certificates. A fixture, set up before ``worker_process``, so
    the worker is stopped while the server still answers (stopping it against a gone server waits
    out its reconnection attempts)."""
    s = tls_server(tmp_path / "redis", certs, auth_clients=True)
    try:
        yield s
    finally:
        s.stop()


def test_a_job_runs_end_to_end_over_tls_with_the_ca_file_and_every_flow_works(
        server, certs, make_settings, worker_process, cli):
    env = {"MESH_REDIS_URL": server.url, "MESH_REDIS_CA_FILE": str(certs["ca"])}
    settings = make_settings(redis_url=server.url, redis_ca_file=str(certs["ca"]))
    client = MeshClient(settings)
    worker_process("--threads", "2", **env)
    wait_for(lambda: client.redis.zcard(client.keys.heartbeats) >= 1, timeout_s=20)
    run = run_flows(client, cli, env)
    assert run.readyz["redis"] == {"address": f"127.0.0.1:{server.port}", "db": 0, "tls": True, "role": "master"}
    assert "127.0.0.1" in cli("status", **env).stdout and "TLS" in cli("status", **env).stdout

    # The plain protocol is refused on that port, and a CA that did not sign the server is refused.
    plain = cli("status", MESH_REDIS_URL=f"redis://127.0.0.1:{server.port}/0")
    assert plain.returncode == 3
    other = cli("status", **{**env, "MESH_REDIS_CA_FILE": str(certs["other_ca"])})
    assert other.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in other.stderr


def test_a_server_that_wants_client_certificates_takes_the_cert_and_key_files(
        client_cert_server, certs, make_settings, worker_process, cli):
    server = client_cert_server
    files = {"redis_ca_file": str(certs["ca"]), "redis_cert_file": str(certs["client"]),
             "redis_key_file": str(certs["client_key"])}
    env = {"MESH_REDIS_URL": server.url, **{f"MESH_{k.upper()}": v for k, v in files.items()}}
    client = MeshClient(make_settings(redis_url=server.url, **files))
    worker_process("--agents", "executor", "--threads", "2", **env)
    ref = client.send("executor", NOTE)
    assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED

    # Without a client certificate the handshake fails.
    anonymous = MeshClient(make_settings(redis_url=server.url, redis_ca_file=str(certs["ca"])))
    with pytest.raises(redis.ConnectionError):
        anonymous.redis.ping()
    refused = cli("status", MESH_REDIS_URL=server.url, MESH_REDIS_CA_FILE=str(certs["ca"]))
    assert refused.returncode == 3, refused.stderr
