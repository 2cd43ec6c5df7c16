"""A pipeline registered when a step could be named ``key`` (before ``{{key}}`` named the job's key)
still reads back: listed, shown, run by name and advanced by workers; a new file is refused it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from subprocess import CompletedProcess

import orjson
import pytest

from mesh.agents.pipelines import PipelineError, load_pipeline
from mesh.agents.pipelines.engine import spec_from_json
from mesh.broker import MeshClient
from tests.pipelines.agents import app

Cli = Callable[..., CompletedProcess[str]]
APP = "tests.pipelines.agents:app"
FLOW = """
name: old
steps:
  - id: {first}
    agent: researcher
  - id: coder
    depends_on: [{first}]
    gate: {first}.confidence > 0.1
"""


def registered_before(mesh: MeshClient) -> str:
    """Register, as an older version stored it, a spec with a step named ``key``; its digest."""
    spec = load_pipeline(FLOW.format(first="keyed"), app)
    raw = orjson.dumps(orjson.loads(spec.canonical())).replace(b'"keyed', b'"key')
    digest = hashlib.sha256(raw).hexdigest()
    mesh.pipelines.register("old", digest, raw)
    return digest


def test_a_spec_registered_with_a_step_named_key_still_reads_back(mesh: MeshClient, cli: Cli) -> None:
    digest = registered_before(mesh)
    spec = spec_from_json(mesh.pipelines.get("old")[1])
    assert [s.id for s in spec.steps] == ["key", "coder"] and spec.digest() == digest
    listed = cli("pipeline", "list")
    assert listed.returncode == 0 and "old" in listed.stdout, listed.stderr
    shown = cli("pipeline", "show", "old")
    assert shown.returncode == 0 and shown.stdout.startswith(f"old 1  digest {digest[:12]}"), shown.stderr
    ran = cli("run", "old", "--app", APP, "--input", '{"goal": "g"}')
    assert ran.returncode == 0, ran.stderr
    with pytest.raises(PipelineError) as caught:  # a new file may not name a step so
        load_pipeline(FLOW.format(first="key"), app)
    assert "step id 'key' is reserved" in str(caught.value)
