"""The events feed (GET /v1/events): a merchant's payment events in feed order, from a cursor.

Every event the outbox carries is recorded in `events` in the transaction that wrote it
(schema.sql). The feed shows the events of transactions older than every transaction
still running, ordered by (transaction, row): an event that commits late was written by a
transaction a reader could not see past, so a cursor never skips it. Bodies are the
RabbitMQ messages' bodies, byte for byte: the page is assembled from them, not re-encoded.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import orjson

from gateway import store

# How often a long poll looks again while nothing new is visible. The feed is read by a
# merchant's catch-up job or receiver, a few waiters, not one per payment: a look is one
# indexed query, cheaper than a NOTIFY in every payment transaction.
WAIT_POLL_SECONDS = 0.25


class UnknownCursor(Exception):
    """`after` names no event of this merchant (never, or pruned after the retention)."""


@dataclass(frozen=True)
class Page:
    bodies: list[bytes]
    has_more: bool
    next_after: str | None  # pass as `after` to continue; the same cursor when the page is empty

    def json(self) -> bytes:
        more = b"true" if self.has_more else b"false"
        return b'{"data":[%b],"has_more":%b,"next_after":%b}' % (
            b",".join(self.bodies),
            more,
            orjson.dumps(self.next_after),
        )


async def read(db: store.Executor, merchant: str, *, after: str | None, limit: int) -> Page:
    position = store.FEED_START
    if after is not None:
        found = await store.event_position(db, merchant=merchant, event_id=after)
        if found is None:
            raise UnknownCursor(after)
        position = found
    rows = await store.events_after(db, merchant=merchant, after=position, limit=limit + 1)
    shown = rows[:limit]
    return Page([bytes(r["body"]) for r in shown], len(rows) > limit, shown[-1]["event_id"] if shown else after)


async def wait(db: store.Executor, merchant: str, *, after: str | None, limit: int, seconds: float) -> Page:
    """The next page once it has an event, or the empty page after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        page = await read(db, merchant, after=after, limit=limit)
        left = deadline - time.monotonic()
        if page.bodies or left <= 0:
            return page
        await asyncio.sleep(min(WAIT_POLL_SECONDS, left))
