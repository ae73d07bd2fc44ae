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

The same pattern as the gateway's processes (gateway.config.EnvSettings): an
empty value counts as unset; `Config.load()` prints a message naming the
variable and exits with 2 on any other bad value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Self

from pydantic import Field, field_validator, model_validator

from gateway.config import ConfigError, EnvSettings, nice_field, one_of

MAX_EXTRA_ACCOUNTS = 1_000_000  # ~7 s of start-up at the maximum
MAX_DB_POOL_SIZE = 10_000
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class Chaos:
    """Run-time switches (readable/changeable through /_mock/chaos); start from Config."""

    min_latency_ms: float
    max_latency_ms: float
    failure_rate: float
    response_loss_rate: float
    key_forget_rate: float
    key_lookup_failure_rate: float
    down: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class Config(EnvSettings):
    min_latency_ms: float = Field(
        default=100.0, ge=0, allow_inf_nan=False, validation_alias="MIN_LATENCY_MS", description="milliseconds >= 0"
    )
    max_latency_ms: float = Field(
        default=2000.0,
        ge=0,
        allow_inf_nan=False,
        validation_alias="MAX_LATENCY_MS",
        description="milliseconds >= MIN_LATENCY_MS",
    )
    failure_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        allow_inf_nan=False,
        validation_alias="FAILURE_RATE",
        description="fraction of API requests answered 500",
    )
    response_loss_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        validation_alias="RESPONSE_LOSS_RATE",
        description="fraction of executed POSTs whose response is lost (the work stays done)",
    )
    key_forget_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        validation_alias="KEY_FORGET_RATE",
        description="fraction of POSTs whose client is gone at the commit that leave their key forgotten",
    )
    key_lookup_failure_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        allow_inf_nan=False,
        validation_alias="KEY_LOOKUP_FAILURE_RATE",
        description="fraction of POSTs whose key lookup fails, so they run as new",
    )
    response_cutoff_seconds: float = Field(
        default=15.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias="RESPONSE_CUTOFF_SECONDS",
        description="a response not ready this long after arrival is never written",
    )
    db_transaction_ms: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        validation_alias="DB_TRANSACTION_MS",
        description="time each operation holds a pool connection and its account's lock (0: off)",
    )
    db_pool_size: int = Field(
        default=25, ge=1, le=MAX_DB_POOL_SIZE, validation_alias="DB_POOL_SIZE", description="connections of that pool"
    )
    auth_expiry_hours: float = Field(
        default=168.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias="AUTH_EXPIRY_HOURS",
        description="hold lifetime in hours",
    )
    extra_accounts: int = Field(
        default=0,
        ge=0,
        le=MAX_EXTRA_ACCOUNTS,
        validation_alias="MOCKBANK_EXTRA_ACCOUNTS",
        description="generated accounts with $100M each, for load tests",
    )
    nice: int = nice_field(
        "MOCKBANK_NICE",
        "CPU priority (0-19): it stands for a bank on another machine, so on the gateway's it gives "
        "way like the pipeline (PIPELINE_NICE) rather than take CPU the gateway would have",
    )
    log_level: str = Field(default="info", validation_alias="LOG_LEVEL", description=", ".join(LOG_LEVELS))

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return one_of("LOG_LEVEL", value, LOG_LEVELS)

    @model_validator(mode="after")
    def _latency_bounds(self) -> Self:
        if self.max_latency_ms < self.min_latency_ms:
            raise ConfigError(
                f"MAX_LATENCY_MS={self.max_latency_ms:g} is below MIN_LATENCY_MS={self.min_latency_ms:g}; "
                "MAX_LATENCY_MS must be >= MIN_LATENCY_MS"
            )
        return self

    @property
    def chaos(self) -> Chaos:
        return Chaos(
            min_latency_ms=self.min_latency_ms,
            max_latency_ms=self.max_latency_ms,
            failure_rate=self.failure_rate,
            response_loss_rate=self.response_loss_rate,
            key_forget_rate=self.key_forget_rate,
            key_lookup_failure_rate=self.key_lookup_failure_rate,
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
