"""The envelope every message of the mesh travels in."""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

SCHEMA_VERSION = 1

#: A message's place in its agent's queue: ``high`` is fetched before ``normal``, ``normal`` before
#: ``low``, and every level below the highest waiting one is still given one fetch in eight
#: (broker/scripts/lanes_lib.lua), so no level starves.
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
#: Longest flow key an envelope carries (:func:`mesh.contracts.flow.flow_key_of` hashes a longer one).
FLOW_KEY_MAX = 128


def new_trace_id() -> str:
    """A W3C trace id: 32 lowercase hex digits, not all zero."""
    return secrets.token_hex(16)


def traceparent(trace_id: str) -> str:
    """A W3C ``traceparent`` header value for a fresh span of ``trace_id``."""
    return f"00-{trace_id}-{secrets.token_hex(8)}-01"


def child_key(key: str, agent: str, step: str) -> str:
    """Downstream keys derive from the upstream key, so a re-sent hop reproduces them."""
    return f"{key}/{agent}/{step}"


class Frozen(BaseModel):
    """Base of every contract: immutable, and unknown fields are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Envelope(Frozen):
    """Delivery metadata around an agent's typed payload."""

    key: str = Field(min_length=1, max_length=512)
    job_id: str = Field(min_length=1, max_length=128)
    step_id: str = Field(min_length=1, max_length=128)
    agent: str = Field(min_length=1, max_length=64)
    trace_id: str
    #: Finite: an infinite deadline never comes, and NaN compares false with every time (never past).
    deadline: float = Field(allow_inf_nan=False, description="absolute UNIX time in seconds; the budget carried "
                                                             "across hops")
    hops: tuple[str, ...] = ()
    attempt: int = Field(default=1, ge=1)
    schema_version: int = SCHEMA_VERSION
    #: The agent's contract version the payload was written for; None: unchecked (not known to the sender).
    contract_version: int | None = Field(default=None, ge=1)
    replay_of: str | None = None
    #: Model tokens the whole job may spend (every step, every attempt); None: no budget.
    token_budget: int | None = Field(default=None, ge=1)
    #: This step's retry budget (a pipeline step's ``retry_policy.max_attempts`` - 1); None: the agent's.
    #: On the envelope, not the message options, so retries and DLQ replays keep it.
    max_retries: int | None = Field(default=None, ge=0)
    #: This step's wait between attempts (a pipeline step's ``retry_policy.backoff``); None: exponential.
    backoff: Literal["exponential", "fixed", "none"] | None = None
    #: This step may be re-run harmlessly (a pipeline step's ``idempotent: true``): a timed-out attempt is
    #: retried within ``max_retries`` like other retried failures; False: the agent's ``timeout_retries``.
    idempotent: bool = False
    #: The model this step's ``ctx.model.complete`` calls use (a pipeline step's ``model``); None: MESH_MODEL_NAME.
    model: str | None = None
    #: The message's priority level within its agent's queue (kept by retries, replays and recovery);
    #: left out of the encoded envelope when normal. Before ``payload``: the queue scripts read it (and
    #: ``flow_key``) from the encoded message without decoding it.
    priority: Priority = "normal"
    #: The rendered key of the agent's flow limits (``concurrency: {key: "input.tenant"}``), written by
    #: the sender; None: one limit for every message of the agent (see docs/guides/limits.md).
    flow_key: str | None = Field(default=None, min_length=1, max_length=FLOW_KEY_MAX)
    #: The key was rendered from a pipeline step's ``idempotency_key``, so jobs of other shards may share it:
    #: with several shards (MESH_SHARDS) its claim is also taken in the shard of the job the key names
    #: (broker/shared_claims.py). False (a job's own key, a default step key): the job's claim is the key's.
    #: Left out of the encoded envelope when False.
    shared_key: bool = False
    payload: dict[str, Any]

    @field_validator("trace_id")
    @classmethod
    def _w3c_trace_id(cls, value: str) -> str:
        if not _TRACE_ID.match(value) or value == "0" * 32:
            raise ValueError("trace_id must be 32 lowercase hex digits, not all zero")
        return value

    @model_serializer(mode="wrap")
    def _without_absent_flow_key(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A message without a flow key, of normal priority, is written as before these fields existed:
        # a worker of an earlier release (which refuses unknown fields) still reads it during a
        # rolling deploy, and the default message is no longer than it was.
        data: dict[str, Any] = handler(self)
        if data.get("flow_key", ...) is None:
            data.pop("flow_key", None)
        if data.get("priority") == "normal":
            data.pop("priority", None)
        if data.get("shared_key") is False:
            data.pop("shared_key", None)
        return data

    def remaining_s(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)
