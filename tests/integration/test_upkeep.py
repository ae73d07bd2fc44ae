"""worker/upkeep.py against the real PostgreSQL: with the server's autovacuum off (as on the CI
machine) the outbox's deleted rows are vacuumed once there are as many as autovacuum would
wait for; with it on, the gateway leaves the tables to it."""

from __future__ import annotations

import asyncio

import pytest

from gateway import store
from worker import upkeep

pytestmark = pytest.mark.timeout(60)

DEAD_ROWS = 300


async def outbox_stats(pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables"
        " WHERE relname = 'outbox' AND schemaname = current_schema()"
    )
    return row["n_dead_tup"], row["vacuum_count"]


async def leave_dead_outbox_rows(pool, count: int) -> None:
    """`count` outbox rows inserted and deleted (as the relay deletes what it published), and the
    statistics sent, so that pg_stat_user_tables counts them."""
    async with pool.acquire() as conn:
        ids = await conn.fetch(
            """INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
               SELECT 'payments.upkeep-test', 'nothing', 'upkeep-' || gen_random_uuid(), '\\x7b7d'::bytea, '{}'
                 FROM generate_series(1, $1) RETURNING id""",
            count,
        )
        await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", [r["id"] for r in ids])
        await conn.execute("SELECT pg_stat_force_next_flush()")
    for _ in range(100):
        if (await outbox_stats(pool))[0] >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the deleted rows never showed in pg_stat_user_tables")


async def test_dead_outbox_rows_are_vacuumed_when_autovacuum_is_off(pool) -> None:
    await leave_dead_outbox_rows(pool, DEAD_ROWS)
    _, vacuums_before = await outbox_stats(pool)
    pages_before = await pool.fetchval("SELECT pg_relation_size('outbox')")
    done = await upkeep.keep_tables(pool)
    dead, vacuums = await outbox_stats(pool)
    if await pool.fetchval("SHOW autovacuum") == "off":
        assert "outbox" in done
        assert vacuums == vacuums_before + 1
        assert dead < DEAD_ROWS
        # The emptied pages at the end stay: cutting them off would lock out every insert.
        assert await pool.fetchval("SELECT pg_relation_size('outbox')") == pages_before
    else:  # autovacuum sees to it: the gateway does nothing
        assert done == []
        assert vacuums == vacuums_before


async def test_only_the_busy_tables_are_kept_up(pool) -> None:
    with pytest.raises(ValueError, match="not a table the gateway keeps up"):
        await store.vacuum_or_analyze(pool, table="payments; DROP TABLE payments", vacuum=True)
    assert await pool.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'payments'") == 1
