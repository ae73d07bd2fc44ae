"""worker.metrics and the bank client's instrumentation: what each family counts, by which
labels, and that label children are made once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from gateway import tracing
from gateway.domain import BankOutcome, OperationKind
from gateway.messages import COMMANDS_EXCHANGE, events_exchange
from gateway.timefmt import iso
from tests.unit.test_bank_client import APPROVED, AUTH_URL, BANK, _Mock
from worker.bank import OPERATION, BankClient
from worker.metrics import BANK_OUTCOMES, BankMetrics, RelayMetrics, WorkerMetrics, bank_outcome

A, C, V, R, REL = (
    OperationKind.AUTHORIZE,
    OperationKind.CAPTURE,
    OperationKind.VOID,
    OperationKind.REFUND,
    OperationKind.RELEASE,
)


def error(status: int, code: str) -> BankOutcome:
    return BankOutcome("error", http_status=status, code=code)


@pytest.mark.parametrize(
    ("operation", "outcome", "label"),
    [
        (A, BankOutcome("ok", http_status=201), "succeeded"),
        (A, error(402, "insufficient_funds"), "refused"),
        (C, error(400, "authorization_expired"), "refused"),  # the hold lapsed: a refusal, settled as expired
        (C, error(409, "already_captured"), "confirm"),
        (V, error(409, "authorization_already_used"), "confirm"),
        (REL, error(404, "authorization_not_found"), "refused"),
        (R, error(500, "internal_error"), "retry"),
        (A, error(418, "who_knows"), "retry"),  # not in the contract for this call: never settled as refused
        (C, BankOutcome("unparseable", http_status=502), "retry"),
        (C, BankOutcome("malformed", http_status=200), "retry"),
        (A, BankOutcome("timeout"), "timeout"),
        (V, BankOutcome("connection"), "connection"),
        (A, BankOutcome("unreachable"), "connection"),  # never sent: still no bank to talk to
        (None, BankOutcome("ok", http_status=200), "succeeded"),
        (None, error(404, "authorization_not_found"), "refused"),
        (None, error(503, "unavailable"), "retry"),
        (None, BankOutcome("timeout"), "timeout"),
    ],
)
def test_bank_outcome_labels(operation, outcome, label):
    assert bank_outcome(operation, outcome) == label
    assert label in BANK_OUTCOMES


def test_label_children_are_made_once():
    metrics = BankMetrics(CollectorRegistry())
    metrics.observe("capture", "succeeded", 0.2)
    child = metrics._children[("capture", "succeeded")]
    metrics.observe("capture", "succeeded", 0.3)
    assert metrics._children == {("capture", "succeeded"): child}


# ---- the bank client ------------------------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_a_bank_call_is_timed_by_operation_and_outcome_and_carries_the_trace():
    registry = CollectorRegistry()
    headers_seen = []
    with _Mock() as mocked:
        mocked.post(AUTH_URL, status=201, payload=APPROVED)
        mocked.post(f"{BANK}/api/v1/voids", status=500, payload={"error": "internal_error"})
        mocked.post(f"{BANK}/api/v1/voids", status=404, payload={"error": "authorization_not_found"})
        async with BankClient(BANK, timeout=5, metrics=BankMetrics(registry)) as bank:
            traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            with tracing.continued({"traceparent": traceparent}, "process authorize", tracing.SpanKind.CONSUMER):
                await bank.authorize(
                    "gw-op_1", card_number="4111111111111111", cvv="123", expiry_month=12, expiry_year=2030, amount=500
                )
            await bank.void("gw-op_2", authorization_id="auth_x")
            releasing = OPERATION.set(REL)  # the consumer says: this command is a release
            try:
                await bank.void("gw-op_3", authorization_id="auth_x")
            finally:
                OPERATION.reset(releasing)
            assert bank.metrics.in_flight == 0
        for (_method, _url), calls in mocked.requests.items():
            headers_seen += [call.kwargs["headers"] for call in calls]
    count = "gateway_bank_request_seconds_count"
    assert sample(registry, count, operation="authorize", outcome="succeeded") == 1
    assert sample(registry, count, operation="void", outcome="retry") == 1
    assert sample(registry, count, operation="release", outcome="refused") == 1
    assert sample(registry, count, operation="void", outcome="refused") is None
    assert sample(registry, "gateway_bank_requests_in_flight") == 0
    authorize_headers = next(h for h in headers_seen if h["Idempotency-Key"] == "gw-op_1")
    assert authorize_headers["traceparent"] == traceparent  # nothing recorded: the trace goes on as it came
    assert all(len(h["traceparent"]) == 55 for h in headers_seen)  # outside a trace, each call starts one


async def test_a_call_in_flight_is_counted():
    registry = CollectorRegistry()
    metrics = BankMetrics(registry)
    seen = []

    class Slow(BankClient):
        async def _exchange(self, *args):
            seen.append(sample(registry, "gateway_bank_requests_in_flight"))
            return BankOutcome("timeout")

    async with Slow(BANK, metrics=metrics) as bank:
        await bank.capture("gw-op_1", authorization_id="auth_x", amount=5)
    assert seen == [1] and metrics.in_flight == 0
    assert sample(registry, "gateway_bank_request_seconds_count", operation="capture", outcome="timeout") == 1


# ---- the worker's own ------------------------------------------------------------------------


def payment(status: str, history: list[tuple[str, datetime]], updated_at: datetime) -> dict:
    return {
        "status": status,
        "history": [{"status": s, "at": iso(at)} for s, at in history],
        "updated_at": iso(updated_at),
    }


T0 = datetime(2030, 1, 1, tzinfo=UTC)


def settled(metrics: WorkerMetrics, status: str) -> tuple[float | None, float | None]:
    registry = metrics.registry
    return (
        sample(registry, "gateway_submit_to_final_seconds_count", status=status),
        sample(registry, "gateway_submit_to_final_seconds_sum", status=status),
    )


def test_submit_to_final_runs_from_the_request_accepted_to_the_outcome():
    metrics = WorkerMetrics()
    s = timedelta(seconds=1)
    metrics.outcome_recorded(payment("authorized", [("pending", T0), ("authorized", T0 + 2 * s)], T0 + 2 * s))
    assert settled(metrics, "authorized") == (1, 2.0)
    # A capture accepted at +10 s, parked, replayed by ops at +60 s, settled at +61 s: from +10 s.
    history = [("pending", T0), ("authorized", T0 + s), ("capturing", T0 + 10 * s), ("capturing", T0 + 60 * s)]
    metrics.outcome_recorded(payment("captured", [*history, ("captured", T0 + 61 * s)], T0 + 61 * s))
    assert settled(metrics, "captured") == (1, 51.0)
    # A refused capture returns to authorized: from the capture's request too.
    back = [("pending", T0), ("authorized", T0 + s), ("capturing", T0 + 5 * s), ("authorized", T0 + 7 * s)]
    metrics.outcome_recorded(payment("authorized", back, T0 + 7 * s))
    assert settled(metrics, "authorized") == (2, 4.0)


def test_submit_to_final_skips_outcomes_that_moved_nothing():
    metrics = WorkerMetrics()
    s = timedelta(seconds=1)
    metrics.outcome_recorded(None)  # already settled by someone else
    # A release: the payment stays expired, so no new history row.
    metrics.outcome_recorded(
        payment("expired", [("pending", T0), ("authorized", T0 + s), ("expired", T0 + 9 * s)], T0 + 99 * s)
    )
    assert settled(metrics, "expired") == (None, None)


def test_retries_by_rung_and_the_breaker_gauge():
    metrics = WorkerMetrics()
    is_open = [False]
    metrics.watch_breaker(lambda: is_open[0])
    metrics.retried(1)
    metrics.retried(1)
    metrics.retried(3)
    assert sample(metrics.registry, "gateway_operation_retries_total", rung="1") == 2
    assert sample(metrics.registry, "gateway_operation_retries_total", rung="3") == 1
    assert sample(metrics.registry, "gateway_bank_circuit_open") == 0
    is_open[0] = True
    assert sample(metrics.registry, "gateway_bank_circuit_open") == 1


def test_relay_counts_by_exchange_and_events_by_type():
    metrics = RelayMetrics()
    metrics.published(COMMANDS_EXCHANGE, "capture", 0.002)
    metrics.published(events_exchange("ficmart"), "payment.captured", 0.003)
    metrics.published(events_exchange("ficmart"), "payment.captured", 0.001)
    metrics.backlog(7, 12.5)
    registry = metrics.registry
    assert sample(registry, "gateway_relay_published_total", exchange=COMMANDS_EXCHANGE) == 1
    assert sample(registry, "gateway_relay_published_total", exchange="payments.events.ficmart") == 2
    assert sample(registry, "gateway_payment_events_total", type="payment.captured") == 2
    assert sample(registry, "gateway_payment_events_total", type="capture") is None  # commands are not events
    assert sample(registry, "gateway_relay_confirm_seconds_count") == 3
    assert (sample(registry, "gateway_outbox_unsent"), sample(registry, "gateway_outbox_oldest_unsent_seconds")) == (
        7,
        12.5,
    )
    metrics.backlog(0, None)
    assert sample(registry, "gateway_outbox_oldest_unsent_seconds") == 0
