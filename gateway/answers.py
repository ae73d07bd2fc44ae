"""The bank's answers checked against what was asked, before anything is believed.

Pure Python, no I/O. A 2xx is success only if it is the contract's answer to
OUR request: the status the call promises, our amount in USD, a new id of the
right shape (prefix + lowercase UUID), and the reference we sent (a capture
names our authorization, a refund our capture). Anything else is the bank
malfunctioning: the caller treats it as a failed attempt (retried, then
parked for a human), never as success.

Only the fields the gateway uses are kept from a body, so whatever else a bank
sends (an echoed card number, a 5 MB id, a field of its own) is never stored.
Error codes outside the contract become `unknown_bank_error`. What the bank
says beside its code (and a code outside the contract) is kept for ops only,
stripped of unprintable characters, redacted and cut: a merchant sees our own
words for the code (domain.BANK_ERRORS), never the bank's free text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.domain import BANK_ERRORS, UNKNOWN_BANK_ERROR, is_bank_id
from gateway.redact import clean
from gateway.timefmt import parse

KNOWN_ERRORS = frozenset(BANK_ERRORS)
_MAX_CODE = 64
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class Asked:
    """What one bank call asked for: the facts its answer must repeat."""

    call: str  # authorize, capture, void, refund, get_authorization, get_capture, get_refund
    amount: int | None = None
    authorization_id: str | None = None
    capture_id: str | None = None
    refund_id: str | None = None


@dataclass(frozen=True)
class _Shape:
    new_id: str  # the field naming what the call created (or the GET looked up)
    prefix: str
    status: str | None  # the status a success carries (None: any of the contract's)
    money: bool  # amount and currency must be ours
    reference: str | None  # the field that must name what we sent
    keep: tuple[str, ...]  # further fields the gateway uses


_SHAPES = {
    "authorize": _Shape("authorization_id", "auth", "approved", True, None, ("expires_at",)),
    "capture": _Shape("capture_id", "cap", "captured", True, "authorization_id", ()),
    "void": _Shape("void_id", "void", "voided", False, "authorization_id", ()),
    "refund": _Shape("refund_id", "ref", "refunded", True, "capture_id", ()),
    # GETs (reconciliation): the object asked for, whose amount and links reconciliation compares.
    "get_authorization": _Shape("authorization_id", "auth", "approved", False, None, ("amount", "expires_at")),
    "get_capture": _Shape("capture_id", "cap", "captured", False, None, ("amount", "authorization_id")),
    "get_refund": _Shape("refund_id", "ref", "refunded", False, None, ("amount", "capture_id")),
}


class AnswerMismatch(ValueError):
    """A 2xx that is not the contract's answer to our request; the text says why (safe to store)."""


def check_success(asked: Asked, body: object) -> dict[str, Any]:
    """The fields the gateway keeps from a 2xx body, or AnswerMismatch."""
    if not isinstance(body, dict):
        raise AnswerMismatch("the body is not a JSON object")
    shape = _SHAPES[asked.call]
    kept: dict[str, Any] = {}
    new_id = body.get(shape.new_id)
    if not is_bank_id(new_id, f"{shape.prefix}_"):
        raise AnswerMismatch(f"{shape.new_id} is not {shape.prefix}_ followed by a lowercase UUID")
    looked_up = getattr(asked, shape.new_id) if asked.call.startswith("get_") else None
    if looked_up is not None and new_id != looked_up:
        raise AnswerMismatch(f"{shape.new_id} is not the one asked for")
    kept[shape.new_id] = new_id
    status = body.get("status")
    if status != shape.status:
        raise AnswerMismatch(f"status is {_quote(status)}, not {shape.status!r}")
    kept["status"] = status
    if shape.money:
        amount = body.get("amount")
        if type(amount) is not int or amount != asked.amount:
            raise AnswerMismatch(f"amount is {_quote(amount)}, not the {asked.amount} asked for")
        if body.get("currency") != "USD":
            raise AnswerMismatch(f"currency is {_quote(body.get('currency'))}, not 'USD'")
        kept["amount"], kept["currency"] = amount, "USD"
    if shape.reference is not None:
        reference = body.get(shape.reference)
        if reference != getattr(asked, shape.reference):
            raise AnswerMismatch(f"{shape.reference} is not the one sent")
        kept[shape.reference] = reference
    for name in shape.keep:
        kept[name] = _field(name, body.get(name))
    return kept


def _field(name: str, value: object) -> object:
    if name == "expires_at":
        if not isinstance(value, str):
            raise AnswerMismatch("expires_at is missing")
        try:
            at = parse(value)
        except ValueError:
            raise AnswerMismatch(f"expires_at is {_quote(value)}, not an RFC 3339 time") from None
        if at.tzinfo is None:
            raise AnswerMismatch("expires_at has no time zone")
        return value
    if name == "amount":
        if type(value) is not int:
            raise AnswerMismatch(f"amount is {_quote(value)}, not whole cents")
        return value
    # A link (authorization_id, capture_id) on a GET: its shape, not its value, is checked
    # here; whether it is ours is reconciliation's finding to make.
    prefix = "auth" if name == "authorization_id" else "cap"
    if not is_bank_id(value, f"{prefix}_"):
        raise AnswerMismatch(f"{name} is not {prefix}_ followed by a lowercase UUID")
    return value


def check_error(body: dict) -> tuple[str, dict[str, str]]:
    """(code, kept) of an error body `{"error": CODE, "message": TEXT}`: a contract code as it
    is, anything else `unknown_bank_error`. `kept` is the operation's bank_response, for ops:
    the code, the bank's own code when it is outside the contract, and its message."""
    raw = body.get("error")
    code = raw if isinstance(raw, str) and raw in KNOWN_ERRORS else UNKNOWN_BANK_ERROR
    kept = {"error": code}
    if code != raw:
        kept["bank_code"] = _quote(raw)
    said = body.get("message")
    if isinstance(said, str):
        kept["message"] = clean(said, _MAX_MESSAGE, printable=True)
    return code, kept


def _quote(value: object) -> str:
    """A value from the bank, fit to appear in an error text: short and redacted."""
    return clean(repr(value), _MAX_CODE)
