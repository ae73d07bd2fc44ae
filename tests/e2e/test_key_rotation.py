"""Rotating the card key with authorizations pending across it, on the real processes.

The gateway starts with one key A (CARD_ENCRYPTION_KEY, id "default") and no worker, so an
authorization waits with its card sealed under A. The API moves to CARD_ENCRYPTION_KEYS=b:B,
default:A: a retry of that authorization is still recognised (the idempotency fingerprint
is checked under every card key), and a new card is sealed under B. A worker with B,A then
sends both. Another card sealed under A (an API process not restarted yet) is moved to B by
`gatewayctl rekey-cards`, after which a worker with B alone still sends it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid

import orjson
import pytest

from harness.procs import run_script
from tests.e2e.stack import Stack

pytestmark = pytest.mark.timeout(240)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def vault_keys(stack: Stack) -> dict[str, str]:
    """Payment id -> the id of the key its card is sealed under."""
    assert stack.pool is not None
    return dict(await stack.pool.fetch("SELECT payment_id, key_id FROM card_vault"))


async def test_pending_cards_survive_a_key_rotation_and_a_rekey(server_urls):
    key_a, key_b = new_key(), new_key()
    only_a = {"CARD_ENCRYPTION_KEY": key_a, "CARD_ENCRYPTION_KEYS": None}
    rotated = {"CARD_ENCRYPTION_KEY": None, "CARD_ENCRYPTION_KEYS": f"b:{key_b},default:{key_a}"}
    only_b = {"CARD_ENCRYPTION_KEY": None, "CARD_ENCRYPTION_KEYS": f"b:{key_b}"}
    stack = Stack(server_urls, key_a)
    try:
        await stack.start("api", "relay")  # no worker yet: authorizations wait with their card in the vault
        client = stack.client(patience=60)
        cards = await stack.extra_cards(3)

        key, order = uuid.uuid4().hex, f"ord_{uuid.uuid4().hex[:10]}"
        first = await client.authorize(order_id=order, amount=1_001, card=cards[0], key=key)
        assert first.status == 202, first
        before = first.body["id"]
        assert await vault_keys(stack) == {before: "default"}

        await stack.restart("api", env=rotated)
        again = await client.authorize(order_id=order, amount=1_001, card=cards[0], key=key)
        assert (again.status, again.body["id"], again.headers.get("Idempotent-Replayed")) == (202, before, "true")
        after = (await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=1_002, card=cards[1])).body[
            "id"
        ]
        assert await vault_keys(stack) == {before: "default", after: "b"}

        await stack.start_process("worker", env=rotated)
        for payment_id in (before, after):
            assert (await client.settled(payment_id, timeout=60))["status"] == "authorized", payment_id
        await stack.terminate("worker")

        # An API process still on A alone seals one more card under A.
        await stack.restart("api", env=only_a)
        late = (await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=1_003, card=cards[2])).body["id"]
        assert await vault_keys(stack) == {late: "default"}
        await stack.restart("api", env=rotated)

        cli_env = {"DATABASE_URL": stack.database_url, "GATEWAY_ENV": "development", "LOG_LEVEL": None, **rotated}
        result = await asyncio.to_thread(run_script, "gatewayctl", "rekey-cards", "--json", env=cli_env)
        assert result.returncode == 0, result.stderr
        assert orjson.loads(result.stdout) == {"key_id": "b", "resealed": 1, "unreadable": [], "left": {}}
        assert await vault_keys(stack) == {late: "b"}

        # Key A dropped everywhere: the card sealed under it is still sent.
        await stack.restart("api", env=only_b)
        await stack.restart("worker", env=only_b)
        assert (await client.settled(late, timeout=60))["status"] == "authorized"
        assert await vault_keys(stack) == {}
    finally:
        await stack.close()
