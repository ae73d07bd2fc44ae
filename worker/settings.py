"""Environment variables of gateway-relay and gateway-worker, validated once at start.

The shared ones (DATABASE_URL, AMQP_URL, BANK_URL, CARD_ENCRYPTION_KEY,
LOG_LEVEL) live in gateway.config; these are the tuning knobs of the
asynchronous pipeline. A bad value stops the process with a message naming
the variable and exit code 2, like gateway.config.load().
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config import ConfigError

DEFAULT_RETRY_LADDER = "1,5,30,120,600"

# Housekeeping and ops decisions (the sweeper; gatewayctl abandon reads ABANDON_AFTER_HOURS).
DEFAULT_KEY_RETENTION_HOURS = 48.0
MIN_KEY_RETENTION_HOURS = 24.0  # gateway-api.md: "Keys are kept at least 24 hours"
DEFAULT_PRUNE_BATCH_SIZE = 500
DEFAULT_ABANDON_AFTER_HOURS = 24.0

# name -> (default, what it means); the --help epilogs are built from this table.
RELAY_VARS = {
    "RELAY_BATCH_SIZE": ("200", "outbox rows claimed and published per transaction"),
    "RELAY_POLL_SECONDS": ("1", "poll interval when no NOTIFY arrives"),
    "RELAY_RETENTION_DAYS": ("7", "published rows older than this are deleted"),
    "RELAY_PRUNE_INTERVAL_SECONDS": ("600", "how often published rows are pruned"),
}
WORKER_VARS = {
    "BANK_TIMEOUT_SECONDS": ("20", "total timeout of one bank call (the bank may take 15 s)"),
    "WORKER_PREFETCH": ("1000", "unacknowledged messages per worker"),
    "WORKER_CONCURRENCY": ("1000", "messages handled at once (bank calls in flight)"),
    "WORKER_DB_POOL_SIZE": ("20", "PostgreSQL connections per worker"),
    "WORKER_RETRY_LADDER": (DEFAULT_RETRY_LADDER, "delays (seconds) of the retry queues, in order"),
    "WORKER_QUICK_RETRIES": ("3", "bank attempts per message before the next ladder rung"),
    "WORKER_QUICK_RETRY_BASE_SECONDS": ("0.5", "base of the exponential backoff between those attempts"),
    "WORKER_LEASE_MARGIN_SECONDS": ("10", "lease = bank timeout + this margin"),
    "WORKER_CONFIRM_DELAY_SECONDS": ("1", "wait before re-sending a request the bank says is already done"),
    "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS": ("23", "an authorize first tried longer ago is parked, not re-sent"),
    "SWEEPER_INTERVAL_SECONDS": ("15", "how often the sweeper runs"),
    "SWEEPER_STUCK_AFTER_SECONDS": (
        "60",
        "idle time (on top of the longest retry delay) before a pending operation is re-enqueued",
    ),
    "SWEEPER_BATCH_SIZE": ("500", "operations or payments handled per sweeper pass"),
    "RECONCILE_INTERVAL_SECONDS": ("3600", "how often one worker reconciles receipts with the bank (0: never)"),
    "RECONCILE_RATE": ("5", "bank requests per second a reconciliation pass may make"),
    "RECONCILE_LIMIT": ("500", "newest settled payments checked per pass"),
    # -- housekeeping and ops decisions
    "IDEMPOTENCY_KEY_RETENTION_HOURS": (
        f"{DEFAULT_KEY_RETENTION_HOURS:g}",
        f"stored API responses older than this are deleted (at least {MIN_KEY_RETENTION_HOURS:g}: the API promises it)",
    ),
    "IDEMPOTENCY_PRUNE_BATCH_SIZE": (f"{DEFAULT_PRUNE_BATCH_SIZE}", "stored API responses deleted per transaction"),
    "ABANDON_AFTER_HOURS": (
        f"{DEFAULT_ABANDON_AFTER_HOURS:g}",
        "ops may abandon a payment parked this long (gatewayctl abandon); the card vault keeps no card longer",
    ),
}


def _number(
    env: Mapping[str, str], name: str, table: dict, *, lo: float, integer: bool = False, lo_open: bool = False
) -> float:
    raw = (env.get(name) or "").strip() or table[name][0]
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value) or (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {raw!r}")
    return value


def parse_ladder(raw: str) -> tuple[int, ...]:
    """'1,5,30' -> (1, 5, 30): whole seconds, strictly increasing, at least one rung."""
    try:
        ladder = tuple(int(part.strip()) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"WORKER_RETRY_LADDER must be comma-separated whole seconds, got {raw!r}") from None
    if not ladder or any(d < 1 for d in ladder) or list(ladder) != sorted(set(ladder)):
        raise ConfigError(f"WORKER_RETRY_LADDER must list increasing delays >= 1 s, got {raw!r}")
    return ladder


@dataclass(frozen=True)
class RelaySettings:
    batch_size: int = 200
    poll_seconds: float = 1.0
    retention_days: float = 7.0
    prune_interval: float = 600.0


@dataclass(frozen=True)
class WorkerSettings:
    bank_timeout: float = 20.0
    prefetch: int = 1000
    concurrency: int = 1000
    db_pool_size: int = 20
    retry_ladder: tuple[int, ...] = field(default=(1, 5, 30, 120, 600))
    quick_retries: int = 3
    quick_retry_base: float = 0.5
    lease_margin: float = 10.0
    confirm_delay: float = 1.0
    authorize_key_max_age_hours: float = 23.0
    sweep_interval: float = 15.0
    stuck_after: float = 60.0
    sweep_batch: int = 500
    reconcile_interval: float = 3600.0
    reconcile_rate: float = 5.0
    reconcile_limit: int = 500
    # -- housekeeping and ops decisions
    key_retention_hours: float = DEFAULT_KEY_RETENTION_HOURS
    prune_batch: int = DEFAULT_PRUNE_BATCH_SIZE
    abandon_after_hours: float = DEFAULT_ABANDON_AFTER_HOURS

    @property
    def lease_seconds(self) -> float:
        """Longer than any bank call can last, so a lease never ends while its call may run."""
        return self.bank_timeout + self.lease_margin


def parse_relay(env: Mapping[str, str]) -> RelaySettings:
    t = RELAY_VARS
    return RelaySettings(
        batch_size=int(_number(env, "RELAY_BATCH_SIZE", t, lo=1, integer=True)),
        poll_seconds=_number(env, "RELAY_POLL_SECONDS", t, lo=0, lo_open=True),
        retention_days=_number(env, "RELAY_RETENTION_DAYS", t, lo=0, lo_open=True),
        prune_interval=_number(env, "RELAY_PRUNE_INTERVAL_SECONDS", t, lo=0, lo_open=True),
    )


def parse_worker(env: Mapping[str, str]) -> WorkerSettings:
    t = WORKER_VARS
    return WorkerSettings(
        bank_timeout=_number(env, "BANK_TIMEOUT_SECONDS", t, lo=0, lo_open=True),
        prefetch=int(_number(env, "WORKER_PREFETCH", t, lo=1, integer=True)),
        concurrency=int(_number(env, "WORKER_CONCURRENCY", t, lo=1, integer=True)),
        db_pool_size=int(_number(env, "WORKER_DB_POOL_SIZE", t, lo=2, integer=True)),
        retry_ladder=parse_ladder((env.get("WORKER_RETRY_LADDER") or "").strip() or DEFAULT_RETRY_LADDER),
        quick_retries=int(_number(env, "WORKER_QUICK_RETRIES", t, lo=1, integer=True)),
        quick_retry_base=_number(env, "WORKER_QUICK_RETRY_BASE_SECONDS", t, lo=0),
        lease_margin=_number(env, "WORKER_LEASE_MARGIN_SECONDS", t, lo=0, lo_open=True),
        confirm_delay=_number(env, "WORKER_CONFIRM_DELAY_SECONDS", t, lo=0),
        authorize_key_max_age_hours=_number(env, "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS", t, lo=0, lo_open=True),
        sweep_interval=_number(env, "SWEEPER_INTERVAL_SECONDS", t, lo=0, lo_open=True),
        stuck_after=_number(env, "SWEEPER_STUCK_AFTER_SECONDS", t, lo=0, lo_open=True),
        sweep_batch=int(_number(env, "SWEEPER_BATCH_SIZE", t, lo=1, integer=True)),
        reconcile_interval=_number(env, "RECONCILE_INTERVAL_SECONDS", t, lo=0),
        reconcile_rate=_number(env, "RECONCILE_RATE", t, lo=0, lo_open=True),
        reconcile_limit=int(_number(env, "RECONCILE_LIMIT", t, lo=1, integer=True)),
        # -- housekeeping and ops decisions
        key_retention_hours=_number(env, "IDEMPOTENCY_KEY_RETENTION_HOURS", t, lo=MIN_KEY_RETENTION_HOURS),
        prune_batch=int(_number(env, "IDEMPOTENCY_PRUNE_BATCH_SIZE", t, lo=1, integer=True)),
        abandon_after_hours=_number(env, "ABANDON_AFTER_HOURS", t, lo=0, lo_open=True),
    )


def epilog(table: dict) -> str:
    shared = "DATABASE_URL, AMQP_URL, LOG_LEVEL"
    return "Environment: " + shared + "; " + "; ".join(f"{n} ({d}): {what}" for n, (d, what) in table.items())


def load(parser) -> object:
    """parse_relay or parse_worker on os.environ, or exit 2 with a clear message."""
    try:
        return parser(dict(os.environ))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
