"""One trace per payment: W3C trace context (`traceparent`) through every process (OpenTelemetry).

    tracing.setup("gateway-worker")            once per process, before serving
    with tracing.continued(headers, "process capture", SpanKind.CONSUMER):
        ...                                    the trace of an HTTP request or an AMQP message
                                               (a new one when it carries none)
    with tracing.span("bank capture", SpanKind.CLIENT):
        tracing.inject(http_headers)           the current trace, for the next hop
    tracing.trace_id()                         the current trace id (32 hex) or None: logs

The trace lives in OpenTelemetry's context variable, so whatever runs inside a request or a
message carries it without being handed it: gateway.messages puts it into every outbox row's
headers (the relay publishes them as AMQP headers), worker.bank into each bank request,
gateway.logs into every log line.

Spans are exported only when a standard OTLP endpoint variable is set
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the exporter reads the
other OTEL_EXPORTER_OTLP_* variables itself, OTEL_TRACES_SAMPLER and OTEL_SERVICE_NAME are
honoured). Unset, nothing is recorded and nothing leaves the process: a trace that came in is
passed on unchanged (same trace id and parent id, as a hop that takes no part in tracing
does), and a new one (an API request without `traceparent`, a command without one) gets fresh
ids, unsampled. That costs a few microseconds per hop instead of a recorded span's tens.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["TRACEPARENT", "SpanKind", "continued", "exporting", "inject", "setup", "span", "trace_id"]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# A traceparent is 55 characters and a tracestate at most 512 (W3C): anything longer is not one.
_MAX_HEADER_CHARS = 1024

_propagator = TraceContextTextMapPropagator()
# Until setup(): nothing recorded, ids generated for new traces (tests run this way).
_tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer(__name__)
_exporting = False


def exporting() -> bool:
    """Spans are recorded and sent to an OTLP endpoint."""
    return _exporting


def setup(service: str) -> None:
    """This process's tracer: exporting over OTLP/HTTP when an endpoint variable is set."""
    global _tracer, _exporting
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    resource = Resource.create(attributes)
    if any(os.environ.get(name) for name in ENDPOINT_VARIABLES):
        # Imported here: the exporter pulls in requests and protobuf, which a process that
        # exports nothing does not need.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _exporting = True
    else:
        provider = TracerProvider(sampler=ALWAYS_OFF, resource=resource)
        _exporting = False
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer(__name__)


def extract(headers: Mapping[str, object] | None) -> Context | None:
    """The trace context in HTTP or AMQP headers (str or bytes values); None when there is
    none or it is malformed (the W3C propagator checks the format and refuses all-zero ids)."""
    if not headers:
        return None
    carrier = {}
    for name in (TRACEPARENT, TRACESTATE):
        value = headers.get(name)
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("ascii", "replace")
        if isinstance(value, str) and len(value) <= _MAX_HEADER_CHARS:
            carrier[name] = value
    if TRACEPARENT not in carrier:
        return None
    context = _propagator.extract(carrier)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


@contextmanager
def _current(name: str, parent: Context | None, kind: SpanKind) -> Iterator[Span]:
    if not _exporting:
        passed_on = trace.get_current_span(parent)
        if passed_on.get_span_context().is_valid:
            # Recording nothing: the trace goes on unchanged (nothing to end either).
            with trace.use_span(passed_on) as current:
                yield current
            return
    with trace.use_span(_tracer.start_span(name, context=parent, kind=kind), end_on_exit=True) as current:
        yield current


def continued(headers: Mapping[str, object] | None, name: str, kind: SpanKind) -> AbstractContextManager[Span]:
    """A span (the current one inside) continuing the trace in `headers`, or starting one."""
    return _current(name, extract(headers), kind)


def span(name: str, kind: SpanKind = SpanKind.INTERNAL) -> AbstractContextManager[Span]:
    """A child span of the current one (the current one inside); a new trace outside any."""
    return _current(name, None, kind)


def inject(headers: dict) -> dict:
    """`headers` with the current trace context added (`traceparent`, and `tracestate` when
    there is one); unchanged outside any trace."""
    _propagator.inject(headers)
    return headers


def trace_id() -> str | None:
    """The current trace id, 32 lowercase hex digits, or None outside any trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
