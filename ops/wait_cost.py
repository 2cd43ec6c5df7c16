"""What MESH_REDIS_WAIT_REPLICAS costs: ``python -m mesh.ops.wait_cost [N]`` starts a private
primary and one replica on loopback, and times N ``MeshClient.send`` calls (one job each) with
WAIT off and with WAIT 1, alternating, three rounds each; prints the median msg/s of each."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from mesh.broker import MeshClient, MeshSettings
from mesh.broker.connection import connect

from .local_redis import PrivateRedis, redis_binary


def rate(url: str, replicas: int, n: int) -> float:
    client = MeshClient(MeshSettings(redis_url=url, namespace=f"wait-{uuid.uuid4().hex[:8]}",
                                     redis_wait_replicas=replicas))
    started = time.perf_counter()
    for i in range(n):
        client.send("executor", {"tool": "note", "args": {"title": f"n{i}"}}, key=f"k{i}")
    elapsed = time.perf_counter() - started
    client.close()
    return n / elapsed


def main(n: int = 2000) -> None:
    binary = redis_binary()
    if binary is None:
        raise SystemExit("no redis-server binary")
    with tempfile.TemporaryDirectory() as tmp:
        primary = PrivateRedis(binary, folder=Path(tmp) / "primary")
        replica = PrivateRedis(binary, folder=Path(tmp) / "replica",
                               args=("--replicaof", "127.0.0.1", str(primary.port)))
        try:
            probe = connect(replica.settings)
            while probe.info("replication").get("master_link_status") != "up":
                time.sleep(0.05)
            runs: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(3):
                for replicas in (0, 1):
                    runs[replicas].append(rate(primary.url, replicas, n))
            off, on = statistics.median(runs[0]), statistics.median(runs[1])
            print(f"{n} sends per run, median of 3: WAIT off {off:,.0f} msg/s, WAIT 1 {on:,.0f} msg/s "
                  f"({on / off:.2f}x; {1000 / on - 1000 / off:+.3f} ms per send)")
        finally:
            replica.stop()
            primary.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
