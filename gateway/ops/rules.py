"""The settings the worker and the operators' tools (gatewayctl, the /ops console) must share,
because both decide about the same parked operations: the retry ladder (the retry queues a
replay re-declares), how old an authorize may be before it is not re-sent without --force,
and how long an operation must be parked before ops may abandon it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from gateway.config import ConfigError, EnvSettings

DEFAULT_RETRY_LADDER = "1,5,30,120,600"
DEFAULT_ABANDON_AFTER_HOURS = 24.0


def parse_ladder(raw: str | tuple[int, ...]) -> tuple[int, ...]:
    """'1,5,30' -> (1, 5, 30): whole seconds, strictly increasing, at least one rung."""
    if isinstance(raw, str):
        try:
            ladder = tuple(int(part.strip()) for part in raw.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"WORKER_RETRY_LADDER must be comma-separated whole seconds, got {raw!r}") from None
    else:
        ladder = tuple(raw)
    if not ladder or any(d < 1 for d in ladder) or list(ladder) != sorted(set(ladder)):
        raise ConfigError(f"WORKER_RETRY_LADDER must list increasing delays >= 1 s, got {raw!r}")
    return ladder


RetryLadder = Annotated[tuple[int, ...], BeforeValidator(parse_ladder)]


def retry_ladder_field() -> Any:
    return Field(
        default=parse_ladder(DEFAULT_RETRY_LADDER),
        validation_alias="WORKER_RETRY_LADDER",
        description="delays (seconds) of the retry queues, in order",
    )


def hours_field(default: float, alias: str, description: str) -> Any:
    return Field(default=default, gt=0, allow_inf_nan=False, validation_alias=alias, description=description)


class OpsRules(EnvSettings):
    retry_ladder: RetryLadder = retry_ladder_field()
    authorize_key_max_age_hours: float = hours_field(
        23.0, "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS", "an authorize first tried longer ago is parked, not re-sent"
    )
    abandon_after_hours: float = hours_field(
        DEFAULT_ABANDON_AFTER_HOURS,
        "ABANDON_AFTER_HOURS",
        "ops may abandon a payment parked this long (gatewayctl abandon); the card vault keeps no card longer",
    )
