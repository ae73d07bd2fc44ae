"""Reconciliation against a REAL mock bank: real holds, captures and refunds, then receipts
made to disagree on purpose.

Payments are made the way the gateway makes them (tests/support/phases.py:
authorize, request_action), then the worker's part played here (claim, the bank call
with the operation's own key through worker.bank.BankClient, record_outcome),
so every bank id on a receipt is a real one. The module has its own
database: reconciliation looks at every payment in it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from datetime import timedelta

import asyncpg
import orjson
import pytest

from gateway import db, domain, store
from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.domain import Action, OperationKind, Verdict
from gateway.ops.reconcile import run_reconciliation
from gateway.payments import settlement
from gateway.timefmt import parse
from harness import services
from harness.mockbank_client import MockBankClient
from harness.procs import ScriptProcess, free_port, script_path
from tests.support import factories, phases
from worker.bank import BankClient

pytestmark = pytest.mark.timeout(120)


class Books:
    def __init__(self, database_url: str, bank_url: str, pool, vault: CardVault, bank: BankClient):
        self.database_url, self.bank_url = database_url, bank_url
        self.pool, self.vault, self.bank = pool, vault, bank
        self.mock = MockBankClient(bank_url)  # the bank's /_mock API

    async def payment(self, amount: int = 1000, upto: str = "authorized") -> dict:
        """A payment moved through the real bank up to `upto`; returns its row."""
        pid = await factories.authorize(self.pool, self.vault, amount)
        await self.work(pid)
        steps = {
            "authorized": [],
            "voided": [Action.VOID],
            "captured": [Action.CAPTURE],
            "refunding": [Action.CAPTURE, Action.REFUND],
            "refunded": [Action.CAPTURE, Action.REFUND],
        }[upto]
        for i, action in enumerate(steps):
            await self.request(pid, action)
            if not (upto == "refunding" and i == len(steps) - 1):
                await self.work(pid)
        return await self.row(pid)

    async def request(self, pid: str, action: Action) -> None:
        req = factories.request(f"/v1/payments/{pid}/{action}")
        await phases.request_action(self.pool, req, pid, action, None)

    async def work(self, pid: str) -> None:
        """The worker's part for the payment's pending operation, with the real bank."""
        op = await self.pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", pid)
        claim = await phases.claim(self.pool, op, "test-worker", 30)
        assert isinstance(claim, settlement.Claim), claim
        if claim.kind is OperationKind.AUTHORIZE:
            number, cvv = self.vault.open(pid, claim.sealed_card)
            outcome = await self.bank.authorize(
                claim.bank_key,
                card_number=number,
                cvv=cvv,
                expiry_month=claim.payment.card_expiry_month,
                expiry_year=claim.payment.card_expiry_year,
                amount=claim.payment.amount,
            )
        elif claim.kind is OperationKind.CAPTURE:
            outcome = await self.bank.capture(
                claim.bank_key, authorization_id=claim.payment.authorization_id, amount=claim.payment.amount
            )
        elif claim.kind is OperationKind.REFUND:
            outcome = await self.bank.refund(
                claim.bank_key, capture_id=claim.payment.capture_id, amount=claim.payment.amount
            )
        else:
            outcome = await self.bank.void(claim.bank_key, authorization_id=claim.payment.authorization_id)
        verdict = domain.classify(claim.kind, outcome)
        assert verdict is Verdict.SUCCEEDED, outcome
        await phases.record_outcome(self.pool, claim, verdict, outcome, 1)

    async def row(self, pid: str) -> dict:
        return dict(await self.pool.fetchrow("SELECT * FROM payments WHERE id = $1", pid))

    async def corrupt(self, pid: str, **fields) -> None:
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=2))
        await self.pool.execute(f"UPDATE payments SET {sets} WHERE id = $1", pid, *fields.values())

    async def attention_events(self, pid: str) -> int:
        return await self.pool.fetchval(
            "SELECT count(*) FROM outbox WHERE routing_key = 'payment.attention_required'"
            " AND convert_from(body, 'UTF8')::jsonb #>> '{payment,id}' = $1",
            pid,
        )

    async def cli(self, *args: str, expect: int) -> str:
        env = {**os.environ, "DATABASE_URL": self.database_url, "BANK_URL": self.bank_url}
        env.pop("LOG_LEVEL", None)
        proc = await asyncio.create_subprocess_exec(
            script_path("gatewayctl"),
            "reconcile",
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == expect, f"exit {proc.returncode}\n{out.decode()}\n{err.decode()}"
        return out.decode()


@pytest.fixture(scope="module")
async def books_env(server_urls, card_key):
    port = free_port()
    bank_url = f"http://127.0.0.1:{port}"
    async with services.private_database(server_urls[0]) as database_url:
        proc = ScriptProcess(
            "mockbank",
            "--port",
            str(port),
            env={
                "MIN_LATENCY_MS": "0",
                "MAX_LATENCY_MS": "0",
                "FAILURE_RATE": "0",
                "RESPONSE_LOSS_RATE": "0",
                "LOG_LEVEL": "warning",
            },
        ).start()
        pool = await db.create_pool(database_url, min_size=1, max_size=10)
        try:
            await proc.wait_http(f"{bank_url}/health")
            async with BankClient(bank_url, timeout=10) as bank:
                books = Books(
                    database_url, bank_url, pool, CardVault([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))]), bank
                )
                async with books.mock:
                    yield books
        finally:
            await pool.close()
            await proc.stop()
            proc.close()


@pytest.fixture
async def books(books_env):
    await books_env.pool.execute(
        "TRUNCATE payments, payment_history, operations, card_vault, outbox, idempotency_keys, reconciliation_findings"
    )
    await books_env.mock.reset()
    yield books_env


def by_payment(findings: list[dict]) -> dict[str, set[tuple[str, str]]]:
    out: dict[str, set[tuple[str, str]]] = {}
    for f in findings:
        out.setdefault(f["payment_id"], set()).add((f["kind"], f["detail"]["object"]))
    return out


async def disagreeing(books: Books) -> dict[str, dict]:
    """Real payments, then receipts changed so that each disagrees with the bank in one way."""
    p = {
        name: await books.payment(upto=upto)
        for name, upto in (
            ("amount", "authorized"),
            ("missing_capture", "captured"),
            ("expiry", "authorized"),
            ("linked", "captured"),
            ("other", "captured"),
            ("refunded", "refunded"),
            ("busy", "refunding"),
            ("fine", "captured"),
            ("voided", "voided"),
        )
    }
    await books.corrupt(p["amount"]["id"], amount=1100)
    p["bogus_capture_id"] = {"id": f"cap_{uuid.uuid4()}"}
    await books.corrupt(p["missing_capture"]["id"], capture_id=p["bogus_capture_id"]["id"])
    await books.corrupt(
        p["expiry"]["id"], authorization_expires_at=p["expiry"]["authorization_expires_at"] + timedelta(days=1)
    )
    await books.corrupt(p["linked"]["id"], capture_id=p["other"]["capture_id"])  # someone else's capture
    await books.corrupt(p["refunded"]["id"], amount=999)  # hold, capture and refund all disagree
    await books.corrupt(p["busy"]["id"], capture_id=f"cap_{uuid.uuid4()}")  # refund in flight: not looked at
    return p


EXPECTED = {
    "amount": {("amount_mismatch", "authorization")},
    "missing_capture": {("missing_at_bank", "capture")},
    "expiry": {("expiry_mismatch", "authorization")},
    "linked": {("link_mismatch", "capture")},
    "refunded": {("amount_mismatch", "authorization"), ("amount_mismatch", "capture"), ("amount_mismatch", "refund")},
}


async def test_books_that_agree_exit_0(books):
    for upto in ("authorized", "captured", "refunded", "voided"):
        await books.payment(upto=upto)
    await books.payment(upto="refunding")  # in flight: skipped
    out = await books.cli(expect=0)
    assert "no disagreements" in out and "4 payment(s) checked" in out
    doc = orjson.loads(await books.cli("--json", expect=0))
    assert doc["checked"] == 4 and doc["bank_calls"] == 4 + 2 + 1 and doc["findings"] == []
    doc = orjson.loads(await books.cli("--json", "--limit", "1", expect=0))
    assert doc["checked"] == 1 and doc["bank_calls"] == 1  # the newest: the voided one (no capture to check)


async def test_disagreements_are_reported_and_stored_and_nothing_else_changes(books):
    p = await disagreeing(books)
    before = {name: await books.row(row["id"]) for name, row in p.items() if name != "bogus_capture_id"}
    doc = orjson.loads(await books.cli("--json", expect=1))
    assert doc["checked"] == 8 and not doc["repair"]
    assert by_payment(doc["findings"]) == {p[name]["id"]: kinds for name, kinds in EXPECTED.items()}
    details = {(f["payment_id"], f["kind"], f["detail"]["object"]): f["detail"] for f in doc["findings"]}
    assert details[(p["amount"]["id"], "amount_mismatch", "authorization")]["ours"] == 1100
    assert details[(p["amount"]["id"], "amount_mismatch", "authorization")]["bank"] == 1000
    link = details[(p["linked"]["id"], "link_mismatch", "capture")]
    assert (link["ours"], link["bank"]) == (p["linked"]["authorization_id"], p["other"]["authorization_id"])
    expiry = details[(p["expiry"]["id"], "expiry_mismatch", "authorization")]
    assert parse(expiry["bank"]) == p["expiry"]["authorization_expires_at"]

    stored = await books.pool.fetch("SELECT * FROM reconciliation_findings WHERE run_id = $1", doc["run_id"])
    assert len(stored) == len(doc["findings"]) == 7 and not any(r["repaired"] for r in stored)
    assert {(r["payment_id"], r["kind"], r["detail"]["object"]) for r in stored} == set(details)
    for name, row in before.items():  # report only: no receipt touched, no event
        assert await books.row(row["id"]) == row, name
        assert await books.attention_events(row["id"]) == 0

    out = await books.cli(expect=1)  # the human table
    assert "PAYMENT" in out and "amount_mismatch" in out and p["missing_capture"]["id"] in out
    assert "7 finding(s): 0 repaired, 0 flagged" in out and "no --repair" in out


async def test_repair_fixes_only_what_is_safe(books):
    p = await disagreeing(books)
    lapsed = await books.payment(upto="authorized")
    await books.mock.expire(lapsed["authorization_id"])  # the bank says: gone
    bank_hold = await books.bank.get_authorization(p["expiry"]["authorization_id"])

    doc = orjson.loads(await books.cli("--json", "--repair", expect=1))
    found = {(f["payment_id"], f["kind"], f["detail"]["object"]): f for f in doc["findings"]}
    assert found[(p["expiry"]["id"], "expiry_mismatch", "authorization")]["repaired"]
    assert found[(lapsed["id"], "expiry_mismatch", "authorization")]["repaired"]
    assert doc["repaired"] == 2 and doc["attention_flagged"] == 6
    stored = await books.pool.fetch("SELECT * FROM reconciliation_findings WHERE run_id = $1", doc["run_id"])
    assert sorted(r["kind"] for r in stored if r["repaired"]) == ["expiry_mismatch", "expiry_mismatch"]

    # Safe: the expiry is now the bank's; the lapsed hold is expired and its release started.
    row = await books.row(p["expiry"]["id"])
    assert row["authorization_expires_at"] == parse(bank_hold.body["expires_at"]) and row["status"] == "authorized"
    row = await books.row(lapsed["id"])
    assert row["status"] == "expired" and row["authorization_expires_at"] < p["expiry"]["authorization_expires_at"]
    assert (
        await books.pool.fetchval(
            "SELECT kind FROM operations WHERE payment_id = $1 AND status = 'pending'", lapsed["id"]
        )
        == "release"
    )

    # Money: never changed, flagged for a human with one event.
    for name, field, value in (
        ("amount", "amount", 1100),
        ("missing_capture", "capture_id", p["bogus_capture_id"]["id"]),
        ("linked", "capture_id", p["other"]["capture_id"]),
        ("refunded", "amount", 999),
    ):
        row = await books.row(p[name]["id"])
        assert row["attention_required"] and row[field] == value, name
        assert await books.attention_events(p[name]["id"]) == 1
    for name in ("fine", "busy", "voided", "other"):
        assert not (await books.row(p[name]["id"]))["attention_required"], name

    # Next run: the safe ones are gone, money findings stay (no second event).
    doc = orjson.loads(await books.cli("--json", "--repair", expect=1))
    assert {k for f in doc["findings"] for k in [f["kind"]]} == {"amount_mismatch", "missing_at_bank", "link_mismatch"}
    assert doc["attention_flagged"] == 6 and doc["repaired"] == 0
    for name in ("amount", "missing_capture", "linked", "refunded"):
        assert await books.attention_events(p[name]["id"]) == 1


async def test_a_bank_that_keeps_failing_gives_unverified_not_a_finding_about_money(books):
    shaky = await books.payment(upto="captured")
    fine = await books.payment(upto="authorized")
    await books.mock.arm_fault(
        action="error", method="GET", path=f"/api/v1/authorizations/{shaky['authorization_id']}", times=50
    )
    # one failure only: the retry gets through
    await books.mock.arm_fault(action="error", method="GET", path=f"/api/v1/captures/{shaky['capture_id']}", times=1)
    report = await run_reconciliation(
        books.pool, books.bank, rate_per_second=1000, limit=10, repair=True, retries=3, retry_base=0.01
    )
    assert [(f.payment_id, f.kind, f.detail["object"]) for f in report.findings] == [
        (shaky["id"], "unverified", "authorization")
    ]
    assert report.findings[0].detail["http_status"] == 500 and not report.findings[0].flagged
    assert report.bank_calls == 3 + 2 + 1  # auth: 3 tries; capture: 1 failure + 1 answer; the other hold
    assert not (await books.row(shaky["id"]))["attention_required"]
    assert not (await books.row(fine["id"]))["attention_required"]


async def test_the_bank_is_asked_at_a_bounded_rate(books):
    for _ in range(10):
        await books.payment(upto="authorized")
    started = time.monotonic()
    report = await run_reconciliation(books.pool, books.bank, rate_per_second=5, limit=100, repair=False)
    elapsed = time.monotonic() - started
    assert report.ok and report.checked == 10 and report.bank_calls == 10
    assert elapsed >= 1.5, elapsed  # 10 evenly spaced requests at 5/s: at least 1.8 s


async def test_the_worker_reconciles_periodically_one_worker_at_a_time(books):
    from worker import sweeper

    paid = await books.payment(upto="captured")
    await books.corrupt(paid["id"], amount=paid["amount"] + 1)
    # Another worker's pass holds the lock: this one stands aside.
    async with books.pool.acquire() as other:
        assert await store.try_lock_reconciliation(other)
        try:
            assert await sweeper.reconcile_once(books.pool, books.bank, rate=50, limit=20) is None
        finally:
            await store.unlock_reconciliation(other)
    report = await sweeper.reconcile_once(books.pool, books.bank, rate=50, limit=20)
    assert report is not None
    assert any(f.payment_id == paid["id"] and f.kind == "amount_mismatch" for f in report.findings)
    # The worker's pass repairs: a money disagreement is flagged for a human, never rewritten.
    row = await books.row(paid["id"])
    assert row["attention_required"] is True
    assert row["amount"] == paid["amount"] + 1
    # Its lock was released: the next tick runs again.
    assert await sweeper.reconcile_once(books.pool, books.bank, rate=50, limit=20) is not None


async def test_a_payment_locked_elsewhere_is_left_for_the_next_pass(books):
    held, free = await books.payment(upto="authorized"), await books.payment(upto="authorized")
    for row in (held, free):
        await books.corrupt(row["id"], amount=row["amount"] + 1)
    other = await asyncpg.connect(books.database_url)  # a stuck session holding one payment's row
    try:
        locking = other.transaction()
        await locking.start()
        await other.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", held["id"])
        report = await run_reconciliation(books.pool, books.bank, rate_per_second=50, limit=10)
        await locking.rollback()
    finally:
        await other.close()
    assert (report.checked, report.moved) == (1, 1)
    assert {f.payment_id for f in report.findings} == {free["id"]}
    report = await run_reconciliation(books.pool, books.bank, rate_per_second=50, limit=10)
    assert {f.payment_id for f in report.findings} == {held["id"], free["id"]}
