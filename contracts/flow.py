"""Flow-control declarations: the rate and concurrency limits of an agent or a dependency.

    rate: {requests: 600/min, tokens: 90000/min}
    concurrency: {max: 4, key: "input.tenant"}

The same model is read from YAML (a pipeline's ``limits:``) and built by ``@app.agent(rate=...,
concurrency=...)`` / ``@app.tool(dependency=..., rate=...)``. A ``key`` is a CEL expression over the
message's input, rendered by the sender and carried as :attr:`Envelope.flow_key`; without one, one
limit serves every message. The state lives in Redis (:mod:`mesh.broker.limits`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, Field, model_validator

from .envelope import FLOW_KEY_MAX, Frozen

#: Longest key expression a declaration may hold.
KEY_EXPR_MAX = 512
#: The most messages a concurrency limit lets run at once.
MAX_CONCURRENCY = 1_000_000
#: The longest interval a rate may be written over (s), and so its slowest: one per this long.
RATE_INTERVAL_MAX_S = 86400 * 366
#: ASCII digits only (``\d`` would take any script's digits, Arabic-Indic ones too); spaces around the parts allowed.
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([0-9]+(?:\.[0-9]+)?)?\s*([a-z]+)\s*$", re.ASCII)
_PER_S = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


def parse_rate(text: str | int | float) -> tuple[float, float]:
    """``(amount, interval_s)`` of a rate written ``600/min``, ``50/s``, ``1000/10s`` or ``2/h``; a bare
    number is per second. ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError(f"a rate is written 600/min or 50/s, not {text!r}")
    if isinstance(text, int | float):
        amount, interval = float(text), 1.0
    else:
        found = _RATE.match(text.lower())
        if found is None or found.group(3) not in _PER_S:
            raise ValueError(f"a rate is written 600/min, 50/s or 1000/10s, not {str(text)[:40]!r}")
        amount = float(found.group(1))
        interval = float(found.group(2) or 1) * _PER_S[found.group(3)]
    if not 0 < amount < 1e12 or not 0 < interval <= RATE_INTERVAL_MAX_S or amount / interval < 1 / RATE_INTERVAL_MAX_S:
        raise ValueError(f"a rate is a positive amount per a positive interval of at most a year, at least one a "
                         f"year, not {text!r}")
    return amount, interval


def canonical_rate(text: str | int | float) -> str:
    """A rate as :func:`parse_rate` reads it, written one way: no spaces, lower case, a count of 1 left
    out (``' 5 / 2 S '`` is ``5/2s``, ``50`` is ``50/s``). ValueError when it is no rate."""
    parse_rate(text)
    if not isinstance(text, str):
        return f"{text:g}/s"
    found = _RATE.match(text.lower())
    assert found is not None
    amount, count, unit = found.groups()
    return f"{amount}/{'' if count in (None, '1') else count}{unit}"


def _rate_text(value: str | int | float) -> str:
    return canonical_rate(value)


#: A rate as written (``600/min``); :func:`parse_rate` reads it.
RateText = Annotated[str | int | float, AfterValidator(_rate_text)]


def per_second(text: str | None) -> float | None:
    """The rate ``text`` per second (None for None)."""
    if text is None:
        return None
    amount, interval = parse_rate(text)
    return amount / interval


class Rate(Frozen):
    """Requests and model tokens per interval; either may be left out."""

    requests: RateText | None = None
    tokens: RateText | None = None
    #: The CEL expression over the input naming the limit's key (``input.tenant``); None: one for all.
    key: str | None = Field(default=None, min_length=1, max_length=KEY_EXPR_MAX)

    @model_validator(mode="after")
    def _something(self) -> Rate:
        if self.requests is None and self.tokens is None:
            raise ValueError("a rate limits requests (requests: 600/min), tokens (tokens: 90000/min) or both")
        return self


class Concurrency(Frozen):
    """At most ``max`` messages (or calls) in flight at once, fleet-wide, per key."""

    max: int = Field(ge=1, le=MAX_CONCURRENCY)
    key: str | None = Field(default=None, min_length=1, max_length=KEY_EXPR_MAX)


class FlowLimits(Frozen):
    """An agent's or a dependency's limits: a rate, a concurrency, or both."""

    rate: Rate | None = None
    concurrency: Concurrency | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``rate: 600/min`` is ``rate: {requests: 600/min}``; ``concurrency: 4`` is ``{max: 4}``."""
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("rate"), str | int | float) and not isinstance(data.get("rate"), bool):
                data["rate"] = {"requests": data["rate"]}
            if isinstance(data.get("concurrency"), int) and not isinstance(data.get("concurrency"), bool):
                data["concurrency"] = {"max": data["concurrency"]}
        return data

    @model_validator(mode="after")
    def _one_key(self) -> FlowLimits:
        keys = {k for k in (self.rate and self.rate.key, self.concurrency and self.concurrency.key) if k}
        if len(keys) > 1:
            raise ValueError(f"a rate and a concurrency of one declaration share their key; they name {sorted(keys)}")
        if self.rate is None and self.concurrency is None:
            raise ValueError("limits declare a rate, a concurrency, or both")
        return self

    @property
    def key(self) -> str | None:
        """The key expression (the rate's or the concurrency's: they are one); None: one limit for all."""
        return (self.rate and self.rate.key) or (self.concurrency and self.concurrency.key) or None


def flow_limits(rate: Any = None, concurrency: Any = None) -> FlowLimits | None:
    """The limits ``rate=`` and ``concurrency=`` declare (each a model, a dict or the shorthand); None
    when neither is given."""
    if rate is None and concurrency is None:
        return None
    data: dict[str, Any] = {}
    for name, given in (("rate", rate), ("concurrency", concurrency)):
        if given is not None:
            data[name] = given.model_dump(exclude_none=True) if isinstance(given, Frozen) else given
    return FlowLimits.model_validate(data)


def flow_key_of(rendered: Any) -> str | None:
    """The flow key a rendered key expression gives: its text (a value that is no string: its JSON,
    keys sorted, so one map or list gives one key however its fields were ordered), or ``#`` and its
    sha256 when longer than :data:`FLOW_KEY_MAX`; None for null or empty (the one shared limit)."""
    if rendered is None:
        return None
    if isinstance(rendered, str):
        text = rendered
    else:
        try:
            text = orjson.dumps(rendered, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # no JSON (bytes, a timestamp): as Python writes it
            text = str(rendered)
    if not text:
        return None
    if len(text) > FLOW_KEY_MAX:
        return "#" + hashlib.sha256(text.encode()).hexdigest()
    return text


def flow_key(env: Any) -> str | None:
    """The flow key a message carries (an :class:`~mesh.contracts.Envelope` or its dict); None: none."""
    if isinstance(env, dict):
        value = env.get("flow_key")
        return value if isinstance(value, str) and value else None
    return getattr(env, "flow_key", None)
