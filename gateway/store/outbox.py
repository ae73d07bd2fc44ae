"""The outbox: the messages the phases' statements write into it, and the relay's side of it.

A phase writes its command and event rows in the statement that records it, so each
statement is given the messages as columns (`command_exchange`, `event_body`, ... or their
arrays for a statement over many rows), built here in one way for all of them. The relay
(worker/relay.py) takes the rows out and puts back those it could not publish. SQL of the
relay's side in gateway/sql/outbox.sql.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.messages import OutboxMessage
from gateway.store.loader import SQL_DIR, Connection, all_rows, load

_sql = load(SQL_DIR / "outbox.sql")


def command_columns(command: OutboxMessage) -> dict[str, Any]:
    return {
        "command_exchange": command.exchange,
        "command_routing_key": command.routing_key,
        "command_message_id": command.message_id,
        "command_body": command.body,
        "command_headers": command.headers,
    }


def event_columns(event: OutboxMessage | None) -> dict[str, Any]:
    """An optional event: every column null when there is none (the statement skips it)."""
    return {
        "event_exchange": event.exchange if event else None,
        "event_routing_key": event.routing_key if event else None,
        "event_message_id": event.message_id if event else None,
        "event_body": event.body if event else None,
        "event_headers": event.headers if event else None,
    }


def command_arrays(commands: Sequence[OutboxMessage]) -> dict[str, list[Any]]:
    """command_columns as arrays, for a statement that takes a command per row."""
    return {
        "command_exchanges": [c.exchange for c in commands],
        "command_routing_keys": [c.routing_key for c in commands],
        "command_message_ids": [c.message_id for c in commands],
        "command_bodies": [c.body for c in commands],
        "command_headers": [c.headers for c in commands],
    }


def event_arrays(events: Sequence[OutboxMessage | None]) -> dict[str, list[Any]]:
    """event_columns as arrays, null where a row has no event."""
    return {
        "event_exchanges": [e.exchange if e else None for e in events],
        "event_routing_keys": [e.routing_key if e else None for e in events],
        "event_message_ids": [e.message_id if e else None for e in events],
        "event_bodies": [e.body if e else None for e in events],
        "event_headers": [e.headers if e else None for e in events],
    }


async def take_outbox_batch(db: Connection, *, limit: int, held_back: Sequence[int]) -> list[asyncpg.Record]:
    """Up to `limit` rows, oldest first, deleted in the caller's transaction (SKIP LOCKED: rows
    another relay holds are left to it); ids in `held_back` are skipped."""
    rows = await all_rows(_sql.take_outbox_batch, db, limit=limit, held_back=list(held_back))
    return sorted(rows, key=lambda r: r["id"])


async def restore_outbox_rows(db: Connection, *, rows: Sequence[asyncpg.Record]) -> None:
    """Rows of take_outbox_batch put back as they were, in the same transaction."""
    await _sql.restore_outbox_rows(
        db,
        ids=[r["id"] for r in rows],
        exchanges=[r["exchange"] for r in rows],
        routing_keys=[r["routing_key"] for r in rows],
        message_ids=[r["message_id"] for r in rows],
        bodies=[r["body"] for r in rows],
        headers=[r["headers"] for r in rows],
        created=[r["created_at"] for r in rows],
    )
