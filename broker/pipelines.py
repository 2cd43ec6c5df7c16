"""Registered pipelines in Redis, as plain JSON: by name, each version under its content digest.

The broker stores and reads the spec's canonical JSON only; parsing it into the pydantic spec model
is the agents' side (``mesh.agents.pipelines``), so the broker stays free of it.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis

from mesh.contracts import MeshError

from .keys import Keys

#: The hash field naming the newest digest; a digest is 64 hex digits, so it never collides.
LATEST = "latest"


class PipelineNotFound(MeshError):
    """No pipeline of that name (or no such version of it) is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no pipeline {name!r} is registered (mesh pipeline register FILE, or run a file)",
                         pipeline=name)


class PipelineConflict(MeshError):
    """A run that must not replace its name's registration (``MeshClient.run(replace=False)``) found
    another version registered as the newest: nothing was sent, nothing registered."""

    terminal = True

    def __init__(self, name: str, latest: str, digest: str) -> None:
        super().__init__(f"pipeline {name!r} is registered as another version (digest {latest[:12]}; this one is "
                         f"{digest[:12]})", pipeline=name, latest=latest, digest=digest)
        self.latest = latest


def stage_register(pipe: Any, keys: Keys, name: str, digest: str, canonical: bytes) -> None:
    """Stage the registration of one version (``digest`` → ``canonical`` JSON), made the newest."""
    pipe.hsetnx(keys.pipeline(name), digest, canonical)
    pipe.hset(keys.pipeline(name), LATEST, digest)
    pipe.sadd(keys.pipelines, name)


class PipelineStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def register(self, name: str, digest: str, canonical: bytes) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            stage_register(pipe, self.keys, name, digest, canonical)
            pipe.execute()

    def get(self, name: str, digest: str | None = None) -> tuple[str, dict[str, Any]]:
        """(digest, spec JSON) of ``name``'s version ``digest`` (default: the newest)."""
        if digest is None:
            raw: Any = self.client.hget(self.keys.pipeline(name), LATEST)
            if raw is None:
                raise PipelineNotFound(name)
            digest = raw.decode()
        data: Any = self.client.hget(self.keys.pipeline(name), digest)
        if data is None:
            raise PipelineNotFound(f"{name}@{digest[:12]}")
        return digest, orjson.loads(data)

    def names(self) -> list[str]:
        names: Any = self.client.smembers(self.keys.pipelines)
        return sorted(n.decode() for n in names)

    def versions(self, name: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
        """(newest digest, digest → spec JSON) of every registered version of ``name``."""
        raw: Any = self.client.hgetall(self.keys.pipeline(name))
        latest = raw.pop(LATEST.encode(), None)
        return (latest.decode() if latest else None), {d.decode(): orjson.loads(v) for d, v in raw.items()}
