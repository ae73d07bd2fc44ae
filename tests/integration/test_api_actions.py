"""POST /v1/payments/{id}/capture|void|refund."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway import domain
from gateway.domain import BankOutcome, OperationKind, Verdict
from gateway.ops import decisions
from gateway.payments import lapses, settlement
from tests.integration.conftest import authorized, captured, pending_operation, settle
from tests.support import phases

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
    return await lapses.expire_hold(pool, payment["id"])


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


# ---- a step the bank did but never named (it forgot our key) --------------------------------------


async def _captured_unnamed(api, pool) -> dict:
    """A capture the bank did without ever naming it, recorded as the worker records such work
    (worker/handling.py, proven by "already captured" after a lost answer): captured, the
    capture_id unknown, flagged."""
    payment = await authorized(api, pool)
    resp, _ = await api.post(f"/v1/payments/{payment['id']}/capture")
    assert resp.status == 202
    claim = await phases.claim(pool, await pending_operation(pool, payment["id"]), "test-worker", 30)
    assert isinstance(claim, settlement.Claim)
    done = BankOutcome("ok", http_status=400)
    recorded = await phases.record_outcome(
        pool, claim, Verdict.SUCCEEDED, done, 3, domain.unnamed_work(OperationKind.CAPTURE)
    )
    assert recorded is not None and recorded["status"] == "captured" and recorded["bank"]["capture_id"] is None
    return recorded


async def _no_work_started(pool, payment_id: str, key: str) -> None:
    assert (
        await pool.fetchval("SELECT count(*) FROM operations WHERE payment_id = $1 AND status = 'pending'", payment_id)
        == 0
    )
    assert await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key) == 0


async def test_a_refund_of_a_capture_the_bank_never_named_is_refused_until_ops_record_it(api, pool):
    payment = await _captured_unnamed(api, pool)
    path, key = f"/v1/payments/{payment['id']}/refund", uuid.uuid4().hex
    for _ in range(2):  # FicMart retries with the same key: refused again, nothing stored to replay
        resp, err = await api.post(path, {"amount": payment["amount"]}, key=key)
        assert resp.status == 409 and "Idempotent-Replayed" not in resp.headers, err
        assert err["error"]["code"] == "bank_reference_unknown"
        assert (err["error"]["reference"], err["error"]["status"]) == ("capture_id", "captured")
        assert "money is safe" in err["error"]["message"]
        await _no_work_started(pool, payment["id"], key)
    _, after = await api.get(f"/v1/payments/{payment['id']}")
    assert after == payment  # status, flag, last_error and history as they were
    assert after["attention_required"] and after["last_error"]["code"] == "bank_reference_unknown"

    capture_id = f"cap_{uuid.uuid4()}"
    decision = await decisions.set_reference(
        pool, payment["id"], "capture_id", capture_id, reason="found in the bank's back office", by="alice"
    )
    assert decision.payment["bank"]["capture_id"] == capture_id and decision.payment["status"] == "captured"
    cause = await pool.fetchval(
        "SELECT cause FROM payment_history WHERE payment_id = $1 ORDER BY id DESC LIMIT 1", payment["id"]
    )
    assert cause == f"ops:alice:set-reference:capture_id={capture_id} found in the bank's back office"

    resp, body = await api.post(path, {"amount": payment["amount"]}, key=key)  # the same request, accepted now
    assert resp.status == 202 and body["status"] == "refunding", body
    claim = await phases.claim(pool, await pending_operation(pool, payment["id"]), "test-worker", 30)
    assert isinstance(claim, settlement.Claim)
    assert claim.payment.capture_id == capture_id  # what the bank call is sent with
    refund = BankOutcome("ok", http_status=200, body={"refund_id": f"ref_{uuid.uuid4()}"})
    done = await phases.record_outcome(pool, claim, Verdict.SUCCEEDED, refund, 3)
    assert done is not None and done["status"] == "refunded" and done["bank"]["capture_id"] == capture_id
    again, replayed = await api.post(path, {"amount": payment["amount"]}, key=key)
    assert again.headers["Idempotent-Replayed"] == "true" and replayed == body


async def test_a_capture_or_void_of_an_authorization_the_bank_never_named_is_refused(api, pool):
    payment = await api.authorize()
    claim = await phases.claim(pool, await pending_operation(pool, payment["id"]), "test-worker", 30)
    assert isinstance(claim, settlement.Claim)
    await settlement.park(pool, claim.operation_id, {"code": "bank_timeout", "message": "m", "retryable": True})
    await decisions.settle_by_hand(pool, claim.operation_id, succeeded=True, reason="a hold at the bank", by="bob")
    for action in ("capture", "void"):
        key = uuid.uuid4().hex
        resp, err = await api.post(f"/v1/payments/{payment['id']}/{action}", key=key)
        assert resp.status == 409 and err["error"]["code"] == "bank_reference_unknown", err
        assert (err["error"]["reference"], err["error"]["status"]) == ("authorization_id", "authorized")
        await _no_work_started(pool, payment["id"], key)
    _, after = await api.get(f"/v1/payments/{payment['id']}")
    assert after["status"] == "authorized" and after["attention_required"]


async def test_a_batch_refuses_the_request_without_its_reference_and_starts_the_others(api, pool):
    unnamed = await _captured_unnamed(api, pool)
    named = await captured(api, pool)
    results = await asyncio.gather(
        *(api.post(f"/v1/payments/{p['id']}/refund") for p in (unnamed, named, unnamed, named))
    )
    codes = [(r.status, b["error"]["code"] if r.status != 202 else b["status"]) for r, b in results]
    assert sorted(codes[::2]) == [(409, "bank_reference_unknown")] * 2
    assert sorted(codes[1::2]) == [(202, "refunding"), (409, "invalid_state_transition")]
