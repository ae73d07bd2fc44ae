"""Settle by hand, resolve and abandon (gateway/ops/decisions.py), against a real PostgreSQL.

Parked operations are made the way the worker makes them: a claim then
settlement.park; a parked operation is made "old" by moving its updated_at (the
time it was parked) back, as the clock would. What each phase writes is read
back from the tables: operation, payment, history with its cause, the card
vault, the outbox (events and commands) and reconciliation findings.
"""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta

import orjson
import pytest

from gateway.cards import SINGLE_KEY_ID, CardKey, CardVault
from gateway.domain import Action, BankOutcome, Verdict
from gateway.ops import decisions
from gateway.payments import lapses, settlement
from tests.support import factories, phases

pytestmark = pytest.mark.timeout(60)

ERROR = {"code": "bank_outcome_uncertain", "message": "cannot tell whether the money moved", "retryable": False}
DAY = timedelta(hours=24)


def auth_id() -> str:
    return f"auth_{uuid.uuid4()}"


class Payments:
    def __init__(self, pool, vault: CardVault):
        self.pool, self.vault = pool, vault

    async def pending_op(self, pid: str) -> str | None:
        return await self.pool.fetchval("SELECT id FROM operations WHERE payment_id = $1 AND status = 'pending'", pid)

    async def succeed(self, pid: str, body: dict) -> None:
        op = await self.pending_op(pid)
        claim = await phases.claim(self.pool, op, "test", 30)
        assert isinstance(claim, settlement.Claim)
        assert await phases.record_outcome(self.pool, claim, Verdict.SUCCEEDED, BankOutcome("ok", 200, body=body), 1)

    async def act(self, pid: str, action: Action) -> None:
        req = factories.request(f"/v1/payments/{pid}/{action}")
        await phases.request_action(self.pool, req, pid, action, None)

    async def running(self, kind: str) -> str:
        """A payment whose `kind` operation is pending (not parked yet)."""
        pid = await factories.authorize(self.pool, self.vault, 1234)
        if kind == "authorize":
            return pid
        await self.succeed(pid, {"authorization_id": auth_id(), "expires_at": "2030-01-01T00:00:00Z"})
        if kind == "release":
            await self.pool.execute(
                "UPDATE payments SET authorization_expires_at = now() - interval '1 hour' WHERE id = $1", pid
            )
            assert await lapses.expire_hold(self.pool, pid)
            return pid
        if kind in ("capture", "refund"):
            await self.act(pid, Action.CAPTURE)
        if kind == "capture":
            return pid
        if kind == "void":
            await self.act(pid, Action.VOID)
            return pid
        await self.succeed(pid, {"capture_id": f"cap_{uuid.uuid4()}"})
        await self.act(pid, Action.REFUND)
        return pid

    async def parked(self, kind: str, *, hours_ago: float = 0) -> tuple[str, str]:
        pid = await self.running(kind)
        op = await self.pending_op(pid)
        assert isinstance(await phases.claim(self.pool, op, "test-worker", 30), settlement.Claim)
        assert await settlement.park(self.pool, op, ERROR) is not None
        if hours_ago:
            await self.pool.execute(
                "UPDATE operations SET updated_at = now() - make_interval(secs => $2 * 3600) WHERE id = $1",
                op,
                hours_ago,
            )
        return pid, op

    async def row(self, table: str, key: str) -> dict:
        return dict(await self.pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1", key))

    async def history(self, pid: str) -> list[tuple[str, str]]:
        rows = await self.pool.fetch("SELECT status, cause FROM payment_history WHERE payment_id = $1 ORDER BY id", pid)
        return [(r["status"], r["cause"]) for r in rows]

    async def receipt_history(self, pid: str) -> list[str]:
        return [h["status"] for h in await self.pool.fetchval("SELECT payment_history_json($1)", pid)]

    async def events(self, pid: str) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT routing_key, body FROM outbox WHERE exchange LIKE 'payments.events.%' ORDER BY id"
        )
        return [r["routing_key"] for r in rows if orjson.loads(r["body"])["payment"]["id"] == pid]

    async def commands(self, pid: str) -> list[tuple[str, str]]:
        """(routing key, operation id) of every command for this payment's operations, oldest first."""
        ops = {r["id"] for r in await self.pool.fetch("SELECT id FROM operations WHERE payment_id = $1", pid)}
        rows = await self.pool.fetch(
            "SELECT routing_key, body FROM outbox WHERE exchange = 'payments.commands' ORDER BY id"
        )
        found = [(r["routing_key"], orjson.loads(r["body"])["operation_id"]) for r in rows]
        return [(k, op) for k, op in found if op in ops]

    async def has_card(self, pid: str) -> bool:
        return await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM card_vault WHERE payment_id = $1)", pid)


@pytest.fixture(scope="module")
def vault(card_key) -> CardVault:
    return CardVault([CardKey(SINGLE_KEY_ID, base64.b64decode(card_key))])


@pytest.fixture
def book(pool, vault) -> Payments:
    return Payments(pool, vault)


# ---- settle by hand --------------------------------------------------------------------------------


async def test_settle_a_parked_capture_as_succeeded_with_the_banks_id(book):
    pid, op = await book.parked("capture")
    cap = f"cap_{uuid.uuid4()}"
    decision = await decisions.settle_by_hand(
        book.pool, op, succeeded=True, reason="bank portal shows the capture", by="alice", bank_id=cap
    )
    assert decision.operation_id == op and decision.kind == "capture" and decision.follow_up is None
    payment = decision.payment
    assert payment["status"] == "captured" and payment["bank"]["capture_id"] == cap
    assert not payment["attention_required"] and payment["last_error"] is None
    assert payment["history"][-1]["status"] == "captured"
    row = await book.row("payments", pid)
    assert (row["status"], row["capture_id"], row["attention_required"]) == ("captured", cap, False)
    operation = await book.row("operations", op)
    assert operation["status"] == "succeeded" and not operation["parked"] and operation["finished_at"]
    assert (await book.history(pid))[-1] == ("captured", "ops:alice:settle:bank portal shows the capture")
    assert (await book.events(pid))[-2:] == ["payment.attention_required", "payment.captured"]
    assert await book.receipt_history(pid) == ["pending", "authorized", "capturing", "captured"]


async def test_settle_without_the_banks_id_keeps_the_flag_until_resolve_fills_it(book):
    pid, op = await book.parked("refund")
    decision = await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="bank says refunded", by="bob")
    assert decision.payment["status"] == "refunded" and decision.payment["attention_required"]
    row = await book.row("payments", pid)
    assert row["status"] == "refunded" and row["refund_id"] is None and row["attention_required"]
    assert (await book.events(pid))[-1] == "payment.refunded"

    with pytest.raises(decisions.OpsRefused, match="refunded payment has no capture_id|already has capture_id"):
        await decisions.resolve(book.pool, pid, reason="x", by="bob", references={"capture_id": f"cap_{uuid.uuid4()}"})
    with pytest.raises(decisions.OpsRefused, match="no void_id"):
        await decisions.resolve(book.pool, pid, reason="x", by="bob", references={"void_id": f"void_{uuid.uuid4()}"})
    ref = f"ref_{uuid.uuid4()}"
    resolved = await decisions.resolve(
        book.pool, pid, reason="refund id from the bank's back office", by="bob", references={"refund_id": ref}
    )
    assert resolved.payment["bank"]["refund_id"] == ref and not resolved.payment["attention_required"]
    row = await book.row("payments", pid)
    assert (row["refund_id"], row["attention_required"], row["status"]) == (ref, False, "refunded")
    assert (await book.history(pid))[-1] == ("refunded", "ops:bob:resolve:refund id from the bank's back office")
    assert await book.receipt_history(pid) == [  # the resolve row is ops's: no status entered twice
        "pending",
        "authorized",
        "capturing",
        "captured",
        "refunding",
        "refunded",
    ]
    with pytest.raises(decisions.OpsRefused, match="already has refund_id"):
        await decisions.resolve(book.pool, pid, reason="x", by="bob", references={"refund_id": f"ref_{uuid.uuid4()}"})
    with pytest.raises(decisions.OpsRefused, match="nothing to resolve"):
        await decisions.resolve(book.pool, pid, reason="again", by="bob")


async def test_settle_a_parked_authorization_as_failed_declines_it_and_deletes_the_card(book):
    pid, op = await book.parked("authorize")
    assert await book.has_card(pid)
    decision = await decisions.settle_by_hand(book.pool, op, succeeded=False, reason="no hold at the bank", by="carol")
    assert decision.payment["status"] == "declined" and not decision.payment["attention_required"]
    assert decision.payment["last_error"]["code"] == "settled_by_ops"
    assert decision.payment["last_error"]["message"] == "no hold at the bank"
    assert not await book.has_card(pid)
    assert (await book.row("operations", op))["status"] == "failed"
    assert (await book.events(pid))[-1] == "payment.declined"


async def test_settle_of_a_release_records_the_void_and_the_history_without_a_new_status(book):
    pid, op = await book.parked("release")
    void = f"void_{uuid.uuid4()}"
    decision = await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="voided", by="dan", bank_id=void)
    assert decision.payment["status"] == "expired" and decision.payment["bank"]["void_id"] == void
    assert (await book.history(pid))[-1] == ("expired", "ops:dan:settle:voided")
    assert await book.receipt_history(pid) == ["pending", "authorized", "expired"]
    assert (await book.events(pid)).count("payment.expired") == 1  # nothing new to announce


async def test_settle_refuses_what_it_must_not_decide(book):
    with pytest.raises(decisions.OpsRefused, match="no operation"):
        await decisions.settle_by_hand(book.pool, "op_" + "0" * 32, succeeded=True, reason="r", by="e")
    pid = await book.running("capture")
    op = await book.pending_op(pid)
    with pytest.raises(decisions.OpsRefused, match="not parked"):
        await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="r", by="e")
    assert isinstance(await phases.claim(book.pool, op, "worker", 30), settlement.Claim)
    with pytest.raises(decisions.OpsRefused, match="holds its lease"):
        await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="r", by="e")
    await settlement.park(book.pool, op, ERROR)
    with pytest.raises(ValueError, match="'cap_' followed by a lowercase UUID"):
        await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="r", by="e", bank_id=auth_id())
    with pytest.raises(ValueError, match="only goes with a success"):
        await decisions.settle_by_hand(book.pool, op, succeeded=False, reason="r", by="e", bank_id=auth_id())
    for by, reason in (("", "r"), ("a:b", "r"), ("x" * 65, "r"), ("eve", "   ")):
        with pytest.raises(ValueError):
            await decisions.settle_by_hand(book.pool, op, succeeded=True, reason=reason, by=by)
    await decisions.settle_by_hand(book.pool, op, succeeded=False, reason="not captured", by="e")
    with pytest.raises(decisions.OpsRefused, match=r"already final \(failed\)"):
        await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="r", by="e")
    assert (await book.row("payments", pid))["status"] == "authorized"


async def test_a_history_cause_is_redacted_and_bounded(book):
    pid, op = await book.parked("capture")
    reason = "customer read 4111 1111 1111 1111 cvv 123 over the phone " + "x" * 1000
    await decisions.settle_by_hand(book.pool, op, succeeded=False, reason=reason, by="frank")
    (_, cause) = (await book.history(pid))[-1]
    assert cause.startswith("ops:frank:settle:customer read [redacted]") and "123" not in cause
    assert len(cause) <= decisions.CAUSE_LIMIT + 40
    error = (await book.row("payments", pid))["last_error"]
    assert "4111" not in error["message"] and len(error["message"]) <= decisions.REASON_LIMIT + 40


# ---- resolve ---------------------------------------------------------------------------------------


async def test_resolve_refuses_a_payment_with_something_in_flight_or_unknown(book):
    pid, _ = await book.parked("capture")
    with pytest.raises(decisions.OpsRefused, match="in flight"):
        await decisions.resolve(book.pool, pid, reason="r", by="g")
    with pytest.raises(decisions.OpsRefused, match="no payment"):
        await decisions.resolve(book.pool, "pay_" + "0" * 32, reason="r", by="g")


async def test_resolve_clears_a_flag_set_by_reconciliation(book):
    pid = await book.running("capture")
    await book.succeed(pid, {"capture_id": f"cap_{uuid.uuid4()}"})
    await book.pool.execute("UPDATE payments SET attention_required = true WHERE id = $1", pid)
    decision = await decisions.resolve(book.pool, pid, reason="amounts agree after all", by="hana")
    assert decision.payment["status"] == "captured" and not decision.payment["attention_required"]
    assert (await book.history(pid))[-1] == ("captured", "ops:hana:resolve:amounts agree after all")


# ---- set a bank reference -------------------------------------------------------------------------


async def test_set_reference_fills_what_the_receipt_lacks_and_leaves_status_and_flag(book):
    pid, op = await book.parked("refund")
    await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="bank says refunded", by="bob")
    ref = f"ref_{uuid.uuid4()}"
    decision = await decisions.set_reference(book.pool, pid, "refund_id", ref, reason="back office", by="ida")
    assert decision.cause == f"ops:ida:set-reference:refund_id={ref} back office"
    assert decision.payment["bank"]["refund_id"] == ref and decision.payment["attention_required"]
    row = await book.row("payments", pid)
    assert (row["status"], row["refund_id"], row["attention_required"]) == ("refunded", ref, True)
    assert (await book.history(pid))[-1] == ("refunded", decision.cause)
    assert (await book.events(pid))[-1] == "payment.refunded"  # nothing announced: the status did not move


async def test_set_reference_refuses_what_does_not_fit(book):
    pid, op = await book.parked("capture")
    with pytest.raises(decisions.OpsRefused, match="in flight"):
        await decisions.set_reference(book.pool, pid, "capture_id", f"cap_{uuid.uuid4()}", reason="r", by="g")
    await decisions.settle_by_hand(book.pool, op, succeeded=True, reason="bank shows it", by="g")
    refused = [
        (("capture_id", "cap_NOT-A-UUID"), ValueError, "lowercase UUID"),
        (("capture_id", f"ref_{uuid.uuid4()}"), ValueError, "'cap_' followed by"),
        (("refund", f"ref_{uuid.uuid4()}"), ValueError, "not a bank reference"),
        (("refund_id", f"ref_{uuid.uuid4()}"), decisions.OpsRefused, "a captured payment has no refund_id"),
        (("authorization_id", auth_id()), decisions.OpsRefused, "already has authorization_id"),
    ]
    for (name, value), error, message in refused:
        with pytest.raises(error, match=message):
            await decisions.set_reference(book.pool, pid, name, value, reason="r", by="g")
    for by, reason in (("a b", "r"), ("g", " ")):
        with pytest.raises(ValueError):
            await decisions.set_reference(book.pool, pid, "capture_id", f"cap_{uuid.uuid4()}", reason=reason, by=by)
    with pytest.raises(decisions.OpsRefused, match="no payment"):
        await decisions.set_reference(
            book.pool, "pay_" + "0" * 32, "capture_id", f"cap_{uuid.uuid4()}", reason="r", by="g"
        )
    assert (await book.row("payments", pid))["capture_id"] is None
    assert (await book.history(pid))[-1] == ("captured", "ops:g:settle:bank shows it")


# ---- abandon ---------------------------------------------------------------------------------------


async def test_abandon_a_parked_authorization_declines_it_purges_the_card_and_records_a_finding(book):
    pid, op = await book.parked("authorize", hours_ago=25)
    decision = await decisions.abandon(book.pool, pid, reason="bank never answered", by="ivy", parked_at_least=DAY)
    assert decision.payment["status"] == "declined" and decision.follow_up is None and decision.kind == "authorize"
    assert decision.payment["last_error"] == {"code": "abandoned", "message": "bank never answered", "retryable": False}
    row = await book.row("payments", pid)
    assert (row["status"], row["attention_required"], row["last_error"]["code"]) == ("declined", False, "abandoned")
    operation = await book.row("operations", op)
    assert operation["status"] == "failed" and operation["last_error"]["code"] == "abandoned"
    assert not await book.has_card(pid)
    assert (await book.history(pid))[-1] == ("declined", "ops:ivy:abandon:bank never answered")
    assert (await book.events(pid))[-1] == "payment.declined"
    finding = await book.pool.fetchrow("SELECT * FROM reconciliation_findings WHERE payment_id = $1", pid)
    assert finding["kind"] == decisions.ABANDONED_AUTHORIZATION and finding["detail"]["bank_key"] == f"gw-{op}"
    assert finding["detail"]["operation_id"] == op and finding["detail"]["by"] == "ivy"


@pytest.mark.parametrize("kind", ["capture", "void"])
async def test_abandon_a_parked_capture_or_void_voids_the_hold(book, kind):
    pid, op = await book.parked(kind, hours_ago=30)
    events_before = await book.events(pid)
    decision = await decisions.abandon(book.pool, pid, reason="bank stuck", by="jo", parked_at_least=DAY)
    assert decision.payment["status"] == "voiding" and decision.follow_up is not None
    assert decision.payment["last_error"]["code"] == "abandoned"
    void = await book.row("operations", decision.follow_up)
    assert (void["kind"], void["status"], void["parked"]) == ("void", "pending", False)
    assert void["bank_key"] == f"gw-{decision.follow_up}"
    assert (await book.commands(pid))[-1] == ("void", decision.follow_up)
    assert (await book.row("operations", op))["status"] == "failed"
    assert (await book.history(pid))[-1] == ("voiding", "ops:jo:abandon:bank stuck")
    assert await book.events(pid) == events_before  # voiding is announced by payment.voided, later
    # The void runs like any other: the bank confirms, the payment is voided.
    await book.succeed(pid, {"void_id": f"void_{uuid.uuid4()}"})
    row = await book.row("payments", pid)
    assert (row["status"], row["last_error"], row["attention_required"]) == ("voided", None, False)


async def test_abandon_a_parked_refund_returns_the_payment_to_captured(book):
    pid, op = await book.parked("refund", hours_ago=48)
    decision = await decisions.abandon(book.pool, pid, reason="refund by cheque instead", by="kim", parked_at_least=DAY)
    assert decision.payment["status"] == "captured" and decision.follow_up is None
    row = await book.row("payments", pid)
    assert (row["status"], row["last_error"]["code"], row["refund_id"]) == ("captured", "abandoned", None)
    assert (await book.events(pid))[-1] == "payment.captured"


async def test_abandon_a_parked_release_leaves_the_payment_expired(book):
    pid, op = await book.parked("release", hours_ago=24.5)
    decision = await decisions.abandon(book.pool, pid, reason="cannot void", by="lee", parked_at_least=DAY)
    assert decision.payment["status"] == "expired" and decision.follow_up is None
    assert (await book.row("operations", op))["status"] == "failed"
    assert (await book.history(pid))[-1] == ("expired", "ops:lee:abandon:cannot void")
    assert await book.receipt_history(pid) == ["pending", "authorized", "expired"]
    assert (await book.events(pid)).count("payment.expired") == 1


async def test_abandon_refuses_too_early_nothing_parked_or_nothing_in_flight(book):
    pid, op = await book.parked("capture", hours_ago=23)
    with pytest.raises(decisions.OpsRefused, match=r"parked for 23\.0 h; .* once parked for 24 h"):
        await decisions.abandon(book.pool, pid, reason="r", by="m", parked_at_least=DAY)
    assert (await book.row("operations", op))["status"] == "pending"
    running = await book.running("capture")
    with pytest.raises(decisions.OpsRefused, match="not parked"):
        await decisions.abandon(book.pool, running, reason="r", by="m", parked_at_least=DAY)
    done = await book.running("capture")
    await book.succeed(done, {"capture_id": f"cap_{uuid.uuid4()}"})
    with pytest.raises(decisions.OpsRefused, match=r"\(captured\) has no operation in flight"):
        await decisions.abandon(book.pool, done, reason="r", by="m", parked_at_least=DAY)
    with pytest.raises(decisions.OpsRefused, match="no payment"):
        await decisions.abandon(book.pool, "pay_" + "1" * 32, reason="r", by="m", parked_at_least=DAY)
