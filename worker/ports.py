"""What the worker's per-message policy (worker/handling.py) runs against: the bank, the
worker's atomic phases of gateway.payments, and the broker's side of one delivered command.
Small protocols, so that the policy runs as well against fakes (tests/unit/test_handling.py)
as against worker.bank.BankClient, worker/payments.py's pool adapter and worker/consumer.py's
aio-pika one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gateway import domain
from gateway.domain import BankOutcome, Verdict
from gateway.payments.settlement import Claim, OperationState
from gateway.store import AttemptReport


class Bank(Protocol):
    """The bank calls the worker makes (worker.bank.BankClient)."""

    async def authorize(
        self, key: str, *, card_number: str, cvv: str, expiry_month: int, expiry_year: int, amount: int
    ) -> BankOutcome: ...

    async def capture(self, key: str, *, authorization_id: str, amount: int) -> BankOutcome: ...

    async def void(self, key: str, *, authorization_id: str) -> BankOutcome: ...

    async def refund(self, key: str, *, capture_id: str, amount: int) -> BankOutcome: ...

    async def health(self) -> bool: ...


class Payments(Protocol):
    """The worker's atomic phases of gateway.payments, on the worker's pool."""

    async def claim(self, operation_id: str, owner: str, lease_seconds: float) -> Claim | OperationState: ...

    async def release(
        self,
        operation_id: str,
        owner: str,
        error: dict | None,
        bank_ms: int,
        report: AttemptReport,
        *,
        rung_taken: bool = False,
    ) -> None: ...

    async def note(self, operation_id: str, owner: str, report: AttemptReport) -> None:
        """Record what the lease holder learnt of its latest attempts, keeping the lease."""
        ...

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
        """Record a final answer with the doubt it leaves, which settlement decides from the
        earlier attempts whose outcome we never learnt (`unknown_before`, `lost`); the doubt
        recorded. Raises CannotRecord when the outcome cannot be stored for a reason of its own
        (not because the database is away)."""
        ...

    async def proves_own_work(self, claim: Claim, refusal: BankOutcome, *, unknown_before: int) -> bool:
        """Whether "already done", answered again to our key, is provably our own earlier work."""
        ...

    async def record_own_work(self, claim: Claim, refusal: BankOutcome, bank_ms: int) -> domain.Doubt | None:
        """Record work proven our own as a success whose bank reference is unknown; the doubt
        recorded. Raises CannotRecord as record_outcome does."""
        ...

    async def park(self, operation_id: str, error: dict) -> dict | None: ...


class CannotRecord(Exception):
    """The bank's answer could not be stored, and trying again at once will not help."""


class Delivery(Protocol):
    """The broker's side of one delivered command. A handling ends with ack() (after any
    publish it needed, confirmed), requeue(), or nothing at all when the worker stops (the
    command goes back to the queue when the channel closes)."""

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def deliveries(self) -> int:
        """How often the broker has delivered this very message (1 the first time), as the
        broker counts it."""
        ...

    async def ack(self) -> None: ...

    async def requeue(self) -> None: ...

    async def retry_later(self, delay: int, kind: str | None, rung: int | None) -> None:
        """The same command into the retry queue of `delay` seconds; it comes back with the
        routing key `kind` (None: the one it was delivered with). `rung`: the ladder's rung this
        is (counted in the metrics), None for a wait that is not one."""
        ...

    async def dead_letter(self, headers: dict[str, Any]) -> None:
        """The same command into payments.dead with these headers (for ops)."""
        ...
