"""The ledger's rules for a re-run step, on a real Redis, without a worker: a call whose effect
happened is answered from the ledger, one that did not is made again, an intent without an outcome
goes to the verifier, and a call that differs from the one recorded is never made."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from mesh import App
from mesh.agents.effects import EffectCalls
from mesh.broker.ledger import Ledger, unknown_count
from mesh.contracts import Receipt
from mesh.contracts.effects import Verdict
from mesh.contracts.errors import EffectRefuted, EffectUnknown, LeaseLost


class Pay(BaseModel):
    cents: int


def declare(verify: Any = None) -> Any:
    app = App("t")

    @app.tool(verify=verify)
    def pay(ctx: Any, args: Pay) -> Receipt:
        return Receipt(tool="pay", effect_id="e1")

    return app.tools["pay"]


def calls(client: Any, attempt: int = 1) -> EffectCalls:
    return EffectCalls(Ledger(client.redis, client.keys, "job-1", "s", 60), "k-1", attempt)


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> Receipt:
        self.n += 1
        return Receipt(tool="pay", effect_id="e1", detail={"n": self.n})


def test_a_call_that_happened_is_answered_from_the_ledger_not_made_again(client):
    spec, run = declare(), Counter()
    first = calls(client).call(spec, Pay(cents=5), None, run)
    again = calls(client, 2).call(spec, Pay(cents=5), None, run)
    assert run.n == 1 and again == first and isinstance(again, Receipt)
    assert calls(client).ledger.get(1).verdict is Verdict.UNVERIFIED


def test_an_intent_without_an_outcome_and_no_verifier_is_unknown_and_never_called(client):
    spec, run = declare(), Counter()
    calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 1)  # a worker died mid-call
    with pytest.raises(EffectUnknown, match="outcome was never written; the tool has no verifier"):
        calls(client, 2).call(spec, Pay(cents=5), None, run)
    assert run.n == 0 and unknown_count(client.redis, client.keys) == 1


def test_an_intent_without_an_outcome_is_settled_by_the_verifier(client):
    spec, run = declare(verify=lambda ctx, args, result: Receipt(tool="pay", effect_id="found")), Counter()
    calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 1)
    got = calls(client, 2).call(spec, Pay(cents=5), None, run)
    assert run.n == 0 and got.effect_id == "found"
    assert calls(client).ledger.get(1).verdict is Verdict.VERIFIED


def test_a_refuted_call_is_made_again_on_the_next_attempt(client):
    def refute(ctx: Any, args: Pay, result: Any) -> bool:
        raise EffectRefuted("nothing there")

    spec, run = declare(verify=refute), Counter()
    with pytest.raises(EffectRefuted, match="nothing there"):
        calls(client).call(spec, Pay(cents=5), None, run)
    with pytest.raises(EffectRefuted):
        calls(client, 2).call(spec, Pay(cents=5), None, run)
    assert run.n == 2


def test_a_call_that_differs_from_the_recorded_one_is_not_made(client):
    spec, run = declare(), Counter()
    calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 1)
    with pytest.raises(EffectUnknown, match="differs from the call #1"):
        calls(client, 2).call(spec, Pay(cents=6), None, run)
    assert run.n == 0


def _hash(cents: int) -> str:
    from mesh.agents.effects import args_hash

    return args_hash({"cents": cents})


def test_an_intent_the_verifier_refutes_never_happened_and_is_made_now_once(client):
    spec, run = declare(verify=lambda ctx, args, result: result is not None or False), Counter()
    calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 1)  # died before the request left
    got = calls(client, 2).call(spec, Pay(cents=5), None, run)
    assert run.n == 1 and got.detail == {"n": 1}
    assert calls(client).ledger.get(1).verdict is Verdict.VERIFIED  # the new call, checked


def test_a_stale_owner_never_overwrites_the_entry_a_newer_owner_settled(client):
    spec, run = declare(verify=lambda ctx, args, result: True), Counter()
    stale = calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 1)  # paused mid-call
    calls(client, 2).call(spec, Pay(cents=5), None, run)  # the takeover settles it: verified
    with pytest.raises(LeaseLost):  # the stale owner wakes: its write is refused, and it is told so
        calls(client).ledger.outcome(stale, {"late": True}, verdict=Verdict.UNVERIFIED)
    entry = calls(client).ledger.get(1)
    assert entry is not None and (entry.verdict, entry.token, entry.outcome) == (Verdict.VERIFIED, 2, None)
    assert run.n == 0


def test_a_stale_owner_never_makes_a_call_the_newer_owner_settled_not_made(client):
    # The newer owner (token 2) found the stale one's intent refuted (it never left) and owns the
    # entry now; the stale owner (token 1), paused between its fence check and its call, wakes.
    spec, run = declare(verify=lambda ctx, args, result: False), Counter()
    calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 1)
    entry = calls(client).ledger.get(1)
    calls(client).ledger.decide(entry.model_copy(update={"token": 2}), Verdict.REFUTED, "never left")
    with pytest.raises(LeaseLost):
        calls(client, 1).call(spec, Pay(cents=5), None, run)
    assert run.n == 0
    assert calls(client).ledger.get(1).token == 2


def test_a_stale_owner_never_settles_the_call_a_newer_owner_is_making(client):
    # The newer owner (token 2) wrote its intent and its call is in flight (not arrived: the verifier
    # finds nothing yet); the stale owner (token 1) wakes and meets that intent.
    spec, run = declare(verify=lambda ctx, args, result: False), Counter()
    calls(client).ledger.intent(1, "pay", {"cents": 5}, _hash(5), "k-1", 2)
    with pytest.raises(LeaseLost):
        calls(client, 1).call(spec, Pay(cents=5), None, run)
    assert run.n == 0  # never a second call next to the newer owner's
    entry = calls(client).ledger.get(1)
    assert (entry.token, entry.verdict) == (2, None)  # the newer owner's intent, untouched
