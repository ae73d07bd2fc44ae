"""Postgres access: the pool, the named queries and applying the schema.

Every SQL statement lives in gateway/sql/*.sql under a `-- name: x` header
and is loaded once into `Q`; code refers to statements by name.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import asyncpg
import orjson

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for file in sorted(resources.files("gateway.sql").iterdir(), key=lambda f: f.name):
        if not file.name.endswith(".sql"):
            continue
        parts = _HEADER.split(file.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name} is defined twice")
            queries[name] = body.strip()
    return queries


Q = _load_queries()

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
_MIGRATE_LOCK = 0x6761746577617921  # one migration at a time across processes


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, schema="pg_catalog", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads
        )


async def connect(dsn: str, **kwargs) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, **kwargs)
    await _init_connection(conn)
    return conn


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


def schema_sql() -> str:
    return SCHEMA_PATH.read_text()


async def migrate(dsn: str) -> None:
    """Apply schema.sql in one transaction; safe to repeat and on a live database."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await conn.execute(schema_sql())
    finally:
        await conn.close()
