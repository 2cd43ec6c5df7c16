"""Key layout 2 (broker/keys.py): the namespace between braces starts every key, its Redis Cluster hash
tag; a namespace can hold neither braces nor ``:``, so no namespace's keys are another's."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

from mesh.broker.keys import Keys, legacy_pattern, prefix
from mesh.broker.settings import MeshSettings


def built_keys(keys: Keys) -> dict[str, str]:
    """Every key ``keys`` builds, by the name of what builds it (each argument "x")."""
    built = {}
    for field in dir(Keys):
        attr = getattr(Keys, field)
        if field.startswith("_") or field in {"namespace", "shard", "prefix", "fleet", "legacy_everything",
                                              "patterns", "everything"}:
            continue
        if isinstance(attr, property):
            built[field] = getattr(keys, field)
        elif callable(attr):
            n = attr.__code__.co_argcount - 1
            built[field] = attr(keys, *(["x"] * n))
    return built


#: What stays in the namespace's own slot whatever the shard: the fleet-wide keys (broker/keys.py).
FLEET = {"breaker", "breaker_failures", "breaker_errors", "breaker_deferred", "breakers", "breakers_audit",
         "console_logout", "pipeline", "pipelines", "tool_pins", "tool_presented", "registry", "serving",
         "registry_workers", "limit", "limits_declared", "limits_set", "limits_audit", "limit_keys", "layout",
         "probe", "bench_latency", "shard_count"}


def test_every_key_starts_with_the_namespace_between_braces():
    keys = Keys("shop")
    assert prefix("shop") == keys.prefix == keys.fleet == "{shop}"
    built = built_keys(keys)
    assert len(built) > 70
    assert [k for k in built.values() if not k.startswith("{shop}:")] == []
    assert keys.job("1") == "{shop}:job:1" and keys.queue("q") == "{shop}:q"
    assert keys.everything == "{shop}:*" and keys.legacy_everything == legacy_pattern("shop") == "shop:*"
    assert keys == Keys("shop") and "prefix" not in repr(keys)
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.prefix = "{other}"  # type: ignore[misc]


def test_a_shards_keys_carry_its_own_tag_and_the_fleet_wide_keep_the_namespaces():
    keys = Keys("shop", 3)
    assert keys.prefix == "{shop:3.44}" and keys.fleet == "{shop}" and keys != Keys("shop")
    built = built_keys(keys)
    assert set(built) >= FLEET
    assert {name for name, key in built.items() if key.startswith("{shop}:")} == FLEET
    assert {name for name, key in built.items() if key.startswith("{shop:3.44}:")} == set(built) - FLEET
    assert Keys("shop", 0) == Keys("shop")  # shard 0 is the namespace's own tag: layout 2 as it was
    # Every shard's keys and the fleet's, and no other namespace's (none holds a ":")
    assert keys.patterns == ("{shop}:*", "{shop:*}:*") == Keys("shop").patterns
    assert keys.everything == "{shop}:*"


@pytest.mark.parametrize("count", [3, 6, 7, 12, 48])
def test_shards_tags_spread_evenly_over_a_clusters_primaries(count):
    """Shards 1..N land in slots spread over the slot range, so three primaries holding thirds of it (as
    ``redis-cli --cluster create`` makes them) get N/3 each, within two; each tag is its slot's first try
    or a salted one, and each shard's own."""
    tags = [Keys("orders", s).prefix for s in range(1, count + 1)]
    assert len(set(tags)) == count and all(re.fullmatch(rf"\{{orders:{s}(\.\d+)?\}}", t)
                                           for s, t in enumerate(tags, 1))
    per_primary = Counter(min(2, key_slot(t[1:-1].encode()) * 3 // 16384) for t in tags)
    assert max(per_primary.values()) - min(per_primary[p] for p in range(3)) <= 2, per_primary


@pytest.mark.parametrize("namespace", ["a{b", "a}b", "{a}", "a:b", ""])
def test_a_namespace_with_braces_or_a_colon_is_refused(namespace):
    with pytest.raises(ValidationError):
        MeshSettings(namespace=namespace)
