"""The claim on a message key, phase by phase, against the real Redis: claim, busy, done,
release, takeover with a higher fencing token, renewal, and job writes fenced by the claim."""

from __future__ import annotations

import time

import pytest
from conftest import wait_for

from mesh.broker.idempotency import Idempotency, Lease
from mesh.broker.jobs import JobStore
from mesh.contracts import JobRecord, LeaseLost, StepRecord, dumps, loads


def claim(mw: Idempotency, key: str, owner: str) -> tuple[str, int, bytes | int | None]:
    verdict, token, *rest = mw._call("claim", mw.keys.claim(key), owner)
    return verdict.decode(), int(token), rest[0] if rest else None


def stat(mw: Idempotency, name: str) -> int:
    return int(mw.client.hget(mw.keys.stats, name) or 0)


@pytest.fixture
def mw(make_settings, rclient) -> Idempotency:
    return Idempotency(make_settings(lease_s=30), rclient)


def test_first_claim_runs_with_token_1_and_a_second_owner_is_told_busy_with_the_lease_left(mw):
    assert claim(mw, "k", "a")[:2] == ("run", 1)
    verdict, token, expires_in = claim(mw, "k", "b")
    assert (verdict, token) == ("busy", 1)
    assert 0 < int(expires_in) <= 30_000  # type: ignore[arg-type]


def test_the_same_owner_asking_again_keeps_its_claim_and_token(mw):
    assert claim(mw, "k", "a")[:2] == ("run", 1)
    assert claim(mw, "k", "a")[:2] == ("run", 1)  # a client retry after a lost reply


def test_done_key_answers_every_later_claim_with_the_stored_result_and_counts_duplicates(mw):
    claim(mw, "k", "a")
    assert mw._call("done", mw.keys.claim("k"), "a", dumps({"receipt": 7})) == 1
    for owner in ("b", "c"):
        verdict, token, result = claim(mw, "k", owner)
        assert (verdict, token, loads(result)) == ("done", 1, {"receipt": 7})  # type: ignore[arg-type]
    assert stat(mw, "duplicates") == 2
    assert 0 < mw.client.ttl(mw.keys.claim("k")) <= mw.ttl_s


def test_only_the_owner_can_mark_done_release_or_renew(mw):
    claim(mw, "k", "a")
    ck = mw.keys.claim("k")
    assert mw._call("done", ck, "b", dumps({})) == 0
    assert mw._call("release", ck, "b") == 0
    assert mw._call("renew", ck, "b") == 0
    assert claim(mw, "k", "b")[0] == "busy"


def test_release_frees_the_key_and_the_next_claim_gets_a_higher_token(mw):
    claim(mw, "k", "a")
    assert mw._call("release", mw.keys.claim("k"), "a") == 1
    assert claim(mw, "k", "b")[:2] == ("run", 2)
    assert stat(mw, "takeovers") == 0


def test_expired_lease_is_taken_over_with_a_higher_token_and_the_old_owner_can_no_longer_finish(
    make_settings, rclient
):
    mw = Idempotency(make_settings(lease_s=0.2), rclient)
    assert claim(mw, "k", "dead")[:2] == ("run", 1)
    assert wait_for(lambda: (c := claim(mw, "k", "alive"))[0] == "run" and c, timeout_s=5)[1] == 2
    assert stat(mw, "takeovers") == 1
    ck = mw.keys.claim("k")
    assert mw._call("done", ck, "dead", dumps({"stale": True})) == 0
    assert mw._call("done", ck, "alive", dumps({"fresh": True})) == 1
    assert loads(claim(mw, "k", "third")[2]) == {"fresh": True}  # type: ignore[arg-type]


def test_renewal_keeps_a_short_lease_alive_and_it_expires_once_renewal_stops(make_settings, rclient):
    # A lease of a second (renewed every third of it): a shorter one lapsed on a loaded machine when
    # the renewing thread was not scheduled for a lease's length, which is not what this tests.
    mw = Idempotency(make_settings(lease_s=1.0), rclient)
    claim(mw, "k", "a")
    mw._hold(Lease(key="k", claim_key=mw.keys.claim("k"), owner="a", token=1))  # starts the renewer
    end = time.monotonic() + 3.0  # three lease lengths: without renewal it would have expired
    while time.monotonic() < end:
        assert claim(mw, "k", "b")[0] == "busy"
        time.sleep(0.05)
    mw._stop.set()
    assert wait_for(lambda: (c := claim(mw, "k", "b"))[0] == "run" and c, timeout_s=5)[1] == 2


def test_job_write_fenced_by_a_lost_lease_raises_lease_lost_and_writes_nothing(mw, rclient):
    jobs = JobStore(rclient, mw.keys)
    record = JobRecord(job_id="j", key="k", trace_id="1" * 32,
                       steps={"s": StepRecord(step_id="s", agent="executor", key="k")})
    rclient.set(mw.keys.job("j"), dumps(record))
    claim(mw, "k", "a")
    lease = Lease(key="k", claim_key=mw.keys.claim("k"), owner="a", token=1)
    touched = jobs.update("j", lambda r: (r.model_copy(update={"goal": "ours"}), []), fence=lease)
    assert touched.goal == "ours"
    mw._call("release", lease.claim_key, "a")
    claim(mw, "k", "b")  # another owner holds the key now
    with pytest.raises(LeaseLost):
        jobs.update("j", lambda r: (r.model_copy(update={"goal": "stale"}), []), fence=lease)
    stored = jobs.get("j")
    assert stored is not None and stored.goal == "ours"


def test_a_claim_the_fetch_made_for_a_message_still_waiting_for_a_thread_is_never_reported_stuck(
        make_settings, rclient):
    mw = Idempotency(make_settings(stuck_after_s=0.5), rclient)
    long_ago = time.monotonic() - 60
    waiting = Lease(key="w", claim_key=mw.keys.claim("w"), owner="a", token=1, running=False, progress_at=long_ago)
    running = Lease(key="r", claim_key=mw.keys.claim("r"), owner="a", token=2, progress_at=long_ago)
    mw._flag_stuck([waiting, running])
    assert (waiting.stuck, running.stuck) == (False, True)
    assert stat(mw, "stuck") == 1
