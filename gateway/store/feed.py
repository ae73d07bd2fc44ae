"""The events feed: a merchant's events in commit order, read after a position, and their retention.

gateway/feed.py serves GET /v1/events from these; the sweeper prunes old events. SQL in
gateway/sql/feed.sql.
"""

from __future__ import annotations

from typing import NamedTuple

import asyncpg

from gateway.store.loader import SQL_DIR, Executor, all_rows, load

_sql = load(SQL_DIR / "feed.sql")


class FeedPosition(NamedTuple):
    """An event's place in its merchant's feed: (writing transaction, row id)."""

    txid: int
    id: int


FEED_START = FeedPosition(0, 0)


async def event_position(db: Executor, *, merchant: str, event_id: str) -> FeedPosition | None:
    row = await _sql.event_position(db, merchant=merchant, event_id=event_id)
    return FeedPosition(row["txid"], row["id"]) if row else None


async def events_after(db: Executor, *, merchant: str, after: FeedPosition, limit: int) -> list[asyncpg.Record]:
    """Up to `limit` events (id, event_id, body) of the merchant after `after`, in feed order."""
    return await all_rows(_sql.events_after, db, merchant=merchant, txid=after.txid, id=after.id, limit=limit)


async def prune_events(db: Executor, *, retention_seconds: float, limit: int) -> int:
    """Delete up to `limit` events older than `retention_seconds`; returns how many."""
    status = await _sql.prune_events(db, retention_seconds=retention_seconds, limit=limit)
    return int(status.split()[-1])


# ---- webhooks (gateway/webhooks.py, worker/webhook_delivery.py) -------------------------
