"""The full card number and the CVV appear nowhere: responses, logs, outbox, stored rows.

Runs a payment through every API call (and some refused ones) with a
distinctive card, then searches everything the gateway wrote. The api_logs
fixture holds every log line of the session, so the search covers the other
API tests too (they all use the same card).
"""

from __future__ import annotations

import re

import orjson
import pytest

from gateway.api.routes import STATE
from tests.integration.conftest import CARD_NUMBER, CVV, auth_body, card, settle

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The CVV is short enough to occur inside ids or timestamps by chance; it is
# looked for as a JSON value or next to a "cvv" key rather than anywhere.
CVV_PATTERNS = [re.compile(p) for p in (rf'"{CVV}"', r'"cvv"', rf"cvv\W+{CVV}")]


def assert_clean(text: str, where: str) -> None:
    assert CARD_NUMBER not in text, f"card number in {where}"
    assert CARD_NUMBER[:12] not in text, f"card number prefix in {where}"
    for pattern in CVV_PATTERNS:
        assert not pattern.search(text), f"CVV ({pattern.pattern}) in {where}"


async def test_card_data_is_nowhere(api, api_client, pool, api_logs):
    seen: list[str] = []

    async def call(method, path, body=None, **kw):
        resp, parsed = await (api.post(path, body, **kw) if method == "POST" else api.get(path, **kw))
        seen.append(orjson.dumps(parsed).decode() + repr(dict(resp.headers)))
        return resp, parsed

    body = auth_body()
    _, payment = await call("POST", "/v1/payments", body)
    pid = payment["id"]
    await call("POST", "/v1/payments", body)  # order_already_paid
    await call("POST", "/v1/payments", {**body, "card": card(number=CARD_NUMBER[:-1] + "7")})  # Luhn
    await call("POST", "/v1/payments", {**body, "card": card(cvv=int(CVV))})  # CVV not a string
    await call("POST", "/v1/payments", {**body, "card": card(expiry_year=2020)})  # expired
    await call("POST", "/v1/payments", {**body, "card": {**card(), "extra": CARD_NUMBER}})
    await call("POST", "/v1/payments", {**body, CARD_NUMBER: CVV})  # the number as a field name
    await call("POST", "/v1/payments", orjson.dumps(body)[:-3])  # broken JSON
    await call("GET", f"/v1/payments/{pid}")
    await settle(api_client.server.app[STATE].pool, pid)
    await call("POST", f"/v1/payments/{pid}/capture")
    await settle(pool, pid)
    await call("POST", f"/v1/payments/{pid}/refund")
    await call("GET", f"/v1/payments/{pid}", params={"wait": "0.2"})
    await call("GET", "/v1/payments", params={"order_id": body["order_id"]})

    for i, text in enumerate(seen):
        assert_clean(text, f"response {i}")

    logs = api_logs.getvalue()
    assert pid in logs  # the capture works: the payment's requests were logged
    assert_clean(logs, "logs")

    for table, column in [("outbox", "body"), ("idempotency_keys", "response_body")]:
        for row in await pool.fetch(f"SELECT * FROM {table}"):
            assert_clean(bytes(row[column]).decode(), f"{table}.{column}")
            assert_clean(repr(dict(row)), table)
    for table in ("payments", "payment_history", "operations"):
        for row in await pool.fetch(f"SELECT row_to_json(t)::text AS j FROM {table} t"):
            assert_clean(row["j"], table)

    # While the authorization is undecided the card is in the vault, sealed; once decided it is gone.
    fresh = await api.authorize()
    sealed = bytes(await pool.fetchval("SELECT sealed FROM card_vault WHERE payment_id = $1", fresh["id"]))
    assert CARD_NUMBER.encode() not in sealed and CVV.encode() not in sealed
    await settle(pool, fresh["id"])
    assert await pool.fetchval("SELECT count(*) FROM card_vault WHERE payment_id = $1", fresh["id"]) == 0
    assert await pool.fetchval("SELECT count(*) FROM card_vault WHERE payment_id = $1", pid) == 0
