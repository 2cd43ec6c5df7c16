"""The tests' Redis (tests/conftest.py, TEST_REDIS): on a Redis Cluster the fixtures' client is a
cluster's, and a namespace's keys are deleted on every primary, the older layout's too (no hash tag:
spread over the slots)."""

from __future__ import annotations

import redis
from conftest import delete_keys, on_cluster

from mesh.broker.connection import is_cluster, parse_url, primaries
from mesh.broker.keys import legacy_pattern


def test_the_fixtures_client_is_a_cluster_s_exactly_when_the_tests_run_on_one(rclient: redis.Redis, redis_url: str):
    assert is_cluster(rclient) == parse_url(redis_url).cluster == on_cluster()


def test_a_pattern_s_keys_are_deleted_on_every_primary(rclient: redis.Redis, namespace: str):
    keys = [f"{namespace}:{i}" for i in range(60)]
    for key in keys:
        rclient.set(key, 1)
    holding = [node for node in primaries(rclient) if any(True for _ in node.scan_iter(match=f"{namespace}:*"))]
    assert len(holding) == len(primaries(rclient))  # on a cluster, keys on each of its primaries
    assert delete_keys(rclient, legacy_pattern(namespace)) == len(keys)
    assert not any(rclient.exists(key) for key in keys)
