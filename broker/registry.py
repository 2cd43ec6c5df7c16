"""The agents a deployment serves, as its workers publish them: what ``mesh agents`` shows, and what a
client that does not import the app validates against.

A worker publishes each agent it serves when it starts (name, queue, contract version, input and
output JSON Schema, tools) and records itself as one of the agent's workers; on a graceful stop it
removes itself, and the agent stays published. Whether a worker is alive is read from dramatiq's
heartbeat zset, on the Redis server's clock. Plain data only: the broker does not import the agent
runtime; ``mesh.ops.worker`` builds the records from the app.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis

from mesh.contracts import ContractError, dumps, loads

from .clock import server_ms
from .keys import Keys

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError


@dataclass(frozen=True)
class PublishedAgent:
    """An agent as published: enough to route a message to it and to check a payload against it."""

    name: str
    queue: str
    version: int
    input_schema: dict[str, Any] | None
    output_schema: dict[str, Any] | None
    tools: tuple[str, ...] = ()
    description: str = ""
    app: str = ""

    def to_json(self) -> bytes:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> PublishedAgent:
        raw = loads(data)
        return cls(name=raw["name"], queue=raw["queue"], version=int(raw["version"]),
                   input_schema=raw.get("input_schema"), output_schema=raw.get("output_schema"),
                   tools=tuple(raw.get("tools", ())), description=raw.get("description", ""),
                   app=raw.get("app", ""))

    def validate_input(self, payload: Any) -> None:
        """Check ``payload`` against the published input schema; ContractError naming every bad field."""
        if self.input_schema is None:
            raise ContractError(f"agent {self.name!r} published no input schema: send it from a process that "
                                "imports its app (MeshClient(app=...))", agent=self.name)
        # Imported here: only a send by name validates, and every `mesh` command would pay for it.
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            validator = Draft202012Validator(self.input_schema)
            found = sorted(validator.iter_errors(payload), key=lambda e: [str(p) for p in e.absolute_path])
        except SchemaError as exc:
            raise ContractError(f"agent {self.name!r} published an invalid input schema: {exc.message}",
                                agent=self.name) from None
        if not found:
            return
        errors = [error for e in found for error in _located(e)]
        described = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors)
        raise ContractError(f"invalid {self.name} input: {described}", errors=errors, agent=self.name)


def _located(error: ValidationError) -> list[dict[str, Any]]:
    """A schema error located at the field it is about, as pydantic locates its own: a missing or an
    unexpected property is reported at that property, not at the object holding it."""
    path = tuple(error.absolute_path)
    instance = error.instance if isinstance(error.instance, dict) else {}
    missing = [p for p in error.validator_value if p not in instance and repr(p) in error.message] \
        if error.validator == "required" else []
    if missing:
        return [{"loc": (*path, missing[0]), "msg": "Field required", "type": "missing"}]
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = [p for p in instance if p not in known]
        if extra:
            return [{"loc": (*path, p), "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
                    for p in extra]
    return [{"loc": path, "msg": error.message, "type": str(error.validator)}]


@dataclass(frozen=True)
class ServingWorker:
    """One worker serving an agent: its label, the version it serves and its last heartbeat."""

    id: str
    label: str
    version: int | None
    published_ms: int
    #: Its last heartbeat (ms, Redis TIME); None: none yet, or it was reaped.
    heartbeat_ms: int | None
    alive: bool


@dataclass(frozen=True)
class WorkerListing:
    """One worker as ``mesh workers`` shows it: who, what it serves, since when, last heartbeat."""

    id: str
    label: str
    app: str
    agents: tuple[str, ...]
    #: When it first published (ms, Redis TIME); None: recorded by a worker from before this was kept.
    since_ms: int | None
    #: Its last heartbeat (ms, Redis TIME); None: none, or it was reaped.
    heartbeat_ms: int | None
    alive: bool
    #: The shards it consumes when several (MESH_SHARDS > 1; alive as its first one's heartbeat is fresh); else ().
    shards: tuple[int, ...] = ()


@dataclass(frozen=True)
class AgentListing:
    agent: PublishedAgent
    workers: tuple[ServingWorker, ...] = field(default_factory=tuple)
    #: The Redis server's clock when listed (ms): ages are measured against it.
    now_ms: int = 0


class AgentCatalog(Protocol):
    """What a client needs of an app (``mesh.agents.App`` is one): each agent's models, version and queue."""

    @property
    def contracts(self) -> Mapping[str, tuple[Any, Any]]: ...

    @property
    def agents(self) -> Mapping[str, Any]: ...

    def stored_pipeline(self, data: Mapping[str, Any]) -> Any:
        """A registered pipeline's stored JSON back as a spec (one with ``start`` and ``digest``)."""
        ...


class Registry:
    """Read and write the published agents of the deployment ``keys`` names."""

    def __init__(self, client: redis.Redis, keys: Keys, heartbeat_timeout_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.heartbeat_timeout_ms = int(heartbeat_timeout_s * 1000)

    def now_ms(self) -> int:
        return server_ms(self.redis)

    def publish(self, worker_id: str, label: str, agents: Iterable[PublishedAgent], *, app: str = "",
                shards: Iterable[int] = ()) -> None:
        """Publish ``agents`` and record ``worker_id`` as serving each, with a heartbeat (it is alive as
        it publishes); workers of them that stopped heartbeating long ago are pruned on the way.
        ``shards``: those the worker consumes, recorded when several (MESH_SHARDS > 1); its heartbeat is
        read in this registry's shard (the first of them), where it beats as in each of the others."""
        agents = list(agents)
        now = self.now_ms()
        self._prune([a.name for a in agents], now)
        before = self.redis.hget(self.keys.registry_workers, worker_id)
        since = (loads(before).get("since") if before else None) or now  # its first publish, kept on re-publishing
        pipe = self.redis.pipeline(transaction=True)
        for agent in agents:
            pipe.hset(self.keys.registry, agent.name, agent.to_json())
            pipe.zadd(self.keys.serving(agent.name), {worker_id: now})
        about = {"label": label, "app": app, "agents": {a.name: a.version for a in agents}, "since": since}
        if self.keys.shard:  # where its heartbeats are: the registry is the fleet's, the heartbeats its shard's
            about["shard"] = self.keys.shard
        shards = list(shards)
        if len(shards) > 1:
            about["shards"] = shards
        pipe.hset(self.keys.registry_workers, worker_id, dumps(about))
        pipe.execute()
        # The worker is alive as it publishes: listed from now on, it must not read "dead" until its
        # consumers' first fetch beats (GT: a later beat already recorded is never moved back). Its own
        # command: the heartbeats are its shard's keys, the registry the namespace's (broker/keys.py).
        self.redis.zadd(self.keys.heartbeats, {worker_id: now}, gt=True)

    def unpublish(self, worker_id: str) -> None:
        """``worker_id`` stopped: it no longer serves its agents (which stay published)."""
        raw = self.redis.hget(self.keys.registry_workers, worker_id)
        served = loads(raw).get("agents", {}) if raw else {}
        pipe = self.redis.pipeline(transaction=True)
        for name in served:
            pipe.zrem(self.keys.serving(name), worker_id)
        pipe.hdel(self.keys.registry_workers, worker_id)
        pipe.execute()

    def get(self, name: str) -> PublishedAgent | None:
        raw = self.redis.hget(self.keys.registry, name)
        return PublishedAgent.from_json(raw) if raw else None

    def agents(self) -> dict[str, PublishedAgent]:
        raw: Any = self.redis.hgetall(self.keys.registry)
        return {k.decode(): PublishedAgent.from_json(v) for k, v in sorted(raw.items())}

    def listing(self) -> list[AgentListing]:
        """Every published agent with the workers serving it and their last heartbeat."""
        agents = self.agents()
        if not agents:
            return []
        now = self.now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for name in agents:
            pipe.zrange(self.keys.serving(name), 0, -1, withscores=True)
        serving = pipe.execute()
        ids = sorted({member.decode() for members in serving for member, _ in members})
        info, beats = self._workers(ids)
        out = []
        for (name, agent), members in zip(agents.items(), serving, strict=True):
            workers = []
            for member, published in members:
                wid = member.decode()
                about = info.get(wid, {})
                beat = beats.get(wid)
                workers.append(ServingWorker(
                    id=wid, label=about.get("label", wid[:8]), version=about.get("agents", {}).get(name),
                    published_ms=int(published), heartbeat_ms=beat,
                    alive=beat is not None and now - beat <= self.heartbeat_timeout_ms))
            out.append(AgentListing(agent=agent, workers=tuple(workers), now_ms=now))
        return out

    def workers(self) -> tuple[list[WorkerListing], int]:
        """Every worker that published what it serves (a graceful stop removes it; a killed one stays,
        not alive, until a later publish prunes it), newest first, with its last heartbeat; and the
        Redis server's clock (ms) the ages are measured against. Producers heartbeat too (dramatiq
        records every process that enqueues), so the heartbeat zset alone does not say who serves."""
        raw: Any = self.redis.hgetall(self.keys.registry_workers)
        ids = sorted(k.decode() for k in raw)
        now = self.now_ms()
        _, beats = self._workers(ids)
        out = []
        for wid in ids:
            about = loads(raw[wid.encode()])
            beat = beats.get(wid)
            out.append(WorkerListing(
                id=wid, label=about.get("label", wid[:8]), app=about.get("app", ""),
                agents=tuple(sorted(about.get("agents", {}))), since_ms=about.get("since"), heartbeat_ms=beat,
                alive=beat is not None and now - beat <= self.heartbeat_timeout_ms,
                shards=tuple(int(s) for s in about.get("shards", ()))))
        out.sort(key=lambda w: (not w.alive, -(w.since_ms or 0), w.label))
        return out, now

    def _workers(self, ids: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """Per worker id: what it recorded about itself, and its last heartbeat (ms), read in the heartbeats of
        the worker's shard (``shard`` in what it recorded; 0 when absent), whatever this process's is: the
        registry is the whole fleet's. One round trip when every worker is on this process's shard."""
        if not ids:
            return {}, {}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.registry_workers, ids)
        for wid in ids:
            pipe.zscore(self.keys.heartbeats, wid)
        about, *scores = pipe.execute()
        info = {wid: loads(raw) for wid, raw in zip(ids, about, strict=True) if raw}
        found = dict(zip(ids, scores, strict=True))
        elsewhere = [(wid, shard) for wid in ids
                     if (shard := int(info.get(wid, {}).get("shard", 0) or 0)) != self.keys.shard]
        if elsewhere:
            pipe = self.redis.pipeline(transaction=False)
            for wid, shard in elsewhere:
                pipe.zscore(Keys(self.keys.namespace, shard).heartbeats, wid)
            found.update(zip((wid for wid, _ in elsewhere), pipe.execute(), strict=True))
        beats = {wid: int(score) for wid, score in found.items() if score is not None}
        return info, beats

    def _prune(self, names: list[str], now: int) -> None:
        """Drop workers of ``names`` that published over a heartbeat timeout ago and do not heartbeat:
        killed workers that never said goodbye, so the lists cannot grow without bound."""
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zrangebyscore(self.keys.serving(name), "-inf", now - self.heartbeat_timeout_ms)
        candidates = pipe.execute()
        ids = sorted({m.decode() for members in candidates for m in members})
        if not ids:
            return
        info, beats = self._workers(ids)
        dead = [wid for wid in ids if wid not in beats or now - beats[wid] > self.heartbeat_timeout_ms]
        if not dead:
            return
        pipe = self.redis.pipeline(transaction=False)
        for wid in dead:
            for name in {*names, *info.get(wid, {}).get("agents", {})}:
                pipe.zrem(self.keys.serving(name), wid)
        pipe.hdel(self.keys.registry_workers, *dead)
        pipe.execute()
