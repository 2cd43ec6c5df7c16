"""A namespace's jobs spread over several shards (MESH_SHARDS): where a job lives, and every shard a
reader must add up.

A shard is a hash tag of its own (:func:`mesh.broker.keys.shard_prefix`): on a Redis Cluster, a slot
of its own, so the shards of a namespace spread its jobs over the cluster's primaries. A job lives in
one shard, chosen from its id (:func:`shard_of`: CRC-32 of the id, modulo the count): every key of the
job and of what runs it (its record, trace, claims, the queue messages of its steps, its dead letters)
is that shard's, so every script and transaction of a step touches one slot, as with one shard. A job's
id is fixed by its key (``job_id_for``): two sends of one key are one job, in one shard, and a reader
of a job (``mesh status ID``) finds its shard from the id alone, with no lookup.

The shards are MESH_SHARD, MESH_SHARD + 1, ... MESH_SHARD + MESH_SHARDS - 1, except that with more than
one, shard 0 holds none: they are then 1 .. MESH_SHARDS (MESH_SHARD is 0 but in tests), so no job shares the
fleet-wide keys' slot, and the tags of shards 1, 2, ... are placed to spread evenly over a cluster's slots
(:func:`mesh.broker.keys.shard_prefix`). The count is fixed per namespace: a job's
shard follows from it, so a process counting otherwise would look for jobs where they are not. The
first process to use the namespace (a worker at its start, a client at its first send) records it
(``{ns}:shards``), and a process with another count
refuses to start (:func:`check_shards`); to change it, drain the namespace first.

Workers consume every shard (ops/worker.py); readers of many jobs (``mesh jobs``, the DLQ, metrics,
approvals, waits) read each shard and add them up (:attr:`Shards.keys`).
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from mesh.contracts import ConfigError

from .keys import Keys

if TYPE_CHECKING:
    from .settings import MeshSettings


def job_id_for(key: str) -> str:
    """The same key always names the same job: sending twice cannot fork it. (``uuid5(NAMESPACE_URL,
    "mesh-key:" + key).hex``, computed without the UUID objects.)"""
    digest = bytearray(hashlib.sha1(_URL_NAMESPACE + f"mesh-key:{key}".encode()).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50
    digest[8] = digest[8] & 0x3F | 0x80
    return "job-" + digest.hex()




_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes


def shard_of(job_id: str, first: int = 0, count: int = 1) -> int:
    """The shard job ``job_id`` lives in, of ``count`` starting at ``first``: CRC-32 of its id."""
    if count == 1:
        return first
    return first + zlib.crc32(job_id.encode()) % count


@dataclass(frozen=True)
class Shards:
    """The shards of a namespace: ``count`` of them from ``first`` (MESH_SHARD, MESH_SHARDS)."""

    namespace: str
    first: int = 0
    count: int = 1
    #: each shard's keys, in shard order
    keys: tuple[Keys, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(Keys(self.namespace, self.start + i) for i in range(self.count)))

    @property
    def start(self) -> int:
        """The first shard holding jobs: ``first``, but 1 when ``first`` is 0 and there are several: shard 0
        (``{ns}``) is the fleet-wide keys' slot, and the shards from 1 have tags spread over the slots
        (:func:`mesh.broker.keys.shard_prefix`)."""
        return max(self.first, 1) if self.count > 1 else self.first

    @classmethod
    def of(cls, settings: MeshSettings) -> Shards:
        return cls(settings.namespace, settings.first_shard, settings.shards)

    @property
    def many(self) -> bool:
        """Whether there is more than one shard."""
        return self.count > 1

    @property
    def home(self) -> Keys:
        """The first shard's keys (the only one's, with one shard); their ``fleet`` is the namespace's."""
        return self.keys[0]

    def shard_of(self, job_id: str) -> int:
        return shard_of(job_id, self.start, self.count)

    def of_job(self, job_id: str) -> Keys:
        """The keys of the shard job ``job_id`` lives in."""
        return self.keys[self.shard_of(job_id) - self.start]

    def of_key(self, key: str) -> Keys:
        """The keys of the shard a claim on ``key`` (an idempotency key shared by jobs) is kept in: the
        shard of the job ``key`` names (:func:`job_id_for`), so a job sent with that key claims it in its
        own shard, and a pipeline step rendering it meets it there."""
        return self.of_job(job_id_for(key))

    @property
    def recorded(self) -> str:
        """What ``{ns}:shards`` holds for these shards."""
        return f"{self.first}+{self.count}"


def check_shards(client: redis.Redis, shards: Shards, *, record: bool = True) -> None:
    """Record the namespace's shards the first time (``record``: a worker, at its start), else check
    them (one round trip; a client records them before its first send, with the layout's check:
    MeshClient.layout_refusal): ConfigError when another process recorded
    another first shard or count (its jobs would be looked for in the wrong shards). While Redis refuses
    writes for want of memory (maxmemory, noeviction: SET refused even when NX would not write), a worker
    only checks: it starts, and waits for memory as its consumers do; a later start records them."""
    key = shards.home.shard_count
    found: Any
    if record and shards.start > shards.first and client.get(key) is None:
        refuse_held_first_shard(client, shards)
    if record:
        try:
            found = client.set(key, shards.recorded, nx=True, get=True)
        except redis.OutOfMemoryError:
            found = client.get(key)
    else:
        found = client.get(key)
    refused = shards_refusal(found, shards)
    if refused is not None:
        raise refused


def refuse_held_first_shard(client: redis.Redis, shards: Shards) -> None:
    """ConfigError when nothing is recorded yet shard ``first`` (0), which these shards leave out, holds jobs:
    a namespace a mesh before MESH_SHARDS served (one shard, no count recorded). Recording several would start
    workers that never read it: its queued jobs would never run, nor would readers find them. Before a worker
    or a client records the count (:func:`check_shards`, MeshClient.layout_refusal)."""
    held = int(client.zcard(Keys(shards.namespace, shards.first).jobs))
    if held:
        ns, key = shards.namespace, shards.home.shard_count
        raise ConfigError(f"namespace {ns} holds {held} job(s) in shard {shards.first} and records no shard count: "
                          f"a mesh before MESH_SHARDS served it with one, which MESH_SHARDS={shards.count} never "
                          f"reads. Serve it with MESH_SHARDS=1 until its jobs have ended, then record the new count "
                          f"(SET {key} {shards.recorded}) and start these workers", namespace=ns,
                          held=held, wanted=shards.recorded)


def shards_refusal(found: bytes | str | None, shards: Shards) -> ConfigError | None:
    """What :func:`check_shards` raises when ``{ns}:shards`` holds ``found`` (None: nothing recorded),
    else None: for a reader that read it in a round trip of its own (the client's first enqueue)."""
    if found is None:
        return None
    found = found.decode() if isinstance(found, bytes) else str(found)
    if found == shards.recorded:
        return None
    first, _, count = found.partition("+")
    key = shards.home.shard_count
    return ConfigError(f"namespace {shards.namespace} spreads its jobs over {count} shard(s) from shard {first} "
                       f"(MESH_SHARD={first}, MESH_SHARDS={count}); this process has MESH_SHARD={shards.first}, "
                       f"MESH_SHARDS={shards.count}: set them the same, or drain the namespace and delete "
                       f"{key} to change them", namespace=shards.namespace, recorded=found,
                       wanted=shards.recorded)
