"""Reconciliation: our receipts against the bank's own books, read through its GET endpoints.

One pass (`run_reconciliation`) takes the newest payments that have bank ids
and that no operation is working on (a pending or parked operation means the
receipt is not settled yet), and for each one asks the bank:

    GET /authorizations/{authorization_id}  exists? amount? expires_at?
    GET /captures/{capture_id}              exists? amount? authorization_id is ours?
    GET /refunds/{refund_id}                exists? amount? capture_id is ours?

The bank has no GET for voids and no search, so a void (and a capture or
refund we have no id for) cannot be checked here. Every request waits for
the rate limiter (one shared budget of `rate_per_second`, retries included),
and a transient answer (5xx, timeout, dropped connection, unreadable body) is
retried with jittered backoff; still no answer -> finding `unverified`, never
a guess.

Findings (stored in reconciliation_findings under the run's id):

    missing_at_bank    the bank answers 404 for an id on our receipt        money
    amount_mismatch    the bank's amount differs from the receipt's         money
    link_mismatch      a capture/refund belongs to another auth/capture     money
    receipt_incomplete a settled status without the id it implies          money
    expiry_mismatch    the hold's expires_at differs                        safe
    unverified         the bank did not give a usable answer                -

With repair=True, and only if the payment did not move while it was checked
(same fields, still no operation running; checked again under its row lock):
an expiry mismatch takes the bank's value, and a hold that has thereby lapsed
on an authorized payment is expired with lapses.expire_hold (which starts
the release); a money finding is never settled by the gateway: the payment
gets attention_required (with a payment.attention_required event) for a
human. Without repair nothing but the findings is written.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg
import backoff

from gateway import db, domain, logs, messages, store
from gateway.domain import BankOutcome, Payment, Status
from gateway.payments import lapses
from gateway.timefmt import iso, now, parse
from gateway.views import receipt

log = logs.get("reconcile")

MISSING_AT_BANK = "missing_at_bank"
AMOUNT_MISMATCH = "amount_mismatch"
LINK_MISMATCH = "link_mismatch"
RECEIPT_INCOMPLETE = "receipt_incomplete"
EXPIRY_MISMATCH = "expiry_mismatch"
UNVERIFIED = "unverified"

# Disagreements about money: flagged for a human, never repaired by the gateway.
MONEY_KINDS = frozenset({MISSING_AT_BANK, AMOUNT_MISMATCH, LINK_MISMATCH, RECEIPT_INCOMPLETE})

DEFAULT_RATE = 20.0
DEFAULT_LIMIT = 1000
DEFAULT_RETRIES = 3
EXPIRY_TOLERANCE_SECONDS = 0.001  # the bank may carry more digits than our microseconds

# The receipt fields a check depends on: if any moved meanwhile, the findings are stale.
_CHECKED_FIELDS = ("status", "amount", "authorization_id", "authorization_expires_at", "capture_id", "refund_id")
# Statuses that imply a bank id on the receipt.
_NEEDS = {
    "capture_id": {Status.CAPTURED.value, Status.REFUNDING.value, Status.REFUNDED.value},
    "refund_id": {Status.REFUNDED.value},
    "void_id": {Status.VOIDED.value},
}


@dataclass
class Finding:
    payment_id: str
    kind: str
    detail: dict[str, Any]
    repaired: bool = False
    flagged: bool = False  # the payment shows attention_required (set by this run or an earlier one)
    note: str | None = None  # what the repair did next (e.g. the hold was expired)

    @property
    def money(self) -> bool:
        return self.kind in MONEY_KINDS

    def to_json(self) -> dict:
        return {
            "payment_id": self.payment_id,
            "kind": self.kind,
            "detail": self.detail,
            "repaired": self.repaired,
            "attention_flagged": self.flagged,
            "note": self.note,
        }


@dataclass
class Report:
    run_id: str
    repair: bool
    rate_per_second: float
    limit: int
    started_at: datetime
    finished_at: datetime | None = None
    checked: int = 0  # payments compared with the bank
    moved: int = 0  # payments that changed while being checked: their findings were dropped
    bank_calls: int = 0  # requests sent, retries included
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def seconds(self) -> float:
        end = self.finished_at or now()
        return (end - self.started_at).total_seconds()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind] = out.get(f.kind, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> dict:
        return {
            "run_id": self.run_id,
            "repair": self.repair,
            "rate_per_second": self.rate_per_second,
            "limit": self.limit,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "seconds": round(self.seconds, 3),
            "checked": self.checked,
            "moved": self.moved,
            "bank_calls": self.bank_calls,
            "counts": self.counts(),
            "repaired": sum(f.repaired for f in self.findings),
            "attention_flagged": sum(f.flagged for f in self.findings),
            "findings": [f.to_json() for f in self.findings],
        }


class RateLimiter:
    """At most `rate` acquisitions per second, spaced evenly (no bursts), shared by all tasks."""

    def __init__(self, rate: float):
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            t = time.monotonic()
            at = max(t, self._next)
            self._next = at + self.interval
        if at > t:
            await asyncio.sleep(at - t)


def _transient(outcome: BankOutcome) -> bool:
    """Worth asking again: the bank did not give a usable answer (a 404 is an answer)."""
    if outcome.kind == "ok":
        return False
    return outcome.kind != "error" or outcome.http_status is None or outcome.http_status >= 500


def _not_found(outcome: BankOutcome) -> bool:
    return outcome.kind == "error" and outcome.http_status == 404


def _describe(outcome: BankOutcome) -> dict:
    return {"outcome": outcome.kind, "http_status": outcome.http_status, "code": outcome.code}


def _bank_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse(value)
    except ValueError:
        return None


class _Pass:
    """One reconciliation run."""

    def __init__(self, pool: asyncpg.Pool, bank, report: Report, retries: int, retry_base: float):
        self.pool = pool
        self.bank = bank
        self.report = report
        self.limiter = RateLimiter(report.rate_per_second)
        self.retries = retries
        self.retry_base = retry_base

    async def _get(self, call: Callable[[str], Awaitable[BankOutcome]], ident: str) -> BankOutcome:
        @backoff.on_predicate(
            backoff.expo,
            _transient,
            max_tries=self.retries,
            factor=self.retry_base,
            jitter=backoff.full_jitter,
            logger=None,
        )
        async def attempt() -> BankOutcome:
            await self.limiter.acquire()
            self.report.bank_calls += 1
            return await call(ident)

        return await attempt()

    async def check(self, p: asyncpg.Record) -> list[Finding]:
        """Compare one receipt with the bank; no writes."""
        found: list[Finding] = []

        def add(kind: str, **detail: Any) -> None:
            found.append(Finding(p["id"], kind, detail))

        for id_field, statuses in _NEEDS.items():
            if p["status"] in statuses and not p[id_field]:
                add(
                    RECEIPT_INCOMPLETE,
                    object="receipt",
                    field=id_field,
                    status=p["status"],
                    message=f"a {p['status']} payment has no {id_field}",
                )

        auth_id = p["authorization_id"]
        outcome = await self._get(self.bank.get_authorization, auth_id)
        if self._usable(outcome, "authorization", auth_id, add):
            body = outcome.body or {}  # "ok" always comes with a JSON object
            if body.get("amount") != p["amount"]:
                add(
                    AMOUNT_MISMATCH,
                    object="authorization",
                    id=auth_id,
                    field="amount",
                    ours=p["amount"],
                    bank=body.get("amount"),
                )
            bank_expiry, ours = _bank_time(body.get("expires_at")), p["authorization_expires_at"]
            if bank_expiry is not None and (
                ours is None or abs((bank_expiry - ours).total_seconds()) >= EXPIRY_TOLERANCE_SECONDS
            ):
                add(
                    EXPIRY_MISMATCH,
                    object="authorization",
                    id=auth_id,
                    field="expires_at",
                    ours=iso(ours),
                    bank=iso(bank_expiry),
                )

        # A capture must name our authorization, a refund our capture; both move the full amount.
        for obj, ident, get, link_field, our_link in (
            ("capture", p["capture_id"], self.bank.get_capture, "authorization_id", auth_id),
            ("refund", p["refund_id"], self.bank.get_refund, "capture_id", p["capture_id"]),
        ):
            if not ident:
                continue
            outcome = await self._get(get, ident)
            if self._usable(outcome, obj, ident, add):
                body = outcome.body or {}
                if body.get("amount") != p["amount"]:
                    add(
                        AMOUNT_MISMATCH, object=obj, id=ident, field="amount", ours=p["amount"], bank=body.get("amount")
                    )
                if body.get(link_field) != our_link:
                    add(LINK_MISMATCH, object=obj, id=ident, field=link_field, ours=our_link, bank=body.get(link_field))
        return found

    def _usable(self, outcome: BankOutcome, obj: str, ident: str, add) -> bool:
        if outcome.kind == "ok":
            return True
        if _not_found(outcome):
            add(MISSING_AT_BANK, object=obj, id=ident, message=f"the bank does not know {obj} {ident}")
        else:
            add(
                UNVERIFIED,
                object=obj,
                id=ident,
                attempts=self.retries if _transient(outcome) else 1,
                **_describe(outcome),
            )
        return False

    async def settle(self, snapshot: asyncpg.Record, found: list[Finding], repair: bool) -> bool:
        """Store the findings (and act on them with repair): one transaction per payment.

        Returns False when the payment moved while it was checked, or another session held it
        past the lock timeout: nothing is stored, and a later pass checks it again.
        """
        try:
            return await self._settle(snapshot, found, repair)
        except db.TIMED_OUT as exc:
            log.warning(
                "payment locked elsewhere; left for the next pass", payment_id=snapshot["id"], error=type(exc).__name__
            )
            return False

    async def _settle(self, snapshot: asyncpg.Record, found: list[Finding], repair: bool) -> bool:
        expire_after = False
        async with self.pool.acquire() as conn, conn.transaction():
            row = await store.reconcile_lock_payment(conn, payment_id=snapshot["id"])
            if row is None or row["busy"] or any(row[f] != snapshot[f] for f in _CHECKED_FIELDS):
                return False
            at = now()
            if repair:
                for f in found:
                    if f.kind == EXPIRY_MISMATCH:
                        bank_expiry = parse(f.detail["bank"])
                        await store.reconcile_set_expiry(conn, payment_id=row["id"], expires_at=bank_expiry, at=at)
                        f.repaired = True
                        f.detail["repair"] = "authorization_expires_at set to the bank's value"
                        if row["status"] == Status.AUTHORIZED.value and bank_expiry <= at:
                            expire_after = True
                            f.detail["repair"] += "; the hold has lapsed: payment expired, release started"
                money = [f for f in found if f.money]
                if money:
                    payment = replace(Payment.from_row(row), attention_required=True, updated_at=at)
                    event = messages.event(domain.ATTENTION_EVENT, receipt(payment), at, merchant=row["merchant"])
                    await store.flag_attention(conn, payment_id=row["id"], at=at, event=event)
                    for f in money:
                        f.flagged = True
                        f.detail["attention_required"] = True
            for f in found:
                await store.insert_finding(
                    conn,
                    run_id=self.report.run_id,
                    payment_id=f.payment_id,
                    kind=f.kind,
                    detail=f.detail,
                    repaired=f.repaired,
                    found_at=at,
                )
        if expire_after:
            expired = await lapses.expire_hold(self.pool, snapshot["id"])
            for f in found:
                if f.kind == EXPIRY_MISMATCH:
                    f.note = "payment expired, release started" if expired else "payment moved on before expiry"
        return True


async def run_reconciliation(
    pool: asyncpg.Pool,
    bank_client,
    *,
    rate_per_second: float = DEFAULT_RATE,
    limit: int = DEFAULT_LIMIT,
    repair: bool = False,
    retries: int = DEFAULT_RETRIES,
    retry_base: float = 0.5,
) -> Report:
    """One reconciliation pass over the newest `limit` settled payments with bank ids.

    `bank_client` is a worker.bank.BankClient (anything with get_authorization,
    get_capture and get_refund returning domain.BankOutcome). Every bank request,
    retries included, fits in one budget of `rate_per_second`.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    report = Report(
        run_id=messages.new_id("rec"), repair=repair, rate_per_second=rate_per_second, limit=limit, started_at=now()
    )
    run = _Pass(pool, bank_client, report, max(1, retries), retry_base)
    candidates = await store.reconcile_candidates(pool, limit=limit)
    # Enough requests in flight to use the budget while the bank takes its time (up to ~2 s).
    workers = max(1, min(64, math.ceil(rate_per_second * 2)))
    todo = iter(enumerate(candidates))
    results: list[list[Finding]] = [[] for _ in candidates]

    async def work() -> None:
        for i, row in todo:  # one shared iterator: each payment is taken by one task
            found = await run.check(row)
            if found and not await run.settle(row, found, repair):
                report.moved += 1
                continue
            report.checked += 1
            results[i] = found
            for f in found:
                log.warning(
                    "reconciliation finding",
                    run_id=report.run_id,
                    payment_id=f.payment_id,
                    kind=f.kind,
                    detail=f.detail,
                    repaired=f.repaired,
                    attention_flagged=f.flagged,
                )

    tasks = [asyncio.create_task(work()) for _ in range(min(workers, len(candidates)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    report.findings = [f for found in results for f in found]  # newest payment first
    report.finished_at = now()
    log.info(
        "reconciliation finished",
        run_id=report.run_id,
        checked=report.checked,
        moved=report.moved,
        bank_calls=report.bank_calls,
        findings=report.counts(),
        repair=repair,
        seconds=round(report.seconds, 3),
    )
    return report
