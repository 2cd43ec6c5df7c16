"""A send's bytes are filled into formats encoded once per agent (broker/outbox.py ``_formats``) and its
EVALSHA packed by hiredis (broker/connection.py ``_pack``): each must give exactly what the models and
redis-py give, for payloads, keys and names that JSON escapes, ``%`` (the formats' own sign), numbers
at the edges, flow keys, priorities and budgets."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
import redis
from dramatiq.message import Message
from pydantic import BaseModel, Field

from mesh import App
from mesh.broker import MeshClient
from mesh.broker.connection import _pack
from mesh.broker.outbox import NewJobs
from mesh.contracts import ContractError, Envelope, JobRecord, LimitExceeded, StepRecord, dumps, loads

ODD_PAYLOADS: list[dict[str, Any]] = [
    {"text": "plain"},
    {"text": "é ü 漢字 🙂 \u2028\u2029 \x00\x1f \" \\ / </script>"},
    {"text": "%(key)b %s %% %(payload)b %"},
    {"n": 2**63 - 1, "m": -(2**63), "f": 1.5e300, "g": -0.0, "h": 1e-7, "t": True, "z": None},
    {"nested": {"a": [1, [2, [3, {"b": []}]]], "c": {}}, "list": [[], {}, ""]},
    {"%(now)b": "a key the formats must not fill", "mesh-slot-": "x"},
]
ODD_KEYS = ["k", "key with \"quotes\" and \\ and %(key)b", "é/ü 🙂", "k" * 512]


def job_models(*, agent: str, queue: str, version: int | None, token_budget: int | None, goal: str | None,
               priority: Any, now: float, deadline: float, step_id: str, payload: dict[str, Any], key: str,
               job_id: str, trace_id: str, payload_hash: str, flow_key: str | None, rid: str, mid: str
               ) -> tuple[JobRecord, dict[str, Any], dict[str, Any]]:
    """The record, event and message (as a dict) the models make of one job."""
    from mesh.broker import trace

    env = Envelope(key=key, job_id=job_id, step_id=step_id, agent=agent, trace_id=trace_id, deadline=deadline,
                   contract_version=version, token_budget=token_budget, priority=priority, flow_key=flow_key,
                   payload=payload).model_dump(mode="json")
    step = StepRecord(step_id=step_id, agent=agent, key=key, sent_at=now, created_at=now, updated_at=now,
                      input=payload)
    record = JobRecord(job_id=job_id, key=key, trace_id=trace_id, goal=goal, created_at=now, updated_at=now,
                       payload_hash=payload_hash, priority=priority, steps={step_id: step})
    event = trace.event("enqueued", env, at=now, queue=queue, by="client")
    message = Message(queue_name=queue, actor_name=agent, args=(env,), kwargs={},
                      options={"redis_message_id": rid}, message_id=mid, message_timestamp=int(now * 1000))
    return record, event, message.asdict()


def _model_bytes(**fields: Any) -> tuple[bytes, bytes, bytes]:
    """The record, event and message the models make of one job, encoded as the mesh encodes them."""
    record, event, message = job_models(**fields)
    return dumps(record), dumps(event), dumps(message)


@pytest.mark.parametrize("payload", ODD_PAYLOADS)
@pytest.mark.parametrize(("agent", "goal", "priority", "budget", "version", "flow_key"), [
    ("executor", None, "normal", None, None, None),
    ("a%(key)b-%s", "a goal with %(now)b, \"quotes\" and é", "high", 500, 3, "tenant \"%(x)b\" é"),
    ("low-agent", "", "low", 1, 1, "t"),
])
def test_each_job_of_a_batch_is_the_bytes_its_models_encode(payload, agent, goal, priority, budget, version,
                                                           flow_key):
    now, deadline = time.time(), time.time() + 3600.123456789
    batch = NewJobs(agent=agent, queue=agent + "-q", version=version, deadline=deadline, token_budget=budget,
                    goal=goal, now=now, max_bytes=1 << 20, max_depth=64, expected=len(ODD_KEYS), priority=priority)
    for i, key in enumerate(ODD_KEYS):
        batch.add(f"step-{i}", payload, key=key, job_id=f"job-{i}", trace_id=f"{i + 1:032x}", payload_hash=f"h{i}",
                  checked=bool(i % 2), flow_key=flow_key)
    for i, (key, job) in enumerate(zip(ODD_KEYS, batch.jobs(), strict=True)):
        job_id, bound, record, event, rid, data = job
        assert (job_id, bound) == (f"job-{i}".encode(), f"h{i}".encode() if i % 2 else b"")
        decoded = loads(data)
        assert rid.decode() == decoded["options"]["redis_message_id"]
        expected = _model_bytes(agent=agent, queue=agent + "-q", version=version, token_budget=budget, goal=goal,
                                priority=priority, now=now, deadline=deadline, step_id=f"step-{i}", payload=payload,
                                key=key, job_id=f"job-{i}", trace_id=f"{i + 1:032x}", payload_hash=f"h{i}",
                                flow_key=flow_key, rid=rid.decode(), mid=decoded["message_id"])
        assert (record, event, data) == expected


def test_a_payload_past_the_limits_is_refused_by_the_formats_as_by_the_models():
    batch = NewJobs(agent="executor", queue="executor", version=None, deadline=time.time() + 60, token_budget=None,
                    goal=None, now=time.time(), max_bytes=4096, max_depth=6)
    with pytest.raises(LimitExceeded, match="MESH_MAX_MESSAGE_BYTES"):
        batch.add("executor", {"text": "x" * 4096}, key="k", job_id="j", trace_id="1" * 32, payload_hash="h",
                  checked=False)
    with pytest.raises(LimitExceeded, match="MESH_MAX_JSON_DEPTH"):
        batch.add("executor", {"a": {"b": {"c": {"d": 1}}}}, key="k", job_id="j", trace_id="1" * 32,
                  payload_hash="h", checked=False)
    # Many brackets, shallow: within the depth (the count alone does not refuse it).
    batch.add("executor", {"a": [[] for _ in range(50)]}, key="k", job_id="j", trace_id="1" * 32, payload_hash="h",
              checked=False)
    assert len(batch.jobs()) == 1


class Aliased(BaseModel):
    model_config = {"populate_by_name": True}

    text: str = Field(alias="Text")
    count: int = 7
    inner: dict[str, Any] = Field(default_factory=lambda: {"deep": [1, {"x": "é"}]})


class Done(BaseModel):
    ok: bool = True


def test_a_sent_model_with_aliases_and_defaults_is_written_as_the_models_encode_it(client: MeshClient):
    app = App("send-bytes")

    @app.agent(name="aliased", input=Aliased, output=Done)
    def aliased(ctx: Any, input: Aliased) -> Done:
        return Done()

    sender = MeshClient(client.settings, client=client.redis, app=app)
    ref = sender.send(aliased, Aliased(text="%(key)b é", count=2**62), key="alias-%(key)b")
    raw = client.redis.get(client.keys_of(ref.id).job(ref.id))
    record = JobRecord.model_validate(loads(raw))
    assert dumps(record) == raw
    assert record.steps["aliased"].input == {"Text": "%(key)b é", "count": 2**62, "inner": {"deep": [1, {"x": "é"}]}}
    [body] = client.redis.hvals(client.keys_of(ref.id).messages("aliased"))
    message = Message.decode(body)
    assert dumps(message.asdict()) == body
    assert Envelope.model_validate(message.args[0]).model_dump(mode="json") == message.args[0]


def test_a_declared_agents_target_is_kept_until_its_app_spec_changes(client: MeshClient):
    import dataclasses

    app = App("targets")

    @app.agent(name="kept", input=Aliased, output=Done)
    def kept(ctx: Any, input: Aliased) -> Done:
        return Done()

    sender = MeshClient(client.settings, client=client.redis, app=app)
    first = sender.target("kept")
    assert sender.target("kept") is first and sender.target(kept) is sender.target(kept)
    # The app's spec replaced (as a pipeline's limits: replace it): the target is made anew from it.
    app.agents["kept"] = dataclasses.replace(app.agents["kept"], queue="kept_v2", version=2)
    again = sender.target("kept")
    assert again is not first and (again.queue, again.version) == ("kept_v2", 2)
    with pytest.raises(ContractError, match="another's"):  # the declared agent given is no longer the app's
        sender.target(kept)
    sender.app = None  # without the app, the agent given is all the client knows
    assert sender.target(kept).queue == "kept" and sender.target(kept).version == 1


class _Catalog:
    """An agent catalog (``MeshClient(app=...)``) other than an App: its specs are not frozen."""

    def __init__(self) -> None:
        import types

        self.agents = {"mutable": types.SimpleNamespace(queue="mutable", version=1, input=Aliased, output=Done)}

    @property
    def contracts(self) -> dict[str, Any]:
        return {name: (spec.input, spec.output) for name, spec in self.agents.items()}

    def stored_pipeline(self, data: Any) -> Any:
        raise NotImplementedError


def test_a_declared_agents_target_follows_its_spec_changed_in_place(client: MeshClient):
    catalog = _Catalog()
    sender = MeshClient(client.settings, client=client.redis, app=catalog)
    first = sender.target("mutable")
    assert (first.queue, first.version, first.input) == ("mutable", 1, Aliased)
    spec = catalog.agents["mutable"]
    spec.queue, spec.version, spec.input = "mutable_v2", 2, Done  # the same object, changed

    again = sender.target("mutable")
    assert (again.queue, again.version, again.input) == ("mutable_v2", 2, Done)
    assert sender.target("mutable") is again


@pytest.mark.parametrize("args", [
    ("q", 1.5, 64, 1000, b"\x00\n\xff" * 700),
    ("é 🙂", 0.1, 1e20, -3, 10**20, float("inf"), 1733491234.123456, b""),
    (bytearray(b"ab"), memoryview(b"cd"), "x y"),
])
def test_an_evalsha_is_packed_as_redis_py_packs_it(args):
    conn = redis.Redis(port=1).connection_pool.make_connection()
    command = ("EVALSHA", "a" * 40, 1, "ns", *args)
    ours, theirs = _pack(conn, command), conn._command_packer.pack(*command)
    assert b"".join(bytes(p) for p in ours) == b"".join(bytes(p) for p in theirs)


def test_an_argument_redis_py_refuses_is_refused_as_it_refuses_it():
    conn = redis.Redis(port=1).connection_pool.make_connection()
    with pytest.raises(redis.DataError):
        _pack(conn, ("EVALSHA", "a" * 40, 0, True))


def test_the_message_ids_are_uuid4_texts():
    import uuid

    batch = NewJobs(agent="executor", queue="executor", version=None, deadline=time.time() + 60, token_budget=None,
                    goal=None, now=time.time())
    batch.add("executor", {}, key="k", job_id="j", trace_id="1" * 32, payload_hash="h", checked=False)
    message = orjson.loads(batch.jobs()[0][5])
    for text in (message["message_id"], message["options"]["redis_message_id"]):
        assert str(uuid.UUID(text)) == text and uuid.UUID(text).version == 4


def test_message_ids_cut_from_the_random_hex_are_what_the_uuid4_bits_make_of_the_same_bytes(monkeypatch):
    import os

    from mesh.broker import outbox

    pool = os.urandom(16 * 300)
    monkeypatch.setattr(outbox.os, "urandom", lambda n: pool[:n])
    assert outbox.new_message_ids(300) == [outbox._uuid4_text(pool[i:i + 16]) for i in range(0, 16 * 300, 16)]
