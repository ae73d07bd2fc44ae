"""PostgreSQL connections: the pool every process uses, and applying the schema.

The statements themselves are gateway/store.py's; this module opens
connections (with the json/jsonb codecs) and runs a migration.
"""

from __future__ import annotations

import asyncpg
import orjson

from gateway import store


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads
        )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset query: one round trip per use saved.

    asyncpg still rolls back a transaction left open before calling this. Our
    pooled connections never SET, LISTEN or open cursors, and the one
    session-level advisory lock (the reconciliation pass) is released
    explicitly, so there is nothing else to reset.
    """


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10, **pool_kwargs) -> asyncpg.Pool:
    """`pool_kwargs` go to asyncpg.create_pool as they are (e.g. `timeout`)."""
    pool_kwargs.setdefault("reset", _keep_session)
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection, **pool_kwargs)


async def migrate(dsn: str) -> None:
    """Apply schema.sql in one transaction; safe to repeat and on a live database."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await store.lock_migrations(conn)
            await store.apply_schema(conn)
    finally:
        await conn.close()
