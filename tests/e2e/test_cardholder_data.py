"""No card number or CVV after authorization, in any form, anywhere the gateway writes.

A card goes through authorize, capture and refund with the real processes; then the whole
database (pg_dump), every process's log, every event published and every process's metrics
are searched for the number and CVV in clear, for their plain SHA-256 digests, and for the
SHA-256 of the authorize body (what the idempotency fingerprint used to be: with the last
four digits and the expiry beside it, the CVV came back in a thousand guesses).
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import uuid

import orjson
import pytest

from tests.e2e.flows import bank_entries

pytestmark = pytest.mark.timeout(120)


def old_fingerprint(path: str, body: bytes) -> str:
    """The fingerprint as it was: SHA-256 of method, path and the raw body, length-prefixed."""
    digest = hashlib.sha256()
    for part in (b"POST", path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def forbidden(card: dict, body: bytes) -> dict[str, str]:
    """What must appear nowhere, by what it is."""
    number, cvv = card["number"], card["cvv"]
    return {
        "card number": number,
        "sha256(number)": hashlib.sha256(number.encode()).hexdigest(),
        "sha256(cvv)": hashlib.sha256(cvv.encode()).hexdigest(),
        "sha256(body)": hashlib.sha256(body).hexdigest(),
        "old fingerprint": old_fingerprint("/v1/payments", body),
        "quoted cvv": f'"{cvv}"',
        "cvv field": '"cvv"',
    }


async def test_no_card_data_after_authorize_capture_and_refund(e2e, client, amount):
    card = (await e2e.extra_cards(1))[0]
    value = amount()
    body = {
        "order_id": f"ord_{uuid.uuid4().hex[:10]}",
        "customer_id": "cus_e2e",
        "amount": value,
        "currency": "USD",
        "card": card,
    }
    raw = orjson.dumps(body)  # the bytes the client sends (Client.request dumps the same way)
    reply = await client.request("POST", "/v1/payments", body, key=uuid.uuid4().hex)
    assert reply.status == 202, reply
    payment_id = reply.body["id"]
    assert (await client.settled(payment_id, timeout=30))["status"] == "authorized"
    for action, final in (("capture", "captured"), ("refund", "refunded")):
        assert (await client.act(payment_id, action)).status == 202
        assert (await client.settled(payment_id, timeout=30))["status"] == final
    # the bank really saw the card (so the test's card is the one that travelled)
    entries = bank_entries(await e2e.bank.ledger(), value)
    assert [len(entries[s]) for s in ("authorizations", "captures", "refunds")] == [1, 1, 1], entries
    assert await e2e.events.wait_for(lambda: e2e.events.types(payment_id)["payment.refunded"] == 1, 15)

    needles = forbidden(card, raw)
    dump = await asyncio.to_thread(_pg_dump, e2e.database_url)
    assert payment_id in dump  # the dump is of the right database
    found = {what: needle for what, needle in needles.items() if needle in dump}
    assert not found, f"the database holds {sorted(found)}"

    for what, needle in needles.items():
        assert not e2e.log_lines(needle, limit=3), f"a log line holds the {what}"

    published = orjson.dumps(e2e.events.of(payment_id)).decode()
    assert payment_id in published
    assert not [what for what, needle in needles.items() if needle in published]

    for url in (e2e.metrics_url("api"), e2e.metrics_url("worker"), e2e.metrics_url("relay")):
        async with e2e.http.get(f"{url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert not [what for what, needle in needles.items() if needle in text], url


def _pg_dump(database_url: str) -> str:
    result = subprocess.run(["pg_dump", "--no-owner", database_url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout
