"""What the console changes, each in one transaction with its history row.

An operator's action is recorded in the payment's history (status unchanged,
cause `ops:<name>:<action>`) in the same transaction as the change itself:
the history says who did it exactly when it happened.
"""

from __future__ import annotations

import asyncpg

from gateway import store
from gateway.timefmt import now


def cause(actor: str, action: str) -> str:
    """The history cause of an operator's action, e.g. ops:alice:replay."""
    return f"ops:{actor}:{action}"


async def unpark(pool: asyncpg.Pool, operation_id: str, *, actor: str, forced: bool) -> bool:
    """payments.unpark as ops does it from the console: back in the normal flow, with a history row
    naming the operator. False (and nothing written) when the operation is no longer pending."""
    async with pool.acquire() as conn, conn.transaction():
        if not await store.unpark_operation(conn, operation_id=operation_id, forced=forced):
            return False
        action = "replay:force" if forced else "replay"
        await store.record_ops_action(conn, operation_id=operation_id, cause=cause(actor, action), at=now())
    return True
