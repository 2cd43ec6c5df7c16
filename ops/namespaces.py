"""Throw-away namespaces (``mesh bench``'s, ``mesh soak``'s): deleted whole when the run ends."""

from __future__ import annotations

from typing import Any

import redis


def delete_namespace(client: redis.Redis, ns: str) -> None:
    """Delete every key of namespace ``ns``, in batches (SCAN, never KEYS)."""
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{ns}:*", count=2_000):
        batch.append(key)
        if len(batch) >= 1_000:
            client.delete(*batch)
            batch = []
    if batch:
        client.delete(*batch)
