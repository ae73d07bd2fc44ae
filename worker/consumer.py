"""gateway-worker: one command message -> one bank operation -> one recorded outcome.

Per message (body {"operation_id"}), with the operation's ids bound to every log line:

    claim the lease (payments.claim)      finished -> ack; unknown -> ack;
                                          parked -> make sure it is in payments.dead, ack;
                                          leased elsewhere -> retry queue >= lease left, ack
    call the bank with the operation's own key, a few quick tries (backoff), re-claiming
    the lease before each one; a try starts only after the previous one is over
    SUCCEEDED / REFUSED / EXPIRED         -> payments.record_outcome, ack
    CONFIRM ("already done")              -> wait, same request + same key again: a replayed
                                             2xx is our own work; still refused -> park
    RETRY after the quick tries           -> payments.release, next retry queue, ack;
                                             after the last rung -> payments.park + payments.dead

Every publish waits for the broker's confirm before the message is acked,
so a crash at any point leaves the command in a queue, never nowhere.
One process keeps up to WORKER_CONCURRENCY bank calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import aio_pika
import asyncpg
import backoff
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from gateway import config, db, domain, logs, messages, payments
from gateway.cards import CardVault, VaultError
from gateway.crashpoints import crash_point
from gateway.domain import BankOutcome, OperationKind, Verdict
from gateway.timefmt import now
from worker import settings as wsettings
from worker import sweeper, topology
from worker.bank import BankClient

log = logs.get("worker")

PUBLISH_TIMEOUT = 30.0


def _error(code: str, message: str, retryable: bool = False) -> dict:
    return {"code": code, "message": message, "retryable": retryable}


@dataclass
class _Run:
    """The result of the quick tries on one message."""

    verdict: Verdict | None = None  # None: the lease was lost to another worker meanwhile
    outcome: BankOutcome | None = None
    uncertain: bool = False  # "already done" twice: cannot tell whether money moved
    lost: payments.OperationState | None = None
    bank_ms: int = 0
    attempts: int = 0  # the operation's attempt count after the last claim


class Worker:
    def __init__(
        self,
        settings: config.Settings,
        cfg: wsettings.WorkerSettings | None = None,
        *,
        worker_id: str | None = None,
        run_sweeper: bool = True,
    ):
        self.settings = settings
        self.cfg = cfg or wsettings.WorkerSettings()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.run_sweeper = run_sweeper
        self.vault = CardVault(settings.card_key) if settings.card_key else None
        self.pool: asyncpg.Pool | None = None
        self.bank: BankClient | None = None
        self.connection: AbstractRobustConnection | None = None
        self._sem = asyncio.Semaphore(self.cfg.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._stop_sweeper = asyncio.Event()
        self._sweeper: asyncio.Task | None = None
        self._queue = None
        self._consumer_tag: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self.pool = await db.create_pool(self.settings.database_url, min_size=2, max_size=self.cfg.db_pool_size)
        self.bank = BankClient(self.settings.bank_url, timeout=self.cfg.bank_timeout)
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url, client_properties={"connection_name": f"gateway-worker {self.worker_id}"}
        )
        self._publish_channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        exchanges = await topology.declare(self._publish_channel, self.cfg.retry_ladder)
        self._retry_exchange = exchanges[topology.RETRY_EXCHANGE]
        consume_channel = await self.connection.channel()
        await consume_channel.set_qos(prefetch_count=self.cfg.prefetch)
        self._queue = await consume_channel.declare_queue(
            topology.WORK_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        self._consumer_tag = await self._queue.consume(self._on_message)
        if self.run_sweeper:
            self._sweeper = asyncio.create_task(
                sweeper.run(
                    self.pool,
                    self._stop_sweeper,
                    interval=self.cfg.sweep_interval,
                    idle_seconds=self.cfg.stuck_after + max(self.cfg.retry_ladder),
                    limit=self.cfg.sweep_batch,
                    bank=self.bank,
                    reconcile_interval=self.cfg.reconcile_interval,
                    reconcile_rate=self.cfg.reconcile_rate,
                    reconcile_limit=self.cfg.reconcile_limit,
                )
            )
        log.info(
            "worker started",
            worker_id=self.worker_id,
            concurrency=self.cfg.concurrency,
            prefetch=self.cfg.prefetch,
            retry_ladder=list(self.cfg.retry_ladder),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop consuming, let the messages being handled finish (up to `grace` s), close."""
        self._stopping = True
        grace = self.cfg.lease_seconds if grace is None else grace
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
        self._stop_sweeper.set()
        if self._sweeper is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._sweeper, 10)
        if self.connection is not None:
            await self.connection.close()  # unacked messages go back to the queue
        if self.bank is not None:
            await self.bank.close()
        if self.pool is not None:
            await self.pool.close()
        log.info("worker stopped", worker_id=self.worker_id)

    # ---- one message ----------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        async with self._sem:
            if self._stopping:
                return  # not acked: back to the queue when the channel closes
            await self.handle(message)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        operation_id = _operation_id(message.body)
        with logs.bound(operation_id=operation_id, message_id=message.message_id):
            try:
                if operation_id is None:
                    log.error("unreadable command sent to the dead-letter queue")
                    await self._publish_dead(
                        message.body,
                        {
                            "last_error": orjson.dumps(
                                _error("bad_message", 'the command body is not {"operation_id": ...}')
                            ).decode()
                        },
                    )
                    await message.ack()
                else:
                    await self._process(message, operation_id)
            except Exception:
                # The database or the broker failed us mid-way: nothing was acked, so the
                # command comes back (a lease we hold is ours again on the next claim).
                log.exception("handling failed; the command goes back to the queue")
                await asyncio.sleep(1.0)
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)

    async def _process(self, message: AbstractIncomingMessage, operation_id: str) -> None:
        headers = message.headers or {}
        retries = _int(headers.get(topology.RETRIES_HEADER))
        force = headers.get(topology.FORCE_HEADER) in (True, "true", "1", 1)
        # The lease belongs to this handling of this message, not to the process: a
        # duplicate of the command arriving here while our bank call runs must wait.
        owner = f"{self.worker_id}/{uuid.uuid4().hex[:8]}"
        got = await payments.claim(self.pool, operation_id, owner, self.cfg.lease_seconds)
        if not isinstance(got, payments.Claim):
            await self._not_claimed(message, operation_id, got, retries, force)
            return
        claim = got
        logs.bind(payment_id=claim.payment_id, operation_kind=claim.kind.value)

        if claim.kind is OperationKind.AUTHORIZE and not force and self._key_too_old(claim):
            await self._park(
                message,
                claim,
                _error(
                    "bank_key_expired",
                    "the first authorization attempt is older than the bank remembers idempotency keys; "
                    "a resend could place a second hold: check the bank, then replay with --force",
                ),
                retries,
            )
            return
        try:
            call = self._call(claim)
        except (VaultError, ValueError) as exc:
            await self._park(message, claim, _error("cannot_build_request", str(exc)), retries)
            return

        run = await self._attempts(claim, call)
        if run.lost is not None:
            await self._not_claimed(message, operation_id, run.lost, retries, force)
            return
        if run.uncertain:
            outcome = run.outcome
            await self._park(
                message,
                claim,
                _error(
                    "bank_outcome_uncertain",
                    f"the bank answers {outcome.code} and does not replay an answer for our key: "
                    "we cannot tell whether the money moved; check the bank before replaying",
                ),
                retries,
                bank_ms=run.bank_ms,
                attempts=run.attempts,
            )
            return
        if domain.is_final(run.verdict):
            crash_point("worker.after_bank")
            await payments.record_outcome(self.pool, operation_id, run.verdict, run.outcome, run.bank_ms)
            log.info("operation settled", verdict=run.verdict.value, bank_ms=run.bank_ms, code=run.outcome.code)
            crash_point("worker.after_record")
            await message.ack()
            return
        await self._retry_later(
            message, claim, domain.error_for(run.outcome), retries, force, run.bank_ms, run.attempts
        )

    def _key_too_old(self, claim: payments.Claim) -> bool:
        age = timedelta(hours=self.cfg.authorize_key_max_age_hours)
        return claim.first_attempt_at is not None and claim.first_attempt_at < now() - age

    def _call(self, claim: payments.Claim) -> Callable[[], Awaitable[BankOutcome]]:
        """The bank request for this operation; the card stays inside the closure."""
        bank, key, kind = self.bank, claim.bank_key, claim.kind
        if kind is OperationKind.AUTHORIZE:
            if claim.sealed_card is None or self.vault is None:
                raise ValueError("the card of this authorization is not in the vault (or no CARD_ENCRYPTION_KEY)")
            number, cvv = self.vault.open(claim.payment_id, claim.sealed_card)
            return lambda: bank.authorize(
                key,
                card_number=number,
                cvv=cvv,
                expiry_month=claim.card_expiry_month,
                expiry_year=claim.card_expiry_year,
                amount=claim.amount,
            )
        if kind is OperationKind.REFUND:
            if not claim.capture_id:
                raise ValueError("the payment has no capture_id to refund")
            return lambda: bank.refund(key, capture_id=claim.capture_id, amount=claim.amount)
        if not claim.authorization_id:
            raise ValueError("the payment has no authorization_id")
        if kind is OperationKind.CAPTURE:
            return lambda: bank.capture(key, authorization_id=claim.authorization_id, amount=claim.amount)
        return lambda: bank.void(key, authorization_id=claim.authorization_id)  # VOID and RELEASE

    async def _attempts(self, claim: payments.Claim, call: Callable[[], Awaitable[BankOutcome]]) -> _Run:
        """Up to WORKER_QUICK_RETRIES sequential tries, each under a freshly renewed lease."""
        run = _Run(attempts=claim.attempts)
        tries = 0

        async def renew() -> bool:
            got = await payments.claim(self.pool, claim.operation_id, claim.owner, self.cfg.lease_seconds)
            if isinstance(got, payments.Claim):
                run.attempts = got.attempts
                return True
            run.lost = got
            return False

        async def timed() -> BankOutcome:
            started = time.monotonic()
            try:
                return await call()
            finally:
                run.bank_ms += int((time.monotonic() - started) * 1000)

        @backoff.on_predicate(
            backoff.expo,
            lambda r: r.verdict is Verdict.RETRY and r.lost is None,
            max_tries=self.cfg.quick_retries,
            factor=self.cfg.quick_retry_base,
            jitter=backoff.full_jitter,
            logger=None,
        )
        async def attempt() -> _Run:
            nonlocal tries
            tries += 1
            if tries > 1 and not await renew():  # the previous try is over: we have its answer
                return run
            run.outcome = await timed()
            run.verdict = domain.classify(claim.kind, run.outcome)
            if run.verdict is Verdict.CONFIRM:
                await self._confirm(claim, run, renew, timed)
            if run.verdict is Verdict.RETRY:
                log.info(
                    "bank try failed",
                    outcome=run.outcome.kind,
                    http_status=run.outcome.http_status,
                    code=run.outcome.code,
                    try_number=tries,
                )
            return run

        return await attempt()

    async def _confirm(self, claim, run: _Run, renew, timed) -> None:
        """ "Already done": maybe our own earlier try whose answer was lost. Ask again, same key."""
        log.info("bank says already done; asking again with the same key", code=run.outcome.code)
        await asyncio.sleep(self.cfg.confirm_delay)
        if not await renew():
            return
        run.outcome = await timed()
        run.verdict = domain.classify(claim.kind, run.outcome)
        if run.verdict is Verdict.CONFIRM:
            run.uncertain = True

    # ---- the ways a message leaves ----------------------------------------------------------

    async def _not_claimed(
        self,
        message: AbstractIncomingMessage,
        operation_id: str,
        state: payments.OperationState,
        retries: int,
        force: bool,
    ) -> None:
        if not state.exists:
            log.warning("command for an unknown operation dropped")
        elif state.finished:
            log.debug("operation already finished; duplicate command dropped")
        elif state.parked:
            # Parked (waiting for ops): make sure the dead-letter queue has it, in case the
            # publish after park() was the step that failed; ops dedupe on operation_id.
            await self._publish_dead(
                message.body,
                _dead_headers(operation_id, state.payment_id, state.kind, state.attempts, state.last_error, retries),
            )
        else:
            # Leased by another worker whose bank call may still be running: come back once
            # the lease can have run out. Not an attempt, so the rung count stays.
            delay = topology.rung_for(self.cfg.retry_ladder, state.lease_left)
            log.info("operation leased by another worker; retrying later", lease_left=state.lease_left, delay=delay)
            await self._publish_retry(message.body, state.kind, delay, retries, force)
        await message.ack()

    async def _retry_later(
        self,
        message: AbstractIncomingMessage,
        claim: payments.Claim,
        error: dict,
        retries: int,
        force: bool,
        bank_ms: int,
        attempts: int,
    ) -> None:
        if retries >= len(self.cfg.retry_ladder):
            await self._park(message, claim, error, retries, bank_ms=bank_ms, attempts=attempts)
            return
        await payments.release(self.pool, claim.operation_id, claim.owner, error, bank_ms)
        delay = self.cfg.retry_ladder[retries]
        await self._publish_retry(message.body, claim.kind.value, delay, retries + 1, force)
        log.info("bank attempts failed; retrying later", delay=delay, rung=retries + 1, error_code=error["code"])
        await message.ack()

    async def _park(
        self,
        message: AbstractIncomingMessage,
        claim: payments.Claim,
        error: dict,
        retries: int,
        bank_ms: int = 0,
        attempts: int | None = None,
    ) -> None:
        attempts = claim.attempts if attempts is None else attempts
        if bank_ms:
            await payments.release(self.pool, claim.operation_id, claim.owner, error, bank_ms)
        payment = await payments.park(self.pool, claim.operation_id, error)
        if payment is not None:
            await self._publish_dead(
                message.body,
                _dead_headers(claim.operation_id, claim.payment_id, claim.kind.value, attempts, error, retries),
            )
            log.error("operation parked for ops", error_code=error["code"], attempts=attempts)
        await message.ack()

    async def _publish_retry(self, body: bytes, kind: str, delay: int, retries: int, force: bool) -> None:
        headers = {topology.RETRIES_HEADER: retries, topology.RETRY_QUEUE_HEADER: topology.retry_queue_name(delay)}
        if force:
            headers[topology.FORCE_HEADER] = True
        await self._retry_exchange.publish(
            _message(body, headers), routing_key=kind, mandatory=True, timeout=PUBLISH_TIMEOUT
        )

    async def _publish_dead(self, body: bytes, headers: dict) -> None:
        await self._publish_channel.default_exchange.publish(
            _message(body, headers), routing_key=topology.DEAD_QUEUE, mandatory=True, timeout=PUBLISH_TIMEOUT
        )


def _message(body: bytes, headers: dict) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        headers=headers,
        message_id=messages.new_id("cmd"),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _dead_headers(
    operation_id: str, payment_id: str, kind: str, attempts: int, error: dict | None, retries: int
) -> dict:
    return {
        "operation_id": operation_id,
        "payment_id": payment_id,
        "kind": kind,
        "attempts": attempts,
        "last_error": orjson.dumps(error).decode(),
        topology.RETRIES_HEADER: retries,
        "parked_at": now().isoformat(),
    }


def _operation_id(body: bytes) -> str | None:
    try:
        operation_id = orjson.loads(body)["operation_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    return operation_id if isinstance(operation_id, str) and operation_id else None


def _int(value) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


# ---- the process --------------------------------------------------------------------------


async def serve() -> None:
    settings = config.load(need_card_key=True)
    cfg = wsettings.load(wsettings.parse_worker)
    logs.setup(settings.log_level, "gateway-worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings, cfg)
    attempt = 0
    while not stop.is_set():
        try:
            await worker.start()
            break
        except Exception as exc:  # database or broker not up yet
            attempt += 1
            log.warning("worker cannot start yet", error=type(exc).__name__, detail=str(exc)[:200], attempt=attempt)
            await worker.stop(grace=0)
            worker = Worker(settings, cfg)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), min(30.0, 0.5 * 2 ** min(attempt, 10)))
    else:
        return
    await stop.wait()
    log.info("stopping: no new messages, finishing those in flight")
    await worker.stop()


def _parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="gateway-worker",
        description="Consume payments.work: call the bank for each operation and record the outcome; "
        "also sweeps stuck operations and lapsed holds.",
        epilog=wsettings.epilog(wsettings.WORKER_VARS) + "; BANK_URL and CARD_ENCRYPTION_KEY (required).",
    )


def main(argv: list[str] | None = None) -> int:
    _parser().parse_args(argv)
    from worker.relay import run_loop

    run_loop(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
