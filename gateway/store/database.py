"""The database as a whole: the schema applied under the migration lock, what it holds, whether it answers.

`gatewayctl migrate` (through gateway/db.py) applies schema.sql and reports what it created;
the readiness probes and the long polls ping. SQL in gateway/sql/database.sql.
"""

from __future__ import annotations

from pathlib import Path

from gateway.store.loader import SQL_DIR, Connection, Executor, all_rows, load

SCHEMA_PATH = Path(__file__).resolve().parent.parent.parent / "schema.sql"

# An advisory lock key of the gateway's own (the idempotency keys' locks are keyed by
# idempotency_lock_key() in schema.sql; reconciliation's is in reconciliation.py).
MIGRATION_LOCK = 0x6761746577617921  # one `gatewayctl migrate` at a time

_sql = load(SQL_DIR / "database.sql")


async def apply_schema(conn: Connection) -> None:
    """Run schema.sql (every statement idempotent); the caller holds lock_migrations."""
    await conn.execute(SCHEMA_PATH.read_text())


async def lock_migrations(conn: Connection) -> None:
    """Wait for the migration lock; held until the caller's transaction ends."""
    await _sql.lock_migrations(conn, lock=MIGRATION_LOCK)


async def schema_objects(db: Executor) -> set[tuple[str, str]]:
    """(kind, name) of the tables, indexes, functions and triggers present."""
    return {(r["kind"], r["name"]) for r in await all_rows(_sql.schema_objects, db)}


async def ping(db: Executor) -> bool:
    return await _sql.ping(db) == 1
