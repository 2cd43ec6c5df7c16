"""Fencing tokens only grow for a key, also once its claim has expired after the dedup window:
an endpoint that compares ``X-Mesh-Fencing-Token`` per key never sees one go backwards."""

from __future__ import annotations

import pytest
from conftest import wait_for

from mesh.broker.idempotency import Idempotency
from mesh.contracts import dumps


def claim(mw: Idempotency, key: str, owner: str) -> tuple[str, int]:
    verdict, token, *_ = mw._call("claim", mw.keys.claim(key), owner)
    return verdict.decode(), int(token)


def expire_now(mw: Idempotency, key: str) -> None:
    """What the dedup TTL (60 s at least) does in the end, done at once."""
    mw.client.pexpire(mw.keys.claim(key), 1)
    wait_for(lambda: not mw.client.exists(mw.keys.claim(key)), timeout_s=5)


@pytest.fixture
def mw(make_settings, rclient) -> Idempotency:
    return Idempotency(make_settings(lease_s=30, dedup_ttl_s=60), rclient)


def test_a_key_claimed_again_after_its_done_claim_expired_gets_a_higher_token_than_before(mw):
    assert claim(mw, "k", "a") == ("run", 1)
    assert mw._call("release", mw.keys.claim("k"), "a") == 1
    assert claim(mw, "k", "b") == ("run", 2)
    assert mw._call("done", mw.keys.claim("k"), "b", dumps({})) == 1
    expire_now(mw, "k")

    verdict, token = claim(mw, "k", "c")  # the dedup window has passed: the effect runs again
    assert verdict == "run" and token > 2


def test_a_claim_that_expired_while_held_is_claimed_again_with_a_higher_token_and_the_old_owner_is_fenced_off(mw):
    assert claim(mw, "k", "slow") == ("run", 1)
    expire_now(mw, "k")  # a handler that outlived the dedup window

    verdict, token = claim(mw, "k", "next")
    assert verdict == "run" and token > 1
    ck = mw.keys.claim("k")
    assert mw._call("renew", ck, "slow") == 0
    assert mw._call("done", ck, "slow", dumps({"stale": True})) == 0


def test_tokens_never_repeat_within_a_deployment_so_they_grow_for_every_key(mw):
    tokens = []
    for key in ("a", "b", "a", "c", "b"):
        verdict, token = claim(mw, key, f"owner-{len(tokens)}")
        assert verdict == "run"
        tokens.append(token)
        mw._call("release", mw.keys.claim(key), f"owner-{len(tokens) - 1}")
    assert tokens == sorted(set(tokens))


def test_a_claim_written_before_the_deployment_counter_existed_still_gets_a_higher_token(mw):
    # A free claim at token 41 while the deployment's counter is behind it.
    mw.client.hset(mw.keys.claim("old"), mapping={"state": "free", "token": 41})
    assert claim(mw, "old", "a") == ("run", 42)
    assert claim(mw, "fresh", "b")[1] > 42  # the counter moved past it too
