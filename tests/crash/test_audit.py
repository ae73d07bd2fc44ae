"""The audit of the crash and chaos runs must see what it is there to see.

A clean run passes it, so these feed it doctored evidence (a second hold, a lost
capture, a missing or doubled event, a stuck payment, a receipt id the bank does not
know) and check that each one is reported. No processes involved.

With a bank that forgets keys, the same for each category of tests/e2e/flows.py: money
lost either way, a second hold flagged (reported) or not (fails), work done but
unnamed and flagged (reported), unflagged or parked instead of settled (fails); and
the harness's verdict, which tells the gateway's known gaps (issue 10) from any
other failure.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest

from harness.system import Death
from tests.crash.harness import MissingGatewayBehaviour, Summary
from tests.e2e.flows import Audit, Flow, Plan, audit
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
    body = {
        "event_id": event_id,
        "type": f"payment.{kind}",
        "occurred_at": "t",
        "merchant": "ficmart",
        "payment": {"id": pid, "status": kind},
    }
    assert events.record(body, routing_key or f"payment.{kind}", event_id, {"merchant": "ficmart"})


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


# ---- a bank that forgets keys: lost, doubled (flagged or not), done but unnamed ----------------


async def check_forgetful(payments, ledger, flows, events, findings=None):
    """The audit as the forgetful-bank crash runs call it (parked operations allowed)."""
    return await audit(
        FakeClient(payments), flows, ledger, events, 0, allow_parked=True, bank_forgets_keys=True, findings=findings
    )


def flag(payments: dict, events: EventLog, pid: str) -> None:
    """The gateway flagged the payment for ops, with its event."""
    payments[pid]["attention_required"] = True
    add_event(events, pid, "attention_required")


def second_hold_of_pay_b(ledger: dict, *, same_key: bool = True) -> None:
    """The bank ran pay_b's authorize key twice (or, with same_key=False, got two keys)."""
    ledger["authorizations"][1]["idempotency_key"] = "gw-op_b"
    second = "gw-op_b" if same_key else "gw-op_b_other"
    ledger["authorizations"].append({"authorization_id": "auth_b2", "amount": 1001, "idempotency_key": second})


async def test_a_clean_run_is_clean_with_a_forgetful_bank():
    result = await check_forgetful(*good_run())
    assert result.failures == {}, result.report()
    assert result.flagged_cases() == []


async def test_a_second_hold_under_our_key_flagged_with_a_finding_is_reported_not_failed():
    payments, ledger, flows, events = good_run()
    second_hold_of_pay_b(ledger)
    flag(payments, events, "pay_b")
    result = await check_forgetful(payments, ledger, flows, events, {"pay_b": {"possible_duplicate_hold"}})
    assert result.failures == {}, result.report()
    [case] = result.doubled_flagged
    assert case.startswith("pay_b(void): 2 authorizations: doubled hold, flagged; bank has hold auth_b (key gw-op_b)")
    assert "hold auth_b2 (key gw-op_b)" in case
    assert "we have voided, attention_required=True" in case and "findings=['possible_duplicate_hold']" in case


async def test_findings_are_counted_against_the_second_holds_the_bank_really_has():
    payments, ledger, flows, events = good_run()
    second_hold_of_pay_b(ledger)
    flag(payments, events, "pay_b")
    flag(payments, events, "pay_a")  # flagged for a second hold it does not have
    found = {"pay_b": {"possible_duplicate_hold"}, "pay_a": {"possible_duplicate_hold"}}
    result = await check_forgetful(payments, ledger, flows, events, found)
    assert (result.duplicate_hold_findings, result.found_second_holds, result.second_holds) == (2, 1, 1)
    assert result.findings_line() == "possible_duplicate_hold findings=2 on real second holds=1/1"


async def test_a_second_hold_not_flagged_fails_the_run():
    payments, ledger, flows, events = good_run()
    second_hold_of_pay_b(ledger)
    result = await check_forgetful(payments, ledger, flows, events, {"pay_b": {"possible_duplicate_hold"}})
    [case] = result.doubled
    assert case.startswith("pay_b(void): 2 authorizations, status voided: doubled hold, not flagged; bank has ")
    assert "we have voided, attention_required=False" in case
    assert result.doubled_flagged == []


async def test_a_second_hold_flagged_without_a_finding_fails_the_run():
    payments, ledger, flows, events = good_run()
    second_hold_of_pay_b(ledger)
    flag(payments, events, "pay_b")
    result = await check_forgetful(payments, ledger, flows, events, {"pay_a": {"possible_duplicate_hold"}})
    [case] = result.doubled
    assert case.startswith("pay_b(void): 2 authorizations, status voided: doubled hold, not flagged; bank has ")
    assert "attention_required=True" in case and "findings=[]" in case


async def test_a_second_hold_under_another_key_is_not_the_banks_doing_and_fails_though_flagged():
    payments, ledger, flows, events = good_run()
    second_hold_of_pay_b(ledger, same_key=False)
    flag(payments, events, "pay_b")
    result = await check_forgetful(payments, ledger, flows, events, {"pay_b": {"possible_duplicate_hold"}})
    [case] = result.doubled
    assert "doubled hold under 2 different keys, the gateway asked twice" in case


async def test_a_refund_done_but_unnamed_in_its_true_status_and_flagged_is_reported_not_failed():
    payments, ledger, flows, events = good_run()
    payments["pay_a"]["bank"]["refund_id"] = None  # the bank refused our retry: already_refunded
    flag(payments, events, "pay_a")
    result = await check_forgetful(payments, ledger, flows, events)
    assert result.failures == {}, result.report()
    [case] = result.unnamed
    assert case.startswith("pay_a(capture_refund): done but unnamed (refund id unknown), flagged; bank has ")
    assert "refund ref_a" in case and "we have refunded, attention_required=True" in case and "refund_id=None" in case


async def test_a_refund_done_but_unnamed_and_not_flagged_fails_the_run():
    payments, ledger, flows, events = good_run()
    payments["pay_a"]["bank"]["refund_id"] = None
    result = await check_forgetful(payments, ledger, flows, events)
    [case] = result.unnamed_unflagged
    assert case.startswith("pay_a(capture_refund): done but unnamed (refund id unknown), not flagged; bank has ")
    assert result.unnamed == []


async def test_a_refund_done_but_parked_instead_of_settled_fails_the_run():
    payments, ledger, flows, events = good_run(skip="pay_a:refunded")
    pay_a = payments["pay_a"]
    pay_a["status"] = "refunding"
    pay_a["history"].pop()
    pay_a["bank"]["refund_id"] = None
    pay_a["last_error"] = {"code": "bank_outcome_uncertain", "message": "m", "retryable": True}
    flag(payments, events, "pay_a")
    result = await check_forgetful(payments, ledger, flows, events)
    [case] = result.unnamed_parked
    assert case.startswith("pay_a(capture_refund): done but unnamed (refund), parked instead of settled; bank has ")
    assert "we have refunding, attention_required=True, last_error=bank_outcome_uncertain" in case
    assert list(result.failures) == ["unnamed_parked"], result.report()
    # The audit of a bank that never forgets keeps allowing a parked operation, as before.
    assert (await audit(FakeClient(payments), flows, ledger, events, 0, allow_parked=True)).failures == {}


async def test_money_moved_that_the_receipt_does_not_account_for_is_lost():
    payments, ledger, flows, events = good_run()
    ledger["captures"].append({"capture_id": "cap_b", "amount": 1001, "idempotency_key": "gw-op_x"})
    result = await check_forgetful(payments, ledger, flows, events)
    [case] = result.lost
    assert case.startswith("pay_b(void): a capture the receipt does not account for; bank has ")
    assert "capture cap_b (key gw-op_x)" in case and "we have voided" in case


async def test_a_refund_the_bank_has_while_the_receipt_went_back_to_captured_is_lost_and_wrong():
    payments, ledger, flows, events = good_run(skip="pay_a:refunded")
    pay_a = payments["pay_a"]
    pay_a["status"] = "captured"
    pay_a["bank"]["refund_id"] = None
    flag(payments, events, "pay_a")
    result = await check_forgetful(payments, ledger, flows, events)
    assert [c.split(";")[0] for c in result.lost] == [
        "pay_a(capture_refund): a refund the receipt does not account for"
    ]
    assert result.wrong == ["pay_a(capture_refund): captured, expected refunded"]


async def test_a_flagged_receipt_claiming_a_refund_the_bank_does_not_have_is_lost():
    payments, ledger, flows, events = good_run()
    ledger["refunds"] = []
    payments["pay_a"]["bank"]["refund_id"] = None
    flag(payments, events, "pay_a")
    result = await check_forgetful(payments, ledger, flows, events)
    [case] = result.lost
    assert case.startswith("pay_a(capture_refund): 0 refunds, status refunded needs 1; bank has ")
    assert result.unnamed == []


async def test_a_capture_done_but_unnamed_is_not_refunded_and_captured_is_its_true_status():
    payments, ledger, flows, events = good_run(skip="pay_a:refunded")
    pay_a = payments["pay_a"]
    pay_a["status"] = "captured"
    pay_a["history"] = pay_a["history"][:4]
    pay_a["bank"]["capture_id"] = pay_a["bank"]["refund_id"] = None
    ledger["refunds"] = []
    flag(payments, events, "pay_a")
    flows[0].unnamed_capture = True  # what run_flow does when the capture has no bank id
    result = await check_forgetful(payments, ledger, flows, events)
    assert result.failures == {}, result.report()
    assert [c.split(";")[0] for c in result.unnamed] == [
        "pay_a(capture_refund): done but unnamed (capture id unknown), flagged"
    ]


async def test_a_bank_that_never_forgets_excuses_neither_a_flagged_second_hold_nor_a_missing_id():
    payments, ledger, flows, events = good_run()
    second_hold_of_pay_b(ledger)
    flag(payments, events, "pay_b")
    payments["pay_a"]["bank"]["refund_id"] = None
    flag(payments, events, "pay_a")
    result = await check(payments, ledger, flows, events)
    assert result.doubled == ["pay_b(void): 2 authorizations, status voided"]
    assert result.mismatched == ["pay_a(capture_refund): receipt refund_id=None, bank ref_a"]


# ---- the verdict of a forgetful-bank run: the gateway's known gaps, or something else -----------


def summary_of(result) -> Summary:
    return Summary(
        payments=result.payments,
        kills=Counter(),
        restarts=Counter(),
        broker_cuts=0,
        db_cuts=0,
        terminated_backends=0,
        audit=result,
        duplicate_orders=[],
        unexpected=[],
        client_retries={},
        backlog={},
        wall=0.0,
        drain=0.0,
    )


async def gateway_of_today() -> Audit:
    """What the gateway without issue 10's handling leaves: pay_a's refund parked although the bank
    did it (and FicMart's flow stopped there), pay_b's second hold recorded without a flag."""
    payments, ledger, flows, events = good_run(skip="pay_a:refunded")
    pay_a = payments["pay_a"]
    pay_a["status"] = "refunding"
    pay_a["history"].pop()
    pay_a["bank"]["refund_id"] = None
    flag(payments, events, "pay_a")
    flows[0].problems.append("status refunding (attention=True), expected refunded")
    second_hold_of_pay_b(ledger)
    return await check_forgetful(payments, ledger, flows, events)


async def test_a_run_that_fails_only_where_the_gateway_lacks_issue_10_raises_missing_gateway_behaviour():
    result = await gateway_of_today()
    assert set(result.failures) == {"flow_problems", "doubled", "unnamed_parked"}
    with pytest.raises(MissingGatewayBehaviour, match="parked instead of settled"):
        summary_of(result).raise_problems()


@pytest.mark.parametrize(
    "also",
    ["lost", "flow problem of another payment", "doubled refund", "unexpected death"],
)
async def test_anything_else_is_a_plain_failure(also):
    result = await gateway_of_today()
    summary = summary_of(result)
    if also == "lost":
        result.lost.append("pay_c(decline): a hold the receipt does not account for; ...")
    elif also == "flow problem of another payment":
        result.flow_problems.append("pay_b(void): void answered 500")
    elif also == "doubled refund":
        result.doubled.append("pay_a(capture_refund): 2 refunds, status refunding: doubled; ...")
    else:
        summary.unexpected.append(Death("worker", 1, None, "Traceback ..."))
    with pytest.raises(AssertionError) as raised:
        summary.raise_problems()
    assert not isinstance(raised.value, MissingGatewayBehaviour)


async def test_a_clean_summary_raises_nothing():
    summary_of(await check_forgetful(*good_run())).raise_problems()
