"""The Redis server's clock: every time compared across hosts (heartbeats, breakers, retention,
readiness) is read from it, never from the local clock."""

from __future__ import annotations

from typing import Any


def server_ms(client: Any) -> int:
    """The Redis server's time (``TIME``) in milliseconds."""
    secs, micros = client.time()
    return int(secs) * 1000 + int(micros) // 1000
