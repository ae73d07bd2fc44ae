"""What a bank answer means: the verdict on an operation, the status it settles the payment in,
the follow-up work it makes necessary, and the last_error a payment shows for it.

Pure Python, no I/O, like the rest of gateway.domain. Answers that prove less than they seem
(the bank forgot our key) are gateway.domain.doubts'.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.domain.states import OperationKind, Status


class Verdict(StrEnum):
    SUCCEEDED = "succeeded"
    REFUSED = "refused"  # a reason that will not go away: the payment returns or is declined
    EXPIRED = "expired"  # capture refused because the hold lapsed
    RETRY = "retry"  # transient: the same request with the same key may succeed later
    CONFIRM = "confirm"  # "already done": maybe by our own earlier attempt whose answer was lost


@dataclass(frozen=True)
class BankOutcome:
    """What came back from one bank call, before interpretation.

    kind is "ok" (a 2xx that answers our request, gateway.answers), "error"
    (4xx/5xx with a JSON error code), "timeout" (sent, no answer in time),
    "connection" (sent, the connection dropped), "unreachable" (no connection:
    never sent), "unparseable" (a body that is not JSON), "malformed" (a 2xx
    that does not answer our request; `message` says why), "redirect" (a 3xx,
    never followed) or "oversized" (a body past the client's bound, not read).
    `replayed` is the bank's X-Idempotent-Replayed: the answer remembered for
    our key, not a new execution. `body` is what is kept of the answer (the
    operation's bank_response): of a 2xx the fields the gateway uses, of an
    error the code and what the bank said, for ops (gateway.answers).
    """

    kind: str
    http_status: int | None = None
    code: str | None = None
    message: str | None = None
    body: dict | None = None
    replayed: bool = False


# Bank error codes that say the request itself can never succeed.
_REFUSALS: dict[OperationKind, frozenset[str]] = {
    OperationKind.AUTHORIZE: frozenset(
        {"invalid_card", "invalid_cvv", "invalid_amount", "card_expired", "insufficient_funds"}
    ),
    OperationKind.CAPTURE: frozenset({"authorization_not_found", "amount_mismatch", "invalid_amount"}),
    OperationKind.VOID: frozenset({"authorization_not_found"}),
    OperationKind.RELEASE: frozenset({"authorization_not_found"}),
    OperationKind.REFUND: frozenset({"capture_not_found", "amount_mismatch", "invalid_amount"}),
}

# Bank error codes that may mean our own earlier attempt already did the work.
ALREADY_DONE: dict[OperationKind, frozenset[str]] = {
    OperationKind.AUTHORIZE: frozenset(),
    OperationKind.CAPTURE: frozenset({"authorization_already_used", "already_captured"}),
    OperationKind.VOID: frozenset({"authorization_already_used", "already_voided"}),
    OperationKind.RELEASE: frozenset({"authorization_already_used", "already_voided"}),
    OperationKind.REFUND: frozenset({"already_refunded"}),
}


def classify(kind: OperationKind, outcome: BankOutcome) -> Verdict:
    """What one bank outcome means for an operation of `kind`."""
    if outcome.kind == "ok":
        return Verdict.SUCCEEDED
    if outcome.kind != "error" or outcome.http_status is None or outcome.http_status >= 500:
        return Verdict.RETRY
    code = outcome.code or ""
    if kind is OperationKind.CAPTURE and code == "authorization_expired":
        return Verdict.EXPIRED
    if code in _REFUSALS[kind]:
        return Verdict.REFUSED
    if code in ALREADY_DONE[kind]:
        return Verdict.CONFIRM
    # An error the contract does not list for this call: nothing proves the
    # work was not done, so never settle it as a refusal; retries end parked.
    return Verdict.RETRY


# (operation, verdict) -> the payment's status once the outcome is recorded.
_SETTLEMENTS: dict[tuple[OperationKind, Verdict], Status] = {
    (OperationKind.AUTHORIZE, Verdict.SUCCEEDED): Status.AUTHORIZED,
    (OperationKind.AUTHORIZE, Verdict.REFUSED): Status.DECLINED,
    (OperationKind.CAPTURE, Verdict.SUCCEEDED): Status.CAPTURED,
    (OperationKind.CAPTURE, Verdict.REFUSED): Status.AUTHORIZED,
    (OperationKind.CAPTURE, Verdict.EXPIRED): Status.EXPIRED,
    (OperationKind.VOID, Verdict.SUCCEEDED): Status.VOIDED,
    (OperationKind.VOID, Verdict.REFUSED): Status.AUTHORIZED,
    (OperationKind.REFUND, Verdict.SUCCEEDED): Status.REFUNDED,
    (OperationKind.REFUND, Verdict.REFUSED): Status.CAPTURED,
    (OperationKind.RELEASE, Verdict.SUCCEEDED): Status.EXPIRED,
    (OperationKind.RELEASE, Verdict.REFUSED): Status.EXPIRED,
}


def settle(kind: OperationKind, verdict: Verdict) -> Status:
    """The payment's status after a final verdict on an operation."""
    try:
        return _SETTLEMENTS[(kind, verdict)]
    except KeyError:
        raise ValueError(f"{verdict} is not a final verdict for {kind}") from None


def follow_up(kind: OperationKind, verdict: Verdict) -> OperationKind | None:
    """Bank work that a settled outcome makes necessary.

    A capture refused for an expired hold leaves the hold open at the bank
    (it keeps the customer's funds reserved), so it is released with a void.
    """
    if kind is OperationKind.CAPTURE and verdict is Verdict.EXPIRED:
        return OperationKind.RELEASE
    return None


def may_have_acted(outcome: BankOutcome) -> bool:
    """Could the bank have done the work although this attempt did not tell us so?

    A request never sent, a business refusal and the contract's 500 (which it
    answers WITHOUT doing anything) leave nothing behind; any other failure
    may hide work done: an answer lost on the way, or one we could not read.
    """
    if outcome.kind in ("ok", "unreachable"):
        return False
    if outcome.kind == "error" and outcome.http_status is not None and outcome.http_status < 500:
        return outcome.code == UNKNOWN_BANK_ERROR  # a refusal of the contract moved nothing
    if outcome.kind == "error":
        return outcome.code != "internal_error"
    return True


def is_final(verdict: Verdict) -> bool:
    return verdict in (Verdict.SUCCEEDED, Verdict.REFUSED, Verdict.EXPIRED)


# Every error code of docs/bank.md, and what it says in our own words: the message a
# payment's last_error shows beside the code. The bank's own text is free text from outside
# (it could say anything to a merchant); gateway.answers keeps it for ops only.
BANK_ERRORS: dict[str, str] = {
    "invalid_card": "the bank refused the card",
    "invalid_cvv": "the bank refused the card's security code",
    "invalid_amount": "the bank refused the amount",
    "card_expired": "the card has expired",
    "authorization_not_found": "the bank does not know the authorization",
    "authorization_expired": "the authorization has expired at the bank",
    "authorization_already_used": "the bank says the authorization was already captured or voided",
    "already_captured": "the bank says the authorization was already captured",
    "already_voided": "the bank says the authorization was already voided",
    "already_refunded": "the bank says the capture was already refunded",
    "amount_mismatch": "the bank says the amount differs from the one it holds",
    "capture_not_found": "the bank does not know the capture",
    "insufficient_funds": "the card has insufficient funds",
    "not_found": "the bank does not know what was asked for",
    "internal_error": "the bank failed to handle the request",
}
UNKNOWN_BANK_ERROR = "unknown_bank_error"  # a code outside docs/bank.md (gateway.answers)
_UNKNOWN_BANK_ERROR_TEXT = "the bank answered with an error code outside its contract"


def error_for(outcome: BankOutcome, kind: OperationKind | None = None) -> dict:
    """The `last_error` a payment shows for an outcome that was not a success.

    `retryable` follows classify() when the operation is known; otherwise a
    bank answer below 500 counts as a refusal.
    """
    if kind is not None:
        retryable = classify(kind, outcome) in (Verdict.RETRY, Verdict.CONFIRM)
    else:
        retryable = outcome.kind != "error" or outcome.http_status is None or outcome.http_status >= 500
    if outcome.kind == "error" and outcome.code:
        message = BANK_ERRORS.get(outcome.code, _UNKNOWN_BANK_ERROR_TEXT)
        return {"code": outcome.code, "message": message, "retryable": retryable}
    if outcome.kind == "malformed":
        return {
            "code": "bank_answer_invalid",
            "message": f"the bank's answer does not fit the request: {outcome.message}",
            "retryable": retryable,
        }
    messages = {
        "timeout": "the bank did not answer in time",
        "connection": "the connection to the bank dropped before its answer",
        "unreachable": "the bank could not be reached",
        "unparseable": "the bank answered with a body that could not be read",
        "redirect": "the bank answered with a redirect, which the gateway never follows",
        "oversized": "the bank answered with a body larger than any answer of its contract",
    }
    return {
        "code": f"bank_{outcome.kind}",
        "message": messages.get(outcome.kind, f"bank answered HTTP {outcome.http_status}"),
        "retryable": retryable,
    }


# last_error codes of what ops decided, and of a card the vault no longer keeps.
SETTLED_BY_OPS = "settled_by_ops"  # ops checked the bank: the operation did not happen
CARD_PURGED = "card_purged"  # an authorization that can no longer be sent: ops abandon it
