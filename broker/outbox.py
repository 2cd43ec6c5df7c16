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

from mesh.contracts import Envelope, dumps

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


#: Wake-up tokens kept per queue: enough to wake every idle consumer, never a growing list.
WAKE_CAP = 64


def stage(pipe: Any, keys: Keys, message: Message, *, wake_up: bool = True) -> None:
    """What dramatiq's enqueue does (store the body, push the id), and a token that wakes an idle
    consumer of the queue at once. Staging many, pass ``wake_up=False`` and call :func:`wake` once
    per queue with the count."""
    rid = message.options["redis_message_id"]
    pipe.hset(keys.messages(message.queue_name), rid, encode(message))
    pipe.rpush(keys.queue(message.queue_name), rid)
    if wake_up:
        wake(pipe, keys, message.queue_name)


def stage_all(pipe: Any, keys: Keys, messages: Iterable[Message]) -> None:
    """Stage ``messages`` and wake up to one idle consumer per message, per queue, in two commands."""
    per_queue: Counter[str] = Counter()
    for message in messages:
        stage(pipe, keys, message, wake_up=False)
        per_queue[message.queue_name] += 1
    for queue, n in per_queue.items():
        wake(pipe, keys, queue, n)


def wake(pipe: Any, keys: Keys, queue: str, n: int = 1) -> None:
    pipe.rpush(keys.wake(queue), *([1] * min(n, WAKE_CAP)))
    pipe.ltrim(keys.wake(queue), -WAKE_CAP, -1)
