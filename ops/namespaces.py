"""Throw-away namespaces (``mesh bench``'s, ``mesh soak``'s, the console bench's): deleted whole when the run
ends."""

from __future__ import annotations

import redis

from mesh.broker.keys import Keys, legacy_pattern
from mesh.contracts import ConfigError


def raw_namespace(ns: str) -> str:
    """The namespace raw dramatiq is given in ``mesh bench``'s comparison: its own layout
    (``namespace:queue``) under ``ns``'s hash tag, ``{ns}raw:...``, so that on a Redis Cluster its scripts'
    keys share one slot (the mesh's) and stay apart from the mesh's ``{ns}:...`` keys."""
    return "{" + ns + "}raw"


def _patterns(ns: str) -> tuple[str, ...]:
    """Every key of namespace ``ns``: the mesh's (``{ns}:*``), raw dramatiq's of ``mesh bench``
    (:func:`raw_namespace`) and any in the older layout (``ns:*``)."""
    return *Keys(ns).patterns, f"{raw_namespace(ns)}:*", legacy_pattern(ns)


def is_empty(client: redis.Redis, ns: str) -> bool:
    """Whether namespace ``ns`` holds no key (SCAN, never KEYS)."""
    return not any(next(iter(client.scan_iter(match=pattern, count=2_000)), None) for pattern in _patterns(ns))


def delete_namespace(client: redis.Redis, ns: str) -> None:
    """Delete every key of namespace ``ns``, in batches (SCAN, never KEYS): the mesh's (``{ns}:*`` and each
    shard's, ``{ns:N}:*``), raw dramatiq's of ``mesh bench`` (:func:`raw_namespace`) and any in the older
    layout (``ns:*``). One DEL a key, sent in pipelines: on a Redis Cluster a DEL of keys of several slots
    (a namespace's and a shard's) is refused, and a pipeline sends each to its slot's primary."""
    for pattern in _patterns(ns):
        keys = list(client.scan_iter(match=pattern, count=2_000))
        for i in range(0, len(keys), 1_000):
            pipe = client.pipeline(transaction=False)
            for key in keys[i:i + 1_000]:
                pipe.delete(key)
            pipe.execute()


def check_scratch(client: redis.Redis, ns: str, command: str, *, memory: bool = False) -> None:
    """ConfigError, before anything starts, unless this Redis user may write, walk (SCAN) and delete
    the throw-away namespace ``ns`` (``memory``: and read MEMORY USAGE): the ACL user of
    docs/reference/acl.md, held to its own namespace and refused SCAN, may not, and ``command``
    would fail half-way through."""
    keys = Keys(ns)
    probe = keys.probe
    try:
        client.set(probe, b"1", px=60_000)
        client.scan(0, match=keys.everything, count=10)
        if memory:
            client.memory_usage(probe, samples=0)
        client.delete(probe)
    except redis.exceptions.NoPermissionError as exc:
        raise ConfigError(f"{command} runs in a throw-away namespace ({ns}) that it walks with SCAN and "
                          f"deletes at the end, and this Redis user may not ({exc}); run it as a user "
                          "that may, against a Redis kept for tests") from None
