"""Pure, synchronous state of the mock bank: the accounts and the books (authorizations,
captures, voids, refunds), with the idempotency memory (mockbank.idempotency) that a reset
clears too. The cards are mockbank.cards.

Nothing in this module awaits. The HTTP layer (``mockbank.server``) calls one
method per operation, and each method checks and mutates the books in one go,
so on a single event loop every operation is atomic with respect to every other
one: a balance check and the matching balance change can never be separated by
another request. That is what keeps per-account consistency under 1000+
concurrent requests without any lock held across the injected latency.

Operations return ``(http_status, body_dict)``. Business errors are returned
(not raised) as ``(400|402|404, {"error": CODE, "message": TEXT})``.

Validation order (first failing check wins)
-------------------------------------------
Authorize (POST /api/v1/authorizations):

1. ``card_number`` is a string of 13-19 ASCII digits passing the Luhn check
   -> else 400 ``invalid_card``
2. ``expiry_month`` is an int 1-12 and ``expiry_year`` an int 2024-2099
   (format only: they are never compared with the stored expiry)
   -> else 400 ``invalid_card`` (the contract has no dedicated code)
3. ``cvv`` is a string of 3-4 ASCII digits -> else 400 ``invalid_cvv``
4. ``amount`` is an int >= 1 (JSON booleans and floats are not ints)
   -> else 400 ``invalid_amount``
5. the card exists among the accounts -> else 400 ``invalid_card``
6. the CVV matches the account's CVV -> else 400 ``invalid_cvv``
7. the account's STORED expiry (valid through the end of its month, UTC) is
   not past -> else 400 ``card_expired``
8. the available balance covers the amount -> else 402 ``insufficient_funds``

   Success: a hold is placed (available -= amount), 200.

Capture (POST /api/v1/captures):

1. ``authorization_id`` is a string -> else 400 ``authorization_not_found``
2. ``amount`` is an int >= 1 -> else 400 ``invalid_amount``
3. the authorization exists -> else 400 ``authorization_not_found``
4. it is open (not captured, not voided) -> else 400 ``authorization_already_used``
5. it is not past ``expires_at`` -> else 400 ``authorization_expired``
6. ``amount`` equals the authorized amount -> else 400 ``amount_mismatch``

   Success: balance -= amount, the hold is consumed (available unchanged), 200.

Void (POST /api/v1/voids):

1. ``authorization_id`` is a string -> else 400 ``authorization_not_found``
2. the authorization exists -> else 400 ``authorization_not_found``
3. it is open -> else 400 ``authorization_already_used`` (captured or voided)
   (an expired but open hold CAN be voided)

   Success: the hold is released (available += amount), 200.

Refund (POST /api/v1/refunds):

1. ``capture_id`` is a string -> else 400 ``capture_not_found``
2. ``amount`` is an int >= 1 -> else 400 ``invalid_amount``
3. the capture exists -> else 400 ``capture_not_found``
4. ``amount`` equals the captured amount -> else 400 ``amount_mismatch``
5. the capture has not been refunded -> else 400 ``already_refunded``

   Success: balance += amount and available += amount, 200.

The codes ``already_captured`` and ``already_voided`` are in the contract's
list but its rules map those situations to ``authorization_already_used``;
the mock follows the rules and only emits them when told to through
``POST /_mock/faults``.

An expired hold is NOT released by itself: it keeps reducing the available
balance until it is voided (the contract's void rule releases it).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from mockbank.cards import TEST_ACCOUNTS, card_brand, extra_card, luhn_valid
from mockbank.idempotency import IdempotencyStore

CURRENCY = "USD"

Result = tuple[int, dict[str, Any]]


# --------------------------------------------------------------------- helpers
def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(dt: datetime) -> str:
    """RFC 3339 UTC timestamp with microseconds and a 'Z' suffix."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_digits(value: object, lo: int, hi: int) -> TypeGuard[str]:
    return isinstance(value, str) and lo <= len(value) <= hi and value.isascii() and value.isdigit()


def _error(status: int, code: str, message: str) -> Result:
    return status, {"error": code, "message": message}


# ----------------------------------------------------------------------- model
@dataclass
class Account:
    account_id: str
    card_number: str
    cvv: str
    expiry_month: int
    expiry_year: int
    initial_balance: int
    kind: str  # "test" or "extra"
    balance: int = 0
    available: int = 0

    @property
    def last4(self) -> str:
        return self.card_number[-4:]

    def expired(self, now: datetime) -> bool:
        # A card is valid through the last day of its expiry month.
        return (self.expiry_year, self.expiry_month) < (now.year, now.month)

    def reset(self) -> None:
        self.balance = self.initial_balance
        self.available = self.initial_balance

    def public(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id,
            "kind": self.kind,
            "card_last4": self.last4,
            "brand": card_brand(self.card_number),
            "expiry_month": self.expiry_month,
            "expiry_year": self.expiry_year,
            "balance": self.balance,
            "available": self.available,
            "held": self.balance - self.available,
        }


@dataclass
class Authorization:
    authorization_id: str
    account: Account
    amount: int
    created_at: datetime
    expires_at: datetime
    idempotency_key: str | None
    status: str = "open"  # open | captured | voided
    capture_id: str | None = None
    void_id: str | None = None

    def response(self) -> dict[str, Any]:
        return {
            "authorization_id": self.authorization_id,
            "status": "approved",
            "amount": self.amount,
            "currency": CURRENCY,
            "expires_at": rfc3339(self.expires_at),
            "created_at": rfc3339(self.created_at),
        }

    def ledger(self, now: datetime) -> dict[str, Any]:
        return {
            "authorization_id": self.authorization_id,
            "account_id": self.account.account_id,
            "card_last4": self.account.last4,
            "amount": self.amount,
            "currency": CURRENCY,
            "status": self.status,
            "expired": now >= self.expires_at,
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "idempotency_key": self.idempotency_key,
            "capture_id": self.capture_id,
            "void_id": self.void_id,
        }


@dataclass
class Capture:
    capture_id: str
    authorization: Authorization
    amount: int
    captured_at: datetime
    idempotency_key: str | None
    refund_id: str | None = None

    def response(self) -> dict[str, Any]:
        return {
            "capture_id": self.capture_id,
            "authorization_id": self.authorization.authorization_id,
            "status": "captured",
            "amount": self.amount,
            "currency": CURRENCY,
            "captured_at": rfc3339(self.captured_at),
        }

    def ledger(self) -> dict[str, Any]:
        return {
            "capture_id": self.capture_id,
            "authorization_id": self.authorization.authorization_id,
            "account_id": self.authorization.account.account_id,
            "amount": self.amount,
            "currency": CURRENCY,
            "captured_at": rfc3339(self.captured_at),
            "idempotency_key": self.idempotency_key,
            "refund_id": self.refund_id,
        }


@dataclass
class Void:
    void_id: str
    authorization: Authorization
    voided_at: datetime
    idempotency_key: str | None

    def response(self) -> dict[str, Any]:
        return {
            "void_id": self.void_id,
            "authorization_id": self.authorization.authorization_id,
            "status": "voided",
            "voided_at": rfc3339(self.voided_at),
        }

    def ledger(self) -> dict[str, Any]:
        return {
            "void_id": self.void_id,
            "authorization_id": self.authorization.authorization_id,
            "account_id": self.authorization.account.account_id,
            "amount": self.authorization.amount,
            "voided_at": rfc3339(self.voided_at),
            "idempotency_key": self.idempotency_key,
        }


@dataclass
class Refund:
    refund_id: str
    capture: Capture
    amount: int
    refunded_at: datetime
    idempotency_key: str | None

    def response(self) -> dict[str, Any]:
        return {
            "refund_id": self.refund_id,
            "capture_id": self.capture.capture_id,
            "status": "refunded",
            "amount": self.amount,
            "currency": CURRENCY,
            "refunded_at": rfc3339(self.refunded_at),
        }

    def ledger(self) -> dict[str, Any]:
        return {
            "refund_id": self.refund_id,
            "capture_id": self.capture.capture_id,
            "authorization_id": self.capture.authorization.authorization_id,
            "account_id": self.capture.authorization.account.account_id,
            "amount": self.amount,
            "currency": CURRENCY,
            "refunded_at": rfc3339(self.refunded_at),
            "idempotency_key": self.idempotency_key,
        }


# ------------------------------------------------------------------------ bank
class Bank:
    """Accounts and books. Every public method is synchronous and atomic."""

    def __init__(
        self,
        *,
        auth_expiry_hours: float = 168.0,
        extra_accounts: int = 0,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.auth_expiry_hours = auth_expiry_hours
        self.now = now
        self.accounts: list[Account] = []
        self.by_number: dict[str, Account] = {}
        for acct_id, number, cvv, month, year, balance, _use in TEST_ACCOUNTS:
            self._add(Account(acct_id, number, cvv, month, year, balance, "test"))
        for i in range(extra_accounts):
            c = extra_card(i)
            self._add(
                Account(
                    c["account_id"],
                    c["card_number"],
                    c["cvv"],
                    c["expiry_month"],
                    c["expiry_year"],
                    c["balance"],
                    "extra",
                )
            )
        self.idempotency = IdempotencyStore()
        self.reset()

    def _add(self, account: Account) -> None:
        assert account.card_number not in self.by_number
        self.accounts.append(account)
        self.by_number[account.card_number] = account

    def reset(self) -> None:
        """Back to the initial balances, empty books, nothing remembered."""
        for account in self.accounts:
            account.reset()
        self.authorizations: dict[str, Authorization] = {}
        self.captures: dict[str, Capture] = {}
        self.voids: dict[str, Void] = {}
        self.refunds: dict[str, Refund] = {}
        self.idempotency.forget_all()

    # ------------------------------------------------------------- operations
    def authorize(self, body: dict[str, Any], idempotency_key: str | None = None) -> Result:
        number = body.get("card_number")
        if not _is_digits(number, 13, 19):
            return _error(400, "invalid_card", "card_number must be a string of 13-19 digits")
        if not luhn_valid(number):
            return _error(400, "invalid_card", "card_number fails the Luhn check")
        month, year = body.get("expiry_month"), body.get("expiry_year")
        if not (_is_int(month) and 1 <= month <= 12):
            return _error(400, "invalid_card", "expiry_month must be an integer 1-12")
        if not (_is_int(year) and 2024 <= year <= 2099):
            return _error(400, "invalid_card", "expiry_year must be an integer 2024-2099")
        cvv = body.get("cvv")
        if not _is_digits(cvv, 3, 4):
            return _error(400, "invalid_cvv", "cvv must be a string of 3-4 digits")
        amount = body.get("amount")
        if not (_is_int(amount) and amount >= 1):
            return _error(400, "invalid_amount", "amount must be an integer number of cents >= 1")

        account = self.by_number.get(number)
        if account is None:
            return _error(400, "invalid_card", "card not found")
        if cvv != account.cvv:
            return _error(400, "invalid_cvv", "cvv does not match")
        now = self.now()
        if account.expired(now):
            return _error(400, "card_expired", "card has expired")
        if account.available < amount:
            return _error(402, "insufficient_funds", "insufficient funds")

        account.available -= amount
        auth = Authorization(
            authorization_id=f"auth_{uuid.uuid4()}",
            account=account,
            amount=amount,
            created_at=now,
            expires_at=now + timedelta(hours=self.auth_expiry_hours),
            idempotency_key=idempotency_key,
        )
        self.authorizations[auth.authorization_id] = auth
        return 200, auth.response()

    def capture(self, body: dict[str, Any], idempotency_key: str | None = None) -> Result:
        auth_id = body.get("authorization_id")
        if not isinstance(auth_id, str):
            return _error(400, "authorization_not_found", "authorization_id is required")
        amount = body.get("amount")
        if not (_is_int(amount) and amount >= 1):
            return _error(400, "invalid_amount", "amount must be an integer number of cents >= 1")
        auth = self.authorizations.get(auth_id)
        if auth is None:
            return _error(400, "authorization_not_found", "authorization not found")
        if auth.status != "open":
            return _error(400, "authorization_already_used", f"authorization is already {auth.status}")
        now = self.now()
        if now >= auth.expires_at:
            return _error(400, "authorization_expired", "authorization has expired")
        if amount != auth.amount:
            return _error(400, "amount_mismatch", "amount must equal the authorized amount")

        auth.account.balance -= amount  # the hold is consumed: available unchanged
        cap = Capture(f"cap_{uuid.uuid4()}", auth, amount, now, idempotency_key)
        auth.status = "captured"
        auth.capture_id = cap.capture_id
        self.captures[cap.capture_id] = cap
        return 200, cap.response()

    def void(self, body: dict[str, Any], idempotency_key: str | None = None) -> Result:
        auth_id = body.get("authorization_id")
        if not isinstance(auth_id, str):
            return _error(400, "authorization_not_found", "authorization_id is required")
        auth = self.authorizations.get(auth_id)
        if auth is None:
            return _error(400, "authorization_not_found", "authorization not found")
        if auth.status != "open":
            return _error(400, "authorization_already_used", f"authorization is already {auth.status}")

        auth.account.available += auth.amount
        void = Void(f"void_{uuid.uuid4()}", auth, self.now(), idempotency_key)
        auth.status = "voided"
        auth.void_id = void.void_id
        self.voids[void.void_id] = void
        return 200, void.response()

    def refund(self, body: dict[str, Any], idempotency_key: str | None = None) -> Result:
        cap_id = body.get("capture_id")
        if not isinstance(cap_id, str):
            return _error(400, "capture_not_found", "capture_id is required")
        amount = body.get("amount")
        if not (_is_int(amount) and amount >= 1):
            return _error(400, "invalid_amount", "amount must be an integer number of cents >= 1")
        cap = self.captures.get(cap_id)
        if cap is None:
            return _error(400, "capture_not_found", "capture not found")
        if amount != cap.amount:
            return _error(400, "amount_mismatch", "amount must equal the captured amount")
        if cap.refund_id is not None:
            return _error(400, "already_refunded", "capture has already been refunded")

        account = cap.authorization.account
        account.balance += amount
        account.available += amount
        ref = Refund(f"ref_{uuid.uuid4()}", cap, amount, self.now(), idempotency_key)
        cap.refund_id = ref.refund_id
        self.refunds[ref.refund_id] = ref
        return 200, ref.response()

    # ------------------------------------------- accounts an operation locks
    # Each returns the account_id whose row the operation would lock, or None
    # when the request names nothing that exists (the operation will refuse it).
    def card_account(self, body: dict[str, Any]) -> str | None:
        number = body.get("card_number")
        account = self.by_number.get(number) if isinstance(number, str) else None
        return account.account_id if account is not None else None

    def authorization_account(self, body: dict[str, Any]) -> str | None:
        auth_id = body.get("authorization_id")
        auth = self.authorizations.get(auth_id) if isinstance(auth_id, str) else None
        return auth.account.account_id if auth is not None else None

    def capture_account(self, body: dict[str, Any]) -> str | None:
        cap_id = body.get("capture_id")
        cap = self.captures.get(cap_id) if isinstance(cap_id, str) else None
        return cap.authorization.account.account_id if cap is not None else None

    # ------------------------------------------------------------------ reads
    def get_authorization(self, auth_id: str) -> Result:
        auth = self.authorizations.get(auth_id)
        if auth is None:
            return _error(404, "not_found", "authorization not found")
        return 200, auth.response()

    def get_capture(self, cap_id: str) -> Result:
        cap = self.captures.get(cap_id)
        if cap is None:
            return _error(404, "not_found", "capture not found")
        return 200, cap.response()

    def get_refund(self, ref_id: str) -> Result:
        ref = self.refunds.get(ref_id)
        if ref is None:
            return _error(404, "not_found", "refund not found")
        return 200, ref.response()

    # ----------------------------------------------------------------- mock ops
    def expire_authorization(self, auth_id: str) -> dict[str, Any] | None:
        """Move expires_at of an authorization one second into the past."""
        auth = self.authorizations.get(auth_id)
        if auth is None:
            return None
        now = self.now()
        auth.expires_at = min(auth.expires_at, now - timedelta(seconds=1))
        return auth.ledger(now)

    def ledger(self, accounts: str = "all") -> dict[str, Any]:
        """Snapshot of the books; card numbers appear as last4 only."""
        now = self.now()
        if accounts == "touched":
            touched = {a.account.account_id for a in self.authorizations.values()}
            accts = [a for a in self.accounts if a.kind == "test" or a.account_id in touched]
        else:
            accts = self.accounts
        return {
            "now": rfc3339(now),
            "accounts": [a.public() for a in accts],
            "authorizations": [a.ledger(now) for a in self.authorizations.values()],
            "captures": [c.ledger() for c in self.captures.values()],
            "voids": [v.ledger() for v in self.voids.values()],
            "refunds": [r.ledger() for r in self.refunds.values()],
            "idempotency_entries": len(self.idempotency),
        }

    def account_listing(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Full test card data (numbers and CVVs) for load generators."""
        end = None if limit is None else offset + limit
        out = []
        for a in self.accounts[offset:end]:
            entry = a.public()
            entry.update(card_number=a.card_number, cvv=a.cvv)
            out.append(entry)
        return out
