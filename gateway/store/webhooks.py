"""Webhooks: each merchant's endpoint and secret, and the deliveries of its events.

gateway/webhooks.py registers, rotates, disables and resends (gatewayctl webhooks, /ops);
worker/webhook_delivery.py (gateway-webhooks) claims due deliveries and records each
attempt. SQL in gateway/sql/webhooks.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, NamedTuple

import asyncpg

from gateway.store.loader import SQL_DIR, Executor, all_rows, load

_sql = load(SQL_DIR / "webhooks.sql")


async def upsert_webhook_endpoint(db: Executor, *, merchant: str, url: str, secret: bytes) -> asyncpg.Record:
    """merchant, url, secret (the stored one: `secret` only for a new endpoint), created."""
    return await _sql.upsert_webhook_endpoint(db, merchant=merchant, url=url, secret=secret)


async def rotate_webhook_secret(
    db: Executor, *, merchant: str, secret: bytes, overlap_seconds: float
) -> asyncpg.Record | None:
    """merchant, old_secret_until; None when the merchant has no endpoint."""
    return await _sql.rotate_webhook_secret(db, merchant=merchant, secret=secret, overlap_seconds=overlap_seconds)


async def disable_webhook_endpoint(db: Executor, *, merchant: str) -> bool:
    return await _sql.disable_webhook_endpoint(db, merchant=merchant) is not None


async def webhook_endpoints(db: Executor) -> list[asyncpg.Record]:
    return await all_rows(_sql.webhook_endpoints, db)


async def failed_webhook_deliveries(db: Executor, *, merchant: str | None, limit: int) -> list[asyncpg.Record]:
    return await all_rows(_sql.failed_webhook_deliveries, db, merchant=merchant, limit=limit)


async def resend_webhook_events(db: Executor, *, event_ids: Sequence[str]) -> list[str]:
    """The event ids queued again (unknown ones, pending ones and those without an endpoint are not)."""
    return [r["event_id"] for r in await all_rows(_sql.resend_webhook_events, db, event_ids=list(event_ids))]


async def resend_failed_webhook_deliveries(db: Executor, *, merchant: str | None) -> int:
    status = await _sql.resend_failed_webhook_deliveries(db, merchant=merchant)
    return int(status.split()[-1])


async def claim_webhook_deliveries(
    db: Executor, *, limit: int, per_endpoint: int, busy: Sequence[str], lease_seconds: float
) -> list[asyncpg.Record]:
    return await all_rows(
        _sql.claim_webhook_deliveries,
        db,
        limit=limit,
        per_endpoint=per_endpoint,
        busy=list(busy),
        lease_seconds=lease_seconds,
    )


class WebhookAttempt(NamedTuple):
    """How one attempt ended: status delivered, failed, or pending with `next_at`."""

    id: int
    status: Literal["delivered", "failed", "pending"]
    next_at: datetime | None
    error: str | None


async def record_webhook_attempts(db: Executor, *, attempts: Sequence[WebhookAttempt]) -> None:
    await _sql.record_webhook_attempts(
        db,
        ids=[a.id for a in attempts],
        statuses=[a.status for a in attempts],
        next_at=[a.next_at for a in attempts],
        errors=[a.error for a in attempts],
    )
