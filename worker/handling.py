"""The worker's policy for one command message, run against small interfaces (worker/ports.py:
Bank, Payments, Delivery), so that every path can be tested with fakes (tests/unit/test_handling.py).
The bank's availability (worker/bank_gate.py) and the pause after database failures
(worker/db_pause.py) are shared by the concurrent handlings of one worker.

Per message (body {"operation_id"}), with the operation's ids bound to every log line:

    the bank is unavailable (breaker open)    wait: no claim, no attempt, no rung. After
                                              WORKER_OUTAGE_HOLD_SECONDS the command goes round
                                              the shortest retry queue, still uncharged
    claim the lease (payments.claim)          finished -> ack; unknown -> ack;
                                              parked -> make sure it is in payments.dead, ack;
                                              leased elsewhere -> retry queue >= lease left, ack
                                              (not an attempt)
    authorize first tried > 23 h ago          park (the bank may have forgotten the key), unless
                                              ops replayed it with --force (on its row)
    call the bank with the operation's own key, a few quick tries (backoff), re-claiming the
    lease before each one; a try starts only after the previous one is over
    SUCCEEDED / REFUSED / EXPIRED             payments.record_outcome (settlement decides the
                                              doubt it leaves), ack
    CONFIRM ("already done")                  wait, same request + same key again: a replayed
                                              2xx is our own work; still refused: proven our own
                                              (payments.proves_own_work) -> record_own_work,
                                              else park
    RETRY after the quick tries               payments.release (a rung counted on the row), next
                                              retry queue, ack; after the last rung ->
                                              payments.park + payments.dead.
                                              If the breaker opened meanwhile, or the bank's
                                              health check fails before parking, the failures
                                              were the outage: release and wait, no rung taken.

Stopping (SIGTERM): no bank call starts any more; a call under way finishes and its outcome
is recorded; any other command is left unacknowledged, so it goes back to the queue.

A statement the database gave up on (a row lock held elsewhere past DB_LOCK_TIMEOUT_SECONDS)
sends the command round the shortest retry queue, no rung taken, no pause. Any other handling
that fails on the database or the broker gives its command back (nack, requeue),
and no handling starts until a probe of the database answers: the pause doubles up to
WORKER_DB_BACKOFF_MAX_SECONDS while handlings keep failing, instead of every command
spinning through the queue.

Nothing that decides a step is read from the message but the operation id: the rungs taken and
a forced replay are on the operation's row (a header could be set by whoever can publish), and
how often the broker delivered the message comes from the broker (Delivery.deliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import orjson

from gateway import db, domain, logs, messages, process, topology
from gateway.cards import CardVault, VaultError
from gateway.crashpoints import crash_point
from gateway.domain import BankOutcome, OperationKind, Verdict
from gateway.payments.settlement import Claim, OperationState
from gateway.store import AttemptReport
from gateway.timefmt import iso, now
from worker.bank_gate import BankGate, policy
from worker.breaker import Permit
from worker.db_pause import DatabasePause
from worker.ports import Bank, CannotRecord, Delivery, Payments
from worker.settings import WorkerSettings

log = logs.get("worker")


def _error(code: str, message: str, retryable: bool = False) -> dict:
    return {"code": code, "message": message, "retryable": retryable}


@dataclass
class _Run:
    """The quick tries of one claim."""

    verdict: Verdict | None = None
    outcome: BankOutcome | None = None
    uncertain: bool = False  # "already done" twice: cannot tell whether money moved
    lost: OperationState | None = None  # the lease went to another handling meanwhile
    interrupted: bool = False  # a try could not start: stopping, or the breaker holds calls back
    bank_ms: int = 0
    attempts: int = 0  # the operation's attempt count after the last claim
    unknown_before: int = 0  # earlier attempts that may have done the work unbeknown to us
    unknown_new: int = 0  # ... of this handling
    unknown_before_last: int = 0  # all that may have, before the latest try
    # This handling's attempts not reported yet (note, release): how many are known to have
    # done nothing, and the lost_answers entries of the others.
    clean_new: int = 0
    lost_new: list[dict] = field(default_factory=list)
    lost_reported: Sequence[Mapping[str, Any]] = ()  # the lost_answers of the latest claim
    lost_before_last: list[Mapping[str, Any]] = field(
        default_factory=list
    )  # ... and this handling's, before the latest try

    @property
    def unknown(self) -> int:
        return self.unknown_before + self.unknown_new

    def report(self) -> AttemptReport:
        """The attempts not reported yet, handed over (to note or release): none are left."""
        report = AttemptReport(self.clean_new, self.lost_new)
        self.clean_new, self.lost_new = 0, []
        return report

    @property
    def error(self) -> dict | None:
        return domain.error_for(self.outcome) if self.outcome is not None else None


class Handling:
    def __init__(
        self,
        cfg: WorkerSettings,
        payments: Payments,
        bank: Bank,
        *,
        vault: CardVault | None,
        worker_id: str,
        database_probe: Callable[[], Awaitable[object]],
    ):
        self.cfg = cfg
        self.payments = payments
        self.bank = bank
        self.vault = vault
        self.worker_id = worker_id
        self.stopping = asyncio.Event()
        self.gate = BankGate(policy(cfg), bank, self.stopping)
        self.pause = DatabasePause(database_probe, self.stopping, cap=cfg.db_backoff_max)

    def stop(self) -> None:
        """No bank call starts from now on; waiting handlings give their command back."""
        self.stopping.set()
        self.gate.notify()
        self.pause.notify()

    async def handle(self, delivery: Delivery) -> None:
        operation_id = messages.operation_id_of(delivery.body)
        with logs.bound(operation_id=operation_id, message_id=delivery.message_id):
            if not await self.pause.ready():
                return  # stopping: not acked, so the command goes back to the queue
            try:
                if operation_id is None:
                    log.error("unreadable command sent to the dead-letter queue")
                    error = _error("bad_message", 'the command body is not {"operation_id": "op_..."}')
                    await delivery.dead_letter({"last_error": orjson.dumps(error).decode()})
                    await delivery.ack()
                elif delivery.deliveries > self.cfg.max_deliveries:
                    await self._delivered_too_often(delivery, operation_id)
                else:
                    await self._operation(delivery, operation_id)
            except db.TIMED_OUT as exc:
                # A row another session holds (an ops tool, a stuck transaction): the database
                # answers, so no pause, and no rung is charged for what is not the operation's
                # fault; the command comes back after the shortest retry queue.
                delay = self.cfg.retry_ladder[0]
                log.warning("the database timed out on the operation; retrying later", error=type(exc).__name__)
                with contextlib.suppress(Exception):
                    await delivery.retry_later(delay, None, None)
                    await delivery.ack()
            except Exception:
                # The database or the broker failed us mid-way: nothing was acked, so the command
                # comes back (a lease we hold runs out; the bank key makes a second call harmless).
                log.exception("handling failed; the command goes back to the queue")
                self.pause.failed()
                with contextlib.suppress(Exception):
                    await delivery.requeue()
            else:
                self.pause.succeeded()

    async def _delivered_too_often(self, delivery: Delivery, operation_id: str) -> None:
        """A command handed out again and again without ever being settled (every handling
        failed on it): to ops, parked, rather than round the queue for ever."""
        error = _error(
            "too_many_deliveries",
            f"the command was delivered {delivery.deliveries} times and never settled; "
            "see the worker's log for why, then replay or abandon it",
        )
        log.error("command delivered too often; parked for ops", deliveries=delivery.deliveries)
        payment = await self.payments.park(operation_id, error)
        await delivery.dead_letter(_dead_headers(operation_id, payment["id"] if payment else None, None, 0, error))
        await delivery.ack()

    async def _operation(self, delivery: Delivery, operation_id: str) -> None:
        while True:
            permit = await self.gate.permit(operation_id, self.cfg.outage_hold)
            if permit is None:
                if self.stopping.is_set():
                    return
                delay = self.cfg.retry_ladder[0]
                log.info("bank still unavailable; the command goes round a retry queue, no rung taken", delay=delay)
                await delivery.retry_later(delay, None, None)
                await delivery.ack()
                return
            if not await self._claim_and_try(delivery, operation_id, permit):
                return

    async def _claim_and_try(self, delivery: Delivery, operation_id: str, permit: Permit) -> bool:
        """One claim and its quick tries. True: the bank became unavailable meanwhile, so the
        lease was given back and the operation waits for the bank again."""
        # The lease belongs to this handling of this message, not to the process: a
        # duplicate of the command arriving here while our bank call runs must wait.
        owner = f"{self.worker_id}/{uuid.uuid4().hex[:8]}"
        got = await self.payments.claim(operation_id, owner, self.cfg.lease_seconds)
        if not isinstance(got, Claim):
            self.gate.cancel(permit)
            await self._not_claimed(delivery, got)
            return False
        claim = got
        logs.bind(payment_id=claim.payment.id, operation_kind=claim.kind.value)

        if claim.kind is OperationKind.AUTHORIZE and not claim.forced and self._key_too_old(claim):
            self.gate.cancel(permit)
            await self._park(
                delivery,
                claim,
                _error(
                    "bank_key_expired",
                    "the first authorization attempt is older than the bank remembers idempotency keys; "
                    "a resend could place a second hold: check the bank, then replay with --force",
                ),
            )
            return False
        try:
            call = self._call(claim)
        except (VaultError, ValueError) as exc:
            self.gate.cancel(permit)
            await self._park(delivery, claim, _error("cannot_build_request", str(exc)))
            return False

        run = await self._tries(claim, call, permit)
        if run.lost is not None:
            await self._not_claimed(delivery, run.lost)
            return False
        outage = run.verdict is Verdict.RETRY and (
            self.gate.breaker.is_open or (claim.rungs >= len(self.cfg.retry_ladder) and await self.gate.bank_down())
        )
        if run.interrupted or outage:
            # Nothing settled, and no further call may start now: give the lease back. Stopping:
            # the command stays unacknowledged and goes back to the queue. The bank unavailable:
            # the failures were the outage, so no rung is taken; wait for the bank.
            await self.payments.release(operation_id, owner, run.error, run.bank_ms, run.report())
            if self.stopping.is_set():
                log.info("stopping: operation left for the next worker")
                return False
            log.info("bank unavailable; the operation waits for it", attempts=run.attempts)
            return True
        assert run.verdict is not None and run.outcome is not None  # a try was made
        if run.uncertain:
            await self._already_done(delivery, claim, run)
            return False
        if domain.is_final(run.verdict):
            verdict, outcome = run.verdict, run.outcome
            await self._record(
                delivery,
                claim,
                run,
                verdict,
                outcome,
                lambda: self.payments.record_outcome(
                    claim,
                    verdict,
                    outcome,
                    run.bank_ms,
                    unknown_before=run.unknown_before_last,
                    lost=run.lost_before_last,
                ),
            )
            return False
        await self._retry_later(delivery, claim, domain.error_for(run.outcome), run)
        return False

    async def _record(
        self,
        delivery: Delivery,
        claim: Claim,
        run: _Run,
        verdict: Verdict,
        outcome: BankOutcome,
        recording: Callable[[], Awaitable[domain.Doubt | None]],
    ) -> None:
        crash_point("worker.after_bank")
        try:
            doubt = await recording()
        except CannotRecord as exc:
            # Bounded like any other failure: the ladder, then parked with the reason. The
            # bank did its part; asking again with our key gets the same answer back.
            log.error("the bank's answer could not be recorded", problem=str(exc))
            error = _error(domain.CANNOT_RECORD, f"the bank's answer could not be recorded: {exc}", retryable=True)
            run.unknown_new += 1
            run.lost_new.append(domain.lost_answer(run.attempts, iso(now()), claim.owner, error))
            await self._retry_later(delivery, claim, error, run)
            return
        if doubt is not None:
            log.warning("operation settled with a doubt for ops", doubt=doubt.code, verdict=verdict.value)
        else:
            log.info("operation settled", verdict=verdict.value, bank_ms=run.bank_ms, code=outcome.code)
        crash_point("worker.after_record")
        await delivery.ack()

    async def _already_done(self, delivery: Delivery, claim: Claim, run: _Run) -> None:
        """Still "already done" when asked again with our key: our own work if the domain's
        proof holds (recorded, reference unknown, flagged), else parked as uncertain."""
        refusal = run.outcome
        assert refusal is not None
        if await self.payments.proves_own_work(claim, refusal, unknown_before=run.unknown_before_last):
            await self._record(
                delivery,
                claim,
                run,
                Verdict.SUCCEEDED,
                refusal,
                lambda: self.payments.record_own_work(claim, refusal, run.bank_ms),
            )
            return
        await self._park(
            delivery,
            claim,
            _error(
                "bank_outcome_uncertain",
                f"the bank answers {refusal.code} and does not replay an answer for our key: "
                "we cannot tell whether the money moved; check the bank before replaying",
            ),
            run=run,
        )

    def _key_too_old(self, claim: Claim) -> bool:
        age = timedelta(hours=self.cfg.authorize_key_max_age_hours)
        return claim.first_attempt_at is not None and claim.first_attempt_at < now() - age

    def _call(self, claim: Claim) -> Callable[[], Awaitable[BankOutcome]]:
        """The bank request for this operation; the card stays inside the closure."""
        bank, key, kind, amount = self.bank, claim.bank_key, claim.kind, claim.payment.amount
        if kind is OperationKind.AUTHORIZE:
            if claim.sealed_card is None or self.vault is None:
                raise ValueError("the card of this authorization is not in the vault (or no card key)")
            number, cvv = self.vault.open(claim.payment.id, claim.sealed_card)
            month, year = claim.payment.card_expiry_month, claim.payment.card_expiry_year
            return lambda: bank.authorize(
                key, card_number=number, cvv=cvv, expiry_month=month, expiry_year=year, amount=amount
            )
        if kind is OperationKind.REFUND:
            capture_id = claim.payment.capture_id
            if not capture_id:
                raise ValueError("the payment has no capture_id to refund")
            return lambda: bank.refund(key, capture_id=capture_id, amount=amount)
        authorization_id = claim.payment.authorization_id
        if not authorization_id:
            raise ValueError("the payment has no authorization_id")
        if kind is OperationKind.CAPTURE:
            return lambda: bank.capture(key, authorization_id=authorization_id, amount=amount)
        return lambda: bank.void(key, authorization_id=authorization_id)  # VOID and RELEASE

    # ---- the bank calls of one claim ------------------------------------------------------------

    async def _tries(self, claim: Claim, call: Callable[[], Awaitable[BankOutcome]], permit: Permit) -> _Run:
        """Up to WORKER_QUICK_RETRIES sequential tries, each under a freshly renewed lease."""
        run = _Run(attempts=claim.attempts, unknown_before=claim.unknown_outcomes, lost_reported=claim.lost_answers)
        for tries in range(1, self.cfg.quick_retries + 1):
            if tries > 1:
                await self._note_while_waiting(
                    claim, run, random.uniform(0, self.cfg.quick_retry_base * 2 ** (tries - 2))
                )
                next_permit = await self._renew(claim, run)
                if next_permit is None:
                    return run
                permit = next_permit
            elif self.stopping.is_set():
                self.gate.cancel(permit)
                run.interrupted = True
                run.clean_new += 1  # claimed, never sent
                return run
            outcome = await self._ask(claim, call, permit, run)
            if run.verdict is Verdict.CONFIRM:
                await self._confirm(claim, call, run, outcome)
            if run.verdict is not Verdict.RETRY or run.lost is not None or run.interrupted:
                return run
            latest = run.outcome or outcome  # after a confirm: the second answer
            log.info(
                "bank try failed",
                outcome=latest.kind,
                http_status=latest.http_status,
                code=latest.code,
                try_number=tries,
            )
        return run

    async def _confirm(
        self, claim: Claim, call: Callable[[], Awaitable[BankOutcome]], run: _Run, refusal: BankOutcome
    ) -> None:
        """ "Already done": maybe our own earlier try whose answer was lost. Ask again, same key."""
        log.info("bank says already done; asking again with the same key", code=refusal.code)
        await self._note_while_waiting(claim, run, self.cfg.confirm_delay)
        permit = await self._renew(claim, run)
        if permit is None:
            return
        await self._ask(claim, call, permit, run)
        if run.verdict is Verdict.CONFIRM:
            run.uncertain = True

    async def _note_while_waiting(self, claim: Claim, run: _Run, seconds: float) -> None:
        """Wait before the next try, meanwhile reporting what the tries so far taught us: a
        handler that dies before its next write must not leave an attempt known to have done
        nothing counted as one that may have (a possible second hold, for an authorization).
        The report costs no time (it runs during the wait) and only follows a failed try."""
        report = run.report()
        if report.clean_attempts or report.lost_answers:
            await asyncio.gather(
                self.payments.note(claim.operation_id, claim.owner, report), process.wait(self.stopping, seconds)
            )
        else:
            await process.wait(self.stopping, seconds)

    async def _renew(self, claim: Claim, run: _Run) -> Permit | None:
        """Permission for one more call: not stopping, the breaker lets it through, and the lease
        renewed (the previous try is over: we have its answer)."""
        if self.stopping.is_set():
            run.interrupted = True
            return None
        permit = self.gate.try_permit(claim.operation_id)
        if permit is None:
            run.interrupted = True
            return None
        got = await self.payments.claim(claim.operation_id, claim.owner, self.cfg.lease_seconds)
        if not isinstance(got, Claim):
            self.gate.cancel(permit)
            run.lost = got
            return None
        run.attempts, run.lost_reported = got.attempts, got.lost_answers
        return permit

    async def _ask(
        self, claim: Claim, call: Callable[[], Awaitable[BankOutcome]], permit: Permit, run: _Run
    ) -> BankOutcome:
        sent_at, started = iso(now()), time.monotonic()
        try:
            outcome = await call()
        finally:
            run.bank_ms += int((time.monotonic() - started) * 1000)
        self.gate.record(permit, outcome)
        run.outcome = outcome
        run.verdict = domain.classify(claim.kind, outcome)
        run.unknown_before_last = run.unknown
        run.lost_before_last = [*run.lost_reported, *run.lost_new]
        if outcome.kind == "ok":
            pass  # work we know of: recorded next (or, if that fails, counted as unknown then)
        elif domain.may_have_acted(outcome):
            run.unknown_new += 1
            error = domain.error_for(outcome, claim.kind)
            run.lost_new.append(domain.lost_answer(run.attempts, sent_at, claim.owner, error))
        else:
            run.clean_new += 1
        return outcome

    # ---- the ways a message leaves ----------------------------------------------------------

    async def _not_claimed(self, delivery: Delivery, state: OperationState) -> None:
        if not state.exists:
            log.warning("command for an unknown operation dropped")
        elif state.finished:
            log.debug("operation already finished; duplicate command dropped")
        elif state.parked:
            # Parked (waiting for ops): make sure the dead-letter queue has it, in case the
            # publish after park() was the step that failed; ops dedupe on operation_id.
            await delivery.dead_letter(
                _dead_headers(
                    messages.operation_id_of(delivery.body),
                    state.payment_id,
                    state.kind,
                    state.attempts,
                    state.last_error,
                )
            )
        else:
            # Leased by another handling whose bank call may still be running: come back once
            # the lease can have run out. Not an attempt, so the rung count stays.
            delay = topology.rung_for(self.cfg.retry_ladder, state.lease_left)
            log.info("operation leased by another worker; retrying later", lease_left=state.lease_left, delay=delay)
            await delivery.retry_later(delay, state.kind, None)
        await delivery.ack()

    async def _retry_later(self, delivery: Delivery, claim: Claim, error: dict, run: _Run) -> None:
        rungs = claim.rungs
        if rungs >= len(self.cfg.retry_ladder):
            await self._park(delivery, claim, error, run=run)
            return
        await self.payments.release(claim.operation_id, claim.owner, error, run.bank_ms, run.report(), rung_taken=True)
        delay = self.cfg.retry_ladder[rungs]
        await delivery.retry_later(delay, claim.kind.value, rungs + 1)
        log.info("bank attempts failed; retrying later", delay=delay, rung=rungs + 1, error_code=error["code"])
        await delivery.ack()

    async def _park(self, delivery: Delivery, claim: Claim, error: dict, *, run: _Run | None = None) -> None:
        attempts = claim.attempts if run is None else run.attempts
        if run is not None and (run.bank_ms or run.clean_new or run.lost_new):
            await self.payments.release(claim.operation_id, claim.owner, error, run.bank_ms, run.report())
        payment = await self.payments.park(claim.operation_id, error)
        if payment is not None:
            await delivery.dead_letter(
                _dead_headers(claim.operation_id, claim.payment.id, claim.kind.value, attempts, error)
            )
            log.error("operation parked for ops", error_code=error["code"], attempts=attempts)
        await delivery.ack()


def _dead_headers(
    operation_id: str | None,
    payment_id: str | None,
    kind: str | None,
    attempts: int,
    error: dict | None,
) -> dict[str, Any]:
    return {
        "operation_id": operation_id,
        "payment_id": payment_id,
        "kind": kind,
        "attempts": attempts,
        "last_error": orjson.dumps(error).decode(),
        "parked_at": now().isoformat(),
    }
