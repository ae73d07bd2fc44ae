"""Each worker's bank circuit breaker as it last reported it.

gateway-worker records its breaker's state when it changes and every minute anyway
(worker/consumer.py); the /ops console shows them, and the API's admission reads them (backlog.work_waiting). SQL in
gateway/sql/circuit.sql.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from gateway.store.loader import SQL_DIR, Executor, all_rows, load

_sql = load(SQL_DIR / "circuit.sql")


async def record_circuit_state(
    db: Executor, *, worker_id: str, open: bool, changed_at: datetime, detail: str | None
) -> None:
    """Upsert one worker's bank circuit breaker state (bank_circuit)."""
    await _sql.record_circuit_state(db, worker_id=worker_id, open=open, changed_at=changed_at, detail=detail)


async def circuit_states(db: Executor) -> list[asyncpg.Record]:
    """worker_id, open, changed_at, detail of every worker that reported, by worker id."""
    return await all_rows(_sql.circuit_states, db)
