"""The busy tables' upkeep, inside gateway-worker, for a server whose autovacuum is off.

PostgreSQL's autovacuum removes the dead rows the payment flow leaves (the outbox is a queue:
every row is inserted, then deleted; operations and payments are updated two or three times
each) and keeps the planner's statistics fresh as tables grow from empty. Where it is turned
off (the CI machine runs so), nothing does either, and two things go wrong under load
(bench `--scenario overload`, auto_explain): a statement prepared while a table was small keeps
its plan, a scan of the whole table where an index lookup was meant (finish_operations read
every operation for each batch); and scans walk ever more dead rows (the outbox trigger's
check read 900 pages of deleted rows per insert). Throughput then falls as the tables grow.

Every UPKEEP_SECONDS this asks which busy tables autovacuum would see to by its own default
thresholds, and runs VACUUM (ANALYZE) or ANALYZE on them. An ANALYZE also makes every session
plan its statements on that table again. With autovacuum on, the query returns nothing and
this costs one small query per interval. Several workers may run it: SKIP_LOCKED leaves a
table one of them is vacuuming to it. A VACUUM runs under the pool's DB_STATEMENT_TIMEOUT_SECONDS
like any statement: a table too big to vacuum in that time needs the server's autovacuum on.
"""

from __future__ import annotations

import asyncio

import asyncpg

from gateway import logs, process, store

log = logs.get("upkeep")

UPKEEP_SECONDS = 2.0


async def keep_tables(pool: asyncpg.Pool) -> list[str]:
    """One pass: the tables vacuumed or analyzed."""
    done = []
    for row in await store.tables_due_upkeep(pool):
        await store.vacuum_or_analyze(pool, table=row["table_name"], vacuum=row["vacuum"])
        done.append(row["table_name"])
    return done


async def run(pool: asyncpg.Pool, stop: asyncio.Event, interval: float = UPKEEP_SECONDS) -> None:
    """keep_tables every `interval` seconds until `stop` is set; a failed pass is logged and tried
    again at the next tick."""
    while not await process.wait(stop, interval):
        try:
            if done := await keep_tables(pool):
                log.debug("tables vacuumed or analyzed", tables=done)
        except Exception as exc:
            log.warning("table upkeep failed", error=type(exc).__name__, detail=str(exc)[:200])
