"""Exception -> failure class (+ retry-after). Pure: no Redis, no clock unless one is passed in."""

from __future__ import annotations

import datetime
import email.utils
import math
import re
import time
from collections.abc import Mapping

import dramatiq
import httpx
import pydantic
import redis
from dramatiq.middleware import TimeLimitExceeded

from mesh.contracts import (
    Brownout,
    DependencyTimeout,
    FailureClass,
    MeshError,
    PermanentFailure,
    RateLimited,
)

from .redact import redact

_TIMEOUT_STATUS = {408, 504}
_BROWNOUT_STATUS = {500, 502, 503}
_PERMANENT_STATUS = {400, 401, 403, 404, 405, 409, 410, 413, 415, 422}

#: Characters of a response body kept in the error (whitespace collapsed, secrets masked).
BODY_SNIPPET_CHARS = 200
#: Characters of the body read to make it (a huge body is not scanned whole).
BODY_READ_CHARS = 65_536
#: The longest wait a failure may name (s): a longer Retry-After or reset is read as this long.
NAMED_WAIT_MAX_S = 86_400.0


def named_wait(seconds: float | None) -> float | None:
    """A wait a failure named, as the mesh uses it: between 0 and :data:`NAMED_WAIT_MAX_S` seconds;
    None when it names none (or not a number: NaN)."""
    if seconds is None or isinstance(seconds, bool) or not isinstance(seconds, int | float) or math.isnan(seconds):
        return None
    return min(max(0.0, float(seconds)), NAMED_WAIT_MAX_S)


def classify(exc: BaseException) -> tuple[FailureClass, float | None]:
    """The failure class of ``exc`` and how many seconds to wait, when the failure names a time
    (a rate limit's Retry-After, an open breaker's reopen time)."""
    if isinstance(exc, RateLimited | Brownout):
        return exc.failure_class, named_wait(exc.retry_after_s)
    if isinstance(exc, MeshError):
        return exc.failure_class, None
    if isinstance(exc, dramatiq.Retry) and exc.delay is not None:
        # dramatiq's "retry me after at least this long": a deferral, as a named wait is.
        return FailureClass.RATE_LIMITED, max(0.0, exc.delay / 1000)
    if isinstance(exc, TimeLimitExceeded | httpx.TimeoutException):
        return FailureClass.TIMEOUT, None
    if isinstance(exc, httpx.HTTPStatusError):
        return classify(error_for_response(exc.response, dependency=exc.request.url.netloc.decode()))
    if isinstance(exc, redis.RedisError):
        # The mesh's own Redis: tools raise their dependencies' failures as mesh errors.
        return FailureClass.MESH_UNAVAILABLE, None
    if isinstance(exc, httpx.TransportError | ConnectionError):
        return FailureClass.BROWNOUT, None
    if isinstance(exc, pydantic.ValidationError):
        return FailureClass.INVALID_OUTPUT, None
    return FailureClass.UNKNOWN, None


def error_for_response(response: httpx.Response, *, dependency: str, now: float | None = None) -> MeshError:
    """The mesh error a non-success HTTP response stands for."""
    status = response.status_code
    text = f"{dependency} answered {status}"
    if snippet := body_snippet(response):
        text = f"{text}: {snippet}"
    if status == 429:
        wait = parse_retry_after(response.headers, now=now)
        if wait is None:
            wait = rate_limit_reset(response.headers, now=now)
        return RateLimited(text, retry_after_s=wait, dependency=dependency)
    if status in _TIMEOUT_STATUS:
        return DependencyTimeout(text, dependency=dependency, status=status)
    if status in _BROWNOUT_STATUS or status >= 500:
        return Brownout(text, dependency=dependency, status=status)
    if status in _PERMANENT_STATUS or 400 <= status < 500:
        return PermanentFailure(text, dependency=dependency, status=status)
    return MeshError(text, dependency=dependency, status=status)


def body_snippet(response: httpx.Response, limit: int = BODY_SNIPPET_CHARS) -> str:
    """The start of ``response``'s body, whitespace collapsed and secrets masked, at most ``limit``
    characters (an ellipsis marks a cut): what the dependency said about the failure. Empty when
    the body is empty or was never read (a streamed response)."""
    try:
        body = response.text[:BODY_READ_CHARS]
    except (httpx.ResponseNotRead, UnicodeDecodeError, LookupError):
        return ""
    # Masked before it is cut, so a cut can never leave part of a secret showing.
    text = " ".join(redact(body).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP-date; None when absent or bad.

    An HTTP-date is on the endpoint's clock, so without ``now`` it is read against the response's own
    ``Date`` (the same clock): a worker whose clock is off neither retries at once nor waits its skew
    longer. Without a usable ``Date``, this host's clock."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return named_wait(float(value))
    when = _http_date(value)
    if when is None:
        return None
    if now is None:
        now = _http_date(headers.get("date") or headers.get("Date") or "") or time.time()
    return named_wait(when - now)


_RESET_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_RESET_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def rate_limit_reset(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds until an exhausted rate limit resets: from ``x-ratelimit-remaining-*`` /
    ``x-ratelimit-reset-*`` (OpenAI's ``6m0s``, ``20ms``, or plain seconds), or Anthropic's
    ``anthropic-ratelimit-*-remaining`` / ``anthropic-ratelimit-*-reset`` (an RFC 3339 time, read
    against ``now``, else the response's ``Date``, else this host's clock): the longest reset among the
    limits with nothing remaining; None when no header says so."""
    lowered = {name.lower(): value for name, value in headers.items()}
    waits = []
    for lower, value in lowered.items():
        if lower.startswith("x-ratelimit-reset"):
            remaining = lowered.get("x-ratelimit-remaining" + lower.removeprefix("x-ratelimit-reset"))
            seconds = _reset_seconds(value.strip())
        elif lower.startswith("anthropic-ratelimit-") and lower.endswith("-reset"):
            remaining = lowered.get(lower.removesuffix("-reset") + "-remaining")
            seconds = _reset_at(value.strip(), lowered, now)
        else:
            continue
        if remaining is not None and remaining.strip() not in ("0", "0.0"):
            continue
        if seconds is not None:
            waits.append(seconds)
    return max(waits) if waits else None


def _reset_at(value: str, headers: Mapping[str, str], now: float | None) -> float | None:
    """An RFC 3339 reset time as seconds from ``now`` (the response's ``Date`` when not given: the
    endpoint's clock); None when it is not one."""
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    if now is None:
        now = _http_date(headers.get("date") or "") or time.time()
    return named_wait(when.timestamp() - now)


def _reset_seconds(value: str) -> float | None:
    try:
        seconds = float(value)
        if math.isnan(seconds):
            return None
    except ValueError:
        parts = _RESET_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        seconds = sum(float(n) * _RESET_UNIT_S[u] for n, u in parts)
    if seconds > 1e9:  # an epoch time, not a delta
        seconds -= time.time()
    return named_wait(seconds)


def _http_date(value: str) -> float | None:
    """An HTTP-date as UNIX seconds; None when it is not one (or names no time zone)."""
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() if when.tzinfo is not None else None
