"""Outcomes the bank will not name, and attempts whose outcome we never learnt: when an
answer proves our own earlier work, and when an approval may be a second hold.

Pure Python, no I/O, like the rest of gateway.domain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.domain.outcomes import ALREADY_DONE, BankOutcome
from gateway.domain.states import REFERENCE_OF, OperationKind

# Outcomes the bank will not name.
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
    if kind not in _COULD_HAVE_DONE_IT or code not in ALREADY_DONE[kind] or unknown_before < 1:
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


# Attempts whose outcome we never learnt.
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
