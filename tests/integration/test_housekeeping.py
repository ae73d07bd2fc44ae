"""The sweeper's housekeeping against a real PostgreSQL: old idempotency keys pruned in small
batches without holding up the API, and no card kept in the vault past its time.

Rows are made old by moving their created_at back, as the clock would. The
API is the real aiohttp app (tests/integration/conftest.py) on the session's
database.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from gateway import domain, store
from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.domain import BankOutcome, Verdict
from gateway.ops import decisions
from gateway.payments import settlement
from gateway.timefmt import iso
from tests.integration.conftest import auth_body
from tests.support import factories, phases
from worker import sweeper

pytestmark = pytest.mark.timeout(60)

RETENTION = timedelta(hours=48)
CARD_MAX_AGE = timedelta(hours=24)
MERCHANT = "prune-test"


async def stored_keys(pool, count: int, *, hours_ago: float, tag: str) -> None:
    """`count` stored responses of MERCHANT, created `hours_ago`."""
    await pool.execute(
        """INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status,
                                         response_body, location, created_at)
           SELECT $1, $2 || g, 'POST', '/v1/payments', 'f', 202, '\\x7b7d'::bytea, NULL,
                  now() - make_interval(secs => $3 * 3600)
             FROM generate_series(1, $4) AS g""",
        MERCHANT,
        f"{tag}-",
        hours_ago,
        count,
    )


async def keys_left(pool, tag: str) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM idempotency_keys WHERE merchant = $1 AND key LIKE $2", MERCHANT, f"{tag}-%"
    )


async def timed_authorize(api) -> float:
    """Seconds an accepted POST /v1/payments takes (its own new key)."""
    started = time.monotonic()
    resp, body = await asyncio.wait_for(api.post("/v1/payments", auth_body()), 10)
    assert resp.status == 202, body
    return time.monotonic() - started


async def test_old_keys_go_in_batches_while_the_api_goes_on_unhindered(pool, api):
    tag = uuid.uuid4().hex[:8]
    await stored_keys(pool, 1200, hours_ago=72, tag=f"old{tag}")
    await stored_keys(pool, 30, hours_ago=47, tag=f"young{tag}")  # inside the retention
    baseline = min([await timed_authorize(api) for _ in range(3)])

    async with pool.acquire() as holder, pool.acquire() as pruner:
        # A transaction of someone else's holds one old row: the batches skip it.
        held = holder.transaction()
        await held.start()
        await holder.execute(
            "SELECT 1 FROM idempotency_keys WHERE merchant = $1 AND key = $2 FOR UPDATE", MERCHANT, f"old{tag}-7"
        )
        # One batch, left open: its row locks are held while the API works.
        batch = pruner.transaction()
        await batch.start()
        first = await store.prune_idempotency_keys(pruner, retention_seconds=RETENTION.total_seconds(), limit=500)
        assert first == 500
        during = [await timed_authorize(api) for _ in range(3)]
        # Reading a key the open batch is deleting (the API's idempotency check) is not held up either.
        seen = await asyncio.wait_for(
            pool.fetchval(
                "SELECT count(*) FROM idempotency_keys WHERE merchant = $1 AND key LIKE $2", MERCHANT, f"old{tag}-%"
            ),
            5,
        )
        assert seen == 1200  # the batch has not committed: others still see every row
        await batch.commit()
        assert await keys_left(pool, f"old{tag}") == 700

        pruned = await sweeper.prune_idempotency_keys(pool, RETENTION, batch=250)
        assert pruned == 699  # three batches of 250 took all but the held row, the last one came back short
        assert await keys_left(pool, f"old{tag}") == 1
        await held.rollback()

    assert await sweeper.prune_idempotency_keys(pool, RETENTION, batch=250) == 1
    assert await keys_left(pool, f"old{tag}") == 0 and await keys_left(pool, f"young{tag}") == 30
    # Not blocked: as fast as without the open batch, give or take a slow CI machine.
    assert max(during) < baseline + 1.0, (baseline, during)


async def test_the_apis_keys_older_than_the_retention_are_forgotten_and_younger_ones_replayed(pool, api):
    body = auth_body()
    key = uuid.uuid4().hex
    first, payment = await api.post("/v1/payments", body, key=key)
    assert first.status == 202
    again, _ = await api.post("/v1/payments", body, key=key)
    assert again.headers.get("Idempotent-Replayed") == "true"
    await sweeper.prune_idempotency_keys(pool, RETENTION, batch=100)
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 1
    await pool.execute("UPDATE idempotency_keys SET created_at = now() - interval '49 hours' WHERE key = $1", key)
    await sweeper.prune_idempotency_keys(pool, RETENTION, batch=100)
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0


# ---- the card vault ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vault(card_key) -> CardVault:
    return CardVault([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))])


async def aged_card(pool, vault, hours: float) -> tuple[str, str]:
    pid = await factories.authorize(pool, vault, 900)
    await pool.execute(
        "UPDATE card_vault SET created_at = now() - make_interval(secs => $2 * 3600) WHERE payment_id = $1",
        pid,
        hours,
    )
    op = await pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", pid)
    return pid, op


async def attention_events(pool, pid: str) -> int:
    rows = await pool.fetch("SELECT body FROM outbox WHERE routing_key = 'payment.attention_required'")
    return sum(orjson.loads(r["body"])["payment"]["id"] == pid for r in rows)


async def test_the_vault_keeps_no_card_past_its_time_and_the_authorization_parks_for_ops(pool, vault):
    waiting_pid, waiting_op = await aged_card(pool, vault, 25)  # pending, its command in a retry queue
    parked_pid, parked_op = await aged_card(pool, vault, 30)  # parked 10 hours ago
    assert isinstance(await phases.claim(pool, parked_op, "w", 30), settlement.Claim)
    await settlement.park(pool, parked_op, {"code": "bank_connection", "message": "down", "retryable": True})
    await pool.execute("UPDATE operations SET updated_at = now() - interval '10 hours' WHERE id = $1", parked_op)
    parked_since = await pool.fetchval("SELECT updated_at FROM operations WHERE id = $1", parked_op)
    leased_pid, leased_op = await aged_card(pool, vault, 26)  # a bank call may be running with it
    assert isinstance(await phases.claim(pool, leased_op, "w", 30), settlement.Claim)
    fresh_pid, fresh_op = await aged_card(pool, vault, 23)

    purged = await sweeper.purge_old_cards(pool, CARD_MAX_AGE, limit=500)
    assert purged == 2

    cards = {r["payment_id"] for r in await pool.fetch("SELECT payment_id FROM card_vault")}
    assert waiting_pid not in cards and parked_pid not in cards
    assert leased_pid in cards and fresh_pid in cards
    for pid, op in ((waiting_pid, waiting_op), (parked_pid, parked_op)):
        operation = await pool.fetchrow("SELECT * FROM operations WHERE id = $1", op)
        payment = await pool.fetchrow("SELECT * FROM payments WHERE id = $1", pid)
        assert operation["status"] == "pending" and operation["parked"]
        assert operation["last_error"]["code"] == "card_purged" and "card purged" in operation["last_error"]["message"]
        assert payment["status"] == "pending" and payment["attention_required"]
        assert payment["last_error"]["code"] == "card_purged"
    assert await attention_events(pool, waiting_pid) == 1
    assert await attention_events(pool, parked_pid) == 1  # from its parking; flagged already, not again
    # Parked since when it was parked, not since the purge: ops may abandon it 14 h from now.
    assert await pool.fetchval("SELECT updated_at FROM operations WHERE id = $1", parked_op) == parked_since
    # The command still waiting in a retry queue will find it parked: no bank call without a card.
    assert not isinstance(await phases.claim(pool, waiting_op, "w2", 30), settlement.Claim)

    # Abandoned once parked long enough; and a later pass has nothing left to purge of these.
    with pytest.raises(decisions.OpsRefused, match="parked for 10"):
        await decisions.abandon(pool, parked_pid, reason="card gone", by="ops", parked_at_least=CARD_MAX_AGE)
    await pool.execute("UPDATE operations SET updated_at = now() - interval '25 hours' WHERE id = $1", parked_op)
    decision = await decisions.abandon(pool, parked_pid, reason="card gone", by="ops", parked_at_least=CARD_MAX_AGE)
    assert decision.payment["status"] == "declined"
    assert await sweeper.purge_old_cards(pool, CARD_MAX_AGE, limit=500) == 0


async def flagged_approval(pool, vault, *, expired_hours_ago: float, code: str = "possible_duplicate_hold") -> str:
    """An authorization approved with a doubt (an earlier attempt's answer lost), its hold expiring
    `expired_hours_ago` hours ago at the bank."""
    pid = await factories.authorize(pool, vault, 700)
    op = await pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", pid)
    claim = await phases.claim(pool, op, "test-worker", 30)
    assert isinstance(claim, settlement.Claim)
    expires = datetime.now(UTC) - timedelta(hours=expired_hours_ago)
    approval = BankOutcome("ok", 200, body={"authorization_id": f"auth_{uuid.uuid4()}", "expires_at": iso(expires)})
    doubt = domain.Doubt(code, "maybe a second hold", code)
    assert await phases.record_outcome(pool, claim, Verdict.SUCCEEDED, approval, 1, doubt)
    return pid


async def test_a_possible_second_hold_closes_itself_once_the_hold_has_lapsed_at_the_bank(pool, vault):
    lapsed = await flagged_approval(pool, vault, expired_hours_ago=3)
    recent = await flagged_approval(pool, vault, expired_hours_ago=0.25)  # within the bank-clock margin
    other = await flagged_approval(pool, vault, expired_hours_ago=3, code="bank_answer_invalid")

    assert await sweeper.close_lapsed_doubts(pool, 100) >= 1

    flags = dict(
        await pool.fetch("SELECT id, attention_required FROM payments WHERE id = ANY($1)", [lapsed, recent, other])
    )
    assert flags == {lapsed: False, recent: True, other: True}
    causes = await pool.fetch("SELECT cause FROM payment_history WHERE payment_id = $1 ORDER BY id", lapsed)
    assert "ops:sweeper:lapsed:any second hold has lapsed at the bank" in causes[-1]["cause"]
    assert sum("ops:sweeper:lapsed" in c["cause"] for c in causes) == 1


async def lapsed_hold(pool, vault) -> str:
    """An authorized payment whose hold lapsed at the bank an hour ago."""
    pid = await factories.authorize(pool, vault, 800)
    op = await pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", pid)
    claim = await phases.claim(pool, op, "test-worker", 30)
    assert isinstance(claim, settlement.Claim)
    expired = iso(datetime.now(UTC) - timedelta(hours=1))
    approval = BankOutcome("ok", 200, body={"authorization_id": f"auth_{uuid.uuid4()}", "expires_at": expired})
    assert await phases.record_outcome(pool, claim, Verdict.SUCCEEDED, approval, 1)
    return pid


async def test_a_payment_locked_elsewhere_waits_for_the_next_pass_and_the_others_expire(pool, vault, database_url):
    held, free = await lapsed_hold(pool, vault), await lapsed_hold(pool, vault)
    other = await asyncpg.connect(database_url)  # a stuck session holding one payment's row
    try:
        locking = other.transaction()
        await locking.start()
        await other.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", held)
        await sweeper.expire_lapsed_holds(pool, 100)  # no error: past the lock timeout, the next one
        await locking.rollback()
    finally:
        await other.close()
    statuses = dict(await pool.fetch("SELECT id, status FROM payments WHERE id = ANY($1)", [held, free]))
    assert statuses == {held: "authorized", free: "expired"}
    await sweeper.expire_lapsed_holds(pool, 100)  # the next pass
    assert await pool.fetchval("SELECT status FROM payments WHERE id = $1", held) == "expired"
