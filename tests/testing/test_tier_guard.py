"""A TestMesh starts a worker: the fast tier refuses it (tests/tier.py), and the refused start
leaves nothing behind."""

from __future__ import annotations

import pytest

from examples.quickstart.app import app
from mesh.broker.keys import Keys
from mesh.testing import TestMesh
from tests.conftest import redis_client
from tests.tier import NeedsSlowMarker


def test_a_test_mesh_in_an_unmarked_test_is_refused_and_leaves_no_key_or_folder(redis_url: str) -> None:
    mesh = TestMesh(app, secrets={"UNUSED_SECRET": "a-secret-value"}, redis_url=redis_url)
    with pytest.raises(NeedsSlowMarker, match=r"mark it @pytest\.mark\.slow"):
        mesh.start()
    assert mesh.settings is not None
    client = redis_client(redis_url)
    assert [k for pattern in Keys(mesh.settings.namespace).patterns for k in client.scan_iter(match=pattern)] == []
    assert mesh._secrets_dir is not None and not mesh._secrets_dir.exists()
