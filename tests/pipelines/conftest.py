"""Fixtures the pipeline tests share: in-process workers serving the tests' agents, and a client
that knows their app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mesh import MeshClient
from tests.pipelines.agents import app


@pytest.fixture
def run_workers(settings: Any) -> Iterator[Callable[[], Any]]:
    """Start an in-process worker (4 threads) serving the tests' agents; stopped at teardown."""
    from mesh.ops.worker import start_worker

    started = []

    def start() -> Any:
        worker = start_worker(settings, None, 4, app=app)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=10_000)
        worker.broker.close()


@pytest.fixture
def mesh(settings: Any, rclient: Any) -> MeshClient:
    return MeshClient(settings, client=rclient, app=app)
