"""Registered pipelines in Redis, as plain JSON: by name, each version under its content digest.

The broker stores and reads the spec's canonical JSON only; parsing it into the pydantic spec model
is the agents' side (``mesh.agents.pipelines``), so the broker stays free of it.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
import redis

from mesh.contracts import MeshError, dumps

from . import lanes, trace
from .connection import WaitingPipeline, on_slot, run_script
from .keys import Keys
from .outbox import WAKE_CAP

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


RUN_LUA = lanes.LIB + "\n" + resources.files("mesh.broker").joinpath("scripts/run.lua").read_text()


#: How many arguments of run.lua precede its trace events (job_id ... n_events).
_FIRST = 10


class StartRun:
    """A run's start written by one script (scripts/run.lua): the spec's registration, the job
    record, its trace events and the root steps' messages, with the key's conflict check and the
    ``replace=False`` check, atomic with no WATCH, in one round trip. On a shard other than 0
    (MESH_SHARD), where the job's keys and the registered pipelines are two slots, the registration
    is a call of its own made first: a run refused for its key then leaves its spec registered (and when that
    call refuses a ``replace=False`` run, a key bound to another input is still the conflict answered)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.script = client.register_script(RUN_LUA)
        self.keys = keys

    def __call__(self, *, job_id: str, payload_hash: str, record: bytes, created_at: float, name: str,
                 digest: str, replace: bool, canonical: bytes | None, events: list[dict[str, Any]],
                 messages: list[tuple[str, str, bytes]], wait: tuple[int, int] | None = None,
                 keys: Keys | None = None) -> tuple[Any, int]:
        """Run the script. ``keys``: the keys of the job's shard (default: those it was made with);
        ``canonical``: the spec's JSON, None when this client stored the version
        already; ``messages``: (queue, message id, encoded message); ``wait``: (replicas, timeout_ms)
        to WAIT for after it on the same connection (MESH_REDIS_WAIT_REPLICAS). (answer, replicas
        that confirmed): the answer is 0 (created), 1 (the key's job is this run: nothing sent),
        ``b"key"`` (the key names a job of another input), ``b"pipeline:" + digest`` (replace=False
        and that digest is the newest) or ``b"spec"`` (``canonical`` None, but Redis does not hold
        that version: call again with it); only the first two wrote anything."""
        traced = [(ev["job_id"], dumps(ev)) for ev in events if isinstance(ev.get("job_id"), str)]
        args: list[Any] = [job_id, payload_hash, record, created_at, trace.TRACE_MAXLEN, WAKE_CAP, name, digest,
                           1 if replace else 0, canonical or b"", len(traced)]
        for job, event in traced:
            args += (job, event)
        for queue, message_id, data in messages:
            args += (queue, message_id, data)
        keys = self.keys if keys is None else keys
        if keys.fleet != keys.prefix:  # a shard's job: the registration first, in its own call
            registration = ["", args[1], b"", *args[3:_FIRST], 0]  # job_id "": the spec alone, no record, no event
            registered, acked = self._call([keys.fleet], registration, wait)
            if registered != 1:
                return self._key_first(job_id, payload_hash, registered, keys), acked
            args[6] = ""  # name "": registered already
        return self._call([keys.prefix], args, wait)

    def _key_first(self, job_id: str, payload_hash: str, answer: Any, keys: Keys) -> Any:
        """A shard's refused registration (``answer``): ``b"key"`` instead of a ``replace=False`` conflict when
        the key's job is bound to another input, the conflict the one script finds first on shard 0. A read
        alone: both answers write nothing."""
        if not (isinstance(answer, bytes) and answer.startswith(b"pipeline:")):
            return answer
        stored: Any = self.script.registered_client.get(keys.job(job_id))
        try:
            bound = orjson.loads(stored).get("payload_hash") if stored is not None else None
        except (orjson.JSONDecodeError, AttributeError):  # not a record: the job's call would refuse it
            return answer
        return b"key" if bound is not None and bound != payload_hash else answer

    def _call(self, keys: list[str], args: list[Any], wait: tuple[int, int] | None) -> tuple[Any, int]:
        if wait is None:
            return run_script(self.script, keys, args), 0

        def send(node: redis.Redis) -> Any:  # the WAIT on the connection of the script's writes
            pipe = WaitingPipeline(node, *wait)
            self.script(keys=keys, args=args, client=pipe)
            return *pipe.execute(), pipe.acked

        answer, acked = on_slot(self.script.registered_client, keys[0], send)
        return answer, int(acked)


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
