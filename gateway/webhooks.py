"""Webhook endpoints as operators manage them: gatewayctl webhooks and the /ops console.

One endpoint per merchant. Its signing secret is made here, shown to the operator (who
hands it to the shop) and stored sealed (webhook_rules.SecretBox); a rotation keeps the
old secret signing beside the new one for webhook_rules.ROTATION_OVERLAP. Deliveries are
made by gateway-webhooks (worker/webhook_delivery.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from gateway import store
from gateway.config import MERCHANT_NAME
from gateway.webhook_rules import ROTATION_OVERLAP, SecretBox, check_url, new_secret

FAILED_LIST_LIMIT = 100


class NoEndpoint(LookupError):
    """The merchant has no webhook endpoint."""


@dataclass(frozen=True)
class Registered:
    merchant: str
    url: str
    secret: str
    created: bool  # a new endpoint (else its URL changed and it is enabled, secret kept)


@dataclass(frozen=True)
class Rotated:
    merchant: str
    secret: str
    old_secret_until: datetime


def check_merchant(merchant: str) -> str:
    if not MERCHANT_NAME.fullmatch(merchant):
        raise ValueError(f"{merchant!r} is not a caller name (1-64 of a-z 0-9 _ -, as in GATEWAY_API_KEYS)")
    return merchant


async def register(pool: asyncpg.Pool, box: SecretBox, merchant: str, url: str, *, development: bool) -> Registered:
    """Register the merchant's endpoint or point it at `url`; UrlRefused, ValueError on bad input."""
    check_merchant(merchant)
    check_url(url, development=development)
    sealed = box.seal(merchant, new_secret())
    row = await store.upsert_webhook_endpoint(pool, merchant=merchant, url=url, secret=sealed)
    return Registered(merchant, url, box.open(merchant, bytes(row["secret"])), row["created"])


async def rotate(pool: asyncpg.Pool, box: SecretBox, merchant: str) -> Rotated:
    secret = new_secret()
    row = await store.rotate_webhook_secret(
        pool, merchant=merchant, secret=box.seal(merchant, secret), overlap_seconds=ROTATION_OVERLAP.total_seconds()
    )
    if row is None:
        raise NoEndpoint(merchant)
    return Rotated(merchant, secret, row["old_secret_until"])


async def disable(pool: asyncpg.Pool, merchant: str) -> None:
    if not await store.disable_webhook_endpoint(pool, merchant=merchant):
        raise NoEndpoint(merchant)


async def endpoints(pool: asyncpg.Pool) -> list[dict]:
    """Every endpoint: merchant, url, enabled, old_secret_until (while rotating), pending, failed."""
    return [dict(r) for r in await store.webhook_endpoints(pool)]


async def failed(pool: asyncpg.Pool, merchant: str | None = None, limit: int = FAILED_LIST_LIMIT) -> list[dict]:
    """Deliveries that ran out of retries, newest first: event_id, merchant, attempts, last_error, ..."""
    return [dict(r) for r in await store.failed_webhook_deliveries(pool, merchant=merchant, limit=limit)]


async def resend(pool: asyncpg.Pool, event_ids: Sequence[str]) -> list[str]:
    """Queue these events for delivery again; returns those queued."""
    return await store.resend_webhook_events(pool, event_ids=event_ids)


async def resend_failed(pool: asyncpg.Pool, merchant: str | None = None) -> int:
    """Queue every failed delivery (of one merchant, or all) again; returns how many."""
    return await store.resend_failed_webhook_deliveries(pool, merchant=merchant)
