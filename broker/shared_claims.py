"""The claim on a message key shared by jobs of several shards (MESH_SHARDS > 1).

A message's key is claimed in its job's shard (broker/idempotency.py), and that claim fences the
job's writes. Two jobs rendering one ``idempotency_key`` share its effect; with several shards they
may live in two, so each would claim the key in its own shard and both would run. So the key's
effect is claimed once more in the key's own shard (:meth:`Shards.of_key
<mesh.broker.shards.Shards.of_key>`: the shard of the job the key names, where a job sent with that
key claims it too), where every job rendering it meets:
the *shared claim*. It is taken in a call of its own (another slot on a Redis Cluster), once the
job's claim is won and before the handler runs:

- done: the effect happened (another job's step, or an earlier attempt of this one): the stored
  result is recorded on this job's step and nothing runs, as a shared key on one shard is served;
- held by a live attempt: the message waits on the delay queue (its own claim freed), as a busy
  key's duplicate does;
- free, expired or never claimed: taken with a fencing token and a lease, renewed with the job's
  claim while the handler runs, and checked with it before every effect (broker/fence.py).

A success stores the shared claim as done (with the output, kept whole whatever its size) *first*,
fenced by its token, and then writes the step and the job's claim in the job's shard. An output over
MESH_CLAIM_RESULT_BYTES is then replaced in the shared claim by a reference to that step (naming the
job's shard), as a done claim keeps a large output: never before the record holds it, since a crash
between the two writes would leave a reference to an output kept nowhere. A crash
between the two leaves the shared claim done and the job's claim held by a dead attempt: the
redelivery takes the job's claim over, finds the shared one done and records its output, running
nothing again. A refused done (the lease ran out and another attempt took the key over or finished
it: a paused worker) writes nothing: the attempt is superseded (LeaseLost), and its message comes
back to be served by the claim. A failed attempt frees the shared claim as it frees its own.

Only a key rendered from a pipeline step's ``idempotency_key`` is shared so (the envelope's
``shared_key``, set by the engine): a job's own key and a default step key (``{job key}/{agent}/{step}``)
are claimed in the job's shard alone, at no extra cost, and a job's own key's shard is the one
:meth:`~mesh.broker.shards.Shards.of_key` gives, so a step rendering it shares with that job. A rendered
key equal to another job's *default step key* is not shared across shards (that step claims it in its
job's shard). With one shard, or a key whose shard is the job's, the job's claim is the key's: nothing
more is done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from . import claims
from .claims import script_source
from .keys import Keys
from .settings import MeshSettings
from .shards import Shards

CLAIM_LUA = script_source("claim.lua")


@dataclass
class SharedClaim:
    """The claim an attempt holds (or was served by) on its key in the key's shard."""

    key: str
    #: the key's shard's keys
    keys: Keys
    owner: str
    token: int
    #: the key was done when claimed: its stored result is the attempt's output, nothing runs
    served: bool = False
    #: this attempt stored it as done
    done: bool = False
    lost: bool = field(default=False, compare=False)
    confirmed_at: float = field(default_factory=time.monotonic, compare=False)

    @property
    def claim_key(self) -> str:
        return self.keys.claim(self.key)

    @property
    def held(self) -> bool:
        """Whether the attempt holds it as a running claim (to renew, check, store or free)."""
        return not (self.served or self.done)


class SharedClaims:
    """Takes, renews, stores and frees shared claims (see the module docstring)."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.client = client
        self.shards = Shards.of(settings)
        self.shard = settings.shard
        self.script = client.register_script(CLAIM_LUA)
        self.lease_ms = int(settings.claim_lease_s * 1000)
        self.ttl_s = int(settings.dedup_ttl_s)

    def where(self, key: str, envelope: Any) -> Keys | None:
        """The shard a claim on ``key`` is shared in, when it is not this runtime's (None: the job's
        own claim is the key's: one shard, a key not rendered from an ``idempotency_key`` (a job's own,
        a default step key, which no other job renders: ``envelope``'s ``shared_key`` unset), or a key
        whose shard is the job's)."""
        if not self.shards.many or not (isinstance(envelope, dict) and envelope.get("shared_key") is True):
            return None
        keys = self.shards.of_key(key)
        return None if keys.shard == self.shard else keys

    def _call(self, keys: Keys, command: str, key: str, owner: str, *args: Any, client: Any = None) -> Any:
        return self.script(keys=[keys.stats, keys.claim(key)],
                           args=[command, self.lease_ms, self.ttl_s, owner, *args], client=client)

    def take(self, keys: Keys, key: str, owner: str) -> list[Any]:
        """claim.lua's verdict on ``key`` in shard ``keys``: ``[run, token(, kills)]``, ``[busy, token,
        ms left]`` or ``[done, token, result]``."""
        return list(self._call(keys, "claim", key, owner)[0])

    def renew(self, claim: SharedClaim, client: Any = None) -> Any:
        """Extend the lease (1), or 0: no longer the attempt's. With ``client`` (a pipeline), staged."""
        return self._call(claim.keys, "renew", claim.key, claim.owner, client=client)

    def done(self, claim: SharedClaim, result: bytes) -> bool:
        """Store the key as done with ``result``, fenced by the claim's token: False when another
        attempt holds or finished it (nothing written)."""
        if claim.done:
            return True
        ok = bool(self._call(claim.keys, "done", claim.key, claim.owner, result, claim.token))
        claim.done = ok
        claim.lost = claim.lost or not ok
        return ok

    def keep(self, claim: SharedClaim, result: bytes) -> bool:
        """Replace the result the attempt stored as done with ``result`` (a reference to the job's record,
        once that record holds the output): False when the key is not done under the claim's token."""
        return claim.done and bool(self._call(claim.keys, "keep", claim.key, claim.owner, result, claim.token))

    def release(self, claim: SharedClaim) -> bool:
        """Free the key for the next attempt (1), or 0: not the attempt's any more."""
        if not claim.held:
            return True
        return bool(self._call(claim.keys, "release", claim.key, claim.owner, claim.token))

    def done_by(self, claim: SharedClaim) -> bool:
        """Whether the attempt's own done landed (a renewal refused while it was on the wire)."""
        if claim.done:
            return True
        state = claims.read(self.client, claim.claim_key)
        return state.state == "done" and state.token == claim.token
