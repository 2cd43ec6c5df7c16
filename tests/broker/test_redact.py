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


def test_a_secret_shorter_than_8_characters_is_refused_when_a_tool_reads_it(monkeypatch):
    from mesh.agents.context import read_secret
    from mesh.contracts import ConfigError

    monkeypatch.setenv("SHORT_TOKEN", "123456")
    with pytest.raises(ConfigError, match="SHORT_TOKEN is 6 characters long") as caught:
        read_secret("SHORT_TOKEN", None)
    assert "123456" not in str(caught.value)


def test_masking_a_log_line_never_cuts_a_number_or_breaks_its_json():
    import json
    import logging

    from mesh.ops.logs import JsonFormatter

    redact.register("12345678")  # a PIN-like secret: eight digits
    record = logging.LogRecord("t", logging.INFO, "f", 1, "sent %s", ("code 12345678",), None)
    record.count, record.nested = 123456789, {"pin 12345678": [12345678, "12345678"]}
    line = JsonFormatter().format(record)
    out = json.loads(line)
    assert out["msg"] == "sent code [secret]"
    assert out["count"] == 123456789
    assert out["nested"] == {"pin [secret]": [12345678, "[secret]"]}


def test_redact_value_masks_strings_and_keys_and_keeps_every_number():
    value = f"tok-{secrets.token_hex(8)}"
    redact.register(value)
    data = {"a": f"x{value}y", value: 1, "n": [1.5, 7, True, None], "t": (value,)}
    assert redact.redact_value(data) == {"a": "x[secret]y", "[secret]": 1, "n": [1.5, 7, True, None],
                                         "t": ["[secret]"]}


def test_a_401_body_echoing_mesh_model_api_key_is_masked_in_the_error_the_mesh_keeps():
    from mesh.agents.providers.openai import OpenAIProvider
    from mesh.broker.settings import MeshSettings
    from mesh.contracts import MeshError
    from tests.agents.openai_server import FakeOpenAI

    key = f"sk-{secrets.token_hex(16)}"
    with FakeOpenAI() as api:
        api.responder = lambda request: (401, {"error": {"message": f"Incorrect API key provided: {key}"}}, {})
        provider = OpenAIProvider(MeshSettings(model_provider="openai", model_url=api.url, model_api_key=key))
        try:
            with pytest.raises(MeshError) as caught:
                provider.research("q")
        finally:
            provider.close()
    assert key not in str(caught.value) and "[secret]" in str(caught.value)


def test_a_mesh_model_api_key_shorter_than_8_characters_is_refused():
    from mesh.agents.providers.openai import OpenAIProvider
    from mesh.broker.settings import MeshSettings
    from mesh.contracts import ConfigError

    with pytest.raises(ConfigError, match="MESH_MODEL_API_KEY is 5 characters long"):
        OpenAIProvider(MeshSettings(model_provider="openai", model_url="http://127.0.0.1:1/v1", model_api_key="sk-ab"))
