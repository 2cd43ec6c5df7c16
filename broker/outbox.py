"""Messages staged into a Redis pipeline or transaction, in dramatiq's own format.

Staging a message next to the job-record write that caused it (one MULTI/EXEC) is the
transactional outbox: the record and the messages it implies land together or not at all.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

from dramatiq.message import Message

from mesh.contracts import Envelope, LimitExceeded, depth_exceeds, dumps

from .keys import Keys


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
    if len(data) > max_bytes:
        raise LimitExceeded(f"message of {len(data)} bytes is over MESH_MAX_MESSAGE_BYTES ({max_bytes})",
                            setting="MESH_MAX_MESSAGE_BYTES", limit=max_bytes, size=len(data))
    if depth_exceeds(data, message.args, max_depth - 1):  # args sit one level below the message
        raise LimitExceeded(f"message nested deeper than MESH_MAX_JSON_DEPTH ({max_depth})",
                            setting="MESH_MAX_JSON_DEPTH", limit=max_depth, size=-1)
    return data


#: Wake-up tokens kept per queue: enough to wake every idle consumer, never a growing list.
WAKE_CAP = 64


def stage(pipe: Any, keys: Keys, message: Message, *, wake_up: bool = True, data: bytes | None = None) -> None:
    """What dramatiq's enqueue does (store the body, push the id), and a token that wakes an idle
    consumer of the queue at once. Staging many, pass ``wake_up=False`` and call :func:`wake` once
    per queue with the count. ``data``: the message already encoded."""
    rid = message.options["redis_message_id"]
    pipe.hset(keys.messages(message.queue_name), rid, encode(message) if data is None else data)
    pipe.rpush(keys.queue(message.queue_name), rid)
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
