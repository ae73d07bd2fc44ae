"""Random full lifecycles through the HTTP API, and the audit that checks them afterwards.

A flow is one order: authorize, then capture / capture+refund / void / nothing, or a
card the bank declines. Each payment of a run gets its own amount (base + index), so
the mock bank's ledger can be read per payment without trusting the gateway's ids:
every hold, capture, void and refund with that amount belongs to that payment.

The audit compares, per payment: the final receipt with what the flow expects, the
ledger with what the final status requires (exactly one hold per authorized payment,
one capture per captured, one void per voided or expired, one refund per refunded),
the receipt's bank ids with the ledger's, and the events received with the statuses
the payment went through (one event per settled status in its history, by event_id).

A bank that may forget keys (docs/bank.md, "Idempotency at the bank": the work done,
the key not remembered, so a repeat runs again) is audited with `bank_forgets_keys=True`
and the reconciliation findings per payment. Each payment's books then fall into:
  lost      money moved at the bank that the receipt does not account for at all, or a
            receipt claiming a movement the bank does not have (fails the run);
  doubled   two holds, captures, voids or refunds for one payment at the bank. Two holds
            under the payment's one authorize key are the bank running our retry as new:
            the gateway must flag the payment and record a `possible_duplicate_hold`
            finding; flagged they are reported (doubled_flagged), otherwise they fail;
  unnamed   done at the bank, but the receipt has no bank id for it (the bank forgot our
            key, so its refusal of our retry named nothing). The receipt must still show
            the true status, with the id unknown (null) and attention_required: reported
            (unnamed). Parked in progress instead of settled (unnamed_parked), or not
            flagged (unnamed_unflagged), it fails.
Every such entry explains itself: payment, category, what the bank has, what we have.
With a bank that never forgets (the default) none of this can be the bank's doing: a
second hold is doubled and a receipt without the id is mismatched, flagged or not.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from tests.e2e.stack import EVENT_STATUSES, EXPIRED_CARD, IN_PROGRESS, NO_FUNDS, Client, EventLog

ACTIONS = ("capture", "capture_refund", "void", "none")
FINAL_FOR = {"capture": "captured", "capture_refund": "refunded", "void": "voided", "none": "authorized"}
DECLINES = ((NO_FUNDS, "insufficient_funds"), (EXPIRED_CARD, "card_expired"))

# Final status -> bank entries the payment must have: (holds, captures, voids, refunds).
BANK_SHAPE = {
    "declined": (0, 0, 0, 0),
    "authorized": (1, 0, 0, 0),
    "captured": (1, 1, 0, 0),
    "refunded": (1, 1, 0, 1),
    "voided": (1, 0, 1, 0),
    "expired": (1, 0, 1, 0),
}
SECTIONS = ("authorizations", "captures", "voids", "refunds")
ID_FIELDS = {"authorizations": "authorization_id", "captures": "capture_id", "voids": "void_id", "refunds": "refund_id"}
ENTRY_NAMES = {"authorizations": "hold", "captures": "capture", "voids": "void", "refunds": "refund"}
# While an operation runs, the receipt accounts for the status it left; the operation's
# own section may or may not be done at the bank yet.
IN_FLIGHT = {
    "pending": ((0, 0, 0, 0), "authorizations"),
    "capturing": (BANK_SHAPE["authorized"], "captures"),
    "voiding": (BANK_SHAPE["authorized"], "voids"),
    "refunding": (BANK_SHAPE["captured"], "refunds"),
}
DUPLICATE_HOLD_FINDING = "possible_duplicate_hold"
UNFLAGGED_HOLD = "doubled hold, not flagged"


def bank_entries(ledger: dict, amount: int) -> dict[str, list[dict]]:
    """The ledger's holds, captures, voids and refunds of the payment with this amount."""
    return {s: [e for e in ledger[s] if e["amount"] == amount] for s in SECTIONS}


@dataclass
class Plan:
    index: int
    amount: int
    card: dict
    action: str  # one of ACTIONS, or "decline"
    decline_code: str | None = None

    @property
    def expected(self) -> str:
        return "declined" if self.action == "decline" else FINAL_FOR[self.action]


@dataclass
class Flow:
    plan: Plan
    order_id: str
    payment_id: str | None = None
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unnamed_capture: bool = False  # captured without a capture id: the refund was refused (409)

    @property
    def expected(self) -> str:
        """The final status this flow should leave: its plan's, unless FicMart held back a refund."""
        return "captured" if self.unnamed_capture else self.plan.expected


def plans(n: int, cards: list[dict], *, seed: int, base_amount: int = 1000, decline_rate: float = 0.08) -> list[Plan]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < decline_rate:
            card, code = DECLINES[i % 2]
            out.append(Plan(i, base_amount + i, card, "decline", code))
        else:
            out.append(Plan(i, base_amount + i, rng.choice(cards), rng.choice(ACTIONS)))
    return out


async def run_flow(client: Client, plan: Plan, run_id: str, settle_timeout: float = 120.0) -> Flow:
    """One order through the API as FicMart would drive it; problems are noted, not raised."""
    flow = Flow(plan, f"ord_{run_id}_{plan.index}")
    started = time.monotonic()
    try:
        reply = await client.authorize(
            order_id=flow.order_id, amount=plan.amount, card=plan.card, customer_id=f"cus_{run_id}"
        )
        if reply.status != 202:
            flow.problems.append(f"authorize answered {reply.status} {reply.body}")
            return flow
        flow.payment_id = reply.body["id"]
        payment = await client.settled(flow.payment_id, settle_timeout)
        if plan.action == "decline":
            _expect(flow, payment, "declined")
            if (payment.get("last_error") or {}).get("code") != plan.decline_code:
                flow.problems.append(f"declined with {payment.get('last_error')}, expected {plan.decline_code}")
            return flow
        if not _expect(flow, payment, "authorized"):
            return flow
        steps = {"capture": ["capture"], "capture_refund": ["capture", "refund"], "void": ["void"], "none": []}
        for action in steps[plan.action]:
            reply = await client.act(flow.payment_id, action)
            if action == "refund" and payment["bank"]["capture_id"] is None:
                # The bank took the money but never named the capture (it forgot our key): the
                # refund is refused at once, nothing started, the payment stays captured and
                # flagged until ops record the capture id. FicMart leaves it there.
                flow.unnamed_capture = True
                code = (reply.body.get("error") or {}).get("code") if isinstance(reply.body, dict) else None
                if (reply.status, code) != (409, "bank_reference_unknown"):
                    flow.problems.append(f"refund of an unnamed capture answered {reply.status} {reply.body}")
                return flow
            if reply.status != 202:
                flow.problems.append(f"{action} answered {reply.status} {reply.body}")
                return flow
            flagged = payment["attention_required"]  # e.g. a possible second hold, found at authorize
            payment = await client.settled(flow.payment_id, settle_timeout, flagged_before=flagged)
            want = {"capture": "captured", "refund": "refunded", "void": "voided"}[action]
            if not _expect(flow, payment, want):
                return flow
        return flow
    except AssertionError as exc:
        flow.problems.append(str(exc))
        return flow
    finally:
        flow.seconds = time.monotonic() - started


def _expect(flow: Flow, payment: dict, status: str) -> bool:
    if payment["status"] != status:
        flow.problems.append(
            f"status {payment['status']} (attention={payment['attention_required']}), expected {status}"
        )
        return False
    return True


async def run_flows(client: Client, todo: list[Plan], run_id: str, concurrency: int, on_done=None) -> list[Flow]:
    sem = asyncio.Semaphore(concurrency)

    async def one(plan: Plan) -> Flow:
        async with sem:
            flow = await run_flow(client, plan, run_id)
        if on_done is not None:
            on_done(flow)
        return flow

    return list(await asyncio.gather(*(one(p) for p in todo)))


# ---- the audit ------------------------------------------------------------------------------


@dataclass
class Audit:
    payments: int = 0
    statuses: Counter = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)  # final status not the expected one
    stuck: list[str] = field(default_factory=list)  # still in progress, not flagged for ops
    parked: list[str] = field(default_factory=list)  # in progress with attention_required
    lost: list[str] = field(default_factory=list)  # a bank operation the status needs is missing
    doubled: list[str] = field(default_factory=list)  # a bank operation happened more than once
    mismatched: list[str] = field(default_factory=list)  # receipt ids differ from the ledger's
    orphans: list[str] = field(default_factory=list)  # ledger entries no payment of the run explains
    missing_events: list[str] = field(default_factory=list)
    doubled_events: list[str] = field(default_factory=list)
    bad_events: list[str] = field(default_factory=list)
    unsent_outbox: int = 0
    flow_problems: list[str] = field(default_factory=list)
    # Only with a bank that may forget keys (see the module docstring):
    doubled_flagged: list[str] = field(default_factory=list)  # a second hold, flagged with a finding
    unnamed: list[str] = field(default_factory=list)  # done, no bank id, true status, flagged
    unnamed_parked: list[str] = field(default_factory=list)  # done, receipt parked in progress
    unnamed_unflagged: list[str] = field(default_factory=list)  # done, no bank id, not flagged
    duplicate_hold_findings: int = 0  # payments with a possible_duplicate_hold finding
    second_holds: int = 0  # payments with more than one hold at the bank
    found_second_holds: int = 0  # ... of which have the finding

    @property
    def failures(self) -> dict[str, list]:
        lists = {
            "flow_problems": self.flow_problems,
            "wrong": self.wrong,
            "stuck": self.stuck,
            "lost": self.lost,
            "doubled": self.doubled,
            "unnamed_parked": self.unnamed_parked,
            "unnamed_unflagged": self.unnamed_unflagged,
            "mismatched": self.mismatched,
            "orphans": self.orphans,
            "missing_events": self.missing_events,
            "doubled_events": self.doubled_events,
            "bad_events": self.bad_events,
        }
        out = {k: v for k, v in lists.items() if v}
        if self.unsent_outbox:
            out["unsent_outbox"] = [self.unsent_outbox]
        return out

    def report(self, limit: int = 8) -> str:
        return "; ".join(f"{k}={len(v)}: {v[:limit]}" for k, v in self.failures.items()) or "clean"

    def findings_line(self) -> str:
        """possible_duplicate_hold findings against the second holds the bank really has."""
        return (
            f"possible_duplicate_hold findings={self.duplicate_hold_findings} on real second holds="
            f"{self.found_second_holds}/{self.second_holds}"
        )

    def flagged_cases(self) -> list[str]:
        """The cases the gateway flagged as it should, each explained; they do not fail a run."""
        return self.doubled_flagged + self.unnamed

    def bank_failures(self) -> list[str]:
        """Every failing disagreement between the bank's books and the receipts (explained ones
        when the bank may forget keys)."""
        return self.lost + self.doubled + self.unnamed_parked + self.unnamed_unflagged


async def audit(
    client: Client,
    flows: list[Flow],
    ledger: dict,
    events: EventLog,
    unsent_outbox: int,
    *,
    allow_parked: bool = False,
    ledger_is_ours: bool = True,
    bank_forgets_keys: bool = False,
    findings: Mapping[str, Collection[str]] | None = None,
) -> Audit:
    """Check a finished run. `ledger_is_ours`: every ledger entry must belong to one of the flows.
    `bank_forgets_keys`: the bank may have done work and forgotten our key, so each payment's books
    are judged as lost, doubled or done but unnamed, with `findings` (payment id -> the kinds of
    reconciliation finding recorded for it) telling a flagged second hold from an unflagged one."""
    result = Audit(payments=len(flows), unsent_outbox=unsent_outbox)
    by_amount: dict[int, dict[str, list[dict]]] = {}
    for section in SECTIONS:
        for entry in ledger[section]:
            by_amount.setdefault(entry["amount"], {s: [] for s in SECTIONS})[section].append(entry)
    amounts = {f.plan.amount for f in flows}
    if ledger_is_ours:
        for amount, entries in by_amount.items():
            if amount not in amounts:
                result.orphans.append(f"amount {amount}: {sum(len(v) for v in entries.values())} entries")

    for flow in flows:
        tag = f"{flow.payment_id or flow.order_id}({flow.plan.action})"
        result.flow_problems.extend(f"{tag}: {p}" for p in flow.problems)
        if flow.payment_id is None:
            continue
        payment = await client.payment(flow.payment_id)
        status = payment["status"]
        result.statuses[status] += 1
        parked = status in IN_PROGRESS and payment["attention_required"]
        if status in IN_PROGRESS:
            (result.parked if parked else result.stuck).append(f"{tag}: {status}")
        elif status != flow.expected:
            result.wrong.append(f"{tag}: {status}, expected {flow.expected}")
        entries = by_amount.get(flow.plan.amount, {s: [] for s in SECTIONS})
        if bank_forgets_keys:
            _check_bank_that_forgets(result, tag, payment, entries, (findings or {}).get(flow.payment_id, ()))
        else:
            _check_bank(result, tag, payment, entries, parked)
        _check_events(result, tag, payment, events)
    if not allow_parked and result.parked:
        result.stuck.extend(f"parked: {p}" for p in result.parked)
    for event_id, (routing_key, message_id) in events.meta.items():
        body = events.events[event_id]
        if (
            routing_key != body["type"]
            or message_id != event_id
            or set(body) != {"event_id", "type", "occurred_at", "merchant", "payment"}
            or events.headers.get(event_id, {}).get("merchant") != body["merchant"]
        ):
            result.bad_events.append(
                f"{event_id}: routing_key={routing_key} message_id={message_id} keys={sorted(body)}"
            )
    result.bad_events.extend(events.bad)
    return result


def _check_bank(result: Audit, tag: str, payment: dict, entries: dict[str, list[dict]], parked: bool) -> None:
    counts = tuple(len(entries[s]) for s in SECTIONS)
    shape = BANK_SHAPE.get(payment["status"])
    for section, have, want in zip(SECTIONS, counts, shape or (1, 1, 1, 1), strict=True):
        if have > want:
            result.doubled.append(f"{tag}: {have} {section}, status {payment['status']}")
        elif shape is not None and have < want and not parked:
            result.lost.append(f"{tag}: {have} {section}, status {payment['status']} needs {want}")
    bank = payment["bank"]
    for section, field_name, id_name in (
        ("authorizations", "authorization_id", "authorization_id"),
        ("captures", "capture_id", "capture_id"),
        ("voids", "void_id", "void_id"),
        ("refunds", "refund_id", "refund_id"),
    ):
        if len(entries[section]) == 1 and not parked:
            if bank[field_name] != entries[section][0][id_name]:
                result.mismatched.append(
                    f"{tag}: receipt {field_name}={bank[field_name]}, bank {entries[section][0][id_name]}"
                )
        elif not entries[section] and bank[field_name] is not None:
            result.mismatched.append(f"{tag}: receipt {field_name}={bank[field_name]} unknown to the bank")


def _check_bank_that_forgets(
    result: Audit, tag: str, payment: dict, entries: dict[str, list[dict]], findings: Collection[str]
) -> None:
    """One payment's books when the bank may have done work and forgotten our key: every movement
    at the bank accounted for by the receipt, none twice unless flagged as a possible duplicate
    hold, and one the bank never named settled in its true status and flagged."""
    status = payment["status"]
    flagged = payment["attention_required"]
    claims, in_flight = IN_FLIGHT.get(status, (BANK_SHAPE.get(status, (1, 1, 1, 1)), None))

    def explained(category: str) -> str:
        return f"{tag}: {category}; bank has {_bank_has(entries)}; we have {_we_have(payment, findings)}"

    doubled_holds = len(entries["authorizations"]) > 1
    result.second_holds += doubled_holds
    result.duplicate_hold_findings += DUPLICATE_HOLD_FINDING in findings
    result.found_second_holds += doubled_holds and DUPLICATE_HOLD_FINDING in findings

    for section, want in zip(SECTIONS, claims, strict=True):
        found = entries[section]
        field_name = ID_FIELDS[section]
        name = ENTRY_NAMES[section]
        receipt_id = payment["bank"][field_name]
        if len(found) > 1:
            fault = _duplicate_hold_fault(found, flagged, findings) if section == "authorizations" else "doubled"
            if fault is None:
                result.doubled_flagged.append(explained(f"{len(found)} authorizations: doubled hold, flagged"))
            else:
                result.doubled.append(explained(f"{len(found)} {section}, status {status}: {fault}"))
        elif len(found) < want:
            result.lost.append(explained(f"{len(found)} {section}, status {status} needs {want}"))
        elif len(found) > want and section == in_flight:
            if flagged:
                result.unnamed_parked.append(explained(f"done but unnamed ({name}), parked instead of settled"))
            else:
                result.unnamed_unflagged.append(explained(f"done but unnamed ({name}), in progress, not flagged"))
        elif len(found) > want:
            result.lost.append(explained(f"a {name} the receipt does not account for"))
        elif found and receipt_id is None:
            if flagged:
                result.unnamed.append(explained(f"done but unnamed ({name} id unknown), flagged"))
            else:
                result.unnamed_unflagged.append(explained(f"done but unnamed ({name} id unknown), not flagged"))
        bank_ids = [e[field_name] for e in found]
        if receipt_id is not None and receipt_id not in bank_ids:
            if bank_ids:
                result.mismatched.append(f"{tag}: receipt {field_name}={receipt_id}, bank {', '.join(bank_ids)}")
            else:
                result.mismatched.append(f"{tag}: receipt {field_name}={receipt_id} unknown to the bank")


def _duplicate_hold_fault(holds: list[dict], flagged: bool, findings: Collection[str]) -> str | None:
    """Why a second hold is not excused, or None: the bank ran our one authorize key again (it
    forgot it, or its lookup failed), and the gateway flagged the payment (attention_required
    and a possible_duplicate_hold finding; the explanation shows which of the two is missing)."""
    keys = {h.get("idempotency_key") for h in holds}
    if len(keys) > 1:
        return f"doubled hold under {len(keys)} different keys, the gateway asked twice"
    if not flagged or DUPLICATE_HOLD_FINDING not in findings:
        return UNFLAGGED_HOLD
    return None


def _bank_has(entries: dict[str, list[dict]]) -> str:
    """The payment's entries at the bank: id, the key it came with, a hold's state."""
    out = []
    for section in SECTIONS:
        for e in entries[section]:
            state = f", {e['status']}" if section == "authorizations" and "status" in e else ""
            out.append(f"{ENTRY_NAMES[section]} {e[ID_FIELDS[section]]} (key {e.get('idempotency_key')}{state})")
    return ", ".join(out) or "nothing"


def _we_have(payment: dict, findings: Collection[str]) -> str:
    """The receipt, as far as the books go: status, flag, last error, bank ids, findings."""
    ids = " ".join(f"{f}={payment['bank'][f]}" for f in ID_FIELDS.values())
    error = (payment.get("last_error") or {}).get("code")
    return (
        f"{payment['status']}, attention_required={payment['attention_required']}, last_error={error}, "
        f"{ids}, findings={sorted(findings)}"
    )


def _check_events(result: Audit, tag: str, payment: dict, events: EventLog) -> None:
    settled = Counter(f"payment.{h['status']}" for h in payment["history"] if h["status"] in EVENT_STATUSES)
    got = events.types(payment["id"])
    for kind, want in settled.items():
        have = got.get(kind, 0)
        if have < want:
            result.missing_events.append(f"{tag}: {kind} {have}/{want}")
        elif have > want:
            result.doubled_events.append(f"{tag}: {kind} {have}/{want}")
    for kind, have in got.items():
        if kind not in settled and kind != "payment.attention_required":
            result.doubled_events.append(f"{tag}: {kind} x{have} but never in the history")
    if payment["attention_required"] and not got.get("payment.attention_required"):
        result.missing_events.append(f"{tag}: payment.attention_required")


async def wait_for_events(events: EventLog, client: Client, flows: list[Flow], timeout: float = 20.0) -> None:
    """After quiescence: give the last published events time to arrive at the test's queue."""
    finals = {}
    for flow in flows:
        if flow.payment_id:
            finals[flow.payment_id] = await client.payment(flow.payment_id)

    def complete() -> bool:
        for pid, payment in finals.items():
            want = Counter(f"payment.{h['status']}" for h in payment["history"] if h["status"] in EVENT_STATUSES)
            got = events.types(pid)
            if any(got.get(k, 0) < v for k, v in want.items()):
                return False
        return True

    await events.wait_for(complete, timeout)
