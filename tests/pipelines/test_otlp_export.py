"""``tracing.provider`` with MESH_OTLP_ENDPOINT exports each succeeded step as an OpenTelemetry span
(OTLP/HTTP) in the job's trace, to a loopback collector that records what it is sent. A pipeline
without a provider exports nothing, and so does a worker without an endpoint."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh.agents.pipelines import Pipeline, check
from mesh.agents.pipelines.export import SpanExport
from mesh.contracts import Envelope, State, new_trace_id
from tests.conftest import wait_for
from tests.pipelines.agents import app

pytest.importorskip("opentelemetry.exporter.otlp.proto.http",
                    reason="the otlp extra is not installed (pip install 'agent-mesh[otlp]')")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class Collector:
    """An OTLP/HTTP receiver on a loopback port: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of_job(self, job_id: str) -> dict[str, Any]:
        return {s.name: s for s in self.spans if attrs(s).get("mesh.job_id") == job_id}


def attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value or v.int_value or v.bool_value
    return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.shutdown()
    c.server.server_close()


@pytest.fixture
def settings(make_settings: Any, collector: Collector) -> Any:
    return make_settings(otlp_endpoint=collector.url)


def traced(provider: str | None) -> Any:
    return check(Pipeline("otlp-demo").step("researcher").step("coder", depends_on=["researcher"])
                 .tracing(provider=provider, log_outputs=True).build(), app)


def test_a_pipeline_with_a_provider_exports_a_span_per_step_in_the_jobs_trace(mesh, run_workers, collector):
    run_workers()
    silent = mesh.wait(mesh.run(traced(None), {"goal": "quiet"}).id, timeout_s=30)
    ref = mesh.run(traced("langfuse"), {"goal": "g", "confidence": 0.7})
    record = mesh.wait(ref.id, timeout_s=30)
    assert silent.state is State.SUCCEEDED and record.state is State.SUCCEEDED, record.error

    spans = wait_for(lambda: len(s := collector.of_job(ref.id)) == 2 and s, timeout_s=30)
    assert set(spans) == {"otlp-demo/researcher", "otlp-demo/coder"}
    coder = spans["otlp-demo/coder"]
    assert coder.trace_id == bytes.fromhex(record.trace_id)
    assert coder.end_time_unix_nano >= coder.start_time_unix_nano > 0
    a = attrs(coder)
    assert a["mesh.step_id"] == "coder" and a["mesh.key"] == record.steps["coder"].key
    assert a["mesh.tracing.provider"] == "langfuse"
    assert '"confidence":0.7' in a["mesh.output"]  # log_outputs: true
    assert "mesh.input_sha256" in a and "mesh.input" not in a  # log_inputs: false
    assert collector.of_job(silent.job_id) == {}  # no provider: nothing exported, before or with these


def test_without_an_endpoint_nothing_is_made_or_sent():
    export = SpanExport(None)
    env = Envelope(key="k", job_id="j", step_id="researcher", agent="researcher", trace_id=new_trace_id(),
                   deadline=2e9, payload={})
    export.step(traced("langfuse"), env, 0.0, output={})
    assert export._tracer is None and export._provider is None
