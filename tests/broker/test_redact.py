"""Error texts the broker keeps mask every secret value a tool read, wherever they are kept."""

from __future__ import annotations

import secrets

import pytest
from dramatiq.message import Message

from mesh.broker import redact
from mesh.broker.breaker import Breakers
from mesh.broker.mesh_broker import build_broker
from mesh.contracts import Brownout


@pytest.fixture
def secret() -> str:
    value = f"s3cret-{secrets.token_hex(12)}"
    redact.register(value)  # as a tool's read of it does
    return value


def test_a_breakers_last_error_masks_a_secret_the_failure_named(settings, rclient, secret):
    def down() -> None:
        raise Brownout(f"tickets answered 503 to Bearer {secret}", dependency="tickets:443")

    with pytest.raises(Brownout):
        Breakers(settings, rclient).call("tickets:443", down)

    [state] = Breakers(settings, rclient).list()
    assert state.last_error == "tickets answered 503 to Bearer [secret]"


def test_a_dead_letter_masks_a_secret_in_its_error_and_in_its_last_attempts_error(settings, secret):
    broker = build_broker(settings)
    try:
        message = Message(queue_name="filer", actor_name="filer", args=({"key": "k-1", "attempt": 1},), kwargs={},
                          options={})
        # As the consumer passes a rejected message's raw exception text.
        entry = broker.dead_letter_entry(message, "permanent", f"rejected: Bearer {secret}", None)
    finally:
        broker.close()
    assert secret not in entry.model_dump_json()
    assert entry.error == entry.attempts[-1].error == "rejected: Bearer [secret]"
