"""POST /v1/payments: validation, idempotency, one live payment per order."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import orjson
import pytest

from gateway import db
from gateway.domain import Verdict
from gateway.fingerprints import Fingerprinter
from gateway.payments import intake, lapses
from tests.integration.conftest import API_KEY, CARD_NUMBER, OTHER_KEY, Api, auth_body, authorized, card, settle

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_authorize_accepts_and_answers_with_the_pending_payment(api):
    body = auth_body(amount=1234)
    resp, payment = await api.post("/v1/payments", body)
    assert resp.status == 202
    assert resp.headers["Location"] == f"/v1/payments/{payment['id']}"
    assert "Idempotent-Replayed" not in resp.headers
    assert payment["id"].startswith("pay_")
    assert payment["status"] == "pending"
    assert payment["amount"] == 1234 and payment["currency"] == "USD"
    assert payment["order_id"] == body["order_id"] and payment["customer_id"] == body["customer_id"]
    assert payment["card"] == {"brand": "visa", "last4": "5556", "expiry_month": 12, "expiry_year": 2030}
    assert payment["bank"]["authorization_id"] is None
    assert payment["last_error"] is None and payment["attention_required"] is False
    assert [h["status"] for h in payment["history"]] == ["pending"]

    resp, fetched = await api.get(resp.headers["Location"])
    assert resp.status == 200 and fetched == payment


async def test_replay_returns_the_stored_answer_and_does_nothing_twice(api, pool):
    raw = orjson.dumps(auth_body())
    key = uuid.uuid4().hex
    first, body1 = await api.post("/v1/payments", raw, key=key)
    second, body2 = await api.post("/v1/payments", raw, key=key)
    assert first.status == second.status == 202
    assert body2 == body1
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == first.headers["Location"]
    order = orjson.loads(raw)["order_id"]
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", order) == 1


async def test_replay_is_byte_exact_even_after_the_payment_moved(api, pool):
    raw = orjson.dumps(auth_body())
    key = uuid.uuid4().hex
    _, original = await api.post("/v1/payments", raw, key=key)
    await settle(pool, original["id"])
    resp, replay = await api.post("/v1/payments", raw, key=key)
    assert resp.status == 202 and replay == original and replay["status"] == "pending"


async def test_same_key_other_body_is_refused(api):
    key = uuid.uuid4().hex
    body = auth_body()
    resp, _ = await api.post("/v1/payments", body, key=key)
    assert resp.status == 202
    resp, err = await api.post("/v1/payments", {**body, "amount": 5001}, key=key)
    assert resp.status == 422 and err["error"]["code"] == "idempotency_key_reused"
    # another card number is another request, though the fingerprint keeps no number
    other_card = {**body, "card": {**body["card"], "number": "4242424242424242"}}
    resp, err = await api.post("/v1/payments", other_card, key=key)
    assert resp.status == 422 and err["error"]["code"] == "idempotency_key_reused"
    # the same JSON with other whitespace and key order is the same request: the fingerprint is
    # over the canonical JSON (gateway/fingerprints.py), and so is a retry with another CVV,
    # which the fingerprint must not keep
    resp, replay = await api.post("/v1/payments", orjson.dumps(body, option=orjson.OPT_INDENT_2), key=key)
    assert resp.status == 202 and resp.headers["Idempotent-Replayed"] == "true"
    other_cvv = {**body, "card": {**body["card"], "cvv": "999"}}
    resp, replay = await api.post("/v1/payments", other_cvv, key=key)
    assert resp.status == 202 and resp.headers["Idempotent-Replayed"] == "true"


async def test_same_key_other_path_is_refused(api, pool):
    payment = await authorized(api, pool)
    key = uuid.uuid4().hex
    resp, _ = await api.post(f"/v1/payments/{payment['id']}/capture", key=key)
    assert resp.status == 202
    resp, err = await api.post("/v1/payments", auth_body(), key=key)
    assert resp.status == 422 and err["error"]["code"] == "idempotency_key_reused"
    resp, err = await api.post(f"/v1/payments/{payment['id']}/void", key=key)
    assert resp.status == 422 and err["error"]["code"] == "idempotency_key_reused"


async def test_idempotency_keys_are_scoped_to_the_caller(api, api_client):
    other = Api(api_client, OTHER_KEY)
    key = uuid.uuid4().hex
    raw = orjson.dumps(auth_body())
    r1, p1 = await api.post("/v1/payments", raw, key=key)
    r2, p2 = await other.post("/v1/payments", raw, key=key)
    assert r1.status == r2.status == 202
    assert p1["id"] != p2["id"] and "Idempotent-Replayed" not in r2.headers
    # and so are payments
    resp, err = await other.get(f"/v1/payments/{p1['id']}")
    assert resp.status == 404 and err["error"]["code"] == "payment_not_found"
    resp, err = await other.post(f"/v1/payments/{p1['id']}/void")
    assert resp.status == 404


async def test_fifty_concurrent_requests_with_one_key_make_one_payment(api, pool):
    raw = orjson.dumps(auth_body())
    key = uuid.uuid4().hex
    results = await asyncio.gather(*(api.post("/v1/payments", raw, key=key) for _ in range(50)))
    statuses = [r.status for r, _ in results]
    assert set(statuses) <= {202, 409}, statuses
    accepted = [(r, b) for r, b in results if r.status == 202]
    fresh = [b for r, b in accepted if "Idempotent-Replayed" not in r.headers]
    assert len(fresh) == 1
    assert all(b == fresh[0] for _, b in accepted)
    for r, b in results:
        if r.status == 409:
            assert b["error"]["code"] == "request_in_progress" and r.headers["Retry-After"] == "1"
    order = orjson.loads(raw)["order_id"]
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", order) == 1


async def test_one_order_twenty_keys_at_once_one_payment(api, pool):
    order = f"ord_{uuid.uuid4().hex[:12]}"
    results = await asyncio.gather(*(api.post("/v1/payments", auth_body(order_id=order)) for _ in range(20)))
    accepted = [b for r, b in results if r.status == 202]
    assert len(accepted) == 1
    for r, b in results:
        if r.status != 202:
            assert r.status == 409 and b["error"]["code"] == "order_already_paid"
            assert b["error"]["payment_id"] == accepted[0]["id"]
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", order) == 1


async def test_order_with_a_live_payment_refuses_a_new_one(api, pool):
    order = f"ord_{uuid.uuid4().hex[:12]}"
    live = await authorized(api, pool, order_id=order)
    resp, err = await api.post("/v1/payments", auth_body(order_id=order))
    assert resp.status == 409
    assert err["error"]["code"] == "order_already_paid" and err["error"]["payment_id"] == live["id"]


async def _declined(api, pool, order):
    payment = await api.authorize(order_id=order)
    return await settle(pool, payment["id"], Verdict.REFUSED, "insufficient_funds")


async def _voided(api, pool, order):
    payment = await authorized(api, pool, order_id=order)
    resp, _ = await api.post(f"/v1/payments/{payment['id']}/void")
    assert resp.status == 202
    return await settle(pool, payment["id"])


async def _expired(api, pool, order):
    payment = await authorized(api, pool, order_id=order)
    return await lapses.expire_hold(pool, payment["id"])


@pytest.mark.parametrize("finish", [_declined, _voided, _expired], ids=["declined", "voided", "expired"])
async def test_new_attempt_allowed_after_a_dead_payment(api, pool, finish):
    order = f"ord_{uuid.uuid4().hex[:12]}"
    dead = await finish(api, pool, order)
    assert dead["status"] in ("declined", "voided", "expired")
    retry = await api.authorize(order_id=order)
    assert retry["id"] != dead["id"] and retry["status"] == "pending"
    _resp, page = await api.get("/v1/payments", params={"order_id": order})
    assert [p["id"] for p in page["data"]] == [retry["id"], dead["id"]]


def _invalid(**changes):
    body = auth_body()
    for path, value in changes.items():
        target, *rest = path.split("__")
        if rest:
            if value is ...:
                del body[target][rest[0]]
            else:
                body[target][rest[0]] = value
        elif value is ...:
            del body[target]
        else:
            body[target] = value
    return body


BAD_BODIES = {
    "luhn": (_invalid(card__number="4000056655665557"), "card.number", "invalid_card_number"),
    "short number": (_invalid(card__number="411111111111"), "card.number", "string_pattern_mismatch"),
    "letters in number": (_invalid(card__number="4111a11111111111"), "card.number", "string_pattern_mismatch"),
    "number as int": (_invalid(card__number=4000056655665556), "card.number", "string_type"),
    "expired card": (_invalid(card__expiry_year=2024, card__expiry_month=1), "card", "card_expired"),
    "month 13": (_invalid(card__expiry_month=13), "card.expiry_month", "less_than_equal"),
    "month 0": (_invalid(card__expiry_month=0), "card.expiry_month", "greater_than_equal"),
    "two digit year": (_invalid(card__expiry_year=30), "card.expiry_year", "greater_than_equal"),
    "year as string": (_invalid(card__expiry_year="2030"), "card.expiry_year", "int_type"),
    "cvv as int": (_invalid(card__cvv=123), "card.cvv", "string_type"),
    "cvv 2 digits": (_invalid(card__cvv="12"), "card.cvv", "string_pattern_mismatch"),
    "cvv 5 digits": (_invalid(card__cvv="12345"), "card.cvv", "string_pattern_mismatch"),
    "amount zero": (_invalid(amount=0), "amount", "greater_than_equal"),
    "amount negative": (_invalid(amount=-5), "amount", "greater_than_equal"),
    "amount string": (_invalid(amount="5000"), "amount", "int_type"),
    "amount float": (_invalid(amount=50.0), "amount", "int_type"),
    "amount bool": (_invalid(amount=True), "amount", "int_type"),
    "amount huge": (_invalid(amount=10**12), "amount", "less_than_equal"),
    "currency": (_invalid(currency="EUR"), "currency", "literal_error"),
    "missing order": (_invalid(order_id=...), "order_id", "missing"),
    "missing card": (_invalid(card=...), "card", "missing"),
    "missing cvv": (_invalid(card__cvv=...), "card.cvv", "missing"),
    "empty order": (_invalid(order_id=""), "order_id", "string_too_short"),
    "long customer": (_invalid(customer_id="c" * 256), "customer_id", "string_too_long"),
    "control char": (_invalid(order_id="ord\x00x"), "order_id", "string_pattern_mismatch"),
    "extra field": (_invalid(note="hi"), "note", "extra_forbidden"),
    "extra card field": (_invalid(card__holder="A B"), "card.holder", "extra_forbidden"),
    "card not object": (_invalid(card="4111"), "card", "model_type"),
}


@pytest.mark.parametrize("body,field,code", BAD_BODIES.values(), ids=BAD_BODIES.keys())
async def test_invalid_bodies_get_422_with_details(api, pool, body, field, code):
    resp, err = await api.post("/v1/payments", body)
    assert resp.status == 422, err
    assert err["error"]["code"] == "validation_error"
    assert {"field": field, "code": code} in [{"field": d["field"], "code": d["code"]} for d in err["error"]["details"]]
    if isinstance(body.get("order_id"), str) and body["order_id"].isprintable():
        assert await pool.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", body["order_id"]) == 0


async def test_validation_errors_never_echo_the_card(api):
    body = _invalid(card__number=CARD_NUMBER[:-1] + "7", card__cvv="98x7", amount="x")
    resp, err = await api.post("/v1/payments", body)
    text = orjson.dumps(err).decode()
    assert resp.status == 422
    assert CARD_NUMBER[:-1] not in text and "98x7" not in text and "input" not in text


async def test_every_problem_is_reported_at_once(api):
    resp, err = await api.post("/v1/payments", _invalid(amount=0, currency="EUR", card__cvv="1"))
    assert resp.status == 422
    assert {d["field"] for d in err["error"]["details"]} == {"amount", "currency", "card.cvv"}


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"{'a': 1}", b"\xff\xfe{}", b"nul"], ids=["empty", "truncated", "quotes", "utf16", "word"]
)
async def test_unreadable_json_is_400(api, raw):
    resp, err = await api.post("/v1/payments", raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and err["error"]["code"] == "invalid_json"


async def test_deeply_nested_json_is_400_without_a_traceback(api, api_logs):
    """1,500 levels of `{"a":` once made the duplicate-key check a RecursionError: a 500 and an
    8 KB traceback in the log."""
    deep = b'{"a":' * 1500 + b"1" + b"}" * 1500
    resp, err = await api.post("/v1/payments", deep, headers={"X-Request-Id": "req-deep-json"})
    assert resp.status == 400 and err["error"]["code"] == "invalid_json", err
    logged = [orjson.loads(line) for line in api_logs.getvalue().splitlines() if "req-deep-json" in line]
    assert [line["event"] for line in logged] == ["request"] and "exception" not in logged[0]


async def test_brackets_inside_strings_do_not_count_as_nesting(api):
    resp, body = await api.post("/v1/payments", auth_body(order_id="[{" * 100))
    assert resp.status == 202, body


async def test_json_that_is_not_an_object_is_422(api):
    resp, err = await api.post("/v1/payments", b"[1, 2]")
    assert resp.status == 422 and err["error"]["details"][0]["field"] == "body"


async def test_other_content_types_are_415(api):
    resp, err = await api.post(
        "/v1/payments", orjson.dumps(auth_body()), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert resp.status == 415 and err["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("mime", ["application/merge+json", "application/evil+json", "text/json"])
async def test_only_application_json_is_json(api, mime):
    resp, err = await api.post("/v1/payments", orjson.dumps(auth_body()), headers={"Content-Type": mime})
    assert resp.status == 415 and err["error"]["code"] == "unsupported_media_type"


async def test_charset_parameter_and_no_content_type_are_accepted(api):
    resp, _ = await api.post(
        "/v1/payments", orjson.dumps(auth_body()), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert resp.status == 202
    raw = orjson.dumps(auth_body())
    resp = await api.client.post(
        "/v1/payments", data=raw, headers={**api.headers(uuid.uuid4().hex)}, skip_auto_headers=["Content-Type"]
    )
    assert resp.status == 202, await resp.text()


async def test_body_too_large_is_413(api):
    body = orjson.dumps({**auth_body(), "pad": "x" * 70_000})
    resp, err = await api.post("/v1/payments", body)
    assert resp.status == 413 and err["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "key,code",
    [
        (None, "idempotency_key_missing"),
        ("", "idempotency_key_invalid"),
        ("k" * 256, "idempotency_key_invalid"),
        ("clé", "idempotency_key_invalid"),
        ("a\tb", "idempotency_key_invalid"),
    ],
    ids=["missing", "empty", "too long", "non-ascii", "tab"],
)
async def test_idempotency_key_is_required_and_checked(api, api_client, key, code):
    headers = api.headers(**{"Content-Type": "application/json"})
    if key is not None:
        headers["Idempotency-Key"] = key
    resp = await api_client.post("/v1/payments", data=orjson.dumps(auth_body()), headers=headers)
    err = await resp.json()
    assert resp.status == 400 and err["error"]["code"] == code


async def test_longest_and_oddest_allowed_keys_work(api):
    for key in ("k" * 255, "a key with spaces ~!@#$%^&*()", "x"):
        resp, body = await api.post("/v1/payments", auth_body(), key=key)
        assert resp.status == 202, body


async def test_a_retry_after_the_card_expired_still_gets_its_answer(api, pool, api_settings):
    """Accepted before its expiry month ended, replayed after: the stored answer, not a 422."""
    body = auth_body(card=card(expiry_month=1, expiry_year=2020))
    raw = orjson.dumps(body)
    key = uuid.uuid4().hex
    stored = orjson.dumps({"id": "pay_" + "0" * 32, "status": "pending"})
    fingerprints = Fingerprinter([api_settings.card_key]).of("POST", "/v1/payments", raw)
    req = intake.IdempotentRequest("ficmart", key, "POST", "/v1/payments", fingerprints)
    # Plant what the first, accepted, request stored.
    await pool.execute(
        "INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status, response_body,"
        " location, created_at) VALUES ('ficmart', $1, 'POST', '/v1/payments', $2, 202, $3, $4, now())",
        key,
        req.fingerprint,
        stored,
        "/v1/payments/pay_" + "0" * 32,
    )
    resp, answer = await api.post("/v1/payments", raw, key=key)
    assert resp.status == 202 and resp.headers["Idempotent-Replayed"] == "true"
    assert answer == orjson.loads(stored)
    resp, err = await api.post("/v1/payments", raw)  # a fresh key: the card really is expired
    assert resp.status == 422 and err["error"]["details"][0]["code"] == "card_expired"


async def test_duplicate_json_keys_are_422(api):
    body = orjson.dumps(auth_body()).replace(b'"amount":', b'"amount":1,"amount":', 1)
    resp, err = await api.post("/v1/payments", body)
    assert resp.status == 422 and err["error"]["code"] == "validation_error"
    assert err["error"]["details"] == [{"field": "body.amount", "code": "duplicate", "message": "given more than once"}]


async def test_duplicate_keys_in_a_nested_object_are_422(api):
    body = orjson.dumps(auth_body()).replace(b'"cvv":', b'"cvv":"000","cvv":', 1)
    resp, err = await api.post("/v1/payments", body)
    assert resp.status == 422 and err["error"]["details"][0]["field"] == "body.cvv"
    assert "000" not in str(err)


async def test_a_stalled_body_is_cut_with_408(api, api_client, monkeypatch):
    from gateway.api import routes

    monkeypatch.setattr(routes, "BODY_READ_SECONDS", 0.3)
    reader, writer = await asyncio.open_connection(api_client.server.host, api_client.server.port)
    head = (
        "POST /v1/payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nIdempotency-Key: {uuid.uuid4().hex}\r\nContent-Length: 500\r\n\r\n"
    )
    writer.write(head.encode() + b'{"order_id": ')
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer and b"X-Request-Id" in answer
    assert b"Connection: close" in answer  # aiohttp then closes it after at most its lingering time


async def test_an_old_plain_digest_fingerprint_is_migrated_away_and_still_replays(api, pool, database_url):
    """Rows of an earlier version kept SHA-256 of the body (card number and CVV inside): schema.sql
    overwrites them, and the key still answers a retry of its request with the stored answer."""
    raw = orjson.dumps(auth_body())
    key = uuid.uuid4().hex
    old = hashlib.sha256(raw).hexdigest()
    stored = orjson.dumps({"id": "pay_" + "1" * 32, "status": "pending"})
    await pool.execute(
        "INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status, response_body,"
        " location, created_at) VALUES ('ficmart', $1, 'POST', '/v1/payments', $2, 202, $3, $4, now())",
        key,
        old,
        stored,
        "/v1/payments/pay_" + "1" * 32,
    )
    await db.migrate(database_url)
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE fingerprint = $1", old) == 0
    resp, answer = await api.post("/v1/payments", raw, key=key)
    assert resp.status == 202 and resp.headers["Idempotent-Replayed"] == "true" and answer == orjson.loads(stored)
    # the path still counts: the same key on another path is another request
    resp, err = await api.post("/v1/payments/pay_" + "1" * 32 + "/capture", key=key)
    assert resp.status == 422 and err["error"]["code"] == "idempotency_key_reused"
