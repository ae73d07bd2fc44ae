"""The mock's own /_mock/* endpoints, the down switch, faults and log hygiene."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from mockbank.idempotency import IdempotencyStore
from tests.contract.bankclient import CARDS, HAPPY, LIMITED


async def test_ledger_shape_and_last4_only(bank):
    auth = (await bank.authorize(HAPPY, 1000, key="k-auth")).json()
    cap = (await bank.capture(auth["authorization_id"], 1000, key="k-cap")).json()
    ref = (await bank.refund(cap["capture_id"], 1000, key="k-ref")).json()
    auth2 = (await bank.authorize(LIMITED, 300, key="k-auth2")).json()
    void = (await bank.void(auth2["authorization_id"], key="k-void")).json()

    reply = await bank.get("/_mock/ledger")
    for card in CARDS:
        assert card["card_number"] not in reply.text
    ledger = reply.json()
    assert set(ledger) >= {
        "now",
        "accounts",
        "authorizations",
        "captures",
        "voids",
        "refunds",
        "idempotency_entries",
        "chaos",
        "stats",
    }
    a1, a2 = ledger["authorizations"]
    assert a1 == {
        "authorization_id": auth["authorization_id"],
        "account_id": "acct_1",
        "card_last4": "1111",
        "amount": 1000,
        "currency": "USD",
        "status": "captured",
        "expired": False,
        "created_at": auth["created_at"],
        "expires_at": auth["expires_at"],
        "idempotency_key": "k-auth",
        "capture_id": cap["capture_id"],
        "void_id": None,
    }
    assert (a2["status"], a2["void_id"], a2["card_last4"]) == ("voided", void["void_id"], "4242")
    assert ledger["captures"] == [
        {
            "capture_id": cap["capture_id"],
            "authorization_id": auth["authorization_id"],
            "account_id": "acct_1",
            "amount": 1000,
            "currency": "USD",
            "captured_at": cap["captured_at"],
            "idempotency_key": "k-cap",
            "refund_id": ref["refund_id"],
        }
    ]
    assert ledger["voids"] == [
        {
            "void_id": void["void_id"],
            "authorization_id": auth2["authorization_id"],
            "account_id": "acct_2",
            "amount": 300,
            "voided_at": void["voided_at"],
            "idempotency_key": "k-void",
        }
    ]
    assert ledger["refunds"] == [
        {
            "refund_id": ref["refund_id"],
            "capture_id": cap["capture_id"],
            "authorization_id": auth["authorization_id"],
            "account_id": "acct_1",
            "amount": 1000,
            "currency": "USD",
            "refunded_at": ref["refunded_at"],
            "idempotency_key": "k-ref",
        }
    ]
    assert ledger["idempotency_entries"] == 5
    acct = ledger["accounts"][0]
    assert set(acct) == {
        "account_id",
        "kind",
        "card_last4",
        "brand",
        "expiry_month",
        "expiry_year",
        "balance",
        "available",
        "held",
    }
    assert [a["account_id"] for a in ledger["accounts"]] == ["acct_1", "acct_2", "acct_3", "acct_4"]


async def test_accounts_endpoint_lists_test_cards(bank):
    reply = await bank.get("/_mock/accounts")
    body = reply.json()
    assert body["total"] == 4
    assert [(a["card_number"], a["cvv"]) for a in body["accounts"]] == [(c["card_number"], c["cvv"]) for c in CARDS]
    page = (await bank.get("/_mock/accounts?offset=1&limit=2")).json()
    assert [a["account_id"] for a in page["accounts"]] == ["acct_2", "acct_3"]


async def test_reset_restores_everything(bank):
    await bank.authorize(LIMITED, 50_000, key="before-reset")
    await bank.chaos(failure_rate=0.5)
    await bank.reset()
    ledger = await bank.ledger()
    assert ledger["authorizations"] == [] and ledger["idempotency_entries"] == 0
    assert all(a["available"] == a["balance"] for a in ledger["accounts"])
    assert ledger["chaos"]["failure_rate"] == 0
    again = await bank.authorize(LIMITED, 50_000, key="before-reset")
    assert again.status == 200 and not again.replayed


async def test_chaos_get_and_put(bank):
    got = (await bank.get("/_mock/chaos")).json()
    assert got == {
        "min_latency_ms": 0,
        "max_latency_ms": 0,
        "failure_rate": 0,
        "response_loss_rate": 0,
        "key_forget_rate": 0,
        "key_lookup_failure_rate": 0,
        "down": False,
    }
    new = await bank.chaos(max_latency_ms=50, failure_rate=0.25, key_forget_rate=0.5, key_lookup_failure_rate=0.1)
    assert (new["max_latency_ms"], new["failure_rate"], new["min_latency_ms"]) == (50, 0.25, 0)
    assert (new["key_forget_rate"], new["key_lookup_failure_rate"]) == (0.5, 0.1)


@pytest.mark.parametrize(
    "body",
    [
        {"failure_rate": 1.5},
        {"min_latency_ms": -1},
        {"min_latency_ms": 100, "max_latency_ms": 10},
        {"down": "yes"},
        {"bogus": 1},
        {"response_loss_rate": "0.1"},
        {"key_forget_rate": 1.01},
        {"key_lookup_failure_rate": -0.5},
        {"key_forget_rate": True},
    ],
)
async def test_chaos_put_rejects_bad_values(bank, body):
    import json

    reply = await bank.request("PUT", "/_mock/chaos", data=json.dumps(body).encode())
    assert reply.status == 400 and reply.json()["error"] == "invalid_chaos"
    assert (await bank.get("/_mock/chaos")).json()["failure_rate"] == 0


async def test_expire_unknown_authorization_is_404(bank):
    reply = await bank.post("/_mock/authorizations/auth_nope/expire", key=None, raw=b"")
    assert reply.status == 404 and reply.json()["error"] == "not_found"


async def test_down_switch_drops_connections_without_doing_anything(bank):
    await bank.chaos(down=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 100)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.get("/health")
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.get("/api/v1/authorizations/auth_x")
    ledger = await bank.ledger()  # /_mock/* stays up
    # >= 3: aiohttp silently retries a GET once when a reused keep-alive connection drops
    assert ledger["authorizations"] == [] and ledger["stats"]["dropped_down"] >= 3
    await bank.chaos(down=False)
    assert (await bank.authorize(HAPPY, 100)).status == 200


async def test_down_switch_cuts_requests_in_flight(bank):
    await bank.chaos(min_latency_ms=400, max_latency_ms=400)
    pending = asyncio.ensure_future(bank.authorize(HAPPY, 100))
    await asyncio.sleep(0.1)
    await bank.chaos(down=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        await pending
    assert (await bank.ledger())["authorizations"] == []


async def test_fault_error_returns_given_body_without_doing_anything(bank):
    auth = (await bank.authorize(HAPPY, 100)).json()
    armed = await bank.post(
        "/_mock/faults",
        {
            "action": "error",
            "path": "/api/v1/captures",
            "status": 400,
            "body": {"error": "already_captured", "message": "forced"},
        },
        key=None,
    )
    assert armed.status == 201 and armed.json()["remaining"] == 1
    forced = await bank.capture(auth["authorization_id"], 100, key="fk")
    assert forced.status == 400 and forced.json() == {"error": "already_captured", "message": "forced"}
    assert (await bank.ledger())["captures"] == []
    real = await bank.capture(auth["authorization_id"], 100, key="fk")  # not remembered, fault used up
    assert real.status == 200 and not real.replayed
    assert (await bank.get("/_mock/faults")).json() == {"faults": []}


async def test_fault_plain_text_error(bank):
    await bank.post(
        "/_mock/faults",
        {"action": "error", "path": "/api/v1/*", "status": 400, "body": "bad request\n", "method": "POST"},
        key=None,
    )
    reply = await bank.authorize(HAPPY, 100)
    assert reply.status == 400 and reply.text == "bad request\n"


async def test_fault_drop_and_lose_response(bank):
    await bank.post("/_mock/faults", {"action": "drop", "path": "/api/v1/authorizations"}, key=None)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 100, key="d1")
    assert (await bank.ledger())["authorizations"] == []

    await bank.post("/_mock/faults", {"action": "lose_response", "path": "/api/v1/authorizations"}, key=None)
    with pytest.raises(aiohttp.ClientConnectionError):
        await bank.authorize(HAPPY, 100, key="d2")
    ledger = await bank.ledger()
    assert [a["idempotency_key"] for a in ledger["authorizations"]] == ["d2"]
    retry = await bank.authorize(HAPPY, 100, key="d2")
    assert retry.replayed and retry.json()["authorization_id"] == ledger["authorizations"][0]["authorization_id"]


async def test_fault_delay_and_clear(bank):
    await bank.post(
        "/_mock/faults", {"action": "delay", "path": "/api/v1/authorizations/*", "delay_ms": 300, "times": 2}, key=None
    )
    reply = await bank.get("/api/v1/authorizations/auth_x")
    assert reply.status == 404 and reply.elapsed >= 0.28
    cleared = await bank.request("DELETE", "/_mock/faults")
    assert cleared.json() == {"cleared": 1}
    assert (await bank.get("/api/v1/authorizations/auth_x")).elapsed < 0.25


async def test_fault_rejects_bad_spec(bank):
    reply = await bank.post("/_mock/faults", {"action": "explode", "path": "/api/v1/voids"}, key=None)
    assert reply.status == 400 and reply.json()["error"] == "invalid_fault"


async def test_logs_never_contain_card_numbers_or_cvvs(bank):
    # The shared bank runs with LOG_LEVEL=debug (access log and per-operation lines on).
    for card in CARDS:
        await bank.authorize(card, 100)
    await bank.authorize(HAPPY, 100, cvv="987")
    await asyncio.sleep(0.1)
    log = bank.proc.stderr_tail(1_000_000)
    assert "acct_" in log or "auth_" in log or "POST" in log  # debug logging is on
    for card in CARDS:
        assert card["card_number"] not in log
    assert '"987"' not in log and "'987'" not in log and "=987" not in log


def test_idempotency_entries_expire_after_24_hours():
    # In-process check of the store the server uses (24 h cannot pass in a test).
    now = [1000.0]
    store = IdempotencyStore(clock=lambda: now[0])
    store.put("k", "/api/v1/voids", 200, b"{}")
    store.put("e", "/api/v1/voids", 400, b"{}")
    assert store.get("e", "/api/v1/voids") is None  # errors never stored
    now[0] += 24 * 3600 - 1
    assert store.get("k", "/api/v1/voids") is not None
    assert store.get("k", "/api/v1/captures") is None
    now[0] += 1
    assert store.get("k", "/api/v1/voids") is None
    store.put("k2", "/p", 201, b"x")
    now[0] += 24 * 3600
    assert store.sweep() == 1 and len(store) == 0
