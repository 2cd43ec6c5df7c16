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


def stage(pipe: Any, keys: Keys, message: Message) -> None:
    """Two commands, exactly what dramatiq's enqueue does: store the body, push the id."""
    rid = message.options["redis_message_id"]
    pipe.hset(keys.messages(message.queue_name), rid, encode(message))
    pipe.rpush(keys.queue(message.queue_name), rid)
