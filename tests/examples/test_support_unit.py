"""The support example's own tests (examples/support/test_agents.py, written with mesh.testing), run
with the suite: the ones that start an in-process worker are in the slow tier."""

from __future__ import annotations

from examples.support.test_agents import *  # noqa: F403
