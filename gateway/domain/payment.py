"""A payment as the gateway keeps it: the frozen value a store row is read into, and what
becomes of it when it enters a status.

One type wherever a payment travels (the API's replies, events, the console, the long polls'
wake-ups); gateway.views turns it into the receipt FicMart reads (docs/api.md). Pure Python,
no I/O, like the rest of gateway.domain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from gateway.domain.states import BANK_REFERENCES, Status


class Row(Protocol):
    """A payments row as the store returns it (an asyncpg.Record) or a dict with its columns."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A status the payment entered, and when."""

    status: Status
    at: datetime


@dataclass(frozen=True, slots=True)
class Payment:
    """One payment: its order, the card's public details, the bank's references, and every
    status it entered. Field names are the payments table's columns."""

    id: str
    order_id: str
    customer_id: str
    amount: int  # cents
    currency: str
    status: Status
    card_brand: str
    card_last4: str
    card_expiry_month: int
    card_expiry_year: int
    authorization_id: str | None
    authorization_expires_at: datetime | None
    capture_id: str | None
    void_id: str | None
    refund_id: str | None
    last_error: dict[str, Any] | None  # code, message, retryable (gateway.domain.outcomes.error_for)
    attention_required: bool
    created_at: datetime
    updated_at: datetime
    history: tuple[HistoryEntry, ...]  # oldest first; a row that left the status as it was is not one

    @classmethod
    def from_row(cls, row: Row) -> Payment:
        """The payment of a payments row with its `history`: the entries payment_history_json
        (schema.sql) builds, each `status` and `at` in the receipt's own format."""
        return cls(
            id=row["id"],
            order_id=row["order_id"],
            customer_id=row["customer_id"],
            amount=row["amount"],
            currency=row["currency"],
            status=Status(row["status"]),
            card_brand=row["card_brand"],
            card_last4=row["card_last4"],
            card_expiry_month=row["card_expiry_month"],
            card_expiry_year=row["card_expiry_year"],
            authorization_id=row["authorization_id"],
            authorization_expires_at=row["authorization_expires_at"],
            capture_id=row["capture_id"],
            void_id=row["void_id"],
            refund_id=row["refund_id"],
            last_error=row["last_error"],
            attention_required=row["attention_required"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            history=tuple(
                HistoryEntry(Status(entry["status"]), datetime.fromisoformat(entry["at"])) for entry in row["history"]
            ),
        )

    @classmethod
    def pending(
        cls,
        *,
        id: str,
        order_id: str,
        customer_id: str,
        amount: int,
        card_brand: str,
        card_last4: str,
        card_expiry_month: int,
        card_expiry_year: int,
        at: datetime,
    ) -> Payment:
        """A new payment as an authorization records it at `at`: pending, nothing at the bank yet."""
        return cls(
            id=id,
            order_id=order_id,
            customer_id=customer_id,
            amount=amount,
            currency="USD",
            status=Status.PENDING,
            card_brand=card_brand,
            card_last4=card_last4,
            card_expiry_month=card_expiry_month,
            card_expiry_year=card_expiry_year,
            authorization_id=None,
            authorization_expires_at=None,
            capture_id=None,
            void_id=None,
            refund_id=None,
            last_error=None,
            attention_required=False,
            created_at=at,
            updated_at=at,
            history=(HistoryEntry(Status.PENDING, at),),
        )

    @property
    def references(self) -> dict[str, str | None]:
        """The bank references (BANK_REFERENCES' names) and their values: what a request's bank
        call is sent with (gateway.domain.start) and what ops may record."""
        return {name: getattr(self, name) for name in BANK_REFERENCES}

    def entering(self, status: Status, at: datetime, **changes: Any) -> Payment:
        """The payment once `status` is entered at `at`, with `changes` to its other fields: its
        history gains an entry only when the status moves, as payment_history_json reads it."""
        history = self.history if status is self.status else (*self.history, HistoryEntry(status, at))
        return replace(self, **changes, status=status, updated_at=at, history=history)
