"""worker.handling: the per-message policy against fake Bank, Payments and Delivery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from gateway import domain
from gateway.cards import CardKey, CardVault, SealedCard
from gateway.domain import BankOutcome, OperationKind, Payment, Verdict
from gateway.payments import settlement
from gateway.payments.settlement import Claim, OperationState
from gateway.store import AttemptReport
from gateway.timefmt import now
from worker.breaker import Failure, State
from worker.db_pause import DatabasePause
from worker.handling import Handling
from worker.ports import CannotRecord
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(30)

KEY = b"k" * 32
CARD = ("4111111111111111", "123")
LADDER = (1, 2, 3)

OK = {
    "authorize": BankOutcome("ok", 200, body={"authorization_id": "auth_1", "expires_at": "2030-01-01T00:00:00Z"}),
    "capture": BankOutcome("ok", 200, body={"capture_id": "cap_1"}),
    "void": BankOutcome("ok", 200, body={"void_id": "void_1"}),
    "refund": BankOutcome("ok", 200, body={"refund_id": "ref_1"}),
}
E500 = BankOutcome("error", 500, code="internal_error", message="boom")
REFUSED = BankOutcome("error", 402, code="insufficient_funds", message="no")
DOWN = BankOutcome("connection")
USED = BankOutcome("error", 400, code="authorization_already_used", message="used")


# ---- fakes ------------------------------------------------------------------------------------


@dataclass
class Op:
    id: str
    kind: OperationKind
    payment_id: str = "pay_1"
    amount: int = 1500
    authorization_id: str | None = "auth_1"
    capture_id: str | None = "cap_1"
    sealed_card: SealedCard | None = None
    status: str = "pending"
    parked: bool = False
    lease_owner: str | None = None
    lease_left: float = 0.0
    attempts: int = 0
    first_attempt_at: datetime | None = None
    last_error: dict | None = None
    verdict: Verdict | None = None
    bank_ms: int = 0
    clean_attempts: int = 0
    lost_answers: list[dict] = field(default_factory=list)
    doubt: domain.Doubt | None = None
    rungs: int = 0
    forced: bool = False


class DatabaseDown(ConnectionError):
    pass


class FakePayments:
    def __init__(self) -> None:
        self.ops: dict[str, Op] = {}
        self.calls: list[tuple] = []
        self.down = False
        self.calls_while_down = 0
        self.failing_records = 0
        self.locked_records = 0
        self.unrecordable = False

    def add(self, op: Op) -> Op:
        self.ops[op.id] = op
        return op

    def _touch(self, *call) -> None:
        if self.down:
            self.calls_while_down += 1
            raise DatabaseDown("connection refused")
        self.calls.append(call)

    def count(self, name: str) -> int:
        return sum(1 for c in self.calls if c[0] == name)

    async def claim(self, operation_id: str, owner: str, lease_seconds: float) -> Claim | OperationState:
        self._touch("claim", operation_id, owner)
        op = self.ops.get(operation_id)
        if op is None:
            return OperationState(exists=False)
        state = dict(exists=True, kind=op.kind.value, payment_id=op.payment_id, attempts=op.attempts)
        if op.status != "pending":
            return OperationState(finished=True, **state)  # type: ignore[arg-type]
        if op.parked:
            return OperationState(parked=True, last_error=op.last_error, **state)  # type: ignore[arg-type]
        if op.lease_owner not in (None, owner):
            return OperationState(lease_left=op.lease_left, **state)  # type: ignore[arg-type]
        if op.attempts > op.clean_attempts + len(op.lost_answers):  # as claim_operations reports it
            op.lost_answers.append(
                {"attempt": op.attempts, "at": None, "worker": op.lease_owner, "code": "worker_stopped"}
            )
        op.attempts += 1
        op.lease_owner = owner
        op.first_attempt_at = op.first_attempt_at or now()
        return Claim(
            owner=owner,
            operation_id=op.id,
            kind=op.kind,
            bank_key=f"gw-{op.id}",
            attempts=op.attempts,
            first_attempt_at=op.first_attempt_at,
            sealed_card=op.sealed_card,
            payment=replace(
                Payment.pending(
                    id=op.payment_id,
                    order_id="ord_1",
                    customer_id="cus_1",
                    amount=op.amount,
                    card_brand="visa",
                    card_last4="1111",
                    card_expiry_month=12,
                    card_expiry_year=2030,
                    at=now(),
                ),
                authorization_id=op.authorization_id,
                capture_id=op.capture_id,
            ),
            merchant="ficmart",
            unknown_outcomes=op.attempts - 1 - op.clean_attempts,
            lost_answers=list(op.lost_answers),
            rungs=op.rungs,
            forced=op.forced,
        )

    def _report(self, op: Op, report: AttemptReport) -> None:
        op.clean_attempts += report.clean_attempts
        op.lost_answers.extend(report.lost_answers)

    async def release(
        self,
        operation_id: str,
        owner: str,
        error: dict | None,
        bank_ms: int,
        report: AttemptReport,
        *,
        rung_taken: bool = False,
    ) -> None:
        self._touch("release", operation_id, owner, error)
        op = self.ops[operation_id]
        if op.lease_owner == owner:
            op.lease_owner, op.last_error = None, error
            op.bank_ms += bank_ms
            op.rungs += rung_taken
            self._report(op, report)

    async def note(self, operation_id: str, owner: str, report: AttemptReport) -> None:
        self._touch("note", operation_id, owner, report)
        op = self.ops[operation_id]
        if op.lease_owner == owner:
            self._report(op, report)

    async def record_outcome(
        self,
        claim: Claim,
        verdict: Verdict,
        outcome: BankOutcome,
        bank_ms: int,
        *,
        unknown_before: int,
        lost: Sequence[Mapping[str, Any]],
    ) -> domain.Doubt | None:
        # The settlement the real adapter records, with the doubt it decides from what the
        # handling knew.
        settled = settlement.final(claim, verdict, outcome, bank_ms, unknown_before=unknown_before, lost=lost)
        return self._record("record_outcome", claim, verdict, settled.doubt)

    async def proves_own_work(self, claim: Claim, refusal: BankOutcome, *, unknown_before: int) -> bool:
        self._touch("proves_own_work", claim.payment.id)
        tried = frozenset(
            op.kind
            for op in self.ops.values()
            if op.payment_id == claim.payment.id and op.id != claim.operation_id and op.attempts
        )
        return domain.proves_own_work(claim.kind, refusal.code, unknown_before=unknown_before, other_kinds_tried=tried)

    async def record_own_work(self, claim: Claim, refusal: BankOutcome, bank_ms: int) -> domain.Doubt | None:
        settled = settlement.own_work(claim, refusal, bank_ms)
        return self._record("record_own_work", claim, Verdict.SUCCEEDED, settled.doubt)

    def _record(self, name: str, claim: Claim, verdict: Verdict, doubt: domain.Doubt | None) -> domain.Doubt | None:
        operation_id = claim.operation_id
        self._touch(name, operation_id, verdict)
        if self.failing_records:
            self.failing_records -= 1
            raise DatabaseDown("connection reset while recording")
        if self.locked_records:
            self.locked_records -= 1
            raise asyncpg.LockNotAvailableError("canceling statement due to lock timeout")
        if self.unrecordable:
            raise CannotRecord("DataError: the answer does not fit the receipt")
        op = self.ops[operation_id]
        op.status = "succeeded" if verdict is Verdict.SUCCEEDED else "failed"
        op.verdict, op.lease_owner, op.doubt = verdict, None, doubt
        return doubt

    async def park(self, operation_id: str, error: dict):
        self._touch("park", operation_id, error)
        op = self.ops[operation_id]
        op.parked, op.lease_owner, op.last_error = True, None, error
        return {"id": op.payment_id}


class FakeBank:
    def __init__(self) -> None:
        self.script: dict[str, list[BankOutcome]] = {}
        self.calls: list[tuple[str, str, dict]] = []
        self.healthy = True
        self.health_calls = 0
        self.during_call: Callable[[str], Awaitable[None]] | None = None

    def answer(self, call: str, *outcomes: BankOutcome) -> None:
        self.script.setdefault(call, []).extend(outcomes)

    def made(self, call: str | None = None) -> int:
        return sum(1 for c in self.calls if call is None or c[0] == call)

    async def _answer(self, call: str, key: str, args: dict) -> BankOutcome:
        self.calls.append((call, key, args))
        if self.during_call is not None:
            await self.during_call(call)
        queue = self.script.get(call)
        return queue.pop(0) if queue else OK[call]

    async def authorize(self, key, *, card_number, cvv, expiry_month, expiry_year, amount) -> BankOutcome:
        return await self._answer("authorize", key, {"card_number": card_number, "cvv": cvv, "amount": amount})

    async def capture(self, key, *, authorization_id, amount) -> BankOutcome:
        return await self._answer("capture", key, {"authorization_id": authorization_id, "amount": amount})

    async def void(self, key, *, authorization_id) -> BankOutcome:
        return await self._answer("void", key, {"authorization_id": authorization_id})

    async def refund(self, key, *, capture_id, amount) -> BankOutcome:
        return await self._answer("refund", key, {"capture_id": capture_id, "amount": amount})

    async def health(self) -> bool:
        self.health_calls += 1
        return self.healthy


@dataclass
class FakeDelivery:
    body: bytes
    message_id: str | None = "cmd_1"
    deliveries: int = 1
    actions: list[tuple] = field(default_factory=list)

    async def ack(self) -> None:
        self.actions.append(("ack",))

    async def requeue(self) -> None:
        self.actions.append(("requeue",))

    async def retry_later(self, delay: int, kind: str | None, rung: int | None) -> None:
        self.actions.append(("retry", delay, rung, kind))

    async def dead_letter(self, headers: dict) -> None:
        self.actions.append(("dead", headers))

    @property
    def dead_headers(self) -> dict:
        (headers,) = [a[1] for a in self.actions if a[0] == "dead"]
        return headers


def command(operation_id: str, **kw) -> FakeDelivery:
    return FakeDelivery(orjson.dumps({"operation_id": operation_id}), **kw)


class World:
    def __init__(self, **cfg) -> None:
        self.payments = FakePayments()
        self.bank = FakeBank()
        self.vault = CardVault([CardKey("k1", KEY)])
        self.probes = 0
        settings = {
            "retry_ladder": LADDER,
            "quick_retries": 3,
            "quick_retry_base": 0.0,
            "confirm_delay": 0.0,
            "bank_timeout": 1.0,
            "lease_margin": 1.0,
            "breaker_probe_interval": 0.01,
            "breaker_unreachable_operations": 3,
            "breaker_min_operations": 5,
            "outage_hold": 5.0,
            "db_backoff_max": 0.05,
            **cfg,
        }
        self.cfg = WorkerSettings(**settings)
        self.handling = Handling(
            self.cfg,
            self.payments,
            self.bank,
            vault=self.vault,
            worker_id="w1",
            database_probe=self._probe_database,
        )

    async def _probe_database(self) -> int:
        self.probes += 1
        if self.payments.down:
            raise DatabaseDown("still down")
        return 1

    def authorize(self, op_id: str = "op_a", **kw) -> Op:
        sealed = self.vault.seal("pay_1", *CARD)
        return self.payments.add(Op(op_id, OperationKind.AUTHORIZE, sealed_card=sealed, **kw))

    def op(self, op_id: str, kind: OperationKind, **kw) -> Op:
        return self.payments.add(Op(op_id, kind, **kw))

    def open_breaker(self) -> None:
        breaker = self.handling.gate.breaker
        for i in range(self.cfg.breaker_unreachable_operations):
            breaker.record(breaker.acquire(f"other{i}"), Failure.UNREACHABLE)  # type: ignore[arg-type]
        assert breaker.state is State.OPEN


@pytest.fixture
def world() -> World:
    return World()


async def eventually(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


# ---- settled paths -----------------------------------------------------------------------------------


async def test_authorize_is_called_with_the_operations_key_and_recorded(world):
    op = world.authorize()
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert op.verdict is Verdict.SUCCEEDED and op.attempts == 1
    ((call, key, args),) = world.bank.calls
    assert (call, key, args["card_number"], args["amount"]) == ("authorize", "gw-op_a", CARD[0], 1500)
    assert delivery.actions == [("ack",)]


async def test_a_refusal_is_final(world):
    op = world.authorize()
    world.bank.answer("authorize", REFUSED)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert op.verdict is Verdict.REFUSED and world.bank.made() == 1
    assert delivery.actions == [("ack",)]


@pytest.mark.parametrize(
    ("kind", "call", "field_name"),
    [
        (OperationKind.CAPTURE, "capture", "authorization_id"),
        (OperationKind.VOID, "void", "authorization_id"),
        (OperationKind.RELEASE, "void", "authorization_id"),
        (OperationKind.REFUND, "refund", "capture_id"),
    ],
)
async def test_each_kind_makes_its_call(world, kind, call, field_name):
    op = world.op("op_k", kind)
    await world.handling.handle(command(op.id))
    ((made, key, args),) = world.bank.calls
    assert (made, key) == (call, "gw-op_k") and args[field_name] in ("auth_1", "cap_1")
    assert op.verdict is Verdict.SUCCEEDED


async def test_a_transient_failure_is_retried_quickly_under_a_renewed_lease(world):
    op = world.authorize()
    world.bank.answer("authorize", E500, DOWN)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 3 and op.attempts == 3 and op.verdict is Verdict.SUCCEEDED
    owners = {c[2] for c in world.payments.calls if c[0] == "claim"}
    assert len(owners) == 1  # one handling: one lease owner, renewed before each try
    assert delivery.actions == [("ack",)]


# ---- the operation is not ours to handle -------------------------------------------------------------


async def test_unknown_operation_is_dropped(world):
    delivery = command("op_nobody")
    await world.handling.handle(delivery)
    assert delivery.actions == [("ack",)] and world.bank.made() == 0


async def test_finished_operation_is_dropped(world):
    world.authorize(status="succeeded")
    delivery = command("op_a")
    await world.handling.handle(delivery)
    assert delivery.actions == [("ack",)] and world.bank.made() == 0


async def test_parked_operation_is_made_sure_to_be_in_the_dead_letter_queue(world):
    world.authorize(parked=True, attempts=4, last_error={"code": "bank_connection"})
    delivery = command("op_a")
    await world.handling.handle(delivery)
    assert [a[0] for a in delivery.actions] == ["dead", "ack"] and world.bank.made() == 0
    headers = delivery.dead_headers
    assert (headers["operation_id"], headers["payment_id"], headers["kind"]) == ("op_a", "pay_1", "authorize")
    assert headers["attempts"] == 4
    assert orjson.loads(headers["last_error"]) == {"code": "bank_connection"}


async def test_operation_leased_elsewhere_waits_without_an_attempt_or_a_rung(world):
    op = world.authorize(lease_owner="w2/other", lease_left=1.5, attempts=1, rungs=1)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert delivery.actions == [("retry", 2, None, "authorize"), ("ack",)]  # the rung >= 1.5 s; not a rung
    assert op.attempts == 1 and op.rungs == 1 and world.bank.made() == 0


async def test_unreadable_command_goes_to_the_dead_letter_queue(world):
    delivery = FakeDelivery(b'{"not": "a command"}')
    await world.handling.handle(delivery)
    assert [a[0] for a in delivery.actions] == ["dead", "ack"]
    assert orjson.loads(delivery.dead_headers["last_error"])["code"] == "bad_message"


async def test_lease_lost_mid_call_hands_over_to_the_new_holder(world):
    op = world.authorize()
    world.bank.answer("authorize", E500)

    async def someone_takes_the_lease(_call: str) -> None:
        op.lease_owner, op.lease_left = "w2/thief", 2.5  # our lease ran out while the bank was slow

    world.bank.during_call = someone_takes_the_lease
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 1  # no second try: the other holder's call may be running
    assert delivery.actions == [("retry", 3, None, "authorize"), ("ack",)]
    assert op.lease_owner == "w2/thief" and world.payments.count("release") == 0


# ---- "already done" ------------------------------------------------------------------------------------


async def test_already_done_then_replayed_is_our_own_work(world):
    op = world.op("op_c", OperationKind.CAPTURE)
    world.bank.answer("capture", USED)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 2 and op.verdict is Verdict.SUCCEEDED and op.attempts == 2
    assert delivery.actions == [("ack",)]


async def test_already_done_twice_is_parked_as_uncertain(world):
    op = world.op("op_c", OperationKind.CAPTURE)
    world.bank.answer("capture", USED, USED)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 2 and op.parked and op.verdict is None and op.attempts == 2
    assert op.last_error["code"] == "bank_outcome_uncertain"
    assert "authorization_already_used" in op.last_error["message"]
    assert [a[0] for a in delivery.actions] == ["dead", "ack"]
    assert delivery.dead_headers["attempts"] == 2


TIMEOUT = BankOutcome("timeout")
ALREADY = {
    OperationKind.CAPTURE: USED,
    OperationKind.VOID: BankOutcome("error", 400, code="already_voided", message="voided"),
    OperationKind.RELEASE: USED,
    OperationKind.REFUND: BankOutcome("error", 400, code="already_refunded", message="refunded"),
}
CALL = {
    OperationKind.CAPTURE: "capture",
    OperationKind.VOID: "void",
    OperationKind.RELEASE: "void",
    OperationKind.REFUND: "refund",
}


@pytest.mark.parametrize("kind", list(ALREADY))
async def test_already_done_after_our_own_lost_answer_is_recorded_unnamed_and_flagged(world, kind):
    """The bank did the work on our first try, lost the answer AND forgot our key: the second
    try is refused as already done, twice. Nobody else can have done it: recorded."""
    op = world.op("op_x", kind)
    world.bank.answer(CALL[kind], TIMEOUT, ALREADY[kind], ALREADY[kind])
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert op.verdict is Verdict.SUCCEEDED and not op.parked and world.bank.made() == 3
    assert op.doubt is not None and op.doubt.code == domain.REFERENCE_UNKNOWN and op.doubt.finding is None
    assert delivery.actions == [("ack",)]


@pytest.mark.parametrize("kind", list(ALREADY))
async def test_an_earlier_handling_that_died_counts_as_an_attempt_that_may_have_acted(world, kind):
    op = world.op("op_x", kind, attempts=1)  # its handler died: the attempt's outcome is unknown
    world.bank.answer(CALL[kind], ALREADY[kind], ALREADY[kind])
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is not None


@pytest.mark.parametrize("kind", list(ALREADY))
async def test_already_done_without_an_earlier_attempt_that_may_have_acted_stays_uncertain(world, kind):
    op = world.op("op_x", kind)
    world.bank.answer(CALL[kind], E500, ALREADY[kind], ALREADY[kind])  # a 500 of the contract did nothing
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert op.parked and op.verdict is None and op.last_error["code"] == "bank_outcome_uncertain"


@pytest.mark.parametrize(
    ("kind", "other"),
    [
        (OperationKind.CAPTURE, OperationKind.VOID),
        (OperationKind.VOID, OperationKind.CAPTURE),
        (OperationKind.CAPTURE, OperationKind.RELEASE),
        (OperationKind.RELEASE, OperationKind.CAPTURE),
    ],
)
async def test_already_used_is_no_proof_when_another_operation_could_have_used_it(world, kind, other):
    world.op("op_other", other, attempts=1, status="failed")
    op = world.op("op_x", kind)
    world.bank.answer(CALL[kind], TIMEOUT, USED, USED)
    await world.handling.handle(command(op.id))
    assert op.parked and op.verdict is None and op.last_error["code"] == "bank_outcome_uncertain"


async def test_a_fresh_approval_after_a_lost_answer_is_recorded_flagged_with_a_finding(world):
    op = world.authorize()
    world.bank.answer("authorize", TIMEOUT, OK["authorize"])
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is not None
    assert op.doubt.code == op.doubt.finding == domain.POSSIBLE_DUPLICATE_HOLD


async def test_a_replayed_approval_after_a_lost_answer_is_simply_ours(world):
    op = world.authorize()
    replayed = BankOutcome("ok", 200, body=OK["authorize"].body, replayed=True)
    world.bank.answer("authorize", TIMEOUT, replayed)
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is None


async def test_a_replayed_approval_after_two_lost_answers_may_still_be_one_of_two_holds(world):
    op = world.authorize()
    replayed = BankOutcome("ok", 200, body=OK["authorize"].body, replayed=True)
    world.bank.answer("authorize", TIMEOUT, TIMEOUT, replayed)
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is not None
    assert op.doubt.finding == domain.POSSIBLE_DUPLICATE_HOLD


async def test_lost_answers_are_counted_across_handlings(world):
    op = world.authorize()
    world.bank.answer("authorize", TIMEOUT, E500, E500)
    first = command(op.id)
    await world.handling.handle(first)
    assert op.clean_attempts == 2 and first.actions == [("retry", 1, 1, "authorize"), ("ack",)]
    replayed = BankOutcome("ok", 200, body=OK["authorize"].body, replayed=True)
    world.bank.answer("authorize", TIMEOUT, replayed)
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is not None  # two unknowns before the replay


async def test_a_possible_second_hold_says_which_attempt_was_lost_when_and_what_to_check(world):
    op = world.authorize()
    world.bank.answer("authorize", TIMEOUT, OK["authorize"])
    await world.handling.handle(command(op.id))
    evidence = op.doubt.evidence if op.doubt else {}
    (lost,) = evidence["lost_attempts"]
    assert (lost["attempt"], lost["code"], lost["worker"]) == (1, "bank_timeout", op.lost_answers[0]["worker"])
    assert lost["at"] and "may have reached the bank" in lost["how_it_ended"]
    assert "1500 cents on card visa ending 1111" in evidence["check_at_bank"] and "auth_1" in evidence["check_at_bank"]
    assert evidence["approval"].startswith("a fresh approval") and evidence["unknown_attempts"] == 1
    assert "attempt 1 at" in op.doubt.message  # type: ignore[union-attr]
    assert [c[0] for c in world.payments.calls].count("note") == 1  # reported during the wait before the retry


async def test_a_handler_that_stopped_after_its_claim_is_named_in_the_finding(world):
    op = world.authorize(attempts=1)  # claimed, then its handler died: nothing was reported
    world.bank.answer("authorize", OK["authorize"])
    await world.handling.handle(command(op.id))
    (lost,) = op.doubt.evidence["lost_attempts"] if op.doubt else []
    assert (lost["attempt"], lost["code"]) == (1, domain.WORKER_STOPPED)
    assert "stopped" in lost["how_it_ended"] and "may have reached the bank" in lost["how_it_ended"]


async def test_a_clean_answer_is_reported_before_the_retry_so_a_handler_dying_then_raises_no_doubt(world):
    """The first try gets the contract's 500 (nothing done) and the worker dies before its retry:
    the next handling must not count that attempt as one that may have placed a hold."""
    op = world.authorize()
    world.bank.answer("authorize", E500)
    report = world.payments.note

    async def note_then_die(operation_id, owner, done):
        await report(operation_id, owner, done)
        raise DatabaseDown("the worker died here")

    world.payments.note = note_then_die  # type: ignore[method-assign]
    first = command(op.id)
    await world.handling.handle(first)
    assert first.actions == [("requeue",)] and op.clean_attempts == 1 and op.verdict is None
    op.lease_owner = None  # its lease runs out
    world.payments.note = report  # type: ignore[method-assign]
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is None and op.lost_answers == []


async def test_every_lost_answer_is_reported_with_the_lease_given_back(world):
    op = world.authorize()
    world.bank.answer("authorize", TIMEOUT, E500, DOWN)
    await world.handling.handle(command(op.id))
    assert op.clean_attempts == 1 and [e["code"] for e in op.lost_answers] == ["bank_timeout", "bank_connection"]
    assert [e["attempt"] for e in op.lost_answers] == [1, 3] and op.lease_owner is None


async def test_a_fresh_approval_after_a_request_never_sent_is_simply_ours(world):
    op = world.authorize()
    world.bank.answer("authorize", BankOutcome("unreachable"), OK["authorize"])
    await world.handling.handle(command(op.id))
    assert op.verdict is Verdict.SUCCEEDED and op.doubt is None


async def test_an_answer_that_cannot_be_recorded_takes_the_ladder_then_parks(world):
    op = world.authorize()
    world.payments.unrecordable = True
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert op.last_error["code"] == "cannot_record" and op.clean_attempts == 0 and not op.parked
    assert delivery.actions == [("retry", 1, 1, "authorize"), ("ack",)] and op.rungs == 1
    op.rungs = len(LADDER)
    last = command(op.id)
    await world.handling.handle(last)
    assert op.parked and op.last_error["code"] == "cannot_record"
    assert [a[0] for a in last.actions] == ["dead", "ack"]


async def test_a_command_delivered_too_often_is_parked_without_a_bank_call(world):
    op = world.authorize()
    delivery = command(op.id, deliveries=world.cfg.max_deliveries + 1)
    await world.handling.handle(delivery)
    assert world.bank.made() == 0 and op.parked and op.last_error["code"] == "too_many_deliveries"
    assert [a[0] for a in delivery.actions] == ["dead", "ack"]
    assert delivery.dead_headers["operation_id"] == op.id


@pytest.mark.parametrize("op_id", ["op_\x00abc", "x" * 101, "", 7, None, "op a"])
async def test_a_command_naming_no_valid_operation_id_never_reaches_the_store(world, op_id):
    delivery = FakeDelivery(orjson.dumps({"operation_id": op_id}))
    await world.handling.handle(delivery)
    assert world.payments.calls == [] and [a[0] for a in delivery.actions] == ["dead", "ack"]
    assert orjson.loads(delivery.dead_headers["last_error"])["code"] == "bad_message"


# ---- the retry ladder ------------------------------------------------------------------------------------


async def test_transient_after_the_quick_tries_takes_the_next_rung(world):
    op = world.authorize(rungs=1)
    world.bank.answer("authorize", E500, E500, E500)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 3 and op.lease_owner is None and op.last_error["code"] == "internal_error"
    assert delivery.actions == [("retry", 2, 2, "authorize"), ("ack",)] and op.rungs == 2


async def test_ladder_exhausted_parks_for_ops(world):
    op = world.authorize(rungs=len(LADDER))
    world.bank.answer("authorize", E500, E500, E500)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert op.parked and op.last_error["code"] == "internal_error" and op.last_error["retryable"]
    assert [a[0] for a in delivery.actions] == ["dead", "ack"]
    assert delivery.dead_headers["attempts"] == 3


async def test_a_bank_found_down_before_parking_holds_the_operation_instead(world):
    # Too few operations to open the breaker (low traffic), but the bank's health check fails:
    # parking now would be for the outage. The breaker opens and the operation waits for the bank.
    op = world.authorize(rungs=len(LADDER))
    world.bank.answer("authorize", DOWN, DOWN, DOWN)
    world.bank.healthy = False
    delivery = command(op.id)
    task = asyncio.create_task(world.handling.handle(delivery))
    await eventually(lambda: world.bank.health_calls >= 3)
    assert not op.parked and op.lease_owner is None and world.handling.gate.breaker.is_open
    world.bank.healthy = True
    await task
    assert op.verdict is Verdict.SUCCEEDED and not op.parked and delivery.actions == [("ack",)]
    assert world.bank.made() == 4


async def test_forced_replay_keeps_its_force_through_the_ladder(world):
    # (on the operation's row: each command of its journey is read against it)
    op = world.authorize(first_attempt_at=now() - timedelta(hours=25), attempts=1, forced=True)
    world.bank.answer("authorize", E500, E500, E500)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert delivery.actions == [("retry", 1, 1, "authorize"), ("ack",)]
    await world.handling.handle(command(op.id))
    assert world.bank.made() == 4 and op.verdict is Verdict.SUCCEEDED


# ---- what cannot be sent ---------------------------------------------------------------------------------


async def test_authorize_older_than_the_key_horizon_is_parked_unsent(world):
    op = world.authorize(first_attempt_at=now() - timedelta(hours=25), attempts=1)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 0 and op.parked and op.last_error["code"] == "bank_key_expired"
    assert [a[0] for a in delivery.actions] == ["dead", "ack"]


async def test_forced_replay_sends_an_old_authorize(world):
    op = world.authorize(first_attempt_at=now() - timedelta(hours=25), attempts=1, forced=True)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 1 and op.verdict is Verdict.SUCCEEDED


async def test_a_recent_authorize_is_sent(world):
    op = world.authorize(first_attempt_at=now() - timedelta(hours=22), attempts=5)
    await world.handling.handle(command(op.id))
    assert world.bank.made() == 1 and op.verdict is Verdict.SUCCEEDED


async def test_card_missing_from_the_vault_is_parked(world):
    op = world.op("op_a", OperationKind.AUTHORIZE, sealed_card=None)
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 0 and op.parked and op.last_error["code"] == "cannot_build_request"
    assert "vault" in op.last_error["message"]


async def test_a_card_sealed_for_another_payment_is_parked(world):
    op = world.op("op_a", OperationKind.AUTHORIZE, sealed_card=world.vault.seal("pay_other", *CARD))
    await world.handling.handle(command(op.id))
    assert world.bank.made() == 0 and op.parked and op.last_error["code"] == "cannot_build_request"


async def test_a_card_sealed_under_a_key_the_worker_no_longer_holds_is_parked_naming_the_key(world):
    dropped = CardVault([CardKey("k0", b"0" * 32)]).seal("pay_a", *CARD)
    op = world.op("op_a", OperationKind.AUTHORIZE, sealed_card=dropped)
    await world.handling.handle(command(op.id))
    assert world.bank.made() == 0 and op.parked and op.last_error["code"] == "cannot_build_request"
    assert "'k0'" in op.last_error["message"] and CARD[0] not in op.last_error["message"]


async def test_refund_without_a_capture_id_is_parked(world):
    op = world.op("op_r", OperationKind.REFUND, capture_id=None)
    await world.handling.handle(command(op.id))
    assert world.bank.made() == 0 and op.parked


# ---- the circuit breaker ---------------------------------------------------------------------------------


async def test_breaker_open_holds_the_command_unclaimed_and_uncharged(world):
    hold = World(outage_hold=0.2)
    hold.bank.healthy = False
    op = hold.authorize(attempts=2, rungs=2)
    hold.open_breaker()
    delivery = command(op.id)
    started = time.monotonic()
    await hold.handling.handle(delivery)
    assert time.monotonic() - started >= 0.2
    assert hold.payments.count("claim") == 0 and op.attempts == 2 and hold.bank.made() == 0
    # round the shortest retry queue, not a rung, back under the routing key it came with
    assert delivery.actions == [("retry", LADDER[0], None, None), ("ack",)] and op.rungs == 2
    assert hold.bank.health_calls >= 2  # probed while it waited


async def test_breaker_open_then_bank_back_resumes_within_moments(world):
    world.bank.healthy = False
    world.open_breaker()
    ops = [world.authorize(f"op_{i}", rungs=len(LADDER)) for i in range(10)]  # even on the last rung
    deliveries = [command(op.id) for op in ops]
    tasks = [asyncio.create_task(world.handling.handle(d)) for d in deliveries]
    await asyncio.sleep(0.1)
    assert world.bank.made() == 0 and world.payments.count("claim") == 0
    world.bank.healthy = True
    back = time.monotonic()
    await asyncio.gather(*tasks)
    assert time.monotonic() - back < 1.0
    assert all(op.verdict is Verdict.SUCCEEDED and op.attempts == 1 for op in ops)
    assert all(d.actions == [("ack",)] for d in deliveries)
    assert world.handling.gate.breaker.state is State.CLOSED


@pytest.mark.parametrize("quick_retries", [1, 3], ids=["on-the-last-try", "between-tries"])
async def test_outage_starting_mid_tries_waits_instead_of_taking_a_rung_or_parking(quick_retries):
    world = World(breaker_unreachable_operations=1, quick_retries=quick_retries)
    op = world.authorize(rungs=len(LADDER))  # a rung would park it
    world.bank.answer("authorize", DOWN)  # the first try finds the bank gone: the breaker opens
    world.bank.healthy = False
    delivery = command(op.id)
    task = asyncio.create_task(world.handling.handle(delivery))
    await eventually(lambda: world.bank.health_calls >= 3)
    assert world.bank.made() == 1 and op.lease_owner is None and not op.parked  # lease given back
    assert world.handling.gate.breaker.is_open
    world.bank.healthy = True
    await task
    assert op.verdict is Verdict.SUCCEEDED and world.bank.made() == 2 and op.attempts == 2
    assert delivery.actions == [("ack",)]


async def test_a_failing_trial_reopens_and_the_operation_keeps_waiting():
    world = World(breaker_unreachable_operations=1, breaker_trial_calls=1)
    op = world.authorize(rungs=len(LADDER))
    world.bank.answer("authorize", DOWN, DOWN)  # the first call, then the first trial
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert world.bank.made() == 3 and op.verdict is Verdict.SUCCEEDED and not op.parked
    assert world.handling.gate.breaker.times_opened == 2


async def test_the_usual_failures_of_many_operations_never_hold_calls_back():
    world = World(breaker_min_operations=20, breaker_unreachable_operations=5)
    ops = [world.authorize(f"op_{i}") for i in range(200)]
    for i, op in enumerate(ops):
        if i % 20 == 0:
            world.bank.answer("authorize", E500)  # 5% of first tries fail
        await world.handling.handle(command(op.id))
    assert all(op.verdict is Verdict.SUCCEEDED for op in ops)
    assert world.handling.gate.breaker.times_opened == 0


# ---- database failures -----------------------------------------------------------------------------------


async def test_recording_failure_gives_the_command_back_and_pauses_handling(world):
    op = world.authorize()
    world.payments.failing_records = 1
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert delivery.actions == [("requeue",)] and world.handling.pause.paused
    assert op.lease_owner is not None  # held until it runs out: a redelivery waits for it

    op.lease_owner = None  # the lease ran out
    again = command(op.id)
    await world.handling.handle(again)  # the redelivery: probe, then the same key again
    assert world.probes == 1 and again.actions == [("ack",)] and op.verdict is Verdict.SUCCEEDED
    assert [c[1] for c in world.bank.calls] == ["gw-op_a", "gw-op_a"]


async def test_a_row_lock_held_elsewhere_sends_the_command_round_the_shortest_queue_uncharged(world):
    op = world.authorize()
    world.payments.locked_records = 1  # an ops session holds the payment's row past the lock timeout
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert delivery.actions == [("retry", LADDER[0], None, None), ("ack",)]  # no rung: not the operation's fault
    assert not world.handling.pause.paused and not op.parked and world.payments.count("park") == 0

    op.lease_owner = None  # the lease ran out
    again = command(op.id)
    await world.handling.handle(again)  # the lock is gone: the same key again, recorded
    assert again.actions == [("ack",)] and op.verdict is Verdict.SUCCEEDED and world.probes == 0


async def test_a_database_outage_does_not_spin_messages(world):
    ops = [world.authorize(f"op_{i}") for i in range(20)]
    world.payments.down = True
    first = command(ops[0].id)
    await world.handling.handle(first)
    assert first.actions == [("requeue",)]

    async def redelivered(op: Op) -> FakeDelivery:
        while True:  # the broker gives a requeued command back at once
            delivery = command(op.id)
            await world.handling.handle(delivery)
            if delivery.actions != [("requeue",)]:
                return delivery

    tasks = [asyncio.create_task(redelivered(op)) for op in ops]
    await asyncio.sleep(0.5)
    # Half a second of outage: every command waits; only the probes touch the database,
    # one at a time, at most every 0.025-0.05 s (WORKER_DB_BACKOFF_MAX_SECONDS, jittered).
    assert world.payments.calls_while_down == 1
    assert 5 <= world.probes <= 21
    assert sum(t.done() for t in tasks) == 0
    world.payments.down = False
    deliveries = await asyncio.gather(*tasks)
    assert all(d.actions == [("ack",)] for d in deliveries)
    assert all(op.verdict is Verdict.SUCCEEDED for op in ops)


async def test_database_pause_backs_off_exponentially_up_to_the_cap():
    stopping = asyncio.Event()
    times: list[float] = []
    answers = iter([False] * 6 + [True])

    async def probe() -> None:
        times.append(time.monotonic())
        if not next(answers):
            raise DatabaseDown("still down")

    pause = DatabasePause(probe, stopping, first=0.02, cap=0.16)
    pause.failed()
    started = time.monotonic()
    assert await pause.ready()
    assert not pause.paused and len(times) == 7
    gaps = [b - a for a, b in zip([started, *times], times, strict=False)]
    expected = [0.02, 0.04, 0.08, 0.16, 0.16, 0.16, 0.16]
    for gap, full in zip(gaps, expected, strict=True):
        assert full * 0.5 - 0.005 <= gap <= full + 0.05


async def test_database_pause_grows_while_handlings_keep_failing_after_a_good_probe():
    stopping = asyncio.Event()

    async def probe() -> None:
        return None  # the database answers, but handlings fail (a schema problem, say)

    pause = DatabasePause(probe, stopping, first=0.02, cap=1.0)
    waits = []
    for _ in range(4):
        pause.failed()
        started = time.monotonic()
        await pause.ready()
        waits.append(time.monotonic() - started)
    assert waits[3] >= 0.08 and waits[3] > waits[0]  # 0.02, 0.04, 0.08, 0.16 (jittered)
    pause.succeeded()
    pause.failed()
    started = time.monotonic()
    await pause.ready()
    assert time.monotonic() - started < 0.05  # a handling went through: back to the first pause


# ---- stopping --------------------------------------------------------------------------------------------


async def test_stopping_before_the_call_leaves_the_command_for_the_queue(world):
    op = world.authorize()
    world.handling.stop()
    delivery = command(op.id)
    await world.handling.handle(delivery)
    assert delivery.actions == [] and world.bank.made() == 0 and world.payments.count("claim") == 0


async def test_stopping_during_a_call_lets_it_finish_and_records_it(world):
    op = world.authorize()
    in_call, release = asyncio.Event(), asyncio.Event()

    async def slow(_call: str) -> None:
        in_call.set()
        await release.wait()

    world.bank.during_call = slow
    delivery = command(op.id)
    task = asyncio.create_task(world.handling.handle(delivery))
    await in_call.wait()
    world.handling.stop()
    await asyncio.sleep(0.05)
    assert not task.done()  # the call under way is not abandoned
    release.set()
    await task
    assert op.verdict is Verdict.SUCCEEDED and delivery.actions == [("ack",)]


async def test_stopping_after_a_failed_try_starts_no_other_call(world):
    op = world.authorize()
    world.bank.answer("authorize", E500)
    in_call, release = asyncio.Event(), asyncio.Event()

    async def slow(_call: str) -> None:
        in_call.set()
        await release.wait()

    world.bank.during_call = slow
    delivery = command(op.id)
    task = asyncio.create_task(world.handling.handle(delivery))
    await in_call.wait()
    world.handling.stop()
    release.set()
    await task
    assert world.bank.made() == 1 and op.lease_owner is None and op.verdict is None
    assert delivery.actions == []  # not acked: back to the queue for the next worker


async def test_stopping_wakes_commands_waiting_for_the_bank(world):
    world.bank.healthy = False
    world.open_breaker()
    op = world.authorize()
    delivery = command(op.id)
    task = asyncio.create_task(world.handling.handle(delivery))
    await asyncio.sleep(0.05)
    world.handling.stop()
    await asyncio.wait_for(task, 1)
    assert delivery.actions == [] and world.payments.count("claim") == 0


async def test_stopping_wakes_commands_waiting_for_the_database(world):
    op = world.authorize()
    world.payments.down = True
    await world.handling.handle(command(op.id))
    waiting = command(op.id)
    task = asyncio.create_task(world.handling.handle(waiting))
    await asyncio.sleep(0.05)
    world.handling.stop()
    await asyncio.wait_for(task, 1)
    assert waiting.actions == []
