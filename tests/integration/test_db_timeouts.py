"""Database timeouts: a request that meets a row lock held elsewhere answers, with nothing done.

The pool (gateway.db.create_pool, the defaults of config.DbTimeouts) gives up on a
lock after DB_LOCK_TIMEOUT_SECONDS; the request's transaction is rolled back and
the caller told to retry. The bound below (ANSWER_WITHIN) is far above the lock
timeout: it only tells "answered" from "waits as long as the lock is held".
"""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlparse

import asyncpg
import pytest

from gateway import config, db
from tests.integration.conftest import authorized

pytestmark = pytest.mark.asyncio(loop_scope="session")

ANSWER_WITHIN = 30.0


async def test_a_capture_meeting_a_held_row_lock_answers_503_with_nothing_done(api, pool, database_url):
    payment = await authorized(api, pool)
    key = uuid.uuid4().hex
    other = await asyncpg.connect(database_url)  # a stuck session: an ops tool, a hung script
    try:
        locking = other.transaction()
        await locking.start()
        await other.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", payment["id"])
        async with asyncio.timeout(ANSWER_WITHIN):
            resp, body = await api.post(f"/v1/payments/{payment['id']}/capture", key=key)
        assert resp.status == 503, body
        assert body["error"]["code"] == "service_unavailable" and resp.headers["Retry-After"] == "1"
        # Nothing half done: no operation, no history row, no stored answer for the key.
        assert await pool.fetchval("SELECT status FROM payments WHERE id = $1", payment["id"]) == "authorized"
        assert await pool.fetchval("SELECT count(*) FROM operations WHERE payment_id = $1", payment["id"]) == 1
        assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0
        await locking.rollback()
    finally:
        await other.close()
    resp, body = await api.post(f"/v1/payments/{payment['id']}/capture", key=key)
    assert resp.status == 202 and body["status"] == "capturing", body
    assert "Idempotent-Replayed" not in resp.headers


async def test_pooled_connections_carry_the_configured_timeouts(database_url):
    timeouts = config.parse(
        {
            "GATEWAY_ENV": "development",
            "DB_ACQUIRE_TIMEOUT_SECONDS": "0.5",
            "DB_LOCK_TIMEOUT_SECONDS": "1.5",
            "DB_STATEMENT_TIMEOUT_SECONDS": "20",
            "DB_COMMAND_TIMEOUT_SECONDS": "25",
            "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS": "45",
        }
    ).db_timeouts
    pool = await db.create_pool(database_url, min_size=1, max_size=1, timeouts=timeouts)
    try:
        shown = await pool.fetchrow(
            "SELECT current_setting('lock_timeout') AS lock, current_setting('statement_timeout') AS statement, "
            "current_setting('idle_in_transaction_session_timeout') AS idle"
        )
        assert dict(shown) == {"lock": "1500ms", "statement": "20s", "idle": "45s"}
        async with pool.acquire():  # the pool's only connection, taken
            async with asyncio.timeout(ANSWER_WITHIN):
                with pytest.raises(TimeoutError):
                    await pool.fetchval("SELECT 1")  # waits for a connection at most 0.5 s
    finally:
        await pool.close()


async def test_a_listen_connection_has_no_timeouts_whatever_the_database_sets(database_url):
    # A role or database default (as an operator might set) would end an idle LISTEN session.
    name = f"timeouts_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{name}'")
        await admin.execute(
            f"ALTER ROLE {name} SET statement_timeout = '1s'; ALTER ROLE {name} SET idle_session_timeout = '1s'; "
            f"ALTER ROLE {name} SET idle_in_transaction_session_timeout = '1s'"
        )
        url = urlparse(database_url)
        dsn = url._replace(netloc=f"{name}:{name}@{url.hostname}:{url.port or 5432}").geturl()
        listener = await db.listen_connection(dsn, timeout=10)
        try:
            shown = await listener.fetchrow(
                "SELECT current_setting('statement_timeout') AS statement, "
                "current_setting('idle_session_timeout') AS idle, "
                "current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction"
            )
            assert dict(shown) == {"statement": "0", "idle": "0", "idle_in_transaction": "0"}
        finally:
            await listener.close()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()
