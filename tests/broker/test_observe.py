"""The handler-duration histogram: two commands per observation, and the metrics still count every run."""

from __future__ import annotations

import redis

from mesh.broker import MeshClient, MeshSettings
from mesh.broker.connection import staged
from mesh.broker.observe import observe_duration
from mesh.ops.metrics import MeshCollector


def test_an_observation_stages_its_bucket_and_sum_only_and_the_metric_counts_every_run(
        settings: MeshSettings, rclient: redis.Redis):
    client = MeshClient(settings, client=rclient)
    pipe = rclient.pipeline(transaction=False)
    for seconds in (0.001, 0.02, 0.02, 400.0):
        observe_duration(pipe, client.keys, "executor", seconds)
    assert [c[0][0] for c in staged(pipe)] == ["HINCRBY", "HINCRBYFLOAT"] * 4
    pipe.execute()

    family = next(f for f in MeshCollector(client).collect() if f.name == "mesh_handler_duration_seconds")
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples if s.labels.get("agent") == "executor"}
    assert samples[("mesh_handler_duration_seconds_count", None)] == 4
    assert samples[("mesh_handler_duration_seconds_bucket", "+Inf")] == 4
    assert samples[("mesh_handler_duration_seconds_bucket", "0.025")] == 3
    assert abs(samples[("mesh_handler_duration_seconds_sum", None)] - 400.041) < 1e-9
