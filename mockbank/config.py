"""Environment configuration of the mock bank, checked once at start.

| variable                 | meaning                                            | default |
|--------------------------|----------------------------------------------------|---------|
| MIN_LATENCY_MS           | lower bound of the injected latency (ms, >= 0)     | 100     |
| MAX_LATENCY_MS           | upper bound (ms, >= MIN_LATENCY_MS)                 | 2000    |
| FAILURE_RATE             | fraction of API requests answered 500, 0..1        | 0.05    |
| RESPONSE_LOSS_RATE       | fraction of executed POSTs whose response is lost  | 0       |
| KEY_FORGET_RATE          | fraction of POSTs whose client is gone when the    | 0       |
|                          | work commits that leave the key NOT remembered     |         |
| KEY_LOOKUP_FAILURE_RATE  | fraction of POSTs whose key lookup fails, so they  | 0       |
|                          | run as new even when the key is remembered         |         |
| RESPONSE_CUTOFF_SECONDS  | a response not ready this long after arrival is    | 15      |
|                          | never written (float > 0)                          |         |
| DB_TRANSACTION_MS        | time each operation holds a pool connection and,   | 0 (off) |
|                          | for a POST, its account's row lock (ms, >= 0)      |         |
| DB_POOL_SIZE             | connections of that pool (int >= 1)                | 25      |
| AUTH_EXPIRY_HOURS        | hold lifetime in hours (float > 0, e.g. 0.001)     | 168     |
| MOCKBANK_EXTRA_ACCOUNTS  | generated accounts with $100M each (int >= 0)      | 0       |
| LOG_LEVEL                | debug, info, warning, error, critical             | info    |

An empty value counts as unset. Any other bad value raises ``ConfigError``
whose message names the variable; ``mockbank`` prints it and exits with 2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

MAX_EXTRA_ACCOUNTS = 1_000_000  # ~7 s of start-up at the maximum
MAX_DB_POOL_SIZE = 10_000
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A bad environment value; the message names the variable."""


@dataclass
class Chaos:
    """Run-time switches (readable/changeable through /_mock/chaos)."""

    min_latency_ms: float = 100.0
    max_latency_ms: float = 2000.0
    failure_rate: float = 0.05
    response_loss_rate: float = 0.0
    key_forget_rate: float = 0.0
    key_lookup_failure_rate: float = 0.0
    down: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Config:
    chaos: Chaos
    auth_expiry_hours: float = 168.0
    extra_accounts: int = 0
    response_cutoff_seconds: float = 15.0
    db_transaction_ms: float = 0.0
    db_pool_size: int = 25
    log_level: str = "info"


def _number(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    what: str,
) -> float:
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; expected {what}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not finite; expected {what}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name}={raw!r} is out of range; expected {what}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name}={raw!r} is out of range; expected {what}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; expected {lo}..{hi}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={raw!r} is out of range; expected {lo}..{hi}")
    return value


def load_config(env: Mapping[str, str]) -> Config:
    min_ms = _number(env, "MIN_LATENCY_MS", 100.0, lo=0, what="milliseconds >= 0")
    max_ms = _number(env, "MAX_LATENCY_MS", 2000.0, lo=0, what="milliseconds >= 0")
    if max_ms < min_ms:
        raise ConfigError(
            f"MAX_LATENCY_MS={max_ms:g} is below MIN_LATENCY_MS={min_ms:g}; MAX_LATENCY_MS must be >= MIN_LATENCY_MS"
        )
    failure = _number(env, "FAILURE_RATE", 0.05, lo=0, hi=1, what="a fraction between 0 and 1")
    loss = _number(env, "RESPONSE_LOSS_RATE", 0.0, lo=0, hi=1, what="a fraction between 0 and 1")
    expiry = _number(env, "AUTH_EXPIRY_HOURS", 168.0, lo=0, lo_open=True, what="a number of hours > 0")

    forget = _number(env, "KEY_FORGET_RATE", 0.0, lo=0, hi=1, what="a fraction between 0 and 1")
    lookup = _number(env, "KEY_LOOKUP_FAILURE_RATE", 0.0, lo=0, hi=1, what="a fraction between 0 and 1")
    cutoff = _number(env, "RESPONSE_CUTOFF_SECONDS", 15.0, lo=0, lo_open=True, what="a number of seconds > 0")
    transaction = _number(env, "DB_TRANSACTION_MS", 0.0, lo=0, what="milliseconds >= 0")
    pool = _integer(env, "DB_POOL_SIZE", 25, lo=1, hi=MAX_DB_POOL_SIZE)
    extra = _integer(env, "MOCKBANK_EXTRA_ACCOUNTS", 0, lo=0, hi=MAX_EXTRA_ACCOUNTS)

    level = env.get("LOG_LEVEL", "").strip().lower() or "info"
    if level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL={env.get('LOG_LEVEL')!r} is invalid; expected one of {', '.join(LOG_LEVELS)}")

    return Config(
        chaos=Chaos(
            min_latency_ms=min_ms,
            max_latency_ms=max_ms,
            failure_rate=failure,
            response_loss_rate=loss,
            key_forget_rate=forget,
            key_lookup_failure_rate=lookup,
        ),
        auth_expiry_hours=expiry,
        extra_accounts=extra,
        response_cutoff_seconds=cutoff,
        db_transaction_ms=transaction,
        db_pool_size=pool,
        log_level=level,
    )


def validate_chaos_update(current: Chaos, update: Mapping[str, object]) -> Chaos:
    """Apply a (partial) /_mock/chaos update; raises ConfigError on bad input."""
    numbers = (
        "min_latency_ms",
        "max_latency_ms",
        "failure_rate",
        "response_loss_rate",
        "key_forget_rate",
        "key_lookup_failure_rate",
    )
    unknown = set(update) - {*numbers, "down"}
    if unknown:
        raise ConfigError(f"unknown field(s): {', '.join(sorted(unknown))}")
    new = Chaos(**current.as_dict())
    for name in numbers:
        if name not in update:
            continue
        value = update[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a number")
        if value < 0 or (name.endswith("_rate") and value > 1):
            raise ConfigError(f"{name} is out of range")
        setattr(new, name, float(value))
    if "down" in update:
        if not isinstance(update["down"], bool):
            raise ConfigError("down must be true or false")
        new.down = update["down"]
    if new.max_latency_ms < new.min_latency_ms:
        raise ConfigError("max_latency_ms must be >= min_latency_ms")
    return new
