"""The worker's housekeeping and ops-decision settings (worker/settings.py): defaults, bounds, and
what the sweeper makes of them. The idempotency-key retention may not go below the 24 hours
gateway-api.md promises."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.config import ConfigError
from worker import settings
from worker.sweeper import Housekeeping


def test_defaults():
    cfg = settings.parse_worker({})
    assert (cfg.key_retention_hours, cfg.prune_batch, cfg.abandon_after_hours) == (48, 500, 24)
    assert Housekeeping.of(cfg) == Housekeeping()
    assert Housekeeping() == Housekeeping(timedelta(hours=24), timedelta(hours=48), 500)


def test_values_are_read_and_reach_the_sweeper():
    cfg = settings.parse_worker(
        {"IDEMPOTENCY_KEY_RETENTION_HOURS": "24", "IDEMPOTENCY_PRUNE_BATCH_SIZE": "50", "ABANDON_AFTER_HOURS": "0.5"}
    )
    assert Housekeeping.of(cfg) == Housekeeping(timedelta(minutes=30), timedelta(hours=24), 50)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IDEMPOTENCY_KEY_RETENTION_HOURS", "23.9", "must be >= 24"),
        ("IDEMPOTENCY_KEY_RETENTION_HOURS", "0", "must be >= 24"),
        ("IDEMPOTENCY_KEY_RETENTION_HOURS", "two days", "must be a number"),
        ("IDEMPOTENCY_KEY_RETENTION_HOURS", "inf", "must be >= 24"),
        ("IDEMPOTENCY_PRUNE_BATCH_SIZE", "0", "must be >= 1"),
        ("IDEMPOTENCY_PRUNE_BATCH_SIZE", "1.5", "must be an integer"),
        ("ABANDON_AFTER_HOURS", "0", "must be > 0"),
        ("ABANDON_AFTER_HOURS", "-1", "must be > 0"),
        ("ABANDON_AFTER_HOURS", "nan", "must be > 0"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name, value, message):
    with pytest.raises(ConfigError, match=message) as error:
        settings.parse_worker({name: value})
    assert name in str(error.value)


def test_the_help_lists_them():
    text = settings.epilog(settings.WORKER_VARS)
    for name in (
        "IDEMPOTENCY_KEY_RETENTION_HOURS (48)",
        "IDEMPOTENCY_PRUNE_BATCH_SIZE (500)",
        "ABANDON_AFTER_HOURS (24)",
    ):
        assert name in text
