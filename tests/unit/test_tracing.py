"""gateway.tracing: W3C trace context in and out, spans only when exported; and where the
trace shows: outbox messages' headers (gateway.messages) and log lines (gateway.logs)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import logs, messages, tracing

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
SERVER = tracing.SpanKind.SERVER


def parts(traceparent: str) -> tuple[str, str, str, str]:
    version, trace_id, parent_id, flags = traceparent.split("-")
    return version, trace_id, parent_id, flags


@pytest.fixture
def recorded(monkeypatch):
    """Spans recorded as with an OTLP endpoint set, into memory instead."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_exporting", True)
    return exporter


# ---- reading a trace context ----------------------------------------------------------------


@pytest.mark.parametrize("value", [TRACEPARENT, TRACEPARENT.encode(), f"  {TRACEPARENT} "])
def test_a_traceparent_is_continued(value):
    with tracing.continued({"traceparent": value}, "x", SERVER):
        assert tracing.trace_id() == TRACE
        assert tracing.inject({}) == {"traceparent": TRACEPARENT}  # nothing recorded: passed on as it came


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE.upper()}-{PARENT}-01",  # ids are lowercase hex
        f"00-{TRACE}-{PARENT}-01" + "-x" * 600,  # far too long to be one
        12345,
    ],
)
def test_no_or_a_bad_traceparent_starts_a_new_trace(value):
    with tracing.continued({"traceparent": value}, "x", SERVER):
        trace_id = tracing.trace_id()
        assert trace_id is not None and trace_id != TRACE and len(trace_id) == 32
        version, injected_trace, parent_id, flags = parts(tracing.inject({})["traceparent"])
        assert (version, injected_trace) == ("00", trace_id) and parent_id != "0" * 16
        assert not int(flags, 16) & 1  # not sampled: nothing is recorded


def test_two_new_traces_differ_and_outside_any_there_is_none():
    assert tracing.trace_id() is None and tracing.inject({}) == {}
    with tracing.continued(None, "a", SERVER):
        first = tracing.trace_id()
    with tracing.continued({}, "b", SERVER):
        second = tracing.trace_id()
    assert first != second and tracing.trace_id() is None


def test_a_child_span_stays_in_the_trace_and_no_tracestate_goes_along():
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    with tracing.continued(headers, "process", tracing.SpanKind.CONSUMER):
        with tracing.span("bank capture", tracing.SpanKind.CLIENT):
            assert tracing.trace_id() == TRACE
            assert tracing.inject({"Idempotency-Key": "k"}) == {"Idempotency-Key": "k", "traceparent": TRACEPARENT}
        assert tracing.trace_id() == TRACE


# ---- a request from outside -----------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}, {}, None])
def test_a_request_starts_a_trace_of_its_own_and_names_it_in_traceresponse(headers):
    """The caller's ids are not adopted (they would name our payment's trace in our logs) and
    its tracestate goes nowhere (not to the bank)."""
    with tracing.started(headers, "POST /v1/payments", SERVER) as span:
        trace_id = tracing.trace_id()
        assert trace_id is not None and trace_id != TRACE
        with tracing.span("bank authorize", tracing.SpanKind.CLIENT):
            sent = tracing.inject({})
        assert set(sent) == {"traceparent"} and parts(sent["traceparent"])[1] == trace_id
        version, response_trace, response_span, flags = parts(tracing.traceresponse(span))
        assert (version, response_trace) == ("00", trace_id) and int(response_span, 16)
        assert not int(flags, 16) & 1  # not sampled: nothing is recorded
    assert tracing.trace_id() is None


def test_a_recorded_request_span_links_to_the_callers(recorded):
    with tracing.started({"traceparent": TRACEPARENT}, "POST /v1/payments", SERVER) as span:
        assert int(parts(tracing.traceresponse(span))[3], 16) & 1  # recorded here: sampled
    (server,) = recorded.get_finished_spans()
    assert format(server.context.trace_id, "032x") != TRACE and server.parent is None
    (link,) = server.links
    assert (format(link.context.trace_id, "032x"), format(link.context.span_id, "016x")) == (TRACE, PARENT)


# ---- exporting ------------------------------------------------------------------------------


def test_recorded_spans_nest_in_the_callers_trace(recorded):
    with tracing.continued({"traceparent": TRACEPARENT}, "POST /v1/payments", SERVER):
        server_parent = parts(tracing.inject({})["traceparent"])[2]
        with tracing.span("bank authorize", tracing.SpanKind.CLIENT):
            version, trace_id, client_parent, flags = parts(tracing.inject({})["traceparent"])
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert server_parent != PARENT and client_parent not in (PARENT, server_parent)
    client, server = recorded.get_finished_spans()
    assert (server.name, client.name) == ("POST /v1/payments", "bank authorize")
    assert format(server.parent.span_id, "016x") == PARENT and client.parent.span_id == server.context.span_id
    assert {server.context.trace_id, client.context.trace_id} == {int(TRACE, 16)}


def test_an_unsampled_caller_is_not_recorded(recorded):
    with tracing.continued({"traceparent": TRACEPARENT[:-2] + "00"}, "x", SERVER):
        assert tracing.trace_id() == TRACE
    assert recorded.get_finished_spans() == ()


def test_an_exception_is_recorded_on_its_span(recorded):
    with pytest.raises(RuntimeError), tracing.continued(None, "x", SERVER):
        raise RuntimeError("boom")
    (span,) = recorded.get_finished_spans()
    assert span.status.status_code.name == "ERROR" and span.events[0].name == "exception"


class FakeExporter:
    made: list[FakeExporter] = []

    def __init__(self):
        self.spans = []
        FakeExporter.made.append(self)

    def export(self, spans):
        self.spans += spans
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=0):
        return True


@pytest.fixture
def fake_otlp(monkeypatch):
    import opentelemetry.exporter.otlp.proto.http.trace_exporter as otlp

    FakeExporter.made = []
    monkeypatch.setattr(otlp, "OTLPSpanExporter", FakeExporter)
    monkeypatch.setattr(tracing, "BatchSpanProcessor", SimpleSpanProcessor)  # exported as each span ends
    monkeypatch.setattr(tracing, "_tracer", tracing._tracer)  # restored after the test
    monkeypatch.setattr(tracing, "_exporting", tracing._exporting)
    for name in (*tracing.ENDPOINT_VARIABLES, "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_nothing_is_exported_without_an_endpoint_variable(fake_otlp):
    tracing.setup("gateway-test")
    with tracing.continued(None, "x", SERVER) as span:
        assert not span.is_recording()
    assert not tracing.exporting() and FakeExporter.made == []


@pytest.mark.parametrize("variable", tracing.ENDPOINT_VARIABLES)
def test_an_endpoint_variable_switches_the_otlp_exporter_on(fake_otlp, variable):
    fake_otlp.setenv(variable, "http://collector.example:4318")
    tracing.setup("gateway-test")
    with tracing.continued(None, "x", SERVER) as span:
        assert span.is_recording()
    assert tracing.exporting()
    (exporter,) = FakeExporter.made
    (exported,) = exporter.spans
    assert exported.name == "x" and exported.resource.attributes["service.name"] == "gateway-test"


# ---- where the trace shows ------------------------------------------------------------------


def test_messages_written_inside_a_trace_carry_it():
    at = datetime(2030, 1, 1, tzinfo=UTC)
    outside_command = messages.command("op_1", "capture")
    outside_event = messages.event("payment.captured", {"id": "pay_1"}, at, merchant="ficmart")
    assert outside_command.headers is None and outside_event.headers == {"merchant": "ficmart"}
    with tracing.continued({"traceparent": TRACEPARENT}, "x", SERVER):
        command = messages.command("op_1", "capture")
        event = messages.event("payment.captured", {"id": "pay_1"}, at, merchant="ficmart")
    assert command.headers == {"traceparent": TRACEPARENT}
    assert event.headers == {"merchant": "ficmart", "traceparent": TRACEPARENT}


@pytest.fixture
def structlog_reset():
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_log_lines_inside_a_trace_carry_its_id(structlog_reset, capsys):
    logs.setup("info", "test-process")  # here: the standard library's handler keeps this stdout
    log = logs.get()
    log.info("outside")
    with tracing.continued({"traceparent": TRACEPARENT}, "x", SERVER):
        log.info("inside")
        logging.getLogger("some.library").warning("a library's line")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["event"], line.get("trace_id")) for line in lines] == [
        ("outside", None),
        ("inside", TRACE),
        ("a library's line", TRACE),
    ]
