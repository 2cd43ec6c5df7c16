"""Human approvals as records carry them: the exact call a person approves, and the decision.

What is approved is **the exact call**: a step's rendered input, its message key and the digest of
the spec the job runs, hashed (:func:`call_hash`). The step record keeps the :class:`Approval`
that asked (that hash, the policy in force, when it was asked) and, once decided, who decided,
when, the note and the outcome. A worker computes the hash again when the step runs: a call that
differs from the approved one (a replayed or re-rendered step) is asked again, never run.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum

import orjson
from pydantic import ConfigDict, Field

from .envelope import Frozen


class Decision(StrEnum):
    APPROVED = "approved"
    DENIED = "denied"
    #: Nobody decided before the timeout: ``on_timeout`` applied (deny, or escalate to the DLQ).
    EXPIRED = "expired"


class Approval(Frozen):
    """A step's request for approval, and its decision once there is one (extra fields kept, as
    records keep a newer release's)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    #: sha256 (hex) of the exact call asked for (:func:`call_hash`).
    hash: str
    asked_at: float
    timeout_s: float
    on_timeout: str = "deny"
    approvers: tuple[str, ...] = ()
    warn_before_s: float | None = None
    decision: Decision | None = None
    by: str | None = None
    at: float | None = None
    note: str | None = None
    #: What the run had left of its deadline when parked (s): a released step's deadline is its
    #: release plus this, so the wait does not spend it. Its token budget goes with it.
    deadline_left_s: float | None = None
    token_budget: int | None = None
    #: How many times this step was asked (a replay or a changed call asks again).
    asks: int = Field(default=1, ge=1)


def call_hash(payload: object, key: str, digest: str | None) -> str:
    """sha256 (hex) of the exact call: the rendered input (JSON, keys sorted), the key, the spec digest."""
    data = orjson.dumps({"input": payload, "key": key, "spec": digest or ""}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


#: The longest duration taken (365 days): a longer one (``99999999h``) is a typo, and past the
#: millisecond precision of the timers' scores or the platform's dates, it would merge an approval's
#: warning into its expiry, or fail ``mesh status`` with an OverflowError.
MAX_DURATION_S = 365 * 86400.0


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration written ``30s``, ``10m``, ``24h`` (also ``500ms``, ``2d``); a bare
    number is seconds. ValueError otherwise, or when it is under 1ms or over 365d (:data:`MAX_DURATION_S`)."""
    if isinstance(text, bool):
        raise ValueError(f"a duration is written 30s, 10m or 24h, not {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        found = _DURATION.match(text)
        if found is None:
            raise ValueError(f"a duration is written 30s, 10m or 24h, not {text!r}")
        seconds = float(found.group(1)) * _UNIT_S[found.group(2)]
    if not seconds > 0:  # also NaN
        raise ValueError(f"a duration must be positive, not {text!r}")
    if seconds < 0.001 or seconds > MAX_DURATION_S:  # an infinite one ('9' * 400 + 's') too
        raise ValueError(f"a duration is at least 1ms and at most 365d, not {str(text)[:40]!r}")
    return seconds


def show_duration(seconds: float) -> str:
    """``seconds`` written the way durations are read (``90s`` → ``1m30s``, ``86400`` → ``24h``)."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    parts = [(whole // 3600, "h"), (whole % 3600 // 60, "m"), (whole % 60, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n)
