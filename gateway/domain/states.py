"""A payment's lifecycle: its statuses, what FicMart's requests, a lapsed hold and ops'
abandonments move it to, and the bank references each status may carry.

Pure Python, no I/O: everything that decides "may this happen" lives here (with what a bank
answer means in gateway.domain.outcomes), so that it can be tested exhaustively without a
database, a broker or a bank.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


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


# The status a payment must be in while each operation runs.
RUNNING_STATUS: dict[OperationKind, Status] = {
    OperationKind.AUTHORIZE: Status.PENDING,
    OperationKind.CAPTURE: Status.CAPTURING,
    OperationKind.VOID: Status.VOIDING,
    OperationKind.REFUND: Status.REFUNDING,
    OperationKind.RELEASE: Status.EXPIRED,
}


# The events FicMart sees: one per status a payment settles in.
EVENT_STATUSES = frozenset(
    {Status.AUTHORIZED, Status.DECLINED, Status.CAPTURED, Status.VOIDED, Status.REFUNDED, Status.EXPIRED}
)


def event_type(status: Status) -> str:
    return f"payment.{status.value}"


ATTENTION_EVENT = "payment.attention_required"


# Decisions ops make by hand (gatewayctl abandon).
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
