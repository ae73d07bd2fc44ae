"""POST /v1/payments/{id}/capture|void|refund."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway import payments
from gateway.domain import Verdict
from tests.integration.conftest import authorized, captured, settle

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_capture_then_refund(api, pool):
    payment = await authorized(api, pool, amount=2500)
    resp, body = await api.post(f"/v1/payments/{payment['id']}/capture")
    assert resp.status == 202 and body["status"] == "capturing"
    assert "Location" not in resp.headers
    assert [h["status"] for h in body["history"]] == ["pending", "authorized", "capturing"]
    done = await settle(pool, payment["id"])
    assert done["status"] == "captured" and done["bank"]["capture_id"]

    resp, body = await api.post(f"/v1/payments/{payment['id']}/refund", {"amount": 2500})
    assert resp.status == 202 and body["status"] == "refunding"
    done = await settle(pool, payment["id"])
    assert done["status"] == "refunded"
    resp, body = await api.get(f"/v1/payments/{payment['id']}")
    assert [h["status"] for h in body["history"]] == [
        "pending",
        "authorized",
        "capturing",
        "captured",
        "refunding",
        "refunded",
    ]


async def test_void(api, pool):
    payment = await authorized(api, pool)
    resp, body = await api.post(f"/v1/payments/{payment['id']}/void", b"{}")
    assert resp.status == 202 and body["status"] == "voiding"
    assert (await settle(pool, payment["id"]))["status"] == "voided"


async def test_action_replay_and_reuse(api, pool):
    payment = await authorized(api, pool)
    key = uuid.uuid4().hex
    first, b1 = await api.post(f"/v1/payments/{payment['id']}/capture", key=key)
    await settle(pool, payment["id"])  # the payment moves on; the replay still says what was answered
    again, b2 = await api.post(f"/v1/payments/{payment['id']}/capture", key=key)
    assert first.status == again.status == 202
    assert b2 == b1 and b2["status"] == "capturing" and again.headers["Idempotent-Replayed"] == "true"
    resp, err = await api.post(f"/v1/payments/{payment['id']}/capture", {"amount": payment["amount"]}, key=key)
    assert resp.status == 422 and err["error"]["code"] == "idempotency_key_reused"


async def test_concurrent_captures_with_different_keys_one_wins(api, pool):
    payment = await authorized(api, pool)
    results = await asyncio.gather(*(api.post(f"/v1/payments/{payment['id']}/capture") for _ in range(10)))
    statuses = sorted(r.status for r, _ in results)
    assert statuses == [202] + [409] * 9
    for r, b in results:
        if r.status == 409:
            assert b["error"]["code"] == "invalid_state_transition" and b["error"]["status"] == "capturing"
    ops = await pool.fetchval(
        "SELECT count(*) FROM operations WHERE payment_id = $1 AND kind = 'capture'", payment["id"]
    )
    assert ops == 1


async def test_concurrent_same_key_capture_is_one_operation(api, pool):
    payment = await authorized(api, pool)
    key = uuid.uuid4().hex
    results = await asyncio.gather(*(api.post(f"/v1/payments/{payment['id']}/capture", key=key) for _ in range(30)))
    for r, b in results:
        assert r.status in (202, 409), b
        if r.status == 409:
            assert b["error"]["code"] == "request_in_progress"
    assert len({orjson_id(b) for r, b in results if r.status == 202}) == 1
    ops = await pool.fetchval(
        "SELECT count(*) FROM operations WHERE payment_id = $1 AND kind = 'capture'", payment["id"]
    )
    assert ops == 1


def orjson_id(body: dict) -> tuple:
    return body["id"], body["status"], body["updated_at"]


async def _pending(api, pool):
    return await api.authorize()


async def _capturing(api, pool):
    payment = await authorized(api, pool)
    _resp, body = await api.post(f"/v1/payments/{payment['id']}/capture")
    return body


async def _voided(api, pool):
    payment = await authorized(api, pool)
    await api.post(f"/v1/payments/{payment['id']}/void")
    return await settle(pool, payment["id"])


async def _declined(api, pool):
    payment = await api.authorize()
    return await settle(pool, payment["id"], Verdict.REFUSED, "invalid_cvv")


async def _refunded(api, pool):
    payment = await captured(api, pool)
    await api.post(f"/v1/payments/{payment['id']}/refund")
    return await settle(pool, payment["id"])


async def _expired(api, pool):
    payment = await authorized(api, pool)
    return await payments.expire_hold(pool, payment["id"])


INVALID = [
    (_pending, "capture", "pending"),
    (_pending, "void", "pending"),
    (_pending, "refund", "pending"),
    (authorized, "refund", "authorized"),
    (_capturing, "capture", "capturing"),
    (_capturing, "void", "capturing"),
    (captured, "void", "captured"),
    (captured, "capture", "captured"),
    (_voided, "capture", "voided"),
    (_voided, "void", "voided"),
    (_declined, "capture", "declined"),
    (_refunded, "refund", "refunded"),
    (_expired, "capture", "expired"),
]


@pytest.mark.parametrize("make,action,status", INVALID, ids=[f"{a} {s}" for _, a, s in INVALID])
async def test_invalid_transitions_are_409(api, pool, make, action, status):
    payment = await make(api, pool)
    assert payment["status"] == status
    resp, err = await api.post(f"/v1/payments/{payment['id']}/{action}")
    assert resp.status == 409
    assert err["error"]["code"] == "invalid_state_transition"
    assert err["error"]["status"] == status and status in err["error"]["message"]
    resp, after = await api.get(f"/v1/payments/{payment['id']}")
    assert after["status"] == status


async def test_second_refund_is_409(api, pool):
    payment = await captured(api, pool)
    r1, _ = await api.post(f"/v1/payments/{payment['id']}/refund")
    r2, err = await api.post(f"/v1/payments/{payment['id']}/refund")
    assert r1.status == 202 and r2.status == 409 and err["error"]["status"] == "refunding"


@pytest.mark.parametrize("action", ["capture", "void"])
async def test_partial_amount_is_422(api, pool, action):
    payment = await authorized(api, pool, amount=5000)
    resp, err = await api.post(f"/v1/payments/{payment['id']}/{action}", {"amount": 4999})
    assert resp.status == 422 and err["error"]["code"] == "amount_mismatch"
    assert err["error"]["expected_amount"] == 5000
    resp, body = await api.post(f"/v1/payments/{payment['id']}/{action}", {"amount": 5000})
    assert resp.status == 202, body


async def test_refund_amount_mismatch(api, pool):
    payment = await captured(api, pool, amount=700)
    resp, err = await api.post(f"/v1/payments/{payment['id']}/refund", {"amount": 70000})
    assert resp.status == 422 and err["error"]["code"] == "amount_mismatch"


@pytest.mark.parametrize(
    "body,code",
    [
        ({"amount": 50, "reason": "x"}, "extra_forbidden"),
        ({"amount": "5000"}, "int_type"),
        ({"amount": 0}, "greater_than_equal"),
        ({"amount": 5000.0}, "int_type"),
    ],
    ids=["extra", "string", "zero", "float"],
)
async def test_bad_action_bodies(api, pool, body, code):
    payment = await authorized(api, pool)
    resp, err = await api.post(f"/v1/payments/{payment['id']}/capture", body)
    assert resp.status == 422 and err["error"]["code"] == "validation_error"
    assert err["error"]["details"][0]["code"] == code


async def test_action_bad_json_is_400(api, pool):
    payment = await authorized(api, pool)
    resp, err = await api.post(
        f"/v1/payments/{payment['id']}/capture", b"{amount: 1}", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400 and err["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("payment_id", ["pay_" + "0" * 32, "pay_nope", "x" * 300, "pay_%00"])
async def test_unknown_payment_is_404(api, payment_id):
    for action in ("capture", "void", "refund"):
        resp, err = await api.post(f"/v1/payments/{payment_id}/{action}")
        assert resp.status == 404 and err["error"]["code"] == "payment_not_found"


async def test_actions_need_an_idempotency_key(api, pool):
    payment = await authorized(api, pool)
    resp, err = await api.post(f"/v1/payments/{payment['id']}/capture", key=None)
    assert resp.status == 400 and err["error"]["code"] == "idempotency_key_missing"
