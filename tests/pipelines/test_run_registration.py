"""``mesh run FILE`` refuses to replace another registered version of its name without
``--register``, and checks it in the run's own atomic write (``MeshClient.run(replace=False)``): two
runs of different versions started together do not both register theirs as the newest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from mesh.agents.pipelines import load_pipeline
from mesh.broker import MeshClient
from mesh.broker.pipelines import PipelineConflict
from tests.pipelines.agents import app

ISSUE_FILE = Path(__file__).parent / "multi-agent-orchestration.skill.yaml"


def test_a_run_that_must_not_replace_is_refused_when_another_version_was_registered_since_it_looked(
        mesh: MeshClient) -> None:
    first = load_pipeline(ISSUE_FILE, app)
    second = load_pipeline(ISSUE_FILE.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90") + "\n", app)
    mesh.app = app
    # both runs looked: nothing registered yet, so neither would replace anything; then the first runs
    assert mesh.pipelines.versions(first.name) == (None, {})
    mesh.run(first, {"goal": "a"}, replace=False)
    with pytest.raises(PipelineConflict) as caught:
        mesh.run(second, {"goal": "b"}, replace=False)
    assert caught.value.latest == first.digest()
    latest, versions = mesh.pipelines.versions(first.name)
    assert (latest, set(versions)) == (first.digest(), {first.digest()})  # the second registered nothing
    assert mesh.run(first, {"goal": "c"}, replace=False).id  # its own version is no conflict
    mesh.run(second, {"goal": "d"})  # replace=True (the default, as before): the newest is the second's
    assert mesh.pipelines.versions(first.name)[0] == second.digest()




def test_a_client_stores_a_version_once_and_a_later_run_of_it_only_makes_it_the_newest_again(
        settings: Any, rclient: redis.Redis) -> None:
    mesh = MeshClient(settings, client=rclient, app=app)
    start, sent = mesh._run_script, []

    def noted(**kwargs: Any) -> Any:
        sent.append(kwargs["canonical"])
        return start(**kwargs)

    mesh._run_script = noted  # type: ignore[assignment]
    first = load_pipeline(ISSUE_FILE, app)
    second = load_pipeline(ISSUE_FILE.read_text().replace("ttl_minutes: 60", "ttl_minutes: 90") + "\n", app)
    mesh.run(first, {"goal": "a"})
    assert sent == [first.canonical()]  # the first run of a version stores it
    assert rclient.sismember(mesh.keys.pipelines, first.name)
    mesh.run(second, {"goal": "b"})
    assert mesh.pipelines.versions(first.name)[0] == second.digest()
    sent.clear()
    mesh.run(first, {"goal": "c"})
    # A later run of a version this client stored does not send its spec again...
    assert sent == [None]
    # ...but makes it the newest again, as every run does
    assert mesh.pipelines.versions(first.name)[0] == first.digest()
    assert set(mesh.pipelines.versions(first.name)[1]) == {first.digest(), second.digest()}
