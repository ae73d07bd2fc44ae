"""Moving the vault to the newest card key (gateway/ops/cardkeys.py, `gatewayctl rekey-cards`)
on a database of its own: it reseals every card there."""

from __future__ import annotations

import asyncio
import base64
import os

import orjson
import pytest

from gateway import db
from gateway.cards import CardKey, CardVault, SealedCard
from gateway.ops import cardkeys
from harness import services
from harness.procs import run_script
from tests.support import factories

pytestmark = pytest.mark.timeout(120)

OLD, OLDER, NEW = CardKey("old", os.urandom(32)), CardKey("older", os.urandom(32)), CardKey("new", os.urandom(32))


def keys_variable(*keys: CardKey) -> str:
    return ",".join(f"{k.id}:{base64.b64encode(k.secret).decode()}" for k in keys)


@pytest.fixture
async def database_url(server_urls):
    async with services.private_database(server_urls[0]) as url:
        yield url


@pytest.fixture
async def pool(database_url):
    opened = await db.create_pool(database_url, min_size=1, max_size=4)
    try:
        yield opened
    finally:
        await opened.close()


async def sealed_under(pool) -> dict[str, str]:
    return dict(await pool.fetch("SELECT payment_id, key_id FROM card_vault"))


async def test_every_card_moves_to_the_newest_key_in_batches(pool):
    under_older = [await factories.authorize(pool, CardVault([OLDER]), 100 + i) for i in range(3)]
    under_old = [await factories.authorize(pool, CardVault([OLD]), 200 + i) for i in range(4)]
    under_new = await factories.authorize(pool, CardVault([NEW]), 7)
    vault = CardVault([NEW, OLD, OLDER])

    report = await cardkeys.reseal_all(pool, vault, batch=2)

    assert (report.key_id, report.resealed, report.unreadable, report.left) == ("new", 7, [], {})
    assert set((await sealed_under(pool)).values()) == {"new"}
    newest_only = CardVault([NEW])
    for payment_id in [*under_older, *under_old, under_new]:
        sealed = await pool.fetchrow("SELECT key_id, sealed FROM card_vault WHERE payment_id = $1", payment_id)
        number, cvv = newest_only.open(payment_id, SealedCard(sealed["key_id"], bytes(sealed["sealed"])))
        assert (number, cvv) == factories.HAPPY[:2]
    assert (await cardkeys.reseal_all(pool, vault)).resealed == 0  # nothing left to do: safe to repeat


async def test_a_card_no_key_opens_is_reported_and_left_as_it_is(pool):
    lost = await factories.authorize(pool, CardVault([CardKey("lost", os.urandom(32))]), 1)
    moved = await factories.authorize(pool, CardVault([OLD]), 2)

    report = await cardkeys.reseal_all(pool, CardVault([NEW, OLD]), batch=1)

    assert (report.resealed, report.unreadable, report.left) == (1, [(lost, "lost")], {"lost": 1})
    assert await sealed_under(pool) == {lost: "lost", moved: "new"}


async def test_a_card_a_worker_holds_is_skipped_and_gatewayctl_says_to_run_again(pool, database_url):
    held = await factories.authorize(pool, CardVault([OLD]), 3)
    free = await factories.authorize(pool, CardVault([OLD]), 4)
    env = {"DATABASE_URL": database_url, "CARD_ENCRYPTION_KEYS": keys_variable(NEW, OLD), "LOG_LEVEL": None}
    async with pool.acquire() as conn, conn.transaction():
        # a worker recording this authorization's outcome holds its vault row
        await conn.execute("SELECT 1 FROM card_vault WHERE payment_id = $1 FOR UPDATE", held)
        result = await asyncio.to_thread(run_script, "gatewayctl", "rekey-cards", "--json", env=env)
    assert result.returncode == 1, result.stderr
    assert orjson.loads(result.stdout) == {"key_id": "new", "resealed": 1, "unreadable": [], "left": {"old": 1}}
    assert await sealed_under(pool) == {held: "old", free: "new"}

    result = await asyncio.to_thread(run_script, "gatewayctl", "rekey-cards", env=env)
    assert result.returncode == 0, result.stderr
    assert "1 card(s) sealed again under card key 'new'" in result.stdout
    assert "older keys can be dropped" in result.stdout
    assert await sealed_under(pool) == {held: "new", free: "new"}


async def test_rekey_cards_without_card_keys_is_a_configuration_error(database_url):
    env = {"DATABASE_URL": database_url, "CARD_ENCRYPTION_KEYS": None, "CARD_ENCRYPTION_KEY": None}
    result = await asyncio.to_thread(run_script, "gatewayctl", "rekey-cards", env=env)
    assert result.returncode == 2 and "CARD_ENCRYPTION_KEYS" in result.stderr
