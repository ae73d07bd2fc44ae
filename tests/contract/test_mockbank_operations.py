"""Contract rules of the four operations and the GETs (docs/bank.md).

One test per rule, against a real zero-chaos mockbank process.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest

from mockbank.cards import luhn_check_digit
from tests.contract.bankclient import EMPTY, EXPIRED, HAPPY, LIMITED, BankClient

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def ts(value: str) -> datetime:
    assert RFC3339.match(value), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def assert_error(reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.text)
    body = reply.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) == {"error", "message"}


def luhn_number(length: int, prefix: str = "4") -> str:
    partial = prefix + "7" * (length - len(prefix) - 1)
    return partial + luhn_check_digit(partial)


async def authorized(bank: BankClient, card: dict = HAPPY, amount: int = 1000) -> dict:
    reply = await bank.authorize(card, amount)
    assert reply.status == 200, reply.text
    return reply.json()


async def captured(bank: BankClient, amount: int = 1000) -> tuple[dict, dict]:
    auth = await authorized(bank, HAPPY, amount)
    reply = await bank.capture(auth["authorization_id"], amount)
    assert reply.status == 200, reply.text
    return auth, reply.json()


# ----------------------------------------------------------------- authorize
async def test_authorize_success_shape(bank):
    reply = await bank.authorize(HAPPY, 5000)
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert set(body) == {"authorization_id", "status", "amount", "currency", "expires_at", "created_at"}
    assert re.fullmatch("auth_" + UUID, body["authorization_id"])
    assert body["status"] == "approved"
    assert body["amount"] == 5000
    assert body["currency"] == "USD"
    assert ts(body["expires_at"]) - ts(body["created_at"]) == timedelta(hours=168)
    assert not reply.replayed


async def test_authorize_hold_reduces_available_not_balance(bank):
    await authorized(bank, HAPPY, 2500)
    acct = await bank.account(HAPPY)
    assert (acct["balance"], acct["available"], acct["held"]) == (1_000_000, 997_500, 2500)


async def test_test_accounts_exactly_as_in_contract(bank):
    accounts = {a["card_last4"]: a for a in (await bank.ledger())["accounts"]}
    expected = {
        "1111": (1_000_000, 12, 2030),
        "4242": (50_000, 6, 2030),
        "4444": (0, 9, 2030),
        "5100": (500_000, 3, 2020),
    }
    assert set(accounts) == set(expected)
    for last4, (balance, month, year) in expected.items():
        a = accounts[last4]
        assert (a["balance"], a["available"], a["expiry_month"], a["expiry_year"]) == (balance, balance, month, year)


async def test_authorize_invalid_card_luhn(bank):
    assert_error(await bank.authorize({**HAPPY, "card_number": "4111111111111112"}), 400, "invalid_card")


@pytest.mark.parametrize(
    "number",
    [
        luhn_number(12),
        luhn_number(20),
        "4111 1111 1111 1111",
        "411111111111111a",
        "",
        4111111111111111,
        None,
    ],
    ids=["12-digits", "20-digits", "spaces", "letter", "empty", "int", "null"],
)
async def test_authorize_invalid_card_format(bank, number):
    assert_error(await bank.authorize(HAPPY, card_number=number), 400, "invalid_card")


@pytest.mark.parametrize("length", [13, 19])
async def test_authorize_unknown_card_of_valid_length_is_invalid_card(bank, length):
    # 13 and 19 digits pass format validation, so the refusal is the account lookup.
    assert_error(await bank.authorize(HAPPY, card_number=luhn_number(length)), 400, "invalid_card")


async def test_authorize_unknown_luhn_valid_card(bank):
    assert_error(await bank.authorize(HAPPY, card_number="4012888888881881"), 400, "invalid_card")


@pytest.mark.parametrize("cvv", ["12", "12345", "12a", "", 123, None])
async def test_authorize_invalid_cvv_format(bank, cvv):
    assert_error(await bank.authorize(HAPPY, cvv=cvv), 400, "invalid_cvv")


async def test_authorize_cvv_mismatch(bank):
    assert_error(await bank.authorize(HAPPY, cvv="124"), 400, "invalid_cvv")
    assert_error(await bank.authorize(HAPPY, cvv="1234"), 400, "invalid_cvv")


@pytest.mark.parametrize("amount", [0, -1, "100", 10.5, True, None])
async def test_authorize_invalid_amount(bank, amount):
    assert_error(await bank.authorize(HAPPY, amount), 400, "invalid_amount")


async def test_authorize_missing_amount_is_invalid_amount(bank):
    reply = await bank.post("/api/v1/authorizations", dict(HAPPY))
    assert_error(reply, 400, "invalid_amount")


@pytest.mark.parametrize(
    "field,value",
    [
        ("expiry_month", 0),
        ("expiry_month", 13),
        ("expiry_month", "12"),
        ("expiry_year", 2023),
        ("expiry_year", 2100),
        ("expiry_year", None),
    ],
)
async def test_authorize_expiry_fields_out_of_range(bank, field, value):
    assert_error(await bank.authorize(HAPPY, **{field: value}), 400, "invalid_card")


async def test_card_expired_uses_stored_expiry_not_request(bank):
    # Stored expiry 03/2020; the request claims 12/2030: still expired.
    assert_error(await bank.authorize(EXPIRED, 100, expiry_month=12, expiry_year=2030), 400, "card_expired")
    # Stored expiry 12/2030; the request claims 01/2024 (past): still approved.
    reply = await bank.authorize(HAPPY, 100, expiry_month=1, expiry_year=2024)
    assert reply.status == 200, reply.text


async def test_authorize_insufficient_funds_402(bank):
    assert_error(await bank.authorize(EMPTY, 1), 402, "insufficient_funds")
    assert_error(await bank.authorize(LIMITED, 50_001), 402, "insufficient_funds")
    assert (await bank.authorize(LIMITED, 50_000)).status == 200
    acct = await bank.account(LIMITED)
    assert acct["available"] == 0 and acct["balance"] == 50_000


async def test_holds_accumulate_against_available(bank):
    assert (await bank.authorize(LIMITED, 30_000)).status == 200
    assert_error(await bank.authorize(LIMITED, 30_000), 402, "insufficient_funds")
    assert (await bank.authorize(LIMITED, 20_000)).status == 200
    ledger = await bank.ledger()
    assert len(ledger["authorizations"]) == 2


@pytest.mark.parametrize(
    "card,overrides,status,code",
    [
        (HAPPY, {"card_number": "4111111111111112", "cvv": "x"}, 400, "invalid_card"),  # format first
        (HAPPY, {"card_number": "4012888888881881", "amount": 0}, 400, "invalid_amount"),  # fields before lookup
        (HAPPY, {"card_number": "4012888888881881", "cvv": "000"}, 400, "invalid_card"),  # lookup before cvv match
        (EXPIRED, {"cvv": "000", "expiry_year": 2030}, 400, "invalid_cvv"),  # cvv match before expiry
        (EXPIRED, {"amount": 10**9, "expiry_year": 2030}, 400, "card_expired"),  # expiry before funds
        (EXPIRED, {}, 400, "invalid_card"),  # its real 03/2020 is outside the 2024-2099 field range
    ],
)
async def test_authorize_validation_order(bank, card, overrides, status, code):
    body = {**card, "amount": 100, **overrides}
    assert_error(await bank.post("/api/v1/authorizations", body), status, code)


async def test_refused_authorization_has_no_side_effect(bank):
    await bank.authorize(LIMITED, 60_000)
    await bank.authorize(LIMITED, 100, cvv="000")
    ledger = await bank.ledger()
    assert ledger["authorizations"] == []
    assert all(a["available"] == a["balance"] for a in ledger["accounts"])


# ------------------------------------------------------------------- capture
async def test_capture_success_shape_and_balance(bank):
    auth = await authorized(bank, HAPPY, 4000)
    reply = await bank.capture(auth["authorization_id"], 4000)
    assert reply.status == 200, reply.text
    body = reply.json()
    assert set(body) == {"capture_id", "authorization_id", "status", "amount", "currency", "captured_at"}
    assert re.fullmatch("cap_" + UUID, body["capture_id"])
    assert body["authorization_id"] == auth["authorization_id"]
    assert (body["status"], body["amount"], body["currency"]) == ("captured", 4000, "USD")
    ts(body["captured_at"])
    acct = await bank.account(HAPPY)
    # the balance drops, the hold is consumed: available stays where the hold put it
    assert (acct["balance"], acct["available"], acct["held"]) == (996_000, 996_000, 0)


@pytest.mark.parametrize("delta", [-1, 1])
async def test_capture_amount_mismatch(bank, delta):
    auth = await authorized(bank, HAPPY, 4000)
    assert_error(await bank.capture(auth["authorization_id"], 4000 + delta), 400, "amount_mismatch")
    acct = await bank.account(HAPPY)
    assert (acct["balance"], acct["available"]) == (1_000_000, 996_000)


@pytest.mark.parametrize(
    "auth_id",
    [
        "auth_00000000-0000-4000-8000-000000000000",
        "garbage",
        "",
        None,
        123,
    ],
)
async def test_capture_authorization_not_found(bank, auth_id):
    assert_error(await bank.capture(auth_id, 100), 400, "authorization_not_found")


@pytest.mark.parametrize("amount", [0, -5, "100", None])
async def test_capture_invalid_amount(bank, amount):
    auth = await authorized(bank)
    assert_error(await bank.capture(auth["authorization_id"], amount), 400, "invalid_amount")


async def test_one_capture_per_authorization(bank):
    auth = await authorized(bank, HAPPY, 1000)
    assert (await bank.capture(auth["authorization_id"], 1000)).status == 200
    assert_error(await bank.capture(auth["authorization_id"], 1000), 400, "authorization_already_used")
    acct = await bank.account(HAPPY)
    assert acct["balance"] == 999_000
    assert len((await bank.ledger())["captures"]) == 1


async def test_capture_of_voided_authorization(bank):
    auth = await authorized(bank)
    assert (await bank.void(auth["authorization_id"])).status == 200
    assert_error(await bank.capture(auth["authorization_id"], 1000), 400, "authorization_already_used")


async def test_capture_of_expired_authorization_refused_but_void_allowed(bank):
    auth = await authorized(bank, HAPPY, 3000)
    auth_id = auth["authorization_id"]
    expire = await bank.post(f"/_mock/authorizations/{auth_id}/expire", key=None, raw=b"")
    assert expire.status == 200 and expire.json()["expired"] is True
    assert_error(await bank.capture(auth_id, 3000), 400, "authorization_expired")
    acct = await bank.account(HAPPY)
    assert (acct["balance"], acct["available"]) == (1_000_000, 997_000)  # still held
    void = await bank.void(auth_id)
    assert void.status == 200, void.text
    acct = await bank.account(HAPPY)
    assert (acct["balance"], acct["available"]) == (1_000_000, 1_000_000)


async def test_capture_order_used_before_expired_before_mismatch(bank):
    auth = await authorized(bank, HAPPY, 3000)
    auth_id = auth["authorization_id"]
    await bank.post(f"/_mock/authorizations/{auth_id}/expire", key=None, raw=b"")
    assert_error(await bank.capture(auth_id, 1), 400, "authorization_expired")
    await bank.void(auth_id)
    assert_error(await bank.capture(auth_id, 1), 400, "authorization_already_used")


# ---------------------------------------------------------------------- void
async def test_void_success_shape_and_release(bank):
    auth = await authorized(bank, LIMITED, 50_000)
    reply = await bank.void(auth["authorization_id"])
    assert reply.status == 200, reply.text
    body = reply.json()
    assert set(body) == {"void_id", "authorization_id", "status", "voided_at"}
    assert re.fullmatch("void_" + UUID, body["void_id"])
    assert (body["authorization_id"], body["status"]) == (auth["authorization_id"], "voided")
    ts(body["voided_at"])
    acct = await bank.account(LIMITED)
    assert (acct["balance"], acct["available"]) == (50_000, 50_000)


async def test_void_of_captured_and_double_void(bank):
    auth, _ = await captured(bank)
    assert_error(await bank.void(auth["authorization_id"]), 400, "authorization_already_used")
    other = await authorized(bank)
    assert (await bank.void(other["authorization_id"])).status == 200
    assert_error(await bank.void(other["authorization_id"]), 400, "authorization_already_used")
    acct = await bank.account(HAPPY)
    assert (acct["balance"], acct["available"]) == (999_000, 999_000)


@pytest.mark.parametrize("auth_id", ["auth_00000000-0000-4000-8000-000000000000", "x", None])
async def test_void_authorization_not_found(bank, auth_id):
    assert_error(await bank.void(auth_id), 400, "authorization_not_found")


# -------------------------------------------------------------------- refund
async def test_refund_success_shape_and_balance(bank):
    _, cap = await captured(bank, 7000)
    reply = await bank.refund(cap["capture_id"], 7000)
    assert reply.status == 200, reply.text
    body = reply.json()
    assert set(body) == {"refund_id", "capture_id", "status", "amount", "currency", "refunded_at"}
    assert re.fullmatch("ref_" + UUID, body["refund_id"])
    assert (body["capture_id"], body["status"], body["amount"], body["currency"]) == (
        cap["capture_id"],
        "refunded",
        7000,
        "USD",
    )
    ts(body["refunded_at"])
    acct = await bank.account(HAPPY)
    assert (acct["balance"], acct["available"]) == (1_000_000, 1_000_000)


async def test_refund_only_once(bank):
    _, cap = await captured(bank, 7000)
    assert (await bank.refund(cap["capture_id"], 7000)).status == 200
    assert_error(await bank.refund(cap["capture_id"], 7000), 400, "already_refunded")
    acct = await bank.account(HAPPY)
    assert acct["balance"] == 1_000_000


async def test_refund_amount_mismatch(bank):
    _, cap = await captured(bank, 7000)
    assert_error(await bank.refund(cap["capture_id"], 6999), 400, "amount_mismatch")
    assert (await bank.account(HAPPY))["balance"] == 993_000


@pytest.mark.parametrize("cap_id", ["cap_00000000-0000-4000-8000-000000000000", "nope", None])
async def test_refund_capture_not_found(bank, cap_id):
    assert_error(await bank.refund(cap_id, 100), 400, "capture_not_found")


async def test_refund_with_authorization_id_is_capture_not_found(bank):
    auth = await authorized(bank)
    assert_error(await bank.refund(auth["authorization_id"], 1000), 400, "capture_not_found")


async def test_refund_invalid_amount(bank):
    _, cap = await captured(bank, 7000)
    assert_error(await bank.refund(cap["capture_id"], 0), 400, "invalid_amount")


# ---------------------------------------------------------------------- GETs
async def test_get_authorization_same_shape_and_always_approved(bank):
    created = await bank.authorize(HAPPY, 1234)
    auth = created.json()
    path = f"/api/v1/authorizations/{auth['authorization_id']}"
    got = await bank.get(path)
    assert got.status == 200 and got.json() == auth
    await bank.capture(auth["authorization_id"], 1234)
    assert (await bank.get(path)).json()["status"] == "approved"
    other = await authorized(bank)
    await bank.void(other["authorization_id"])
    got = await bank.get(f"/api/v1/authorizations/{other['authorization_id']}")
    assert got.status == 200 and got.json() == other


async def test_get_capture_and_refund(bank):
    _, cap = await captured(bank, 2000)
    got = await bank.get(f"/api/v1/captures/{cap['capture_id']}")
    assert got.status == 200 and got.json() == cap
    ref = (await bank.refund(cap["capture_id"], 2000)).json()
    got = await bank.get(f"/api/v1/refunds/{ref['refund_id']}")
    assert got.status == 200 and got.json() == ref
    # a refunded capture keeps its capture shape
    assert (await bank.get(f"/api/v1/captures/{cap['capture_id']}")).json() == cap


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/authorizations/auth_00000000-0000-4000-8000-000000000000",
        "/api/v1/authorizations/not-an-id",
        "/api/v1/captures/cap_00000000-0000-4000-8000-000000000000",
        "/api/v1/captures/%20",
        "/api/v1/refunds/ref_00000000-0000-4000-8000-000000000000",
        "/api/v1/refunds/ref_",
    ],
)
async def test_get_unknown_or_malformed_id_is_404_not_found(bank, path):
    assert_error(await bank.get(path), 404, "not_found")


async def test_get_with_other_kind_of_id_is_404(bank):
    _, cap = await captured(bank)
    assert_error(await bank.get(f"/api/v1/authorizations/{cap['capture_id']}"), 404, "not_found")


async def test_no_get_for_voids(bank):
    auth = await authorized(bank)
    void = (await bank.void(auth["authorization_id"])).json()
    reply = await bank.get(f"/api/v1/voids/{void['void_id']}")
    assert reply.status in (404, 405)


async def test_health(bank):
    reply = await bank.get("/health")
    assert reply.status == 200 and reply.json() == {"status": "healthy"}


async def test_amount_beyond_64_bits_is_invalid_amount(bank):
    # orjson reads integers beyond 64 bits as floats: a JSON business error, not a parse error
    reply = await bank.post(
        "/api/v1/authorizations",
        raw=(
            b'{"card_number":"4111111111111111","cvv":"123","expiry_month":12,'
            b'"expiry_year":2030,"amount":1180591620717411303424}'
        ),
    )
    assert_error(reply, 400, "invalid_amount")
