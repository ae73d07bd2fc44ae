"""The payment domain: the Payment type, its statuses and transitions, and what a bank answer
means. Pure Python, no I/O: everything that decides "may this happen" or "what does this bank
outcome do to the payment" lives here, so that it can be tested exhaustively without a
database, a broker or a bank.

- states.py: statuses, what FicMart's requests, lapsed holds and ops' abandonments move a
  payment to, the bank references each status may carry;
- outcomes.py: the verdict on a bank answer, the status it settles, its follow-up work and
  the last_error a payment shows;
- doubts.py: answers that prove less than they seem (the bank forgot our key) and attempts
  whose outcome we never learnt;
- payment.py: the Payment a store row is read into, and what entering a status makes of it.

Callers import from the package (`from gateway import domain`, `from gateway.domain import
Status`); the modules are how it is read, not how it is used.
"""

from gateway.domain.doubts import (
    CANNOT_RECORD,
    POSSIBLE_DUPLICATE_HOLD,
    REFERENCE_UNKNOWN,
    WORKER_STOPPED,
    Doubt,
    Hold,
    doubt_of_approval,
    lost_answer,
    proves_own_work,
    unnamed_work,
)
from gateway.domain.outcomes import (
    ALREADY_DONE,
    BANK_ERRORS,
    CARD_PURGED,
    SETTLED_BY_OPS,
    UNKNOWN_BANK_ERROR,
    BankOutcome,
    Verdict,
    classify,
    error_for,
    follow_up,
    is_final,
    may_have_acted,
    settle,
)
from gateway.domain.payment import HistoryEntry, Payment
from gateway.domain.states import (
    ABANDONED,
    ATTENTION_EVENT,
    BANK_REFERENCES,
    EVENT_STATUSES,
    IN_PROGRESS,
    ORDER_RETRYABLE,
    REFERENCE_OF,
    RUNNING_STATUS,
    SENT_WITH,
    Abandonment,
    Action,
    InvalidTransition,
    OperationKind,
    ReferenceUnknown,
    Status,
    abandon,
    event_type,
    expire,
    is_bank_id,
    missing_references,
    reference_problem,
    request,
    start,
)

__all__ = [
    "ABANDONED",
    "ALREADY_DONE",
    "ATTENTION_EVENT",
    "BANK_ERRORS",
    "BANK_REFERENCES",
    "CANNOT_RECORD",
    "CARD_PURGED",
    "EVENT_STATUSES",
    "IN_PROGRESS",
    "ORDER_RETRYABLE",
    "POSSIBLE_DUPLICATE_HOLD",
    "REFERENCE_OF",
    "REFERENCE_UNKNOWN",
    "RUNNING_STATUS",
    "SENT_WITH",
    "SETTLED_BY_OPS",
    "UNKNOWN_BANK_ERROR",
    "WORKER_STOPPED",
    "Abandonment",
    "Action",
    "BankOutcome",
    "Doubt",
    "HistoryEntry",
    "Hold",
    "InvalidTransition",
    "OperationKind",
    "Payment",
    "ReferenceUnknown",
    "Status",
    "Verdict",
    "abandon",
    "classify",
    "doubt_of_approval",
    "error_for",
    "event_type",
    "expire",
    "follow_up",
    "is_bank_id",
    "is_final",
    "lost_answer",
    "may_have_acted",
    "missing_references",
    "proves_own_work",
    "reference_problem",
    "request",
    "settle",
    "start",
    "unnamed_work",
]
