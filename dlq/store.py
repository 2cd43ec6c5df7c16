"""Reading the DLQ. Entries are written atomically by the consumer's settle script."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis

from broker.keys import Keys
from contracts import loads

from .entry import DeadLetter


class DeadLetterStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def count(self) -> int:
        return int(self.client.zcard(self.keys.dlq))

    def get(self, entry_id: str) -> DeadLetter | None:
        data = self.client.hget(self.keys.dead_letter(entry_id), "entry")
        return None if data is None else DeadLetter.model_validate(loads(data))

    def raw(self, entry_id: str) -> bytes | None:
        data = self.client.hget(self.keys.dead_letter(entry_id), "raw")
        return None if data is None else data if isinstance(data, bytes) else data.encode()

    def newest(self, limit: int = 100) -> list[DeadLetter]:
        """Newest first."""
        ids = self.client.zrevrange(self.keys.dlq, 0, max(limit, 1) - 1)
        return list(self._load(ids))

    def _load(self, ids: Any) -> Iterator[DeadLetter]:
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.hget(self.keys.dead_letter(entry_id.decode()), "entry")
        for data in pipe.execute():
            if data is not None:
                yield DeadLetter.model_validate(loads(data))
