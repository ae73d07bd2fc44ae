"""Environment variables of gateway-relay and gateway-worker, validated once at start.

The shared ones (DATABASE_URL, AMQP_URL, BANK_URL, CARD_ENCRYPTION_KEY,
LOG_LEVEL) are gateway.config.Settings; these are the tuning knobs of the
asynchronous pipeline, in the same pattern: `WorkerSettings.load()` exits 2
with a message naming the variable on a bad value.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gateway.config import EnvSettings, nice_field
from gateway.ops.rules import OpsRules, RetryLadder, retry_ladder_field

DEFAULT_KEY_RETENTION_HOURS = 48.0
MIN_KEY_RETENTION_HOURS = 24.0  # docs/api.md: "Keys are kept at least 24 hours"
DEFAULT_PRUNE_BATCH_SIZE = 500
DEFAULT_EVENT_RETENTION_DAYS = 30.0  # docs/api.md: the events feed keeps events 30 days


def _seconds(default: float, alias: str, description: str, *, gt: float | None = 0, ge: float | None = None) -> Any:
    """A float variable with the bound it needs (> 0 unless told otherwise), never inf or nan."""
    return Field(default=default, gt=gt, ge=ge, allow_inf_nan=False, validation_alias=alias, description=description)


def _count(default: int, alias: str, description: str, *, ge: int = 1) -> Any:
    return Field(default=default, ge=ge, validation_alias=alias, description=description)


def _metrics_port(default: int, alias: str) -> Any:
    return Field(
        default=default,
        ge=0,
        le=65535,
        validation_alias=alias,
        description="port of /metrics, /healthz and /readyz (on --metrics-host, 127.0.0.1 by default); 0: none",
    )


def _pipeline_nice() -> Any:
    return nice_field(
        "PIPELINE_NICE",
        "CPU priority of relay and worker (0-19): on a shared machine the API and the database go "
        "first, so that answers stay quick while the pipeline runs flat out; 0: as started",
    )


class RelaySettings(EnvSettings):
    retry_ladder: RetryLadder = retry_ladder_field()
    nice: int = _pipeline_nice()
    batch_size: int = _count(200, "RELAY_BATCH_SIZE", "outbox rows claimed and published per transaction")
    poll_seconds: float = _seconds(1.0, "RELAY_POLL_SECONDS", "poll interval when no NOTIFY arrives")
    metrics_port: int = _metrics_port(9102, "RELAY_METRICS_PORT")


class WorkerSettings(OpsRules):
    """The ladder, the authorize-key age and the abandon delay are ops.rules.OpsRules: gatewayctl
    and the console decide with the same values."""

    nice: int = _pipeline_nice()
    metrics_port: int = _metrics_port(9101, "WORKER_METRICS_PORT")
    bank_timeout: float = _seconds(
        20.0, "BANK_TIMEOUT_SECONDS", "total timeout of one bank call (the bank may take 15 s)"
    )
    prefetch: int = _count(1000, "WORKER_PREFETCH", "unacknowledged messages per worker")
    concurrency: int = _count(1000, "WORKER_CONCURRENCY", "messages handled at once (bank calls in flight)")
    db_pool_size: int = _count(20, "WORKER_DB_POOL_SIZE", "PostgreSQL connections per worker", ge=2)
    quick_retries: int = _count(3, "WORKER_QUICK_RETRIES", "bank attempts per message before the next ladder rung")
    quick_retry_base: float = _seconds(
        0.5, "WORKER_QUICK_RETRY_BASE_SECONDS", "base of the exponential backoff between those attempts", gt=None, ge=0
    )
    lease_margin: float = _seconds(10.0, "WORKER_LEASE_MARGIN_SECONDS", "lease = bank timeout + this margin")
    confirm_delay: float = _seconds(
        1.0,
        "WORKER_CONFIRM_DELAY_SECONDS",
        "wait before re-sending a request the bank says is already done",
        gt=None,
        ge=0,
    )
    max_deliveries: int = _count(
        20,
        "WORKER_MAX_DELIVERIES",
        "a command the broker delivered more often than this without its operation settling is parked for ops",
        ge=2,
    )
    outage_hold: float = _seconds(
        300.0,
        "WORKER_OUTAGE_HOLD_SECONDS",
        "while the bank is unavailable a message waits unacknowledged this long, then goes round the "
        "shortest retry queue (no rung charged); keep it under RabbitMQ's consumer_timeout",
    )
    db_backoff_max: float = _seconds(
        30.0,
        "WORKER_DB_BACKOFF_MAX_SECONDS",
        "longest pause between database probes after a handling failed on the database or the broker",
    )
    breaker_window: float = _seconds(
        10.0, "BREAKER_WINDOW_SECONDS", "the bank's recent results the circuit breaker judges (seconds)"
    )
    breaker_min_operations: int = _count(
        20, "BREAKER_MIN_OPERATIONS", "operations tried within the window before their failure ratio counts"
    )
    breaker_failure_ratio: float = Field(
        default=0.5,
        gt=0,
        le=1,
        allow_inf_nan=False,
        validation_alias="BREAKER_FAILURE_RATIO",
        description="share of those operations failing (5xx, timeout, no connection) that opens the breaker",
    )
    breaker_unreachable_operations: int = _count(
        5,
        "BREAKER_UNREACHABLE_OPERATIONS",
        "different operations in a row that cannot reach the bank (refused, reset, timeout) open the breaker",
    )
    breaker_probe_interval: float = _seconds(
        1.0, "BREAKER_PROBE_SECONDS", "while open: how often the bank's GET /health is probed"
    )
    breaker_trial_calls: int = _count(
        3, "BREAKER_TRIAL_CALLS", "after a healthy probe: real calls let through; that many successes close it"
    )
    sweep_interval: float = _seconds(15.0, "SWEEPER_INTERVAL_SECONDS", "how often the sweeper runs")
    stuck_after: float = _seconds(
        60.0,
        "SWEEPER_STUCK_AFTER_SECONDS",
        "idle time (on top of the longest retry delay) before a pending operation is re-enqueued",
    )
    sweep_batch: int = _count(500, "SWEEPER_BATCH_SIZE", "operations or payments handled per sweeper pass")
    reconcile_interval: float = _seconds(
        3600.0,
        "RECONCILE_INTERVAL_SECONDS",
        "how often one worker reconciles receipts with the bank (0: never)",
        gt=None,
        ge=0,
    )
    reconcile_rate: float = _seconds(5.0, "RECONCILE_RATE", "bank requests per second a reconciliation pass may make")
    reconcile_limit: int = _count(500, "RECONCILE_LIMIT", "newest settled payments checked per pass")
    key_retention_hours: float = _seconds(
        DEFAULT_KEY_RETENTION_HOURS,
        "IDEMPOTENCY_KEY_RETENTION_HOURS",
        f"stored API responses older than this are deleted (at least {MIN_KEY_RETENTION_HOURS:g}: the API promises it)",
        gt=None,
        ge=MIN_KEY_RETENTION_HOURS,
    )
    prune_batch: int = _count(
        DEFAULT_PRUNE_BATCH_SIZE, "IDEMPOTENCY_PRUNE_BATCH_SIZE", "stored API responses deleted per transaction"
    )
    event_retention_days: float = _seconds(
        DEFAULT_EVENT_RETENTION_DAYS,
        "EVENT_RETENTION_DAYS",
        "events older than this leave the events feed (at least 30: the API promises it)",
        gt=None,
        ge=DEFAULT_EVENT_RETENTION_DAYS,
    )

    @property
    def lease_seconds(self) -> float:
        """Longer than any bank call can last, so a lease never ends while its call may run."""
        return self.bank_timeout + self.lease_margin


class WebhookSettings(EnvSettings):
    """gateway-webhooks: delivering events to the merchants' webhook endpoints."""

    concurrency: int = _count(256, "WEBHOOK_CONCURRENCY", "deliveries in flight at once, all endpoints together")
    endpoint_concurrency: int = _count(
        16, "WEBHOOK_ENDPOINT_CONCURRENCY", "deliveries in flight at once to one endpoint"
    )
    retry_base: float = _seconds(
        10.0, "WEBHOOK_RETRY_BASE_SECONDS", "delay after a delivery's first failure; it doubles with each failure"
    )
    retry_max: float = _seconds(3600.0, "WEBHOOK_RETRY_MAX_SECONDS", "longest delay between two tries of a delivery")
    retry_window_hours: float = _seconds(
        72.0, "WEBHOOK_RETRY_WINDOW_HOURS", "a delivery not delivered this long after its first try is failed"
    )
    poll_seconds: float = _seconds(0.5, "WEBHOOK_POLL_SECONDS", "how often due deliveries are looked for when idle")
    metrics_port: int = _metrics_port(9103, "WEBHOOK_METRICS_PORT")
    nice: int = nice_field("PIPELINE_NICE", "CPU priority of the deliverer (0-19): the API and the database go first")
