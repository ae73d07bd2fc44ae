"""The audit of the crash and chaos runs must see what it is there to see.

A clean run passes it, so these feed it doctored evidence (a second hold, a lost
capture, a missing or doubled event, a stuck payment, a receipt id the bank does not
know) and check that each one is reported. No processes involved.
"""

from __future__ import annotations

import copy
import itertools

from tests.e2e.flows import Flow, Plan, audit
from tests.e2e.stack import HAPPY, EventLog


class FakeClient:
    def __init__(self, payments: dict[str, dict]):
        self.payments = payments

    async def payment(self, payment_id: str) -> dict:
        return self.payments[payment_id]


def receipt(pid: str, status: str, history: list[str], amount: int, **bank) -> dict:
    ids = {"authorization_id": None, "capture_id": None, "void_id": None, "refund_id": None, **bank}
    return {
        "id": pid,
        "status": status,
        "amount": amount,
        "attention_required": False,
        "bank": ids,
        "history": [{"status": s, "at": "t"} for s in history],
    }


def good_run(skip: str | None = None):
    payments = {
        "pay_a": receipt(
            "pay_a",
            "refunded",
            ["pending", "authorized", "capturing", "captured", "refunding", "refunded"],
            1000,
            authorization_id="auth_a",
            capture_id="cap_a",
            refund_id="ref_a",
        ),
        "pay_b": receipt(
            "pay_b",
            "voided",
            ["pending", "authorized", "voiding", "voided"],
            1001,
            authorization_id="auth_b",
            void_id="void_b",
        ),
        "pay_c": receipt("pay_c", "declined", ["pending", "declined"], 1002),
    }
    ledger = {
        "authorizations": [
            {"authorization_id": "auth_a", "amount": 1000},
            {"authorization_id": "auth_b", "amount": 1001},
        ],
        "captures": [{"capture_id": "cap_a", "amount": 1000}],
        "voids": [{"void_id": "void_b", "amount": 1001}],
        "refunds": [{"refund_id": "ref_a", "amount": 1000}],
    }
    flows = [
        Flow(Plan(0, 1000, HAPPY, "capture_refund"), "o0", "pay_a"),
        Flow(Plan(1, 1001, HAPPY, "void"), "o1", "pay_b"),
        Flow(Plan(2, 1002, HAPPY, "decline", "insufficient_funds"), "o2", "pay_c"),
    ]
    events = EventLog("amqp://unused")
    for pid, kinds in (
        ("pay_a", ["authorized", "captured", "refunded"]),
        ("pay_b", ["authorized", "voided"]),
        ("pay_c", ["declined"]),
    ):
        for kind in kinds:
            if f"{pid}:{kind}" != skip:
                add_event(events, pid, kind)
    return payments, ledger, flows, events


_ids = itertools.count()


def add_event(events: EventLog, pid: str, kind: str, routing_key: str | None = None) -> None:
    event_id = f"evt_{next(_ids)}"
    body = {"event_id": event_id, "type": f"payment.{kind}", "occurred_at": "t", "payment": {"id": pid, "status": kind}}
    assert events.record(body, routing_key or f"payment.{kind}", event_id)


async def check(payments, ledger, flows, events, unsent=0):
    return await audit(FakeClient(payments), flows, ledger, events, unsent)


async def test_a_clean_run_is_clean():
    result = await check(*good_run())
    assert result.failures == {}, result.report()


async def test_a_second_hold_is_doubled():
    payments, ledger, flows, events = good_run()
    ledger["authorizations"].append({"authorization_id": "auth_b2", "amount": 1001})
    assert (await check(payments, ledger, flows, events)).doubled == ["pay_b(void): 2 authorizations, status voided"]


async def test_a_missing_capture_is_lost_and_an_unknown_receipt_id_is_mismatched():
    payments, ledger, flows, events = good_run()
    ledger["captures"] = []
    result = await check(payments, ledger, flows, events)
    assert result.lost == ["pay_a(capture_refund): 0 captures, status refunded needs 1"]
    assert result.mismatched == ["pay_a(capture_refund): receipt capture_id=cap_a unknown to the bank"]


async def test_missing_and_doubled_events_and_bad_routing():
    payments, ledger, flows, events = good_run(skip="pay_b:voided")
    add_event(events, "pay_c", "declined")
    add_event(events, "pay_d", "captured", routing_key="payment.wrong")
    result = await check(payments, ledger, flows, events)
    assert result.missing_events == ["pay_b(void): payment.voided 0/1"]
    assert result.doubled_events == ["pay_c(decline): payment.declined 2/1"]
    assert len(result.bad_events) == 1


async def test_stuck_wrong_orphan_and_unsent():
    payments, ledger, flows, events = good_run()
    payments = copy.deepcopy(payments)
    payments["pay_b"]["status"] = "voiding"
    payments["pay_a"]["status"] = "captured"
    ledger["voids"].append({"void_id": "void_x", "amount": 9999})
    result = await check(payments, ledger, flows, events, unsent=3)
    assert result.stuck == ["pay_b(void): voiding"]
    assert result.wrong == ["pay_a(capture_refund): captured, expected refunded"]
    assert result.orphans == ["amount 9999: 1 entries"]
    assert result.failures["unsent_outbox"] == [3]
