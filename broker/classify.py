"""Exception -> failure class (+ retry-after). Pure: no Redis, no clock unless one is passed in."""

from __future__ import annotations

import email.utils
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


def classify(exc: BaseException) -> tuple[FailureClass, float | None]:
    """The failure class of ``exc`` and how many seconds to wait, when the failure names a time
    (a rate limit's Retry-After, an open breaker's reopen time)."""
    if isinstance(exc, RateLimited | Brownout):
        return exc.failure_class, exc.retry_after_s
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
        return RateLimited(text, retry_after_s=wait if wait is not None else rate_limit_reset(response.headers),
                           dependency=dependency)
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
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    if now is None:
        now = _http_date(headers.get("date") or headers.get("Date") or "") or time.time()
    return max(0.0, when - now)


_RESET_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_RESET_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def rate_limit_reset(headers: Mapping[str, str]) -> float | None:
    """Seconds until an exhausted rate limit resets, from ``x-ratelimit-remaining-*`` /
    ``x-ratelimit-reset-*`` (OpenAI's ``6m0s``, ``20ms``, or plain seconds): the longest reset among
    the limits with nothing remaining; None when no header says so."""
    waits = []
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith("x-ratelimit-reset"):
            continue
        remaining = headers.get("x-ratelimit-remaining" + lower.removeprefix("x-ratelimit-reset"))
        if remaining is not None and remaining.strip() not in ("0", "0.0"):
            continue
        seconds = _reset_seconds(value.strip())
        if seconds is not None:
            waits.append(seconds)
    return max(waits) if waits else None


def _reset_seconds(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        parts = _RESET_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        seconds = sum(float(n) * _RESET_UNIT_S[u] for n, u in parts)
    if seconds > 1e9:  # an epoch time, not a delta
        seconds -= time.time()
    return min(max(0.0, seconds), 86400.0)


def _http_date(value: str) -> float | None:
    """An HTTP-date as UNIX seconds; None when it is not one (or names no time zone)."""
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() if when.tzinfo is not None else None
