"""Fence: before a tool call, the attempt's lease is known valid at that moment, not only as the
renewer last saw it.

The renewer thread confirms every lease a process holds once a third of a lease; a process paused
past its lease (SIGSTOP, a long GC, a VM frozen for migration) wakes with leases it believes valid
while another worker has taken the keys over. So a call checks the claim in Redis first: always
for a tool with an effect, and for any other when the last confirmation is older than
MESH_LEASE_CHECK_AFTER_S (default a quarter of the lease). The check is claim.lua's ``renew``:
it succeeds only while this attempt (its owner, hence its fencing token) still holds the claim,
and extends the lease from the Redis server's clock, so the call starts with a whole lease ahead.

No client-side check closes the window between the check and the request reaching the endpoint
(a pause right there); the request carries the fencing token (``X-Mesh-Fencing-Token``) so the
endpoint can refuse a token lower than one it has seen for the key. See docs/design/fencing.md.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from mesh.contracts import LeaseLost

from .claims import script_source
from .keys import Keys
from .settings import MeshSettings
from .shared_claims import SharedClaims

if TYPE_CHECKING:
    from .idempotency import Lease

logger = logging.getLogger(__name__)


class Fence:
    """Confirms an attempt's lease in Redis before it calls a tool (see the module docstring)."""

    def __init__(self, settings: MeshSettings, client: redis.Redis) -> None:
        self.client = client
        self.keys = Keys(settings.namespace, settings.shard)
        self.script = client.register_script(script_source("claim.lua"))
        self.lease_ms = int(settings.claim_lease_s * 1000)
        self.ttl_s = int(settings.dedup_ttl_s)
        self.fresh_s = settings.lease_check_s
        self.shared = SharedClaims(settings, client)

    def needs_check(self, lease: Lease, *, effect: bool) -> bool:
        """Whether a call must confirm ``lease`` in Redis first: always for an effect, else once the
        last confirmation is older than MESH_LEASE_CHECK_AFTER_S."""
        if lease.served:
            return False  # its handler runs nothing (a shared lease holds no claim)
        return effect or time.monotonic() - lease.confirmed_at >= self.fresh_s

    def confirm(self, lease: Lease, *, effect: bool) -> bool:
        """Make sure ``lease`` holds its key now: True when Redis was asked (False: fresh enough).
        Raises LeaseLost when another owner holds the key (or finished it); a Redis error propagates
        (``mesh_unavailable``: the call is not made unconfirmed)."""
        if lease.lost:
            raise LeaseLost(lease.key, lease.token)
        if not self.needs_check(lease, effect=effect):
            return False
        sent = time.monotonic()
        held: Any = self.script(keys=[self.keys.stats, lease.claim_key],
                                args=["renew", self.lease_ms, self.ttl_s, lease.owner])
        if not held:
            lease.lost = True
            logger.warning("lease lost: call refused", extra={"key": lease.key, "token": lease.token})
            raise LeaseLost(lease.key, lease.token)
        lease.confirmed_at = max(lease.confirmed_at, sent)
        claim = lease.across
        if claim is not None and claim.held:
            # The key's claim in its own shard (broker/shared_claims.py), where a paused attempt's lease
            # may have run out and another job's attempt taken the key over: confirmed too.
            if not self.shared.renew(claim):
                claim.lost = lease.lost = True
                logger.warning("shared lease lost: call refused", extra={"key": lease.key, "token": claim.token})
                raise LeaseLost(lease.key, claim.token)
            claim.confirmed_at = max(claim.confirmed_at, sent)
        return True
