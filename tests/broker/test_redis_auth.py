"""The mesh on a Redis that wants a password, or an ACL user that may touch only the namespace's
keys with the commands the mesh uses; and the password never appears in anything the mesh prints
or stores. Each test starts its own redis-server on a free loopback port."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT, wait_for

from mesh.broker import MeshClient
from mesh.broker.acl import DOC_PAGE, acl_command
from mesh.broker.breaker import Breakers
from mesh.broker.connection import ACL_COMMANDS, acl_rules
from mesh.broker.keys import Keys
from mesh.contracts import Brownout, State
from mesh.ops.local_redis import PrivateRedis, _free_port
from tests.broker.deployed import GOAL, REFUSED_URL, private_redis, run_flows

pytestmark = pytest.mark.slow

NOTE = {"tool": "note", "args": {"title": "auth note", "body": "written through AUTH"}}


@pytest.fixture
def secured(tmp_path) -> Iterator[tuple[PrivateRedis, str]]:
    """A redis-server whose default user has a password; and the password."""
    password = f"pw-{uuid.uuid4().hex}"
    server = private_redis(tmp_path / "redis", ("--requirepass", password),
                           url=f"redis://:{password}@127.0.0.1:{{port}}/0")
    try:
        yield server, password
    finally:
        server.stop()


def test_a_job_runs_end_to_end_with_the_password_in_the_url_and_a_wrong_one_is_a_clear_error(
        secured, make_settings, worker_process, cli):
    server, password = secured
    client = MeshClient(make_settings(redis_url=server.url))
    worker_process("--agents", "executor", "--threads", "2", MESH_REDIS_URL=server.url)
    ref = client.send("executor", NOTE)
    assert client.wait(ref.id, timeout_s=30).state is State.SUCCEEDED

    wrong = f"redis://:not-{password}@127.0.0.1:{server.port}/0"
    with pytest.raises(redis.AuthenticationError):
        MeshClient(make_settings(redis_url=wrong)).send("executor", NOTE)
    done = cli("status", MESH_REDIS_URL=wrong)
    assert done.returncode == 3
    message = " ".join(done.stderr.split())
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{server.port}/0" in message
    assert "invalid username-password pair" in message and "give its user and password" in message
    assert password not in done.stderr + done.stdout

    missing = cli("status", MESH_REDIS_URL=f"redis://127.0.0.1:{server.port}/0")
    assert missing.returncode == 3
    assert "give its user and password in MESH_REDIS_URL" in " ".join(missing.stderr.split())


def every_value(admin: redis.Redis, namespace: str) -> Iterator[tuple[str, Any]]:
    """Every key of ``namespace`` (and the bare name) with its whole value, whatever its type: its
    fleet-wide keys and every shard's."""
    keys = [namespace.encode(), *(key for pattern in Keys(namespace).patterns
                                  for key in admin.scan_iter(match=pattern, count=1000))]
    for key in keys:
        kind = admin.type(key).decode()
        reader = {"string": admin.get, "hash": admin.hgetall, "list": lambda k: admin.lrange(k, 0, -1),
                  "set": admin.smembers, "zset": lambda k: admin.zrange(k, 0, -1, withscores=True),
                  "stream": lambda k: admin.xrange(k), "none": lambda k: None}[kind]
        yield key.decode(), reader(key)


def test_the_password_never_appears_in_anything_the_mesh_prints_or_stores(
        secured, make_settings, worker_process, cli, tmp_path):
    server, password = secured
    settings = make_settings(redis_url=server.url)
    client = MeshClient(settings)
    env = {"MESH_REDIS_URL": server.url}
    worker = worker_process("--threads", "2", **env)  # every built-in agent
    admin = redis.Redis.from_url(server.url)
    wait_for(lambda: admin.zcard(client.keys.heartbeats) >= 1, timeout_s=20)
    run = run_flows(client, cli, env)
    assert run.readyz["redis"] == {"address": f"127.0.0.1:{server.port}", "db": 0, "tls": False, "role": "master"}

    demo = cli("demo", "--timeout", "60", timeout=120, **env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert f"Redis redis://:***@127.0.0.1:{server.port}/0" in demo.stdout
    refused = cli("status", MESH_REDIS_URL=f"redis://:{password}@127.0.0.1:{_free_port()}/0")
    assert refused.returncode == 3 and "redis://:***@127.0.0.1:" in refused.stderr
    bad = cli("status", MESH_REDIS_URL=f"redis://:{password}@127.0.0.1:port/0")
    assert bad.returncode == 2 and "redis://:***@127.0.0.1:port/0" in bad.stderr
    worker.terminate()
    worker.wait(30)

    printed = "\n".join([*run.outputs, demo.stdout, demo.stderr, refused.stdout, refused.stderr,
                         bad.stdout, bad.stderr])
    logs = "\n".join(Path(p).read_text(errors="replace") for p in tmp_path.glob("worker-*.log"))
    stored = {key: value for key, value in every_value(admin, settings.namespace)}
    # What was read is what the mesh wrote: dead letters, traces, job records, notes, stats, registry.
    assert any(":dlq" in k for k in stored) and any(":job:" in k for k in stored), sorted(stored)
    assert any(":trace:" in k for k in stored), sorted(stored)
    assert "submitted job" in demo.stdout and "worker started" in logs
    for where, text in (("CLI, demo, /readyz and /metrics", printed), ("worker logs", logs),
                        ("keys of the namespace", repr(stored))):
        assert password not in text, f"the password appears in the {where}"
    admin.close()


@pytest.fixture
def acl_server(tmp_path) -> Iterator[tuple[PrivateRedis, redis.Redis]]:
    """A redis-server whose default (admin) user has a password; and an admin connection."""
    admin_password = f"admin-{uuid.uuid4().hex}"
    server = private_redis(tmp_path / "redis", ("--requirepass", admin_password),
                           url=f"redis://:{admin_password}@127.0.0.1:{{port}}/0")
    admin = redis.Redis.from_url(server.url)
    try:
        yield server, admin
    finally:
        admin.close()
        server.stop()


def test_an_acl_user_held_to_the_namespace_and_the_mesh_commands_runs_jobs_replays_and_status(
        acl_server, make_settings, worker_process, cli):
    server, admin = acl_server
    namespace = make_settings().namespace
    password = f"mesh-{uuid.uuid4().hex}"
    admin.execute_command("ACL", "SETUSER", "mesh", "reset", "on", f">{password}", *acl_rules(namespace))
    url = f"redis://mesh:{password}@127.0.0.1:{server.port}/0"
    settings = make_settings(redis_url=url)
    client = MeshClient(settings)
    env = {"MESH_REDIS_URL": url, "MESH_SWEEP_INTERVAL_S": "1"}  # the retention sweeper runs too
    worker_process("--threads", "2", **env)
    wait_for(lambda: admin.zcard(client.keys.heartbeats) >= 1, timeout_s=20)
    admin.execute_command("ACL", "LOG", "RESET")
    run_flows(client, cli, env)  # every flow passes under the user
    wait_for(lambda: admin.info("commandstats").get("cmdstat_zremrangebyscore"), timeout_s=10)  # a sweep ran
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], denied

    # What the user may not do: other keys, and the commands that wipe or walk the server.
    mesh_user = client.redis
    for command in (("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("SCAN", "0"), ("CONFIG", "GET", "*"),
                    ("GET", "other:key"), ("SET", f"{namespace}x", "1"), ("SHUTDOWN",), ("ACL", "LIST")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            mesh_user.execute_command(*command)

    # The docs give operators the same rules, for the default namespace (tests/broker/test_acl_doc.py).
    assert acl_command("mesh") in (ROOT / DOC_PAGE).read_text()
    assert len(set(ACL_COMMANDS)) == len(ACL_COMMANDS)


def test_redis_commands_a_flow_needs_but_the_acl_user_lacks_are_refused_not_ignored(
        acl_server, make_settings):
    """The ACL test can fail: without one command the mesh uses (here ``set``: job records), the
    client's submit is refused with NOPERM, and nothing of the job is half-written (on a shard >= 1 the
    pipeline's spec is registered first, on its own, in the fleet-wide keys: it may stay)."""
    server, admin = acl_server
    settings = make_settings()
    namespace, keys = settings.namespace, Keys(settings.namespace, settings.shard)
    admin.execute_command("ACL", "SETUSER", "mesh", "reset", "on", ">pw-mesh-1", *acl_rules(namespace),
                          "-set")
    client = MeshClient(make_settings(redis_url=f"redis://mesh:pw-mesh-1@127.0.0.1:{server.port}/0"))
    # Refused by Redis whether the command is sent alone or from the enqueue script.
    with pytest.raises(redis.RedisError, match=r"NOPERM|permission|can't run this command"):
        client.submit("anything")
    written = {key.decode() for pattern in keys.patterns for key in admin.scan_iter(match=pattern)}
    registered = {key for key in written if key == keys.pipelines or key.startswith(keys.pipeline(""))}
    assert written - (registered if keys.shard else set()) == set()


def _down() -> None:
    raise Brownout("503", dependency="127.0.0.1:9")


def _processes_using(port: int) -> list[int]:
    """Pids of live processes whose environment names the Redis on ``port`` (a soak's workers)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"@127.0.0.1:{port}/".encode() in environ and b"MESH_NAMESPACE=" in environ:
            found.append(int(proc.name))
    return found


@pytest.mark.timeout(300)  # some 30 `mesh` processes, each importing the CLI afresh
def test_every_mesh_command_runs_under_the_acl_user_and_bench_and_soak_refuse_it_clearly(
        acl_server, make_settings, worker_process, cli, tmp_path):
    """Every command of ``mesh`` under the user of ``acl_rules()``: none is refused a Redis command
    (ACL LOG stays empty) or ends in a traceback. ``mesh bench`` and ``mesh soak`` work in throw-away
    namespaces outside the user's keys: they refuse at once (exit 2, saying why) and leave no worker."""
    server, admin = acl_server
    namespace = make_settings().namespace
    password = f"mesh-{uuid.uuid4().hex}"
    admin.execute_command("ACL", "SETUSER", "mesh", "reset", "on", f">{password}", *acl_rules(namespace))
    url = f"redis://mesh:{password}@127.0.0.1:{server.port}/0"
    client = MeshClient(make_settings(redis_url=url))
    env = {"MESH_REDIS_URL": url}
    worker_process("--threads", "2", **env)
    wait_for(lambda: admin.zcard(client.keys.heartbeats) >= 1, timeout_s=20)
    admin.execute_command("ACL", "LOG", "RESET")
    job = client.wait(client.submit(GOAL).id, timeout_s=60)
    bad = client.send("executor", {"tool": "http_post", "args": {"url": REFUSED_URL, "json": {"n": 1}}})
    assert client.wait(bad.id, timeout_s=30).state is State.DEAD_LETTERED
    entry = client.redis.zrange(client.keys.dlq, 0, -1)[0].decode()
    drained, pipeline = tmp_path / "dlq.jsonl", ROOT / "agents" / "builtin.yaml"

    def mesh(*args: str, code: int = 0) -> str:
        done = cli(*args, **env)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        return done.stdout + done.stderr

    for args in (("status",), ("status", job.key), ("status", job.job_id[:12]), ("status", job.job_id[4:14], "--json"),
                 ("trace", job.job_id[:12]), ("dlq", "list"), ("dlq", "show", entry[:8]), ("dlq", "list", "--wide"),
                 ("jobs", "--json"), ("jobs", "--state", "succeeded"), ("jobs", "--key", job.key),
                 ("workers", "--json"),
                 ("agents", "--json"), ("queues", "--json"), ("stats", "--json"), ("breakers", "--json"),
                 ("dlq", "stats", "--json"), ("pipeline", "validate", str(pipeline)),
                 ("pipeline", "register", str(pipeline)), ("pipeline", "list"), ("pipeline", "show", "mesh"),
                 ("send", "executor", "--payload", '{"tool": "note", "args": {"title": "acl"}}'),
                 ("submit", "acl note", "--wait", "--timeout", "60"),
                 ("run", str(pipeline), "--input", '{"goal": "acl run"}', "--wait", "--timeout", "60"),
                 ("dlq", "replay", entry[:8], "--yes"), ("dlq", "drain", "--to", str(drained), "--yes"),
                 ("dlq", "load", str(drained)), ("dlq", "purge", "--all", "--yes")):
        mesh(*args)
    with pytest.raises(Brownout):  # a breaker to reset, opened by the user as a worker would
        Breakers(client.settings, client.redis).call("127.0.0.1:9", _down)
    mesh("breakers", "reset", "127.0.0.1:9")
    denied = admin.execute_command("ACL", "LOG")
    assert denied == [], denied



def test_mesh_soak_and_bench_under_the_acl_user_refuse_at_once_and_leave_no_worker_behind(
        acl_server, make_settings, cli):
    """Both work in throw-away namespaces outside the user's keys, walked with SCAN: they refuse
    before starting anything (exit 2, saying why). A soak used to exit 1 with a traceback, its
    worker process left running."""
    server, admin = acl_server
    namespace = make_settings().namespace
    admin.execute_command("ACL", "SETUSER", "mesh", "reset", "on", ">pw-mesh-soak", *acl_rules(namespace))
    env = {"MESH_REDIS_URL": f"redis://mesh:pw-mesh-soak@127.0.0.1:{server.port}/0", "MESH_NAMESPACE": namespace}
    for args in (("soak", "--seconds", "1", "--processes", "1"), ("bench", "--messages", "10")):
        done = cli(*args, **env)
        assert _processes_using(server.port) == [], f"{args[0]} left workers running"
        assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)
        assert "throw-away namespace" in done.stderr and "SCAN" in done.stderr, done.stderr
