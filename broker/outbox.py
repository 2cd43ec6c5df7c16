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
from .connection import HeldConnection, may_hold, run_script
from .keys import Keys

#: lanes_lib.lua wrapped in a function the script calls only for a batch that is not plain (its
#: definitions cost each call of the script, a tenth of it, when run before it as the other scripts do).
ENQUEUE_LUA = ("local function lanes_lib()\n" + lanes.LIB + "\nreturn lane_of, lane_push\nend\n"
               + resources.files("mesh.broker").joinpath("scripts/enqueue.lua").read_text())



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


#: Message object id -> (the message, its bytes): messages encoded when their limits were checked
#: (:func:`encode_checked`), whose staging takes those bytes rather than encoding them again. A message is
#: frozen and nothing changes its envelope or options once built; each entry goes when it is staged, and
#: all of them past _ENCODED_MAX.
_ENCODED: dict[int, tuple[Message, bytes]] = {}
_ENCODED_MAX = 1024


def encode_checked(message: Message, max_bytes: int, max_depth: int) -> bytes:
    """``message`` encoded; LimitExceeded when it is over ``max_bytes`` (MESH_MAX_MESSAGE_BYTES) or
    nests deeper than ``max_depth`` (MESH_MAX_JSON_DEPTH): what a worker would dead-letter unrun. The bytes
    are kept for the message's staging (:func:`stage`)."""
    try:
        data = encode(message)
    except TypeError as exc:  # orjson's own recursion limit, far past any sane depth
        raise LimitExceeded(f"message nested deeper than MESH_MAX_JSON_DEPTH ({max_depth}): {exc}",
                            setting="MESH_MAX_JSON_DEPTH", limit=max_depth, size=-1) from None
    data = check_limits(data, message.args, max_bytes, max_depth)
    if len(_ENCODED) >= _ENCODED_MAX:
        _ENCODED.clear()
    _ENCODED[id(message)] = (message, data)
    return data


def _encoded(message: Message) -> bytes:
    """``message``'s bytes: those :func:`encode_checked` kept of this very message, else encoded now."""
    kept = _ENCODED.pop(id(message), None)
    return kept[1] if kept is not None and kept[0] is message else encode(message)


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
    pipe.hset(keys.messages(message.queue_name), rid, _encoded(message) if data is None else data)
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
                       payload_hash=blank, priority=priority).model_dump(mode="json", exclude_none=True)
    step = StepRecord(step_id=blank, agent=agent, key=blank, sent_at=0.0, created_at=0.0,
                      updated_at=0.0).model_dump(mode="json", exclude_none=True)  # as dumps stores records
    event = trace.event("enqueued", envelope, at=0.0, queue=queue, by="client")
    return envelope, record, step, event


#: The slots of :func:`_formats` (``%(slot)b``), each filled with the JSON of its field: the batch's
#: times (``now``, the ``deadline``, the message's ``ts``), then each job's own fields.
_SLOTS = ("now", "deadline", "ts", "key", "job_id", "step_id", "trace_id", "flow_key", "payload", "payload_hash",
          "rid", "mid")


@functools.lru_cache(maxsize=256)
def _formats(agent: str, queue: str, version: int | None, token_budget: int | None, goal: str | None,
             priority: Priority, flow: bool) -> tuple[bytes, bytes, bytes]:
    """The message, job record and ``enqueued`` event of :class:`NewJobs`, as bytes formats
    (``format % {b"key": ..., ...}``): the dicts of :func:`_templates`, given each field a job fills
    exactly as :meth:`NewJobs.add` did on copies of them, encoded by orjson once with a marker string
    in each of those fields, then each marker (quoted) made a ``%(slot)b``. Filled with each field's
    own encoding (``orjson.dumps(value)``, the payload's :func:`dumps`), a format gives the bytes
    orjson gives for the filled dict. ``flow``: the envelope carries a flow key."""
    envelope, record, step, event = _templates(agent, queue, version, token_budget, goal, priority)
    marker = "mesh-slot-" + os.urandom(12).hex() + ":"
    slot = {name: marker + name for name in _SLOTS}
    env = {**envelope, "deadline": slot["deadline"], "key": slot["key"], "job_id": slot["job_id"],
           "step_id": slot["step_id"], "trace_id": slot["trace_id"]}
    if flow:
        env["flow_key"] = slot["flow_key"]
    env["payload"] = slot["payload"]
    message = {"queue_name": queue, "actor_name": agent, "args": [env], "kwargs": {},
               "options": {"redis_message_id": slot["rid"]}, "message_id": slot["mid"],
               "message_timestamp": slot["ts"]}
    stepped = {**step, "sent_at": slot["now"], "created_at": slot["now"], "updated_at": slot["now"],
               "step_id": slot["step_id"], "key": slot["key"], "input": slot["payload"]}
    job = {**record, "created_at": slot["now"], "updated_at": slot["now"], "job_id": slot["job_id"],
           "key": slot["key"], "trace_id": slot["trace_id"], "steps": {slot["step_id"]: stepped},
           "payload_hash": slot["payload_hash"]}
    ev = {**event, "at": slot["now"], "trace_id": slot["trace_id"], "job_id": slot["job_id"], "key": slot["key"],
          "step_id": slot["step_id"]}

    def compile(value: Any) -> bytes:
        text = orjson.dumps(value).replace(b"%", b"%%")
        for name, mark in slot.items():
            text = text.replace(orjson.dumps(mark), b"%(" + name.encode() + b")b")
        if marker.encode() in text:  # pragma: no cover - a marker orjson did not write as given
            raise AssertionError("a slot of the enqueue formats was not replaced")
        return text

    return compile(message), compile(job), compile(ev)


#: Where the jobs' arguments of scripts/enqueue.lua start, and how many each job has.
_FIRST, _WIDTH = 5, 6


class NewJobs:
    """A batch of new jobs for one agent, each recorded with its first message and ``enqueued`` trace
    event: the transactional outbox of a client's sends, written by one script (scripts/enqueue.lua)
    that checks the batch's keys and writes everything atomically, in one round trip.

    The envelope, job and step dicts are dumped from their models once per agent (which checks the
    fields every item shares; see :func:`_templates`) and encoded once into bytes formats with a slot
    per field a job fills (:func:`_formats`); a batch fills in its times, each job its own fields,
    each field encoded as orjson encodes it in the dict: the bytes are the ones the models would
    encode (tests/broker/test_client.py checks them against the models)."""

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
        self._spec = (agent, queue, version, token_budget, goal, priority)
        self._deadline = deadline
        self.timestamp_ms = int(now * 1000)
        self._times = (orjson.dumps(now), orjson.dumps(deadline), orjson.dumps(self.timestamp_ms))
        #: The script's arguments (scripts/enqueue.lua): the batch's, then six per job. The fifth,
        #: ``plain``, says every message goes on the queue's list (normal, no flow key): cleared by
        #: the first item with a flow key.
        self.args: list[Any] = [queue, now, WAKE_CAP, trace.TRACE_MAXLEN, b"1" if priority == "normal" else b""]
        self.keys: list[str] = []
        #: Message ids made ahead, two per message.
        self.ids: list[str] = []
        self.expected = expected

    @property
    def envelope(self) -> dict[str, Any]:
        """The envelope every message shares (the item's fields aside): what a payload the formats
        cannot take is checked with, and what the depth of a message is measured on."""
        return {**_templates(*self._spec)[0], "deadline": self._deadline}

    def add(self, step_id: str, payload: dict[str, Any], *, key: str, job_id: str, trace_id: str,
            payload_hash: str, checked: bool, flow_key: str | None = None) -> None:
        """One job and its message. ``checked``: the key was given, so it must not already name a job
        created with another payload (nor an earlier item of the batch with another one)."""
        if not key or len(key) > _KEY_MAX or not step_id or len(step_id) > _STEP_MAX or type(payload) is not dict:
            # What the formats do not cover: the envelope's own validation says what is wrong (or,
            # for a mapping that is not a dict, gives the dict).
            payload = Envelope(**{**self.envelope, "key": key, "step_id": step_id, "payload": payload}).payload
        body = dumps(payload)
        if not self.ids:
            wanted = 2 * min(128, max(1, self.expected - len(self.keys)))
            self.ids = new_message_ids(wanted) if wanted > 2 else spare_message_ids()
        rid, mid = self.ids.pop(), self.ids.pop()
        message, record, event = _formats(*self._spec, flow_key is not None)
        quoted, (now, deadline, ts) = orjson.dumps, self._times
        fields = {b"now": now, b"deadline": deadline, b"ts": ts, b"key": quoted(key), b"job_id": quoted(job_id),
                  b"step_id": quoted(step_id),
                  b"trace_id": quoted(trace_id), b"payload": body, b"payload_hash": quoted(payload_hash),
                  b"rid": quoted(rid), b"mid": quoted(mid)}
        if flow_key is not None:
            fields[b"flow_key"] = quoted(flow_key)
        data = message % fields
        if self.max_bytes is not None and self.max_depth is not None and (
                len(data) > self.max_bytes or data.count(b"[") + data.count(b"{") > self.max_depth - 1):
            check_limits(data, [{**self.envelope, "payload": payload}], self.max_bytes, self.max_depth)
        if flow_key:  # an empty flow key is none (lanes_lib.lua's lane_of)
            self.args[4] = b""
        self.args += (job_id.encode(), payload_hash.encode() if checked else b"", record % fields, event % fields,
                      rid.encode(), data)
        self.keys.append(key)

    def jobs(self) -> list[tuple[Any, ...]]:
        """Each job's six arguments of the script: job id, payload hash (empty when unchecked), record,
        ``enqueued`` event, message id and message."""
        items = self.args[_FIRST:]
        return [tuple(items[i:i + _WIDTH]) for i in range(0, len(items), _WIDTH)]

    def write(self, script: Any, keys: Keys, client: Any = None) -> Any:
        """Run the batch through ``script`` (``ENQUEUE_LUA`` registered on the client; ``client``: a
        pipeline to queue the call on instead): its answer, for :meth:`conflict`."""
        if not self.keys:
            return 0
        return script(keys=[keys.prefix], args=self.args, client=client)

    @staticmethod
    def conflict(answer: Any) -> int | None:
        """None when every job and message was written, else the index of the first item whose key
        conflicts (nothing was written)."""
        return int(answer) - 1 if answer else None


def new_message_id() -> str:
    """``str(uuid.uuid4())`` (dramatiq's message ids), without building the UUID object."""
    return _uuid4_text(os.urandom(16))


#: Message ids made ahead for single sends (a read of the random source per send is a system call):
#: taken two at a time by :func:`spare_message_ids` (``list.pop`` is atomic, so threads never share
#: one), and dropped in a forked child, which must not use the ids its parent will.
_SPARE: list[str] = []
os.register_at_fork(after_in_child=_SPARE.clear)


def spare_message_ids() -> list[str]:
    """Two message ids (a send's), from ids made ahead 64 at a time."""
    out: list[str] = []
    while len(out) < 2:
        try:
            out.append(_SPARE.pop())
        except IndexError:
            _SPARE.extend(new_message_ids(64))
    return out


def new_message_ids(n: int) -> list[str]:
    """``n`` of :func:`new_message_id`, from one read of the system's random source, cut from its hex:
    the version digit written as 4 and the variant digit's top two bits as 10 (what :func:`_uuid4_text`
    sets on the bytes)."""
    h, v = os.urandom(16 * n).hex(), _VARIANT
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-{v[h[i + 16]]}{h[i + 17:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * n, 32)]


#: A hex digit with its top two bits made 10 (a UUID's variant).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


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
        #: The connection the client's sends go on (a pooled client's, unless its pool is one whose
        #: connections are few and shared: connection.may_keep).
        self.held = HeldConnection(client) if may_hold(client) else None

    def __call__(self, *, keys: list[str], args: list[Any], client: Any = None) -> Any:
        if not self.loaded:
            self.client.script_load(ENQUEUE_LUA)
            self.loaded = True
        if client is not None:  # a pipeline: it loads the script itself should Redis not hold it
            return self.script(keys=keys, args=args, client=client)
        return run_script(self.script, keys, args, self.held)


def register(client: redis.Redis) -> EnqueueScript:
    """The enqueue script of :class:`NewJobs`, for ``client``."""
    return EnqueueScript(client)
