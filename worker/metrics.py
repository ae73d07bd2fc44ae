"""The Prometheus families of gateway-worker and gateway-relay (gateway-api's are in
gateway.api.middleware and gateway.api.app; the pool gauges of all three in gateway.monitoring).

Cheap on the hot path: a labelled child is made once per label value and kept in a dict, so a
bank call, a retry or a publish costs a dict lookup and an increment, and gauges read from the
database or the broker are refreshed by a periodic task (gateway.monitoring.refresh_every),
never per message. Each WorkerMetrics / RelayMetrics has a registry of its own: tests run
several workers and relays in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from gateway import domain
from gateway.domain import BankOutcome, OperationKind, Verdict
from gateway.messages import is_events_exchange
from gateway.timefmt import parse

REFRESH_SECONDS = 5.0  # gauges read from the database or the broker, at most this old

# The outcome label of a bank call: what domain.classify makes of it for the operation, and
# the two ways of getting no answer at all.
BANK_OUTCOMES = ("succeeded", "refused", "retry", "confirm", "timeout", "connection")
_NO_ANSWER = {"timeout": "timeout", "connection": "connection", "unreachable": "connection"}

_BANK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 15, 20, 30)
_CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SETTLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)


def bank_outcome(operation: OperationKind | None, outcome: BankOutcome) -> str:
    """One of BANK_OUTCOMES. `operation` None: a read (reconciliation's GETs), where an answered
    4xx is a refusal and anything else unanswered a retry."""
    no_answer = _NO_ANSWER.get(outcome.kind)
    if no_answer is not None:
        return no_answer
    if operation is None:
        if outcome.kind == "ok":
            return "succeeded"
        answered_no = outcome.kind == "error" and outcome.http_status is not None and outcome.http_status < 500
        return "refused" if answered_no else "retry"
    verdict = domain.classify(operation, outcome)
    return "refused" if verdict is Verdict.EXPIRED else verdict.value  # a lapsed hold is a refusal


class BankMetrics:
    """Bank calls: latency by operation and outcome, and how many are under way."""

    def __init__(self, registry: CollectorRegistry):
        self.in_flight = 0  # read at each scrape; the bank client counts its calls here
        self._seconds = Histogram(
            "gateway_bank_request_seconds",
            "Bank calls: time to an answer (or to giving up), by operation and outcome",
            ("operation", "outcome"),
            buckets=_BANK_BUCKETS,
            registry=registry,
        )
        Gauge("gateway_bank_requests_in_flight", "Bank calls under way", registry=registry).set_function(
            lambda: self.in_flight
        )
        self._children: dict[tuple[str, str], Histogram] = {}

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        key = (operation, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._seconds.labels(operation, outcome)
        child.observe(seconds)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.bank = BankMetrics(self.registry)
        self._retries = Counter(
            "gateway_operation_retries",
            "Commands sent up a rung of the retry ladder (rung 1 is the first delay)",
            ("rung",),
            registry=self.registry,
        )
        self._rungs: dict[int, Counter] = {}
        self.parked = Gauge(
            "gateway_operations_parked", "Operations parked for ops (database, refreshed)", registry=self.registry
        )
        self.flagged = Gauge(
            "gateway_payments_flagged",
            "Payments showing attention_required (database, refreshed)",
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "gateway_dead_letters", "Messages in payments.dead (broker, refreshed)", registry=self.registry
        )
        self.circuit_open = Gauge(
            "gateway_bank_circuit_open",
            "1 while this worker's bank circuit breaker holds calls back",
            registry=self.registry,
        )
        self._to_final = Histogram(
            "gateway_submit_to_final_seconds",
            "From the API accepting a request (the payment entering its in-progress status) to the "
            "worker recording the bank's outcome, by the status reached",
            ("status",),
            buckets=_SETTLE_BUCKETS,
            registry=self.registry,
        )
        self._statuses: dict[str, Histogram] = {}

    def watch_breaker(self, is_open: Callable[[], bool]) -> None:
        self.circuit_open.set_function(lambda: 1 if is_open() else 0)

    def retried(self, rung: int) -> None:
        child = self._rungs.get(rung)
        if child is None:
            child = self._rungs[rung] = self._retries.labels(str(rung))
        child.inc()

    def outcome_recorded(self, payment: dict | None) -> None:
        """Observe submit-to-final for a payment record_outcome just moved (not when it was
        already settled, nor when the outcome left its status as it was: a release)."""
        if payment is None:
            return
        history = payment.get("history") or []
        if len(history) < 2 or history[-1].get("at") != payment.get("updated_at"):
            return
        accepted = None
        # The request's row and any ops replay rows after it, all in the in-progress status.
        for entry in reversed(history[:-1]):
            if entry.get("status") not in domain.IN_PROGRESS:
                break
            accepted = entry.get("at")
        if accepted is None:
            return
        status = history[-1]["status"]
        child = self._statuses.get(status)
        if child is None:
            child = self._statuses[status] = self._to_final.labels(status)
        child.observe(max(0.0, (parse(history[-1]["at"]) - parse(accepted)).total_seconds()))


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.unsent = Gauge(
            "gateway_outbox_unsent", "Outbox rows not yet published (database, refreshed)", registry=self.registry
        )
        self.oldest_unsent = Gauge(
            "gateway_outbox_oldest_unsent_seconds",
            "Age of the oldest outbox row not yet published, 0 when none (database, refreshed)",
            registry=self.registry,
        )
        self._published = Counter(
            "gateway_relay_published",
            "Outbox rows published and confirmed, by exchange",
            ("exchange",),
            registry=self.registry,
        )
        self._events = Counter(
            "gateway_payment_events",
            "Payment events published, by type (payment.<status>, payment.attention_required): "
            "every status change, whichever process made it",
            ("type",),
            registry=self.registry,
        )
        self._confirm = Histogram(
            "gateway_relay_confirm_seconds",
            "From publishing an outbox row to the broker's confirm",
            buckets=_CONFIRM_BUCKETS,
            registry=self.registry,
        )
        self._counters: dict[tuple[str, str], tuple[Counter, Counter | None]] = {}

    def published(self, exchange: str, routing_key: str, seconds: float) -> None:
        key = (exchange, routing_key)
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = (
                self._published.labels(exchange),
                self._events.labels(routing_key) if is_events_exchange(exchange) else None,
            )
        counters[0].inc()
        if counters[1] is not None:
            counters[1].inc()
        self._confirm.observe(seconds)

    def backlog(self, unsent: int, oldest_seconds: float | None) -> None:
        self.unsent.set(unsent)
        self.oldest_unsent.set(oldest_seconds or 0.0)
