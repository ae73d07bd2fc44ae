"""Every lifecycle of docs/api.md through the HTTP API, with the real processes.

Each test checks three views of the same story: the receipt (GET, long poll),
the bank's ledger (GET /_mock/ledger, the payment's entries found by its unique
amount) and the events on payments.events.ficmart (the test's own queue bound '#').
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest

from tests.e2e.flows import bank_entries
from tests.e2e.stack import EXPIRED_CARD, HAPPY, MERCHANT, NO_FUNDS

pytestmark = pytest.mark.timeout(120)


async def authorized(client, amount: int, card=HAPPY) -> dict:
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=amount, card=card)
    assert reply.status == 202, reply
    payment = await client.settled(reply.body["id"], timeout=30)
    assert payment["status"] == "authorized", payment
    return payment


async def act(client, payment: dict, action: str, running: str, final: str) -> dict:
    reply = await client.act(payment["id"], action)
    assert reply.status == 202, reply
    assert reply.body["status"] == running
    settled = await client.settled(payment["id"], timeout=30)
    assert settled["status"] == final, settled
    return settled


def history(payment: dict) -> list[str]:
    return [h["status"] for h in payment["history"]]


async def assert_events(stack, payment: dict, expected: list[str]) -> None:
    """One event per settled status, as published: routing key payment.<status>, message_id ==
    event_id, the body's payment as it was then; and each one also visible by polling (history)."""
    want = Counter(f"payment.{s}" for s in expected)
    assert await stack.events.wait_for(lambda: stack.events.types(payment["id"]) == want, 15), (
        stack.events.types(payment["id"]),
        want,
    )
    for event in stack.events.of(payment["id"]):
        routing_key, message_id = stack.events.meta[event["event_id"]]
        assert set(event) == {"event_id", "type", "occurred_at", "merchant", "payment"}
        assert event["merchant"] == MERCHANT and stack.events.headers[event["event_id"]]["merchant"] == MERCHANT
        assert event["event_id"].startswith("evt_") and message_id == event["event_id"]
        assert routing_key == event["type"]
        status = event["type"].removeprefix("payment.")
        assert event["payment"]["status"] == status
        assert status in history(payment)  # nothing is only in the broker
        assert "number" not in event["payment"]["card"] and "cvv" not in event["payment"]["card"]


async def test_authorize_capture_refund(e2e, client, amount):
    amt = amount()
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=amt, card=HAPPY)
    assert reply.status == 202 and reply.body["status"] == "pending"
    assert reply.headers["Location"] == f"/v1/payments/{reply.body['id']}"
    payment = await client.settled(reply.body["id"], timeout=30)
    assert payment["status"] == "authorized" and payment["bank"]["authorization_id"].startswith("auth_")

    key = uuid.uuid4().hex
    first = await client.act(payment["id"], "capture", key=key)
    assert first.status == 202 and first.body["status"] == "capturing"
    captured = await client.settled(payment["id"], timeout=30)
    assert captured["status"] == "captured" and captured["bank"]["capture_id"].startswith("cap_")
    again = await client.act(payment["id"], "capture", key=key)  # FicMart retries: same answer, no second capture
    assert (again.status, again.body, again.headers.get("Idempotent-Replayed")) == (202, first.body, "true")

    refunded = await act(client, payment, "refund", "refunding", "refunded")
    assert history(refunded) == ["pending", "authorized", "capturing", "captured", "refunding", "refunded"]
    assert refunded["last_error"] is None and refunded["attention_required"] is False

    entries = bank_entries(await e2e.bank.ledger(), amt)
    (hold,), (capture,), (refund,) = entries["authorizations"], entries["captures"], entries["refunds"]
    assert entries["voids"] == []
    assert hold["authorization_id"] == refunded["bank"]["authorization_id"] and hold["status"] == "captured"
    assert capture["capture_id"] == refunded["bank"]["capture_id"]
    assert refund["refund_id"] == refunded["bank"]["refund_id"]
    await assert_events(e2e, refunded, ["authorized", "captured", "refunded"])


async def test_a_refund_of_a_capture_the_bank_never_named_waits_for_ops_then_completes(e2e, client, amount):
    amt = amount()
    payment = await authorized(client, amt)
    # The bank captures, then drops the connection and forgets our key: the worker's retry is told
    # "already used" and never learns the capture's id.
    await e2e.bank.arm_fault(action="forget_key", path="/api/v1/captures", times=1)
    reply = await client.act(payment["id"], "capture")
    assert reply.status == 202
    captured = await client.settled(payment["id"], timeout=30)
    assert (captured["status"], captured["bank"]["capture_id"], captured["attention_required"]) == (
        "captured",
        None,
        True,
    ), captured
    assert captured["last_error"]["code"] == "bank_reference_unknown"

    refused = await client.act(payment["id"], "refund")
    assert refused.status == 409, refused
    assert (refused.body["error"]["code"], refused.body["error"]["reference"]) == (
        "bank_reference_unknown",
        "capture_id",
    )
    assert await client.payment(payment["id"]) == captured  # nothing started, nothing changed
    (capture,) = bank_entries(await e2e.bank.ledger(), amt)["captures"]

    out = e2e.gatewayctl(
        "payments", "set-reference", payment["id"], "--capture-id", capture["capture_id"],
        "--by", "alice", "--reason", "found at the bank",
    )  # fmt: skip
    assert "recorded the bank reference" in out
    refunded = await act(client, payment, "refund", "refunding", "refunded")
    assert refunded["bank"]["capture_id"] == capture["capture_id"] and refunded["bank"]["refund_id"]
    (refund,) = bank_entries(await e2e.bank.ledger(), amt)["refunds"]
    assert (refund["refund_id"], refund["capture_id"]) == (refunded["bank"]["refund_id"], capture["capture_id"])
    want = Counter(f"payment.{s}" for s in ("authorized", "captured", "attention_required", "refunded"))
    assert await e2e.events.wait_for(lambda: e2e.events.types(payment["id"]) == want, 15), e2e.events.types(
        payment["id"]
    )


async def test_authorize_void(e2e, client, amount):
    amt = amount()
    payment = await authorized(client, amt)
    voided = await act(client, payment, "void", "voiding", "voided")
    assert history(voided) == ["pending", "authorized", "voiding", "voided"]
    entries = bank_entries(await e2e.bank.ledger(), amt)
    (hold,), (void,) = entries["authorizations"], entries["voids"]
    assert entries["captures"] == [] and entries["refunds"] == []
    assert hold["status"] == "voided" and void["void_id"] == voided["bank"]["void_id"]
    refused = await client.act(payment["id"], "capture")
    assert refused.status == 409 and refused.body["error"]["code"] == "invalid_state_transition"
    await assert_events(e2e, voided, ["authorized", "voided"])


@pytest.mark.parametrize(
    "card, code",
    [(NO_FUNDS, "insufficient_funds"), (EXPIRED_CARD, "card_expired")],
    ids=["insufficient_funds", "card_expired"],
)
async def test_declined(e2e, client, amount, card, code):
    amt = amount()
    order_id = f"ord_{uuid.uuid4().hex[:10]}"
    reply = await client.authorize(order_id=order_id, amount=amt, card=card)
    assert reply.status == 202
    payment = await client.settled(reply.body["id"], timeout=30)
    assert payment["status"] == "declined"
    assert payment["last_error"]["code"] == code and payment["last_error"]["retryable"] is False
    assert payment["bank"]["authorization_id"] is None
    assert bank_entries(await e2e.bank.ledger(), amt)["authorizations"] == []
    await assert_events(e2e, payment, ["declined"])
    # After a decline the order may try again (with a card that works).
    retry = await client.authorize(order_id=order_id, amount=amt, card=HAPPY)
    assert retry.status == 202 and retry.body["id"] != payment["id"]
    assert (await client.settled(retry.body["id"], timeout=30))["status"] == "authorized"


async def test_capture_of_an_expired_hold_expires_the_payment_and_releases_the_hold(e2e, client, amount):
    amt = amount()
    payment = await authorized(client, amt)
    await e2e.bank.expire(payment["bank"]["authorization_id"])  # the hold lapses at the bank
    reply = await client.act(payment["id"], "capture")
    assert reply.status == 202 and reply.body["status"] == "capturing"
    expired = await client.settled(payment["id"], timeout=30)
    assert expired["status"] == "expired" and expired["last_error"]["code"] == "authorization_expired"
    released = await _wait_receipt(client, payment["id"], lambda p: p["bank"]["void_id"] is not None)
    entries = bank_entries(await e2e.bank.ledger(), amt)
    (hold,), (void,) = entries["authorizations"], entries["voids"]
    assert entries["captures"] == [] and hold["status"] == "voided"
    assert void["void_id"] == released["bank"]["void_id"] and released["status"] == "expired"
    await assert_events(e2e, released, ["authorized", "expired"])


async def test_the_sweeper_expires_a_lapsed_hold_and_releases_it(e2e, client, amount):
    """Holds that lapse while nobody asks: the worker's sweeper moves the payment to expired
    and voids the hold. Needs a bank whose holds last seconds, so the mock is restarted with
    AUTH_EXPIRY_HOURS=0.001 (3.6 s) for this test only."""
    await e2e.restart_bank(AUTH_EXPIRY_HOURS="0.001")
    try:
        amt = amount()
        payment = await authorized(client, amt)
        expired = await _wait_receipt(
            client, payment["id"], lambda p: p["status"] == "expired" and p["bank"]["void_id"] is not None, timeout=30
        )
        assert history(expired) == ["pending", "authorized", "expired"]
        entries = bank_entries(await e2e.bank.ledger(), amt)
        (hold,), (void,) = entries["authorizations"], entries["voids"]
        assert entries["captures"] == [] and hold["status"] == "voided" and hold["expired"] is True
        assert void["void_id"] == expired["bank"]["void_id"]
        await assert_events(e2e, expired, ["authorized", "expired"])
        refused = await client.act(payment["id"], "capture")
        assert refused.status == 409 and refused.body["error"]["code"] == "invalid_state_transition"
    finally:
        await e2e.restart_bank()


async def test_long_poll_answers_when_the_status_settles(e2e, client, amount):
    await e2e.bank.chaos(min_latency_ms=2000, max_latency_ms=2000)  # every bank call takes 2 s
    reply = await client.authorize(order_id=f"ord_{uuid.uuid4().hex[:10]}", amount=amount(), card=HAPPY)
    pid = reply.body["id"]
    started = time.monotonic()
    still = await client.payment(pid, wait=1)  # the bank is not done: the poll runs out and says so
    assert still["status"] == "pending" and time.monotonic() - started >= 0.9
    settled = await client.payment(pid, wait=25)
    waited = time.monotonic() - started
    assert settled["status"] == "authorized"
    assert waited < 20, f"the long poll held on {waited:.1f}s after the payment settled"
    started = time.monotonic()
    again = await client.payment(pid, wait=25)  # already settled: no wait at all
    assert again["status"] == "authorized" and time.monotonic() - started < 10


async def _wait_receipt(client, payment_id: str, done, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        payment = await client.payment(payment_id)
        if done(payment) or time.monotonic() > deadline:
            assert done(payment), payment
            return payment
        await asyncio.sleep(0.2)
