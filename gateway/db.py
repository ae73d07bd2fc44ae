"""PostgreSQL connections: the pool every process uses, and applying the schema.

The statements themselves are the gateway/store package's; this module opens
connections (with the json/jsonb codecs) and runs a migration.
"""

from __future__ import annotations

import asyncpg
import orjson

from gateway import store
from gateway.config import DEFAULT_DB_TIMEOUTS, DbTimeouts


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


# The server gave up on a statement (DB_LOCK_TIMEOUT_SECONDS: a row another session holds;
# DB_STATEMENT_TIMEOUT_SECONDS): its transaction is rolled back, the connection still good.
TIMED_OUT = (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError)


class _Pool(asyncpg.Pool):
    """A pool whose acquire() waits at most `acquire_timeout` unless told otherwise, so that
    pool.fetch() and friends (which acquire without a timeout) are bounded too."""

    __slots__ = ("acquire_timeout",)
    acquire_timeout: float

    def acquire(self, *, timeout: float | None = None):
        return super().acquire(timeout=self.acquire_timeout if timeout is None else timeout)


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, timeouts: DbTimeouts = DEFAULT_DB_TIMEOUTS, **connect_kwargs
) -> asyncpg.Pool:
    """A pool bounded in time by `timeouts` (config.DbTimeouts): a statement or lock wait past
    its bound fails on the server (QueryCanceledError, LockNotAvailableError) and its
    transaction rolls back. `connect_kwargs` go to asyncpg as they are (e.g. `timeout`; any
    `server_settings` are added to those timeouts)."""
    pool = _Pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        init=_init_connection,
        reset=_keep_session,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        command_timeout=timeouts.command,
        server_settings={
            "statement_timeout": _ms(timeouts.statement),
            "lock_timeout": _ms(timeouts.lock),
            "idle_in_transaction_session_timeout": _ms(timeouts.idle_in_transaction),
            **connect_kwargs.pop("server_settings", {}),
        },
        **connect_kwargs,
    )
    pool.acquire_timeout = timeouts.acquire
    return await pool


# A LISTEN connection is idle between notifications for as long as the process lives: no
# timeout set for the database or its role (as ours are set for the pools) may end it.
_LISTENING = {"statement_timeout": "0", "idle_in_transaction_session_timeout": "0", "idle_session_timeout": "0"}


async def listen_connection(dsn: str, *, timeout: float, application_name: str | None = None) -> asyncpg.Connection:
    """A connection for LISTEN only (the relay's, the long-poll watcher's), without timeouts."""
    named = {} if application_name is None else {"application_name": application_name}
    return await asyncpg.connect(dsn, timeout=timeout, server_settings={**_LISTENING, **named})


async def migrate(dsn: str) -> None:
    """Apply schema.sql in one transaction; safe to repeat and on a live database."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await store.lock_migrations(conn)
            await store.apply_schema(conn)
    finally:
        await conn.close()
