"""Makes a Python process a host whose wall clock is off: with this folder on PYTHONPATH and
SKEWED_CLOCK_S set, ``time.time`` and ``time.time_ns`` (and so dramatiq's ``current_millis``) run
that many seconds ahead (negative: behind). Monotonic clocks are untouched, as on such a host.
Python imports ``sitecustomize`` at start-up, before any of the process's own code."""

from __future__ import annotations

import os
import time

_SKEW_S = float(os.environ.get("SKEWED_CLOCK_S") or 0)

if _SKEW_S:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _SKEW_S
    time.time_ns = lambda: _time_ns() + int(_SKEW_S * 1e9)
