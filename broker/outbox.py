"""Messages staged into a Redis pipeline or transaction, in dramatiq's own format.

Staging a message next to the job-record write that caused it (one MULTI/EXEC) is the
transactional outbox: the record and the messages it implies land together or not at all.
A client's new jobs take the lean form of the same outbox: :class:`NewJobs`, one script per batch.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from typing import Any

import orjson
import redis
from dramatiq.message import Message

from mesh.contracts import Envelope, JobRecord, LimitExceeded, Priority, StepRecord, depth_exceeds, dumps

from . import lanes, trace
from .connection import run_script
from .keys import Keys

ENQUEUE_LUA = lanes.LIB + "\n" + resources.files("mesh.broker").joinpath("scripts/enqueue.lua").read_text()



def _max_length(model: Any, field: str) -> int:
    return min(m.max_length for m in model.model_fields[field].metadata if hasattr(m, "max_length"))


#: The longest key and step id an envelope takes.
_KEY_MAX, _STEP_MAX = _max_length(Envelope, "key"), _max_length(Envelope, "step_id")


def build_message(envelope: Envelope, **options: Any) -> Message:
    """The dramatiq message that carries ``envelope`` to its agent's queue."""
    return Message(
        queue_name=envelope.agent,
        actor_name=envelope.agent,
        args=(envelope.model_dump(mode="json"),),
        kwargs={},
        options={"redis_message_id": str(uuid.uuid4()), **options},
    )


def encode(message: Message) -> bytes:
    return dumps(message.asdict())


def encode_checked(message: Message, max_bytes: int, max_depth: int) -> bytes:
    """``message`` encoded; LimitExceeded when it is over ``max_bytes`` (MESH_MAX_MESSAGE_BYTES) or
    nests deeper than ``max_depth`` (MESH_MAX_JSON_DEPTH): what a worker would dead-letter unrun."""
    try:
        data = encode(message)
    except TypeError as exc:  # orjson's own recursion limit, far past any sane depth
        raise LimitExceeded(f"message nested deeper than MESH_MAX_JSON_DEPTH ({max_depth}): {exc}",
                            setting="MESH_MAX_JSON_DEPTH", limit=max_depth, size=-1) from None
    return check_limits(data, message.args, max_bytes, max_depth)


def check_limits(data: bytes, args: Any, max_bytes: int, max_depth: int) -> bytes:
    """``data`` (an encoded message whose ``args`` are given decoded) when it is within the limits;
    else LimitExceeded."""
    if len(data) > max_bytes:
        raise LimitExceeded(f"message of {len(data)} bytes is over MESH_MAX_MESSAGE_BYTES ({max_bytes})",
                            setting="MESH_MAX_MESSAGE_BYTES", limit=max_bytes, size=len(data))
    if depth_exceeds(data, args, max_depth - 1):  # args sit one level below the message
        raise LimitExceeded(f"message nested deeper than MESH_MAX_JSON_DEPTH ({max_depth})",
                            setting="MESH_MAX_JSON_DEPTH", limit=max_depth, size=-1)
    return data


#: Wake-up tokens kept per queue: enough to wake every idle consumer, never a growing list.
WAKE_CAP = 64


def stage(pipe: Any, keys: Keys, message: Message, *, wake_up: bool = True, data: bytes | None = None) -> None:
    """What dramatiq's enqueue does (store the body, push the id: on its lane, broker/lanes.py), and a
    token that wakes an idle consumer of the queue at once. Staging many, pass ``wake_up=False`` and
    call :func:`wake` once per queue with the count. ``data``: the message already encoded."""
    rid = message.options["redis_message_id"]
    pipe.hset(keys.messages(message.queue_name), rid, encode(message) if data is None else data)
    lanes.push(pipe, keys, message.queue_name, rid, message.args[0] if message.args else None)
    if wake_up:
        wake(pipe, keys, message.queue_name)


def stage_all(pipe: Any, keys: Keys, messages: Iterable[Message], encoded: Iterable[bytes] | None = None) -> None:
    """Stage ``messages`` (``encoded``: the same, already encoded) and wake up to one idle consumer
    per message, per queue, in two commands."""
    per_queue: Counter[str] = Counter()
    datas = iter(encoded) if encoded is not None else None
    for message in messages:
        stage(pipe, keys, message, wake_up=False, data=None if datas is None else next(datas))
        per_queue[message.queue_name] += 1
    for queue, n in per_queue.items():
        wake(pipe, keys, queue, n)


def wake(pipe: Any, keys: Keys, queue: str, n: int = 1) -> None:
    pipe.rpush(keys.wake(queue), *([1] * min(n, WAKE_CAP)))
    pipe.ltrim(keys.wake(queue), -WAKE_CAP, -1)


@functools.lru_cache(maxsize=256)
def _templates(agent: str, queue: str, version: int | None, token_budget: int | None,
               goal: str | None, priority: Priority = "normal"
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The envelope, job record, step record and ``enqueued`` event of a batch's jobs, dumped from their
    models (which checks every field they share) once per agent, queue, version, budget and goal, with
    placeholders for each job's own fields and zero for the times. Callers copy them, never change them."""
    blank, trace_id = "-", "1" * 32
    envelope = Envelope(key=blank, job_id=blank, step_id=blank, agent=agent, trace_id=trace_id, deadline=0.0,
                        contract_version=version, token_budget=token_budget, priority=priority,
                        payload={}).model_dump(mode="json", exclude={"payload"})  # each item's goes last
    record = JobRecord(job_id=blank, key=blank, trace_id=trace_id, goal=goal, created_at=0.0, updated_at=0.0,
                       payload_hash=blank, priority=priority).model_dump(mode="json")
    step = StepRecord(step_id=blank, agent=agent, key=blank, sent_at=0.0, created_at=0.0,
                      updated_at=0.0).model_dump(mode="json")
    event = trace.event("enqueued", envelope, at=0.0, queue=queue, by="client")
    return envelope, record, step, event


class NewJobs:
    """A batch of new jobs for one agent, each recorded with its first message and ``enqueued`` trace
    event: the transactional outbox of a client's sends, written by one script (scripts/enqueue.lua)
    that checks the batch's keys and writes everything atomically, in one round trip.

    The envelope, job and step dicts are dumped from their models once per agent (which checks the
    fields every item shares; see :func:`_templates`), given the batch's times, and copied per item
    with the item's own fields; the payload is encoded once and embedded as it is: the bytes are the
    ones the models would encode."""

    def __init__(self, *, agent: str, queue: str, version: int | None, deadline: float,
                 token_budget: int | None, goal: str | None, now: float,
                 max_bytes: int | None = None, max_depth: int | None = None, expected: int = 128,
                 priority: Priority = "normal") -> None:
        """``max_bytes`` / ``max_depth``: MESH_MAX_MESSAGE_BYTES / MESH_MAX_JSON_DEPTH, checked per
        message by :meth:`add` (LimitExceeded). ``expected``: how many messages the caller will add
        (message ids are made for that many, at most 128 at a time: one send makes two, not 256).
        ``priority``: every message's and job's (its lane of the queue: broker/lanes.py)."""
        self.max_bytes, self.max_depth = max_bytes, max_depth
        self.agent, self.queue, self.now = agent, queue, now
        now, deadline = float(now), float(deadline)
        if not math.isfinite(deadline):  # what the envelope refuses: its own validation says so
            Envelope(key="-", job_id="-", step_id="-", agent=agent, trace_id="1" * 32, deadline=deadline, payload={})
        envelope, record, step, event = _templates(agent, queue, version, token_budget, goal, priority)
        # The times are the only fields that change from batch to batch: set on copies of the dicts
        # the models dumped (a key keeps its place when its value is replaced).
        self.envelope = {**envelope, "deadline": deadline}
        self.record = {**record, "created_at": now, "updated_at": now}
        self.step = {**step, "sent_at": now, "created_at": now, "updated_at": now}
        self.event = {**event, "at": now}
        self.timestamp_ms = int(now * 1000)
        self.args: list[Any] = [queue, now, WAKE_CAP, trace.TRACE_MAXLEN]
        self.keys: list[str] = []
        #: Message ids made ahead, two per message.
        self.ids: list[str] = []
        self.expected = expected

    def add(self, step_id: str, payload: dict[str, Any], *, key: str, job_id: str, trace_id: str,
            payload_hash: str, checked: bool, flow_key: str | None = None) -> None:
        """One job and its message. ``checked``: the key was given, so it must not already name a job
        created with another payload (nor an earlier item of the batch with another one)."""
        if not key or len(key) > _KEY_MAX or not step_id or len(step_id) > _STEP_MAX or type(payload) is not dict:
            # What the templates do not cover: the envelope's own validation says what is wrong (or,
            # for a mapping that is not a dict, gives the dict).
            payload = Envelope(**{**self.envelope, "key": key, "step_id": step_id, "payload": payload}).payload
        body = orjson.Fragment(dumps(payload))
        env = {**self.envelope, "key": key, "job_id": job_id, "step_id": step_id, "trace_id": trace_id}
        if flow_key is not None:
            env["flow_key"] = flow_key
        env["payload"] = body  # last, as the model writes it: the queue scripts read what comes before it
        step = {**self.step, "step_id": step_id, "key": key, "input": body}
        record = {**self.record, "job_id": job_id, "key": key, "trace_id": trace_id, "steps": {step_id: step},
                  "payload_hash": payload_hash}
        event = {**self.event, "trace_id": trace_id, "job_id": job_id, "key": key, "step_id": step_id}
        if not self.ids:
            self.ids = new_message_ids(2 * min(128, max(1, self.expected - len(self.keys))))
        rid, mid = self.ids.pop(), self.ids.pop()
        message = {"queue_name": self.queue, "actor_name": self.agent, "args": [env], "kwargs": {},
                   "options": {"redis_message_id": rid}, "message_id": mid,
                   "message_timestamp": self.timestamp_ms}
        data = orjson.dumps(message)
        if self.max_bytes is not None and self.max_depth is not None:
            check_limits(data, [{**env, "payload": payload}], self.max_bytes, self.max_depth)
        self.args.append(b"\n".join((job_id.encode(), payload_hash.encode() if checked else b"", orjson.dumps(record),
                                      orjson.dumps(event), rid.encode(), data)))
        self.keys.append(key)

    def write(self, script: Any, keys: Keys, client: Any = None) -> Any:
        """Run the batch through ``script`` (``ENQUEUE_LUA`` registered on the client; ``client``: a
        pipeline to queue the call on instead): its answer, for :meth:`conflict`."""
        if not self.keys:
            return 0
        return script(keys=[keys.namespace], args=self.args, client=client)

    @staticmethod
    def conflict(answer: Any) -> int | None:
        """None when every job and message was written, else the index of the first item whose key
        conflicts (nothing was written)."""
        return int(answer) - 1 if answer else None


def new_message_id() -> str:
    """``str(uuid.uuid4())`` (dramatiq's message ids), without building the UUID object."""
    return _uuid4_text(os.urandom(16))


def new_message_ids(n: int) -> list[str]:
    """``n`` of :func:`new_message_id`, from one read of the system's random source."""
    pool = os.urandom(16 * n)
    return [_uuid4_text(pool[i:i + 16]) for i in range(0, 16 * n, 16)]


def _uuid4_text(random16: bytes) -> str:
    b = bytearray(random16)
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class EnqueueScript:
    """``ENQUEUE_LUA`` on a client. Loaded into Redis before its first call: redis-py's fallback for a
    script Redis does not hold sends the whole call a second time, a chunk of a thousand jobs."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.script = client.register_script(ENQUEUE_LUA)
        self.loaded = False

    def __call__(self, *, keys: list[str], args: list[Any], client: Any = None) -> Any:
        if not self.loaded:
            self.client.script_load(ENQUEUE_LUA)
            self.loaded = True
        if client is not None:  # a pipeline: it loads the script itself should Redis not hold it
            return self.script(keys=keys, args=args, client=client)
        return run_script(self.script, keys, args)


def register(client: redis.Redis) -> EnqueueScript:
    """The enqueue script of :class:`NewJobs`, for ``client``."""
    return EnqueueScript(client)
