"""Messages staged into a Redis pipeline or transaction, in dramatiq's own format.

Staging a message next to the job-record write that caused it (one MULTI/EXEC) is the
transactional outbox: the record and the messages it implies land together or not at all.
"""

from __future__ import annotations

import uuid
from typing import Any

from dramatiq.message import Message

from contracts import Envelope, dumps

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


def stage(pipe: Any, keys: Keys, message: Message) -> None:
    """What dramatiq's enqueue does (store the body, push the id), and a token that wakes an idle
    consumer of the queue at once."""
    rid = message.options["redis_message_id"]
    pipe.hset(keys.messages(message.queue_name), rid, encode(message))
    pipe.rpush(keys.queue(message.queue_name), rid)
    wake(pipe, keys, message.queue_name)


def wake(pipe: Any, keys: Keys, queue: str) -> None:
    pipe.rpush(keys.wake(queue), 1)
    pipe.ltrim(keys.wake(queue), -WAKE_CAP, -1)
