"""The payment domain: statuses, allowed transitions and what a bank answer means.

Pure Python, no I/O. Everything that decides "may this happen" or "what does
this bank outcome do to the payment" lives here, so that it can be tested
exhaustively without a database, a broker or a bank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PENDING = "pending"
    AUTHORIZED = "authorized"
    CAPTURING = "capturing"
    CAPTURED = "captured"
    VOIDING = "voiding"
    VOIDED = "voided"
    REFUNDING = "refunding"
    REFUNDED = "refunded"
    DECLINED = "declined"
    EXPIRED = "expired"


# "Accepted, the bank call is in progress": long polls wait while in one of these.
IN_PROGRESS = frozenset({Status.PENDING, Status.CAPTURING, Status.VOIDING, Status.REFUNDING})
# After these an order may try a new authorization; every other status is a live payment.
ORDER_RETRYABLE = frozenset({Status.DECLINED, Status.VOIDED, Status.EXPIRED})


class Action(StrEnum):
    """What FicMart may ask of an existing payment."""

    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"


class OperationKind(StrEnum):
    """A unit of work at the bank. RELEASE is the void of a hold that expired."""

    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"
    RELEASE = "release"


class InvalidTransition(Exception):
    def __init__(self, status: Status, action: str):
        super().__init__(f"cannot {action} a payment that is {status}")
        self.status = status
        self.action = action


# (status, requested action) -> (in-progress status, operation to run)
_REQUESTS: dict[tuple[Status, Action], tuple[Status, OperationKind]] = {
    (Status.AUTHORIZED, Action.CAPTURE): (Status.CAPTURING, OperationKind.CAPTURE),
    (Status.AUTHORIZED, Action.VOID): (Status.VOIDING, OperationKind.VOID),
    (Status.CAPTURED, Action.REFUND): (Status.REFUNDING, OperationKind.REFUND),
}


def request(status: Status, action: Action) -> tuple[Status, OperationKind]:
    """The status a payment moves to when FicMart asks for `action`, and the bank work."""
    try:
        return _REQUESTS[(status, action)]
    except KeyError:
        raise InvalidTransition(status, action.value) from None


class ReferenceUnknown(Exception):
    """A request the status allows, whose bank call needs a bank reference the gateway never
    learnt (the bank did the earlier step but forgot our key, so it never named it)."""

    def __init__(self, status: Status, action: str, reference: str):
        super().__init__(
            f"cannot {action} this {status.value} payment yet: the bank never gave us its {reference}, which the "
            f"{action} is sent with. The money is safe: nothing was started and the payment keeps its status and "
            f"its attention_required flag. An operator checks the bank and records the {reference} "
            f"(gatewayctl payments set-reference); then send this request again"
        )
        self.status = status
        self.action = action
        self.reference = reference


def start(status: Status, action: Action, references: Mapping[str, str | None]) -> tuple[Status, OperationKind]:
    """What FicMart's request starts: request()'s status and operation, refused at once
    (ReferenceUnknown) when `references` (the receipt's bank ids) lack the one its bank call
    is sent with. Accepted, such a request could only be parked by the worker, with the
    payment in progress until an operator acted."""
    running, kind = request(status, action)
    reference = SENT_WITH[kind]
    if not references.get(reference):
        raise ReferenceUnknown(status, action.value, reference)
    return running, kind


def expire(status: Status) -> tuple[Status, OperationKind]:
    """A hold that lapsed before capture: the payment is expired and the hold released."""
    if status is not Status.AUTHORIZED:
        raise InvalidTransition(status, "expire")
    return Status.EXPIRED, OperationKind.RELEASE


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
_ALREADY_DONE: dict[OperationKind, frozenset[str]] = {
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
    if code in _ALREADY_DONE[kind]:
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

# The status a payment must be in while each operation runs.
RUNNING_STATUS: dict[OperationKind, Status] = {
    OperationKind.AUTHORIZE: Status.PENDING,
    OperationKind.CAPTURE: Status.CAPTURING,
    OperationKind.VOID: Status.VOIDING,
    OperationKind.REFUND: Status.REFUNDING,
    OperationKind.RELEASE: Status.EXPIRED,
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


# ---- outcomes the bank will not name -------------------------------------------------------
#
# The bank stores its answer for a key AFTER the money moved, tied to the client's
# connection (docs/bank.md): a client that went away at that moment leaves the work
# done and the key forgotten. A repeat then runs again: "already done" with no replayed
# body for a capture, void or refund, a second hold for an authorization. Which of these
# prove what happened, given that an earlier attempt of ours may have acted:
#
#   refund    already_refunded              the capture id was given to us alone, and a
#                                           payment is refunded once: our refund happened
#   capture   authorization_already_used,   the authorization is ours alone; used, and no
#             already_captured              void or release of it was ever sent: captured
#   void,     authorization_already_used,   likewise, when no capture of it was ever sent:
#   release   already_voided                voided (released)
#   authorize a fresh (not replayed) approval  proves a hold, not that it is the only one:
#             after one such attempt, or a  recorded, flagged, a reconciliation finding
#             replayed one after two
#
# Proven work is recorded as succeeded with the bank's reference unknown and the payment
# flagged (attention_required) for a human to fill the reference; anything not proven is
# parked as uncertain. No money is moved to make up for a doubt.

# The operations whose work an "already done" refusal could be, besides the one asking.
_COULD_HAVE_DONE_IT: dict[OperationKind, frozenset[OperationKind]] = {
    OperationKind.REFUND: frozenset(),
    OperationKind.CAPTURE: frozenset({OperationKind.VOID, OperationKind.RELEASE}),
    OperationKind.VOID: frozenset({OperationKind.CAPTURE, OperationKind.RELEASE}),
    OperationKind.RELEASE: frozenset({OperationKind.CAPTURE, OperationKind.VOID}),
}

REFERENCE_UNKNOWN = "bank_reference_unknown"
POSSIBLE_DUPLICATE_HOLD = "possible_duplicate_hold"


@dataclass(frozen=True)
class Doubt:
    """Why a recorded outcome needs a human: the payment's last_error, the reconciliation
    finding to keep (None: none) and what is known, for the finding's detail."""

    code: str
    message: str
    finding: str | None
    evidence: dict = field(default_factory=dict)

    def error(self) -> dict:
        return {"code": self.code, "message": self.message, "retryable": False}


def proves_own_work(
    kind: OperationKind, code: str | None, *, unknown_before: int, other_kinds_tried: frozenset[OperationKind]
) -> bool:
    """Is an "already done" refusal (still refused when asked again with our key) proof that
    our own earlier attempt did the work? `unknown_before`: earlier attempts of this operation
    whose outcome we never learnt. See the table above."""
    if kind not in _COULD_HAVE_DONE_IT or code not in _ALREADY_DONE[kind] or unknown_before < 1:
        return False
    return not (other_kinds_tried & _COULD_HAVE_DONE_IT[kind])


def unnamed_work(kind: OperationKind) -> Doubt:
    reference = REFERENCE_OF[kind]
    return Doubt(
        REFERENCE_UNKNOWN,
        f"the bank did the {kind.value} but forgot our key, so it never gave us the {reference}: "
        f"check the bank, then record it with `gatewayctl payments set-reference PAYMENT_ID "
        f"--{reference.replace('_', '-')} ...`",
        None,
    )


# ---- attempts whose outcome we never learnt ---------------------------------------------
#
# An attempt is claimed just before its request is written out (claim_operations), so each
# one counted may have reached the bank, except those whose handler learnt that it did
# nothing (may_have_acted). Of each of the others the worker keeps what it knows in
# operations.lost_answers: {"attempt", "at", "worker", "code", "message"}, where `code` is
# error_for()'s for how it ended (bank_timeout, bank_connection...), CANNOT_RECORD for an
# answer that could not be stored, or WORKER_STOPPED for a handler that stopped (killed, or
# cut off from the database) after the claim, before saying: the claim's time, sent or not.
# These entries are what a possible second hold's finding tells ops.

WORKER_STOPPED = "worker_stopped"
CANNOT_RECORD = "cannot_record"


def lost_answer(attempt: int, at: str, worker: str, error: Mapping[str, Any]) -> dict:
    """The lost_answers entry of an attempt of `worker` sent at `at` that ended in `error`
    (error_for()'s, or CANNOT_RECORD's)."""
    return {"attempt": attempt, "at": at, "worker": worker, "code": error["code"], "message": error["message"]}


def _how_it_ended(entry: Mapping[str, Any]) -> str:
    if entry.get("code") == WORKER_STOPPED:
        return (
            "its worker stopped (killed, or cut off from the database) after claiming it, before saying what the "
            "bank answered; the claim comes just before the request is written out, so it may have reached the bank"
        )
    return f"it may have reached the bank: {entry.get('message') or entry.get('code')}"


@dataclass(frozen=True)
class Hold:
    """The hold an approval names, and what ops look for at the bank beside it."""

    amount: int  # cents
    card: str  # brand and last four digits
    authorization_id: str | None
    approved_at: str


def doubt_of_approval(
    outcome: BankOutcome, *, unknown_before: int, lost: Sequence[Mapping[str, Any]] = (), hold: Hold | None = None
) -> Doubt | None:
    """Maybe two holds: a fresh approval after one attempt whose outcome we never learnt (it
    may have placed a hold the bank then forgot), or even a replayed one after two (the
    replay names one of their holds; the other may exist too). `lost`: what is known of those
    attempts (lost_answers); `hold`: the approved one. None when no earlier attempt can have
    placed a hold the bank forgot: every attempt before is known to have done nothing, or (a
    replay) only one may have acted and the replay names its hold."""
    if outcome.kind != "ok" or unknown_before < (2 if outcome.replayed else 1):
        return None
    named = [f"attempt {e.get('attempt')} at {e.get('at') or 'an unknown time'}" for e in lost]
    which = f" ({'; '.join(named)})" if named else ""
    approval = (
        "the bank replayed its answer for our key: the hold it names is one of the holds our attempts placed"
        if outcome.replayed
        else "a fresh approval: the bank did not remember our key, so it placed a new hold"
    )
    evidence: dict[str, Any] = {
        "unknown_attempts": unknown_before,
        "lost_attempts": [{**e, "how_it_ended": _how_it_ended(e)} for e in lost],
        "approval": approval,
    }
    if hold is not None:
        since = min((str(e["at"]) for e in lost if e.get("at")), default="the first attempt")
        evidence["check_at_bank"] = (
            f"the holds of {hold.amount} cents on card {hold.card} placed from {since} to {hold.approved_at}: "
            f"any besides {hold.authorization_id} is a second hold the gateway has no id for; void it at the bank, "
            "then resolve the payment"
        )
    return Doubt(
        POSSIBLE_DUPLICATE_HOLD,
        f"{unknown_before} earlier attempt(s) whose answer was lost{which} may have placed a hold the bank did "
        "not remember under our key: this approval may be a second hold; ops check the bank and void the extra one",
        POSSIBLE_DUPLICATE_HOLD,
        evidence,
    )


def is_final(verdict: Verdict) -> bool:
    return verdict in (Verdict.SUCCEEDED, Verdict.REFUSED, Verdict.EXPIRED)


# The events FicMart sees: one per status a payment settles in.
EVENT_STATUSES = frozenset(
    {Status.AUTHORIZED, Status.DECLINED, Status.CAPTURED, Status.VOIDED, Status.REFUNDED, Status.EXPIRED}
)


def event_type(status: Status) -> str:
    return f"payment.{status.value}"


ATTENTION_EVENT = "payment.attention_required"

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


# ---- decisions ops make by hand (gatewayctl settle, resolve, abandon) ----------------


@dataclass(frozen=True)
class Abandonment:
    """What abandoning a parked operation does to its payment."""

    status: Status  # the payment's status afterwards
    follow_up: OperationKind | None  # bank work it starts: the void of a hold that may exist


# A parked operation -> its abandonment. Nothing here guesses whether money
# moved: a hold that may exist is voided (a void of a hold that is gone or
# captured is refused by the bank and moves nothing), an authorization whose
# outcome is unknown is declined (a hold the bank may have placed without our
# knowing its id lapses by itself at its expiry), and a refund or a release is
# given up with the payment where it was.
_ABANDONMENTS: dict[OperationKind, Abandonment] = {
    OperationKind.AUTHORIZE: Abandonment(Status.DECLINED, None),
    OperationKind.CAPTURE: Abandonment(Status.VOIDING, OperationKind.VOID),
    OperationKind.VOID: Abandonment(Status.VOIDING, OperationKind.VOID),
    OperationKind.REFUND: Abandonment(Status.CAPTURED, None),
    OperationKind.RELEASE: Abandonment(Status.EXPIRED, None),
}

ABANDONED = "abandoned"  # the last_error code of an abandoned operation and its payment


def abandon(kind: OperationKind, status: Status) -> Abandonment:
    """Ops gives up on a parked operation of `kind` while the payment is in `status`."""
    if status is not RUNNING_STATUS[kind]:
        raise InvalidTransition(status, f"abandon a {kind.value} of")
    return _ABANDONMENTS[kind]


# The receipt's bank references, the prefix of each (docs/bank.md: a prefix
# plus a lowercase UUID), and the statuses in which a payment may carry it.
BANK_REFERENCES: dict[str, tuple[str, frozenset[Status]]] = {
    "authorization_id": (
        "auth_",
        frozenset(Status) - {Status.PENDING, Status.DECLINED},
    ),
    "capture_id": ("cap_", frozenset({Status.CAPTURED, Status.REFUNDING, Status.REFUNDED})),
    "void_id": ("void_", frozenset({Status.VOIDED, Status.EXPIRED})),
    "refund_id": ("ref_", frozenset({Status.REFUNDED})),
}


def missing_references(status: Status, references: Mapping[str, str | None]) -> list[str]:
    """The bank references a payment in `status` may carry and `references` (the receipt's) lack:
    what an operator may record after finding them at the bank."""
    return [name for name, (_, statuses) in BANK_REFERENCES.items() if status in statuses and not references.get(name)]


# The reference a successful operation of each kind leaves on the receipt.
REFERENCE_OF: dict[OperationKind, str] = {
    OperationKind.AUTHORIZE: "authorization_id",
    OperationKind.CAPTURE: "capture_id",
    OperationKind.VOID: "void_id",
    OperationKind.RELEASE: "void_id",
    OperationKind.REFUND: "refund_id",
}

# The receipt's reference each operation's bank call is sent with (none for an authorization).
SENT_WITH: dict[OperationKind, str] = {
    OperationKind.CAPTURE: "authorization_id",
    OperationKind.VOID: "authorization_id",
    OperationKind.RELEASE: "authorization_id",
    OperationKind.REFUND: "capture_id",
}

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_bank_id(value: object, prefix: str) -> bool:
    """`value` has the shape of the bank's ids: `prefix` (auth_, cap_, void_, ref_) and a lowercase UUID."""
    return isinstance(value, str) and value.startswith(prefix) and _UUID.fullmatch(value, len(prefix)) is not None


def reference_problem(name: str, value: str, status: Status | None = None) -> str | None:
    """Why `value` cannot be recorded as the receipt's `name` (in `status`, when given); None if it can."""
    if name not in BANK_REFERENCES:
        return f"{name} is not a bank reference (one of {', '.join(BANK_REFERENCES)})"
    prefix, statuses = BANK_REFERENCES[name]
    if not is_bank_id(value, prefix):
        return f"{name} must be {prefix!r} followed by a lowercase UUID"
    if status is not None and status not in statuses:
        return f"a {status.value} payment has no {name}"
    return None


# last_error codes of what ops decided, and of a card the vault no longer keeps.
SETTLED_BY_OPS = "settled_by_ops"  # ops checked the bank: the operation did not happen
CARD_PURGED = "card_purged"  # an authorization that can no longer be sent: ops abandon it
