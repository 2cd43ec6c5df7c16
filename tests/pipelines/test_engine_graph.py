"""The engine reads a spec's DAG (its order, its steps by id) once per spec object, not on every step
(mesh.agents.pipelines.engine.graph): another spec, even one of the same name or a copy, has its own."""

from __future__ import annotations

import itertools
import time

from mesh.agents.pipelines import Pipeline
from mesh.agents.pipelines.engine import Routes, Run, begin, graph
from mesh.contracts import JobRecord
from tests.pipelines.agents import jot

TRACE = "ab" * 16


def chain(*ids: str) -> Pipeline:
    pipeline = Pipeline("graph").step(ids[0], agent=jot)
    for before, sid in itertools.pairwise(ids):
        pipeline.step(sid, agent=jot, depends_on=[before])
    return pipeline


def started(spec: object) -> list[str]:
    """The steps a new run of ``spec`` sends first."""
    now = time.time()
    record = JobRecord(job_id="job-graph", key="graph", trace_id=TRACE, created_at=now, updated_at=now,
                       pipeline="graph", pipeline_digest="d", pipeline_input={"text": "x"})
    _, messages, _ = begin(spec, record, Run(trace_id=TRACE, deadline=now + 60), Routes(), now=now)  # type: ignore[arg-type]
    return [m.args[0]["step_id"] for m in messages]


def test_a_specs_graph_is_computed_once_and_never_taken_for_another_specs():
    first = chain("a", "b", "c").build()
    assert graph(first) is graph(first)
    assert graph(first).order == ("a", "b", "c") and set(graph(first).steps) == {"a", "b", "c"}
    assert graph(first).upstream()["c"] == {"a", "b"}

    other = chain("c", "b", "a").build()  # the same name, its DAG reversed
    assert graph(other) is not graph(first) and graph(other).order == ("c", "b", "a")
    assert started(first) == ["a"] and started(other) == ["c"]

    copy = first.model_copy()  # an equal spec, another object: a graph of its own, the same DAG
    assert graph(copy) is not graph(first) and graph(copy).order == graph(first).order
    assert started(first) == ["a"]  # the first spec's graph is still its own
