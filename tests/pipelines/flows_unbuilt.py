"""A Python pipeline whose builder does not build (a bad timeout; a step declared twice), named on
the command line as ``tests.pipelines.flows_unbuilt:twice``."""

from __future__ import annotations

from mesh.agents.pipelines import Pipeline

twice = Pipeline("py-twice").step("researcher").step("researcher").step("coder", timeout_ms=-1)
