"""The check before a tool call (mesh.broker.fence), against the real claim script: an effect always
confirms the lease in Redis; another call only once the last confirmation is older than
MESH_LEASE_CHECK_AFTER_S; a lease another owner took over is refused before anything goes out."""

from __future__ import annotations

import time

import pytest
from conftest import wait_for

from mesh.broker.fence import Fence
from mesh.broker.idempotency import Idempotency, Lease
from mesh.contracts import LeaseLost


@pytest.fixture
def mw(make_settings, rclient) -> Idempotency:
    return Idempotency(make_settings(lease_s=30, dedup_ttl_s=60), rclient)


def claimed(mw: Idempotency, key: str, owner: str) -> Lease:
    verdict, token, *_ = mw._call("claim", mw.keys.claim(key), owner)
    assert verdict == b"run"
    return Lease(key=key, claim_key=mw.keys.claim(key), owner=owner, token=int(token))


def taken_over(mw: Idempotency, lease: Lease, owner: str) -> Lease:
    """What a paused owner misses: its lease ran out and another worker claimed the key."""
    mw.client.pexpire(lease.claim_key, 1)
    wait_for(lambda: not mw.client.exists(lease.claim_key), timeout_s=5)
    return claimed(mw, lease.key, owner)


def test_the_default_check_age_is_a_quarter_of_the_lease_and_a_setting_replaces_it(make_settings):
    assert make_settings(lease_s=20).lease_check_s == 5
    assert make_settings(heartbeat_timeout_s=8).lease_check_s == 2
    assert make_settings(lease_s=20, lease_check_after_s=0).lease_check_s == 0


def test_an_effect_always_asks_redis_and_another_call_only_once_the_confirmation_is_stale(mw, make_settings):
    fence = Fence(mw.settings, mw.client)
    lease = claimed(mw, "k", "a")
    assert fence.confirm(lease, effect=True) is True
    assert fence.confirm(lease, effect=False) is False  # just confirmed
    lease.confirmed_at = time.monotonic() - mw.settings.lease_check_s
    assert fence.confirm(lease, effect=False) is True


def test_a_check_extends_the_lease_from_the_servers_clock(mw):
    fence = Fence(mw.settings, mw.client)
    lease = claimed(mw, "k", "a")
    mw.client.pexpire(lease.claim_key, 5_000)  # the claim's own key: EX is renewed with the lease
    fence.confirm(lease, effect=True)
    assert mw.client.ttl(lease.claim_key) > 5


def test_a_lease_taken_over_unnoticed_is_refused_even_when_it_looks_fresh(mw):
    fence = Fence(mw.settings, mw.client)
    stale = claimed(mw, "k", "paused")
    newer = taken_over(mw, stale, "next")
    assert newer.token > stale.token and not stale.lost  # the renewer has not seen it yet

    with pytest.raises(LeaseLost):
        fence.confirm(stale, effect=True)
    assert stale.lost
    with pytest.raises(LeaseLost):
        fence.confirm(stale, effect=False)  # lost is remembered: no second round trip needed
    assert fence.confirm(newer, effect=True) is True


def test_a_stale_non_effect_call_on_a_lease_taken_over_is_refused(mw):
    fence = Fence(mw.settings, mw.client)
    stale = claimed(mw, "k", "paused")
    taken_over(mw, stale, "next")
    stale.confirmed_at -= mw.settings.lease_check_s
    with pytest.raises(LeaseLost):
        fence.confirm(stale, effect=False)



def test_a_claim_the_fetch_made_counts_from_when_the_fetch_was_sent_not_from_when_it_was_read(mw):
    # A worker paused between sending its fetch (which claims) and reading the answer must not take
    # the claim as freshly confirmed: the next call checks it if the fetch is older than the limit.
    from dramatiq.broker import MessageProxy
    from dramatiq.message import Message

    fence = Fence(mw.settings, mw.client)
    owner = "fetcher:1"
    verdict = mw._call("claim", mw.keys.claim("k"), owner)
    message = MessageProxy(Message(queue_name="executor", actor_name="executor", args=({"key": "k"},),
                                   kwargs={}, options={}))
    sent = time.monotonic() - mw.settings.lease_check_s - 1  # the fetch went out before a pause
    mw.adopt(message, "k", owner, list(verdict), sent=sent)
    lease = message.mesh_claim.lease
    try:
        assert lease.confirmed_at == sent and fence.needs_check(lease, effect=False)
    finally:
        mw.drop_claims([message])
