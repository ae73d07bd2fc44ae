"""Payments made the way the API makes them, for tests that need one in the database."""

from __future__ import annotations

import uuid

import orjson

from gateway.cards import CardVault
from gateway.fingerprints import Fingerprinter
from gateway.payments import intake
from tests.support import phases

HAPPY = ("4111111111111111", "123", 12, 2030)  # docs/bank.md's happy-path card
# Fingerprints under the tests' card key (tests/conftest.py DEV_CARD_KEY).
FINGERPRINTER = Fingerprinter([b"k" * 32])


def request(path: str = "/v1/payments", body: bytes = b"", *, key: str | None = None) -> intake.IdempotentRequest:
    """FicMart's POST to `path` under `key` (a fresh one by default), as the API records it."""
    fingerprints = FINGERPRINTER.of("POST", path, body)
    return intake.IdempotentRequest("ficmart", key or uuid.uuid4().hex, "POST", path, fingerprints)


async def authorize(pool, vault: CardVault, amount: int, card: tuple = HAPPY) -> str:
    """A new pending payment (fresh order and idempotency key); returns its id."""
    number, cvv, month, year = card
    req = request(body=uuid.uuid4().bytes)
    resp = await phases.authorize(
        pool,
        vault,
        req,
        order_id=f"ord_{uuid.uuid4().hex[:10]}",
        customer_id="cus_1",
        amount=amount,
        card=intake.CardInput(number, cvv, month, year),
    )
    return orjson.loads(resp.body)["id"]
