"""Step spans exported over OpenTelemetry (OTLP/HTTP) for a declared pipeline whose ``tracing.provider``
is set, when MESH_OTLP_ENDPOINT names a collector and the ``otlp`` extra is installed. Otherwise the
provider is accepted and nothing is exported: the trace in Redis (``mesh trace``) is the record.

One span per step that succeeded, in the job's trace (the job's W3C trace id), named ``<pipeline>/<step>``,
from the attempt's start to its record, with a child span per model call (``chat <model>``: a tool
loop's turns each one) and per tool call (``execute_tool <tool>``) of the attempt, in the order they
happened, carrying OpenTelemetry's GenAI attributes (``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.tool.name``);
the step span's attributes name the job, step, agent, key and attempt, and the input and output as
``tracing.log_inputs`` / ``log_outputs`` allow (else their size and hash). Spans are batched and
sent by a background thread; an export that fails is logged by OpenTelemetry and never touches the step.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from mesh.contracts import Envelope

from .spec import PipelineSpec

logger = logging.getLogger(__name__)


class SpanExport:
    """The worker's exporter: :meth:`step` records a step's span; a no-op without an endpoint or the extra."""

    def __init__(self, endpoint: str | None, service: str = "mesh") -> None:
        self.endpoint = endpoint
        self._tracer: Any = None
        self._provider: Any = None
        self._lock = threading.Lock()
        self._service = service
        self._warned = False

    def _start(self) -> Any:
        """The tracer, made on first use (no thread or connection for a worker that never exports)."""
        with self._lock:
            if self._tracer is not None:
                return self._tracer
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import BatchSpanProcessor
            except ImportError:
                if not self._warned:
                    self._warned = True
                    logger.warning("MESH_OTLP_ENDPOINT is set but the otlp extra is not installed "
                                   "(pip install 'agent-mesh[otlp]'): no spans are exported")
                return None
            provider = TracerProvider(resource=Resource.create({"service.name": self._service}))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint),
                                                           schedule_delay_millis=1000))
            self._provider, self._tracer = provider, provider.get_tracer("mesh.pipelines")
            return self._tracer

    def step(self, spec: PipelineSpec | None, env: Envelope, started: float, *, input: Any = None,
             output: Any = None, calls: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        """Record the span of ``env``'s step, which started at ``started`` (UNIX s) and ended now, and
        one child span per model call and tool call the attempt made (``calls``: their trace events,
        read only when a span is exported), with OpenTelemetry's GenAI attributes."""
        if spec is None or not self.endpoint or not spec.tracing.enabled or not spec.tracing.provider:
            return
        tracer = self._start()
        if tracer is None:
            return
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        parent = SpanContext(trace_id=int(env.trace_id, 16), span_id=int(secrets.token_hex(8), 16), is_remote=True,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
        attributes: dict[str, Any] = {
            "mesh.pipeline": spec.name, "mesh.pipeline.version": spec.version, "mesh.job_id": env.job_id,
            "mesh.step_id": env.step_id, "mesh.agent": env.agent, "mesh.key": env.key, "mesh.attempt": env.attempt,
            "mesh.tracing.provider": spec.tracing.provider}
        if env.model:
            attributes["gen_ai.request.model"] = env.model
        attributes.update(_data("input", input, spec.tracing.log_inputs))
        attributes.update(_data("output", output, spec.tracing.log_outputs))
        span = tracer.start_span(f"{spec.name}/{env.step_id}", context=trace.set_span_in_context(
            NonRecordingSpan(parent)), start_time=int(started * 1e9), attributes=attributes)
        inside = trace.set_span_in_context(span)
        for event in sorted(calls() if calls is not None else [], key=lambda e: float(e.get("at") or 0)):
            named = genai_span(event)
            if named is None:
                continue
            name, attrs = named
            end = float(event.get("at") or time.time())
            child = tracer.start_span(name, context=inside, attributes=attrs,
                                      start_time=int((end - float(event.get("duration_s") or 0)) * 1e9))
            child.end(end_time=int(end * 1e9))
        span.end(end_time=time.time_ns())

    def flush(self, timeout_ms: int = 5000) -> None:
        """Send every span recorded so far (a worker stopping)."""
        if self._provider is not None:
            self._provider.force_flush(timeout_ms)

    def close(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def genai_span(event: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The name and GenAI attributes of the span of a ``model_call`` or ``tool_call`` trace event
    (None for any other event): ``chat <model>`` and ``execute_tool <tool>``, as OpenTelemetry's GenAI
    semantic conventions name them."""
    if event.get("event") == "model_call":
        attrs: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.request.model": str(event.get("model")),
                                 "gen_ai.usage.input_tokens": int(event.get("tokens_in") or 0),
                                 "gen_ai.usage.output_tokens": int(event.get("tokens_out") or 0),
                                 "mesh.outcome": str(event.get("outcome"))}
        if event.get("turn") is not None:
            attrs["mesh.turn"] = int(event["turn"])
            attrs["mesh.tools_asked"] = [str(t) for t in event.get("tools") or []]
        return f"chat {event.get('model')}", attrs
    if event.get("event") == "tool_call":
        attrs = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": str(event.get("tool")),
                 "mesh.dependency": str(event.get("dependency")),
                 "mesh.outcome": "error" if event.get("error") else "ok"}
        return f"execute_tool {event.get('tool')}", attrs
    return None


def _data(what: str, value: Any, keep: bool) -> dict[str, Any]:
    if value is None:
        return {}
    data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    if keep:
        return {f"mesh.{what}": data.decode()}
    return {f"mesh.{what}_bytes": len(data), f"mesh.{what}_sha256": hashlib.sha256(data).hexdigest()}
