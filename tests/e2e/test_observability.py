"""Seeing inside the running system (issue 12): one trace per payment across the real
processes, and the metrics and health endpoints of gateway-worker and gateway-relay.

A stack of its own: its processes log at info (the relay at debug, where it writes a line
per published row), which the shared e2e stack does not.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.stack import API_KEY, HAPPY, running_stack

pytestmark = pytest.mark.timeout(240)


def _log_level(kind: str, _name: str) -> dict[str, str]:
    return {"LOG_LEVEL": "debug" if kind == "relay" else "info"}


@pytest.fixture(scope="module")
async def observed(server_urls, card_key):
    async with running_stack(server_urls, card_key, gateway_env={"LOG_LEVEL": "info"}, env_for=_log_level) as stack:
        yield stack


def new_traceparent() -> tuple[str, str]:
    trace_id = uuid.uuid4().hex
    return trace_id, f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"


async def post(stack, path: str, body: dict | None, traceparent: str | None = None) -> tuple[dict, str]:
    """The 202's body and the id of the trace the gateway started for it (its traceresponse)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": uuid.uuid4().hex}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    async with stack.http.post(f"{stack.api_url}{path}", json=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        return await resp.json(), resp.headers["traceresponse"].split("-")[1]


async def event_of(stack, payment_id: str, event_type: str) -> tuple[dict, dict]:
    """The event (body) and its AMQP headers, once it has arrived on payments.events.ficmart."""

    def find():
        return next((e for e in stack.events.of(payment_id) if e["type"] == event_type), None)

    assert await stack.events.wait_for(lambda: find() is not None, timeout=30), stack.events.of(payment_id)
    event = find()
    return event, stack.events.headers[event["event_id"]]


def header_text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def json_lines(stack, process: str, needle: str) -> list[dict]:
    """The JSON log lines of gateway-`process` (api, relay, worker) that mention `needle`."""
    found = []
    for line in stack.log_lines(needle, limit=1000):
        _name, _, text = line.partition(" ")
        try:
            parsed = json.loads(text)
        except ValueError:
            continue  # not one of our lines
        if parsed.get("process") == f"gateway-{process}":
            found.append(parsed)
    return found


async def eventually(check, timeout: float = 15.0):
    """check() until it returns something truthy (returned), or fail with its last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, result
            return result
        await asyncio.sleep(0.2)


# ---- one trace per payment ---------------------------------------------------------------------


async def test_one_trace_from_the_request_to_the_completion_event_and_every_log_line(observed):
    callers_trace, traceparent = new_traceparent()
    body = {"order_id": f"ord_{uuid.uuid4().hex[:12]}", "customer_id": "cus_trace", "amount": 4242, "currency": "USD"}
    payment, trace_id = await post(observed, "/v1/payments", {**body, "card": HAPPY}, traceparent)
    assert trace_id != callers_trace  # linked, not adopted: the caller's ids never name ours

    event, headers = await event_of(observed, payment["id"], "payment.authorized")
    assert header_text(headers["traceparent"]).split("-")[1] == trace_id
    assert header_text(headers["merchant"]) == "ficmart"

    # The worker's line for this payment, the API's access line, the relay's publish lines.
    settled = await eventually(
        lambda: [
            line
            for line in json_lines(observed, "worker", payment["id"])
            if line.get("event") == "operation settled" and line.get("payment_id") == payment["id"]
        ]
    )
    assert {line["trace_id"] for line in settled} == {trace_id}
    (access,) = [line for line in json_lines(observed, "api", trace_id) if line.get("event") == "request"]
    assert (access["route"], access["status"], access["trace_id"]) == ("/v1/payments", 202, trace_id)

    def relay_lines() -> list[dict]:
        lines = [
            line for line in json_lines(observed, "relay", trace_id) if line.get("event") == "outbox row published"
        ]
        # The event may reach our consumer before the relay has its confirm and logs the line.
        return lines if {line["exchange"] for line in lines} >= {"payments.commands", "payments.events.ficmart"} else []

    published = await eventually(relay_lines)
    assert all(line["trace_id"] == trace_id for line in published)
    assert event["event_id"] in {line["message_id"] for line in published}

    # The next request on the payment is a trace of its own, and its event carries it.
    _callers, capture_parent = new_traceparent()
    _, capture_trace = await post(observed, f"/v1/payments/{payment['id']}/capture", None, capture_parent)
    _event, headers = await event_of(observed, payment["id"], "payment.captured")
    assert header_text(headers["traceparent"]).split("-")[1] == capture_trace != trace_id
    assert not observed.log_lines(callers_trace, limit=10)


async def test_a_request_without_traceparent_starts_a_trace_that_the_event_carries(observed):
    body = {"order_id": f"ord_{uuid.uuid4().hex[:12]}", "customer_id": "cus_trace", "amount": 1717, "currency": "USD"}
    payment, started = await post(observed, "/v1/payments", {**body, "card": HAPPY})
    _event, headers = await event_of(observed, payment["id"], "payment.authorized")
    version, trace_id, parent_id, _flags = header_text(headers["traceparent"]).split("-")
    assert version == "00" and trace_id == started and int(trace_id, 16) and int(parent_id, 16)
    settled = await eventually(
        lambda: [
            line for line in json_lines(observed, "worker", payment["id"]) if line.get("event") == "operation settled"
        ]
    )
    assert settled[0]["trace_id"] == trace_id


# ---- metrics and health ---------------------------------------------------------------------------


async def scrape(stack, url: str) -> dict[tuple[str, tuple], float]:
    async with stack.http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def scrape_until(stack, url: str, name: str, timeout: float = 20.0, **labels: str) -> dict:
    """Scrape until the sample `name{labels}` is there and not 0; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(stack, url)
        if value(samples, name, **labels) or time.monotonic() > deadline:
            assert value(samples, name, **labels), (name, labels)
            return samples
        await asyncio.sleep(0.3)


async def test_worker_and_relay_serve_metrics_with_live_values_and_health(observed):
    worker_url, relay_url = observed.metrics_url("worker"), observed.metrics_url("relay")
    await observed.bank.chaos(failure_rate=1.0)  # every call fails: the quick tries, then rung 1
    try:
        body = {"order_id": f"ord_{uuid.uuid4().hex[:12]}", "customer_id": "cus_m", "amount": 999, "currency": "USD"}
        payment, _trace = await post(observed, "/v1/payments", {**body, "card": HAPPY})
        await scrape_until(observed, worker_url, "gateway_operation_retries_total", rung="1")
    finally:
        await observed.bank.chaos(failure_rate=0)
    await event_of(observed, payment["id"], "payment.authorized")

    worker = await scrape_until(observed, worker_url, "gateway_submit_to_final_seconds_count", status="authorized")
    count = "gateway_bank_request_seconds_count"
    assert value(worker, count, operation="authorize", outcome="succeeded") >= 1
    assert value(worker, count, operation="authorize", outcome="retry") >= 1
    assert value(worker, "gateway_operation_retries_total", rung="1") >= 1
    assert value(worker, "gateway_bank_requests_in_flight") == 0
    assert value(worker, "gateway_bank_circuit_open") == 0
    for gauge in ("gateway_operations_parked", "gateway_payments_flagged", "gateway_dead_letters"):
        assert value(worker, gauge) is not None, gauge
    assert value(worker, "gateway_db_pool_in_use") is not None and value(worker, "process_cpu_seconds_total") > 0

    relay = await scrape(observed, relay_url)
    assert value(relay, "gateway_relay_published_total", exchange="payments.commands") >= 1
    assert value(relay, "gateway_relay_published_total", exchange="payments.events.ficmart") >= 1
    assert value(relay, "gateway_payment_events_total", type="payment.authorized") >= 1
    assert value(relay, "gateway_relay_confirm_seconds_count") >= 2
    assert value(relay, "gateway_outbox_unsent") is not None
    assert value(relay, "gateway_outbox_oldest_unsent_seconds") is not None

    api = await scrape(observed, observed.metrics_url("api"))
    assert value(api, "gateway_db_pool_in_use") is not None and value(api, "gateway_db_pool_waiting") == 0

    for url, checks in ((worker_url, {"database", "broker", "consuming"}), (relay_url, {"database", "broker"})):
        async with observed.http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        async with observed.http.get(f"{url}/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 200 and ready["status"] == "ok" and set(ready["checks"]) == checks, ready
