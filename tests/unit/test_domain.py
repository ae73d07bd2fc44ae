"""Exhaustive tests of gateway.domain against docs/api.md and docs/bank.md.

Every expectation below is written from the two contract documents, not
copied from gateway/domain/: the tables are the contract, the code must match them.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway import domain
from gateway.domain import (
    Action,
    BankOutcome,
    InvalidTransition,
    OperationKind,
    Status,
    Verdict,
)

S = Status
A = Action
K = OperationKind
V = Verdict

# --------------------------------------------------------------------------
# The lifecycle diagram of docs/api.md, transcribed edge by edge.
#
# pending ──► authorized ──► capturing ──► captured ──► refunding ──► refunded
#    │            │
#    │            ├────────► voiding ────► voided
#    │            └────────► expired
#    └──► declined
# plus the prose: a failed capture/void/refund returns to the status it had
# (capturing->authorized, voiding->authorized, refunding->captured), and a
# capture refused for an expired hold ends in expired (capturing->expired).
# --------------------------------------------------------------------------
LIFECYCLE_EDGES = frozenset(
    {
        (S.PENDING, S.AUTHORIZED),
        (S.PENDING, S.DECLINED),
        (S.AUTHORIZED, S.CAPTURING),
        (S.AUTHORIZED, S.VOIDING),
        (S.AUTHORIZED, S.EXPIRED),
        (S.CAPTURING, S.CAPTURED),
        (S.CAPTURING, S.AUTHORIZED),
        (S.CAPTURING, S.EXPIRED),
        (S.VOIDING, S.VOIDED),
        (S.VOIDING, S.AUTHORIZED),
        (S.CAPTURED, S.REFUNDING),
        (S.REFUNDING, S.REFUNDED),
        (S.REFUNDING, S.CAPTURED),
    }
)
ALL_STATUS_VALUES = {
    "pending",
    "authorized",
    "capturing",
    "captured",
    "voiding",
    "voided",
    "refunding",
    "refunded",
    "declined",
    "expired",
}
TERMINAL = frozenset({S.DECLINED, S.VOIDED, S.REFUNDED, S.EXPIRED})

# --------------------------------------------------------------------------
# Status x Action: all 30 pairs written out. None = 409 invalid_state_transition.
# --------------------------------------------------------------------------
REQUEST_TABLE: list[tuple[Status, Action, tuple[Status, OperationKind] | None]] = [
    (S.PENDING, A.CAPTURE, None),  # "capture of ... a pending payment" is refused
    (S.PENDING, A.VOID, None),
    (S.PENDING, A.REFUND, None),
    (S.AUTHORIZED, A.CAPTURE, (S.CAPTURING, K.CAPTURE)),
    (S.AUTHORIZED, A.VOID, (S.VOIDING, K.VOID)),
    (S.AUTHORIZED, A.REFUND, None),  # nothing captured yet
    (S.CAPTURING, A.CAPTURE, None),  # already in progress
    (S.CAPTURING, A.VOID, None),
    (S.CAPTURING, A.REFUND, None),
    (S.CAPTURED, A.CAPTURE, None),
    (S.CAPTURED, A.VOID, None),  # "void of a captured payment" is refused
    (S.CAPTURED, A.REFUND, (S.REFUNDING, K.REFUND)),
    (S.VOIDING, A.CAPTURE, None),
    (S.VOIDING, A.VOID, None),
    (S.VOIDING, A.REFUND, None),
    (S.VOIDED, A.CAPTURE, None),  # "capture of a voided ... payment" is refused
    (S.VOIDED, A.VOID, None),
    (S.VOIDED, A.REFUND, None),
    (S.REFUNDING, A.CAPTURE, None),
    (S.REFUNDING, A.VOID, None),
    (S.REFUNDING, A.REFUND, None),
    (S.REFUNDED, A.CAPTURE, None),
    (S.REFUNDED, A.VOID, None),
    (S.REFUNDED, A.REFUND, None),  # "a second refund" is refused
    (S.DECLINED, A.CAPTURE, None),
    (S.DECLINED, A.VOID, None),
    (S.DECLINED, A.REFUND, None),
    (S.EXPIRED, A.CAPTURE, None),
    (S.EXPIRED, A.VOID, None),
    (S.EXPIRED, A.REFUND, None),
]


def test_status_values_are_the_contract_statuses():
    assert {s.value for s in Status} == ALL_STATUS_VALUES
    assert len(Status) == 10


def test_action_and_operation_values():
    assert {a.value for a in Action} == {"capture", "void", "refund"}
    assert {k.value for k in OperationKind} == {"authorize", "capture", "void", "refund", "release"}


def test_request_table_covers_every_pair_exactly_once():
    pairs = [(s, a) for s, a, _ in REQUEST_TABLE]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == set(itertools.product(Status, Action))


def test_request_table_agrees_with_lifecycle_diagram():
    # Self-check of the hand-written table: every allowed request is an edge
    # of the diagram into an in-progress status.
    for status, _action, expected in REQUEST_TABLE:
        if expected is not None:
            assert (status, expected[0]) in LIFECYCLE_EDGES
            assert expected[0] in {S.CAPTURING, S.VOIDING, S.REFUNDING}


@pytest.mark.parametrize(
    ("status", "action", "expected"),
    REQUEST_TABLE,
    ids=[f"{s}-{a}" for s, a, _ in REQUEST_TABLE],
)
def test_request(status, action, expected):
    if expected is None:
        with pytest.raises(InvalidTransition) as info:
            domain.request(status, action)
        assert info.value.status == status
        assert info.value.action == action.value
        assert str(info.value) == f"cannot {action.value} a payment that is {status.value}"
    else:
        result = domain.request(status, action)
        assert result == expected
        assert isinstance(result[0], Status)
        assert isinstance(result[1], OperationKind)


# --------------------------------------------------------------------------
# start(): what an API request starts. The bank contract sends a capture or a
# void with the authorization_id and a refund with the capture_id: without it
# the request is refused at once (409 bank_reference_unknown), never parked.
# --------------------------------------------------------------------------
NEEDED = {A.CAPTURE: "authorization_id", A.VOID: "authorization_id", A.REFUND: "capture_id"}
ALL_KNOWN = {"authorization_id": "auth_x", "capture_id": "cap_x", "void_id": None, "refund_id": None}


@pytest.mark.parametrize(
    ("status", "action", "expected"),
    [row for row in REQUEST_TABLE if row[2] is not None],
    ids=[f"{s}-{a}" for s, a, e in REQUEST_TABLE if e is not None],
)
def test_start_needs_the_reference_the_bank_call_is_sent_with(status, action, expected):
    assert domain.start(status, action, ALL_KNOWN) == expected
    for missing in (None, ""):
        with pytest.raises(domain.ReferenceUnknown) as info:
            domain.start(status, action, {**ALL_KNOWN, NEEDED[action]: missing})
        assert (info.value.status, info.value.action, info.value.reference) == (status, action.value, NEEDED[action])
        assert "money is safe" in str(info.value) and "set-reference" in str(info.value)
    other = "capture_id" if NEEDED[action] == "authorization_id" else "authorization_id"
    assert domain.start(status, action, {**ALL_KNOWN, other: None}) == expected  # only the one it is sent with


@pytest.mark.parametrize(
    ("status", "action"),
    [(s, a) for s, a, e in REQUEST_TABLE if e is None],
    ids=[f"{s}-{a}" for s, a, e in REQUEST_TABLE if e is None],
)
def test_start_refuses_a_wrong_status_first_whatever_the_references(status, action):
    with pytest.raises(InvalidTransition):
        domain.start(status, action, {})


def test_terminal_statuses_are_the_contract_ones():
    # The diagram has no edge out of declined, voided, refunded, expired.
    assert TERMINAL == {s for s in Status if not any(old == s for old, _ in LIFECYCLE_EDGES)}


@pytest.mark.parametrize("status", sorted(TERMINAL), ids=str)
def test_request_from_terminal_status_is_always_refused(status):
    for action in Action:
        with pytest.raises(InvalidTransition):
            domain.request(status, action)
    with pytest.raises(InvalidTransition):
        domain.expire(status)


def test_invalid_transition_is_an_exception_with_fields():
    exc = InvalidTransition(S.VOIDED, "capture")
    assert isinstance(exc, Exception)
    assert exc.status is S.VOIDED
    assert exc.action == "capture"
    assert "voided" in str(exc) and "capture" in str(exc)


# --------------------------------------------------------------------------
# expire(): only an authorized hold can lapse (authorized -> expired), and
# the lapsed hold is released at the bank.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("status", list(Status), ids=str)
def test_expire(status):
    if status is S.AUTHORIZED:
        assert domain.expire(status) == (S.EXPIRED, K.RELEASE)
        assert (S.AUTHORIZED, S.EXPIRED) in LIFECYCLE_EDGES
    else:
        with pytest.raises(InvalidTransition) as info:
            domain.expire(status)
        assert info.value.status == status
        assert info.value.action == "expire"


# --------------------------------------------------------------------------
# Sets named in the contract.
# --------------------------------------------------------------------------
def test_in_progress_matches_contract():
    # "pending, capturing, voiding, refunding mean accepted, the bank call is in progress"
    assert domain.IN_PROGRESS == {S.PENDING, S.CAPTURING, S.VOIDING, S.REFUNDING}


def test_order_retryable_matches_contract():
    # "after declined, voided or expired a new attempt is allowed"
    assert domain.ORDER_RETRYABLE == {S.DECLINED, S.VOIDED, S.EXPIRED}
    live = {S.PENDING, S.AUTHORIZED, S.CAPTURING, S.CAPTURED, S.VOIDING, S.REFUNDING, S.REFUNDED}
    assert set(Status) - domain.ORDER_RETRYABLE == live
    assert not (domain.ORDER_RETRYABLE & live)


def test_event_statuses_and_types_match_contract():
    contract_routing_keys = {
        "payment.authorized",
        "payment.declined",
        "payment.captured",
        "payment.voided",
        "payment.refunded",
        "payment.expired",
    }
    assert {domain.event_type(s) for s in domain.EVENT_STATUSES} == contract_routing_keys
    assert domain.ATTENTION_EVENT == "payment.attention_required"
    # No event for an in-progress status.
    assert not (domain.EVENT_STATUSES & domain.IN_PROGRESS)


@pytest.mark.parametrize("status", list(Status), ids=str)
def test_event_type_format(status):
    assert domain.event_type(status) == f"payment.{status.value}"


def test_running_status():
    assert domain.RUNNING_STATUS == {
        K.AUTHORIZE: S.PENDING,
        K.CAPTURE: S.CAPTURING,
        K.VOID: S.VOIDING,
        K.REFUND: S.REFUNDING,
        K.RELEASE: S.EXPIRED,
    }
    # The status a requested operation runs in is the one request() moves to.
    for _status, _action, expected in REQUEST_TABLE:
        if expected is not None:
            new_status, kind = expected
            assert domain.RUNNING_STATUS[kind] is new_status
    assert domain.RUNNING_STATUS[domain.expire(S.AUTHORIZED)[1]] is S.EXPIRED


# --------------------------------------------------------------------------
# Bank outcomes: every row of docs/bank.md's error list, plus the
# failures a real network adds. (label, outcome)
# --------------------------------------------------------------------------
def err(status: int, code: str | None, message: str | None = "bank says no") -> BankOutcome:
    return BankOutcome(kind="error", http_status=status, code=code, message=message)


OUTCOMES: dict[str, BankOutcome] = {
    "ok": BankOutcome(kind="ok", http_status=200, body={"status": "approved"}),
    # 400 business errors
    "invalid_card": err(400, "invalid_card"),
    "invalid_cvv": err(400, "invalid_cvv"),
    "invalid_amount": err(400, "invalid_amount"),
    "card_expired": err(400, "card_expired"),
    "authorization_not_found": err(400, "authorization_not_found"),
    "authorization_expired": err(400, "authorization_expired"),
    "authorization_already_used": err(400, "authorization_already_used"),
    "already_captured": err(400, "already_captured"),
    "already_voided": err(400, "already_voided"),
    "already_refunded": err(400, "already_refunded"),
    "amount_mismatch": err(400, "amount_mismatch"),
    "capture_not_found": err(400, "capture_not_found"),
    # 402 (authorize only)
    "insufficient_funds": err(402, "insufficient_funds"),
    # 404 on a POST: the contract only defines it for GETs
    "404_not_found": err(404, "not_found"),
    # 5xx
    "500_internal_error": err(500, "internal_error"),
    "502_bad_gateway": err(502, "bad_gateway"),
    "502_no_code": err(502, None, None),
    "503_with_business_code": err(503, "invalid_card"),
    # unknown 4xx code
    "400_unknown_code": err(400, "something_new"),
    "400_no_code": err(400, None, None),
    # network and body failures
    "timeout": BankOutcome(kind="timeout"),
    "connection": BankOutcome(kind="connection"),
    "unparseable": BankOutcome(kind="unparseable", http_status=200),
    "unparseable_400_plain_text": BankOutcome(kind="unparseable", http_status=400),
    "unparseable_502_html": BankOutcome(kind="unparseable", http_status=502),
}

SUCC, REF, EXP, RET, CONF = V.SUCCEEDED, V.REFUSED, V.EXPIRED, V.RETRY, V.CONFIRM

# Rows: outcome. Columns: authorize, capture, void, refund, release.
# Derived from the rules of docs/bank.md:
# - authorize refuses on invalid_card/invalid_cvv/invalid_amount/card_expired
#   and 402 insufficient_funds (the payment is declined);
# - capture: authorization_not_found, amount_mismatch, invalid_amount never go
#   away; authorization_expired means the hold lapsed; authorization_already_used
#   (and already_captured) may be our own earlier capture -> confirm;
# - void / release: authorization_not_found never goes away;
#   authorization_already_used / already_voided may be our own earlier void;
#   an expired open hold can still be voided, so authorization_expired makes
#   no sense for a void;
# - refund: capture_not_found, amount_mismatch, invalid_amount never go away;
#   already_refunded may be our own earlier refund;
# - every code that makes no sense for the call, every 5xx, 404 on a POST,
#   timeouts, dropped connections and unreadable bodies: retry, never a refusal.
CLASSIFY_TABLE: dict[str, tuple[Verdict, Verdict, Verdict, Verdict, Verdict]] = {
    #                              authorize capture void  refund release
    "ok":                          (SUCC,    SUCC,   SUCC, SUCC,  SUCC),
    "invalid_card":                (REF,     RET,    RET,  RET,   RET),
    "invalid_cvv":                 (REF,     RET,    RET,  RET,   RET),
    "invalid_amount":              (REF,     REF,    RET,  REF,   RET),
    "card_expired":                (REF,     RET,    RET,  RET,   RET),
    "authorization_not_found":     (RET,     REF,    REF,  RET,   REF),
    "authorization_expired":       (RET,     EXP,    RET,  RET,   RET),
    "authorization_already_used":  (RET,     CONF,   CONF, RET,   CONF),
    "already_captured":            (RET,     CONF,   RET,  RET,   RET),
    "already_voided":              (RET,     RET,    CONF, RET,   CONF),
    "already_refunded":            (RET,     RET,    RET,  CONF,  RET),
    "amount_mismatch":             (RET,     REF,    RET,  REF,   RET),
    "capture_not_found":           (RET,     RET,    RET,  REF,   RET),
    "insufficient_funds":          (REF,     RET,    RET,  RET,   RET),
    "404_not_found":               (RET,     RET,    RET,  RET,   RET),
    "500_internal_error":          (RET,     RET,    RET,  RET,   RET),
    "502_bad_gateway":             (RET,     RET,    RET,  RET,   RET),
    "502_no_code":                 (RET,     RET,    RET,  RET,   RET),
    "503_with_business_code":      (RET,     RET,    RET,  RET,   RET),
    "400_unknown_code":            (RET,     RET,    RET,  RET,   RET),
    "400_no_code":                 (RET,     RET,    RET,  RET,   RET),
    "timeout":                     (RET,     RET,    RET,  RET,   RET),
    "connection":                  (RET,     RET,    RET,  RET,   RET),
    "unparseable":                 (RET,     RET,    RET,  RET,   RET),
    "unparseable_400_plain_text":  (RET,     RET,    RET,  RET,   RET),
    "unparseable_502_html":        (RET,     RET,    RET,  RET,   RET),
}  # fmt: skip
KIND_COLUMNS = (K.AUTHORIZE, K.CAPTURE, K.VOID, K.REFUND, K.RELEASE)

CONTRACT_400_CODES = {
    "invalid_card",
    "invalid_cvv",
    "invalid_amount",
    "card_expired",
    "authorization_not_found",
    "authorization_expired",
    "authorization_already_used",
    "already_captured",
    "already_voided",
    "already_refunded",
    "amount_mismatch",
    "capture_not_found",
}

CLASSIFY_CASES = [
    (kind, label, CLASSIFY_TABLE[label][i]) for label in CLASSIFY_TABLE for i, kind in enumerate(KIND_COLUMNS)
]


def test_classify_table_is_complete():
    assert set(CLASSIFY_TABLE) == set(OUTCOMES)
    assert set(KIND_COLUMNS) == set(OperationKind)
    assert CONTRACT_400_CODES <= set(OUTCOMES)
    for code in CONTRACT_400_CODES:
        assert OUTCOMES[code].http_status == 400
    assert OUTCOMES["insufficient_funds"].http_status == 402
    assert len(CLASSIFY_CASES) == len(OUTCOMES) * len(OperationKind)


@pytest.mark.parametrize(
    ("kind", "label", "expected"),
    CLASSIFY_CASES,
    ids=[f"{k}-{label}" for k, label, _ in CLASSIFY_CASES],
)
def test_classify(kind, label, expected):
    assert domain.classify(kind, OUTCOMES[label]) is expected


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
def test_only_listed_codes_refuse(kind):
    """A refusal ends the operation for good, so only codes the contract gives that call may refuse."""
    refusing = {label for label in CLASSIFY_TABLE if domain.classify(kind, OUTCOMES[label]) is V.REFUSED}
    expected = {label for label, row in CLASSIFY_TABLE.items() if row[KIND_COLUMNS.index(kind)] is V.REFUSED}
    assert refusing == expected


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
@pytest.mark.parametrize("status", [500, 501, 502, 503, 504, 599])
@pytest.mark.parametrize("code", [*sorted(CONTRACT_400_CODES | {"insufficient_funds", "internal_error"}), None])
def test_classify_5xx_always_retries_whatever_the_code(kind, status, code):
    assert domain.classify(kind, err(status, code)) is V.RETRY


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
@pytest.mark.parametrize("http_status", [200, 201, 204, None])
def test_classify_ok_is_success(kind, http_status):
    assert domain.classify(kind, BankOutcome(kind="ok", http_status=http_status)) is V.SUCCEEDED


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
def test_classify_error_without_http_status_retries(kind):
    # An error whose status is unknown proves nothing: retry.
    for code in CONTRACT_400_CODES | {"insufficient_funds"}:
        assert domain.classify(kind, BankOutcome(kind="error", code=code)) is V.RETRY


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
@pytest.mark.parametrize("outcome_kind", ["timeout", "connection", "unparseable", "something_else"])
def test_classify_non_http_failures_retry(kind, outcome_kind):
    for http_status in (None, 200, 400, 402, 404, 500):
        assert domain.classify(kind, BankOutcome(kind=outcome_kind, http_status=http_status)) is V.RETRY


def test_classify_never_expires_anything_but_a_capture():
    for kind in OperationKind:
        for outcome in OUTCOMES.values():
            if domain.classify(kind, outcome) is V.EXPIRED:
                assert kind is K.CAPTURE


# --------------------------------------------------------------------------
# settle(): every (kind, verdict) pair.
# --------------------------------------------------------------------------
SETTLE_TABLE: dict[tuple[OperationKind, Verdict], Status | None] = {
    (K.AUTHORIZE, SUCC): S.AUTHORIZED,
    (K.AUTHORIZE, REF): S.DECLINED,
    (K.AUTHORIZE, EXP): None,  # an authorize is never "expired"
    (K.AUTHORIZE, RET): None,
    (K.AUTHORIZE, CONF): None,
    (K.CAPTURE, SUCC): S.CAPTURED,
    (K.CAPTURE, REF): S.AUTHORIZED,  # returns to the status it had
    (K.CAPTURE, EXP): S.EXPIRED,  # the one exception
    (K.CAPTURE, RET): None,
    (K.CAPTURE, CONF): None,
    (K.VOID, SUCC): S.VOIDED,
    (K.VOID, REF): S.AUTHORIZED,
    (K.VOID, EXP): None,
    (K.VOID, RET): None,
    (K.VOID, CONF): None,
    (K.REFUND, SUCC): S.REFUNDED,
    (K.REFUND, REF): S.CAPTURED,
    (K.REFUND, EXP): None,
    (K.REFUND, RET): None,
    (K.REFUND, CONF): None,
    (K.RELEASE, SUCC): S.EXPIRED,  # the payment stays expired either way
    (K.RELEASE, REF): S.EXPIRED,
    (K.RELEASE, EXP): None,
    (K.RELEASE, RET): None,
    (K.RELEASE, CONF): None,
}


def test_settle_table_is_complete():
    assert set(SETTLE_TABLE) == set(itertools.product(OperationKind, Verdict))


@pytest.mark.parametrize(("kind", "verdict"), list(SETTLE_TABLE), ids=[f"{k}-{v}" for k, v in SETTLE_TABLE])
def test_settle(kind, verdict):
    expected = SETTLE_TABLE[(kind, verdict)]
    if expected is None:
        with pytest.raises(ValueError):
            domain.settle(kind, verdict)
    else:
        assert domain.settle(kind, verdict) is expected
        running = domain.RUNNING_STATUS[kind]
        assert running == expected or (running, expected) in LIFECYCLE_EDGES


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
@pytest.mark.parametrize("verdict", [V.RETRY, V.CONFIRM], ids=str)
def test_settle_refuses_non_final_verdicts(kind, verdict):
    assert not domain.is_final(verdict)
    with pytest.raises(ValueError, match=str(verdict.value)):
        domain.settle(kind, verdict)


def test_is_final():
    assert {v for v in Verdict if domain.is_final(v)} == {V.SUCCEEDED, V.REFUSED, V.EXPIRED}


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
def test_every_final_verdict_classify_produces_can_be_settled(kind):
    for label, outcome in OUTCOMES.items():
        verdict = domain.classify(kind, outcome)
        if domain.is_final(verdict):
            assert domain.settle(kind, verdict) in Status, label


# --------------------------------------------------------------------------
# follow_up(): only a capture refused for an expired hold needs more bank work.
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "verdict"),
    list(itertools.product(OperationKind, Verdict)),
    ids=[f"{k}-{v}" for k, v in itertools.product(OperationKind, Verdict)],
)
def test_follow_up(kind, verdict):
    expected = K.RELEASE if (kind, verdict) == (K.CAPTURE, V.EXPIRED) else None
    assert domain.follow_up(kind, verdict) is expected


def test_follow_up_runs_in_the_settled_status():
    status = domain.settle(K.CAPTURE, V.EXPIRED)
    follow = domain.follow_up(K.CAPTURE, V.EXPIRED)
    assert domain.RUNNING_STATUS[follow] is status


# --------------------------------------------------------------------------
# error_for(): the payment's last_error.
# --------------------------------------------------------------------------
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def assert_error_shape(error):
    assert set(error) == {"code", "message", "retryable"}
    assert isinstance(error["code"], str) and SNAKE.match(error["code"]), error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["retryable"], bool)


@pytest.mark.parametrize("label", [k for k in OUTCOMES if k != "ok"])
def test_error_for_shape(label):
    assert_error_shape(domain.error_for(OUTCOMES[label]))


def test_error_for_insufficient_funds_is_the_contract_example():
    error = domain.error_for(err(402, "insufficient_funds", "Insufficient funds"))
    assert error == {"code": "insufficient_funds", "message": "the card has insufficient funds", "retryable": False}


def test_our_words_cover_every_code_of_the_contract():
    assert set(domain.BANK_ERRORS) == CONTRACT_400_CODES | {"insufficient_funds", "not_found", "internal_error"}


@pytest.mark.parametrize("code", sorted(CONTRACT_400_CODES))
def test_error_for_business_error_says_it_in_our_words(code):
    """The bank's free text never reaches a merchant: only our own message beside its code."""
    assert domain.error_for(err(400, code, "call +1 555 0100 for a refund")) == {
        "code": code,
        "message": domain.BANK_ERRORS[code],
        "retryable": False,
    }


def test_error_for_an_unknown_code_is_our_words_too():
    error = domain.error_for(err(400, domain.UNKNOWN_BANK_ERROR, "weird_thing: visit evil.example"))
    assert error["code"] == domain.UNKNOWN_BANK_ERROR and "evil" not in error["message"]
    assert error["message"] == domain.error_for(err(400, domain.UNKNOWN_BANK_ERROR, None))["message"]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_error_for_server_error_is_retryable(status):
    error = domain.error_for(err(status, "internal_error", None))
    assert error == {"code": "internal_error", "message": domain.BANK_ERRORS["internal_error"], "retryable": True}


def test_error_for_error_with_code_but_no_status_is_retryable():
    assert domain.error_for(BankOutcome(kind="error", code="internal_error"))["retryable"] is True


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("timeout", "bank_timeout", "the bank did not answer in time"),
        ("connection", "bank_connection", "the connection to the bank dropped before its answer"),
        ("unreachable", "bank_unreachable", "the bank could not be reached"),
        ("unparseable", "bank_unparseable", "the bank answered with a body that could not be read"),
    ],
)
def test_error_for_network_failures(kind, code, message):
    for http_status in (None, 200, 400, 502):
        assert domain.error_for(BankOutcome(kind=kind, http_status=http_status)) == {
            "code": code,
            "message": message,
            "retryable": True,
        }


def test_error_for_error_without_code():
    assert domain.error_for(err(502, None, None)) == {
        "code": "bank_error",
        "message": "bank answered HTTP 502",
        "retryable": True,
    }


@pytest.mark.parametrize("kind", list(OperationKind), ids=str)
def test_error_for_a_final_refusal_is_not_retryable(kind):
    for label, outcome in OUTCOMES.items():
        if domain.classify(kind, outcome) in (V.REFUSED, V.EXPIRED):
            assert domain.error_for(outcome)["retryable"] is False, label


def test_error_for_does_not_leak_the_body():
    outcome = BankOutcome(kind="error", http_status=400, code="invalid_card", body={"card_number": "4111111111111111"})
    assert "4111111111111111" not in repr(domain.error_for(outcome))


def test_domain_realises_exactly_the_lifecycle_diagram():
    """Explore every status the domain functions can reach from pending.

    Each move is a request, an expiry, or a final verdict on the running
    operation; the set of status changes found must be the diagram, no more
    (nothing forbidden is possible) and no less (every edge is reachable).
    """
    start = (S.PENDING, K.AUTHORIZE)
    seen = {start}
    todo = [start]
    edges = set()
    while todo:
        status, running = todo.pop()
        nexts = []
        if running is None or running is K.RELEASE:
            for action in Action:
                try:
                    nexts.append(domain.request(status, action))
                except InvalidTransition:
                    pass
            try:
                nexts.append(domain.expire(status))
            except InvalidTransition:
                pass
        if running is not None:
            for outcome in OUTCOMES.values():
                verdict = domain.classify(running, outcome)
                if domain.is_final(verdict):
                    nexts.append((domain.settle(running, verdict), domain.follow_up(running, verdict)))
        for new_status, new_running in nexts:
            if new_status != status:
                edges.add((status, new_status))
            if (new_status, new_running) not in seen:
                seen.add((new_status, new_running))
                todo.append((new_status, new_running))
    assert edges == LIFECYCLE_EDGES
    assert {s for s, _ in seen} == set(Status)


# --------------------------------------------------------------------------
# The state machine: random requests, expiries and bank outcomes applied to
# one model payment; every step checked against the lifecycle diagram.
# --------------------------------------------------------------------------
OUTCOME_LABELS = sorted(OUTCOMES)

# Per operation, the outcomes that are not a plain retry.
DECISIVE_LABELS = {
    kind: sorted(label for label, row in CLASSIFY_TABLE.items() if row[i] is not V.RETRY)
    for i, kind in enumerate(KIND_COLUMNS)
}

# Which bank operations actually move money (or a hold), by verdict.
MONEY_MOVES = {
    (K.AUTHORIZE, V.SUCCEEDED): "hold",
    (K.CAPTURE, V.SUCCEEDED): "capture",
    (K.VOID, V.SUCCEEDED): "void",
    (K.RELEASE, V.SUCCEEDED): "release",
    (K.REFUND, V.SUCCEEDED): "refund",
}


class PaymentLifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # A new payment: accepted, the authorization is in progress.
        self.status: Status = S.PENDING
        self.running: OperationKind | None = K.AUTHORIZE
        self.history: list[Status] = [S.PENDING]
        self.moves: list[str] = []
        self.ever_terminal = False

    def _move(self, new: Status, via: str) -> None:
        old = self.status
        if new != old:
            assert (old, new) in LIFECYCLE_EDGES, f"{old} -> {new} via {via} is not in the lifecycle"
            self.history.append(new)
        self.status = new

    @rule(action=st.sampled_from(list(Action)))
    def api_request(self, action):
        allowed = {(s, a): exp for s, a, exp in REQUEST_TABLE}[(self.status, action)]
        if allowed is None:
            before = (self.status, self.running)
            try:
                domain.request(self.status, action)
            except InvalidTransition as exc:
                assert exc.status == self.status
            else:
                raise AssertionError(f"{action} accepted in {self.status}")
            assert (self.status, self.running) == before
            return
        assert self.status not in TERMINAL
        assert self.running is None, "a request was accepted while a bank call was running"
        new_status, kind = domain.request(self.status, action)
        assert (new_status, kind) == allowed
        # Money never moves twice: nothing is asked of the bank that already happened.
        ended = {"capture", "void", "release"} & set(self.moves)
        if kind in (K.CAPTURE, K.VOID):
            assert self.moves == ["hold"], self.moves
        if kind is K.REFUND:
            assert ended == {"capture"} and "refund" not in self.moves, self.moves
        self._move(new_status, f"request {action}")
        self.running = kind

    @rule()
    def hold_lapses(self):
        if self.status is S.AUTHORIZED:
            new_status, kind = domain.expire(self.status)
            self._move(new_status, "expire")
            self.running = kind
        else:
            with pytest.raises(InvalidTransition):
                domain.expire(self.status)

    @precondition(lambda self: self.running is not None)
    @rule(data=st.data())
    def bank_answers(self, data):
        kind = self.running
        # Bias towards outcomes that settle something, so that long lifecycles are reached.
        label = data.draw(
            st.one_of(st.just("ok"), st.sampled_from(DECISIVE_LABELS[kind]), st.sampled_from(OUTCOME_LABELS)),
            label="bank outcome",
        )
        assert domain.RUNNING_STATUS[kind] is self.status
        verdict = domain.classify(kind, OUTCOMES[label])
        assert verdict is CLASSIFY_TABLE[label][KIND_COLUMNS.index(kind)]
        if not domain.is_final(verdict):
            with pytest.raises(ValueError):
                domain.settle(kind, verdict)
            return  # still in progress: the same call is retried or confirmed
        new_status = domain.settle(kind, verdict)
        if (kind, verdict) in MONEY_MOVES:
            self.moves.append(MONEY_MOVES[(kind, verdict)])
        self._move(new_status, f"{kind} {verdict} ({label})")
        self.running = domain.follow_up(kind, verdict)
        if self.running is not None:
            assert domain.RUNNING_STATUS[self.running] is self.status

    @invariant()
    def status_is_valid(self):
        assert isinstance(self.status, Status)
        assert self.status.value in ALL_STATUS_VALUES

    @invariant()
    def in_progress_iff_a_requested_call_runs(self):
        in_progress = self.running is not None and self.running is not K.RELEASE
        assert (self.status in domain.IN_PROGRESS) == in_progress
        if self.running is not None:
            assert domain.RUNNING_STATUS[self.running] is self.status

    @invariant()
    def terminal_states_accept_nothing(self):
        if self.status in TERMINAL:
            self.ever_terminal = True
            for action in Action:
                with pytest.raises(InvalidTransition):
                    domain.request(self.status, action)
            with pytest.raises(InvalidTransition):
                domain.expire(self.status)
        if self.ever_terminal:
            assert self.status in TERMINAL, f"left a terminal state: {self.history}"

    @invariant()
    def history_follows_the_diagram(self):
        assert self.history[0] is S.PENDING
        for old, new in itertools.pairwise(self.history):
            assert (old, new) in LIFECYCLE_EDGES

    @invariant()
    def money_never_moves_twice(self):
        m = self.moves
        for move in ("hold", "capture", "void", "refund", "release"):
            assert m.count(move) <= 1, m
        # At most one of capture / void / release ends a hold.
        assert sum(m.count(x) for x in ("capture", "void", "release")) <= 1, m
        if "capture" in m or "void" in m or "release" in m:
            assert m[0] == "hold", m
        if "refund" in m:
            assert m.index("capture") < m.index("refund"), m
        assert self.history.count(S.REFUNDED) <= 1
        assert self.history.count(S.VOIDED) <= 1
        if S.CAPTURED in self.history:
            assert S.VOIDED not in self.history and S.EXPIRED not in self.history
        if S.REFUNDED in self.history:
            assert S.CAPTURED in self.history


PaymentLifecycle.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPaymentLifecycle = PaymentLifecycle.TestCase


# ---- outcomes the bank will not name --------------------------------------------------------------

ALREADY_CODES = [*sorted({c for codes in domain.ALREADY_DONE.values() for c in codes} | {"insufficient_funds"}), None]
OTHER_KIND_SETS = [frozenset(s) for n in range(3) for s in itertools.combinations(OperationKind, n)]


@pytest.mark.parametrize("kind", list(OperationKind))
@pytest.mark.parametrize("code", ALREADY_CODES)
@pytest.mark.parametrize("unknown", [0, 1, 2])
@pytest.mark.parametrize("others", OTHER_KIND_SETS)
def test_proof_of_our_own_work_follows_the_table(kind, code, unknown, others):
    proven = domain.proves_own_work(kind, code, unknown_before=unknown, other_kinds_tried=others)
    expected = (
        unknown > 0
        and kind is not OperationKind.AUTHORIZE
        and code in domain.ALREADY_DONE[kind]
        and not {
            OperationKind.REFUND: set(),
            OperationKind.CAPTURE: {OperationKind.VOID, OperationKind.RELEASE},
            OperationKind.VOID: {OperationKind.CAPTURE, OperationKind.RELEASE},
            OperationKind.RELEASE: {OperationKind.CAPTURE, OperationKind.VOID},
        }[kind]
        & others
    )
    assert proven is bool(expected)


@pytest.mark.parametrize("kind", [k for k in OperationKind if k is not OperationKind.AUTHORIZE])
def test_unnamed_work_names_the_missing_reference_and_flags_without_a_finding(kind):
    doubt = domain.unnamed_work(kind)
    assert doubt.code == domain.REFERENCE_UNKNOWN and doubt.finding is None
    assert domain.REFERENCE_OF[kind] in doubt.message
    assert doubt.error() == {"code": doubt.code, "message": doubt.message, "retryable": False}


@pytest.mark.parametrize(
    ("outcome", "unknown", "doubtful"),
    [
        (BankOutcome("ok", 200, body={}), 1, True),
        (BankOutcome("ok", 200, body={}), 2, True),
        (BankOutcome("ok", 200, body={}), 0, False),
        (BankOutcome("ok", 200, body={}, replayed=True), 0, False),
        (BankOutcome("ok", 200, body={}, replayed=True), 1, False),
        (BankOutcome("ok", 200, body={}, replayed=True), 2, True),
        (BankOutcome("timeout"), 2, False),
    ],
)
def test_an_approval_is_doubtful_when_another_unknown_attempt_may_have_held_money(outcome, unknown, doubtful):
    doubt = domain.doubt_of_approval(outcome, unknown_before=unknown)
    assert (doubt is not None) is doubtful
    if doubt is not None:
        assert doubt.finding == domain.POSSIBLE_DUPLICATE_HOLD


def test_a_doubtful_approval_tells_ops_which_attempts_were_lost_how_and_what_to_look_for_at_the_bank():
    timeout = domain.lost_answer(1, "2030-01-01T10:00:00Z", "w1/a", domain.error_for(BankOutcome("timeout")))
    stopped = {"attempt": 2, "at": "2030-01-01T10:00:05Z", "worker": "w2/b", "code": domain.WORKER_STOPPED}
    hold = domain.Hold(1234, "visa ending 1111", "auth_x", "2030-01-01T10:00:09Z")
    fresh = domain.doubt_of_approval(
        BankOutcome("ok", 200, body={}), unknown_before=2, lost=[timeout, stopped], hold=hold
    )
    assert fresh is not None and fresh.finding == domain.POSSIBLE_DUPLICATE_HOLD
    assert "attempt 1 at 2030-01-01T10:00:00Z; attempt 2 at 2030-01-01T10:00:05Z" in fresh.message
    first, second = fresh.evidence["lost_attempts"]
    assert first["code"] == "bank_timeout" and "did not answer in time" in first["how_it_ended"]
    assert "stopped" in second["how_it_ended"] and "just before the request is written out" in second["how_it_ended"]
    assert fresh.evidence["check_at_bank"] == (
        "the holds of 1234 cents on card visa ending 1111 placed from 2030-01-01T10:00:00Z to 2030-01-01T10:00:09Z: "
        "any besides auth_x is a second hold the gateway has no id for; void it at the bank, then resolve the payment"
    )
    replayed = domain.doubt_of_approval(
        BankOutcome("ok", 200, body={}, replayed=True), unknown_before=2, lost=[timeout, stopped]
    )
    assert replayed is not None and replayed.evidence["approval"].startswith("the bank replayed its answer")
    assert "check_at_bank" not in replayed.evidence  # no hold named: nothing to compare with


@pytest.mark.parametrize(
    ("outcome", "acted"),
    [
        (BankOutcome("ok", 200), False),
        (BankOutcome("unreachable"), False),
        (BankOutcome("error", 402, code="insufficient_funds"), False),
        (BankOutcome("error", 500, code="internal_error"), False),
        (BankOutcome("error", 400, code="unknown_bank_error"), True),
        (BankOutcome("error", 502, code="bad_gateway"), True),
        (BankOutcome("timeout"), True),
        (BankOutcome("connection"), True),
        (BankOutcome("unparseable", 200), True),
        (BankOutcome("malformed", 200), True),
        (BankOutcome("redirect", 307), True),
        (BankOutcome("oversized", 200), True),
    ],
)
def test_which_failures_may_hide_work_done(outcome, acted):
    assert domain.may_have_acted(outcome) is acted
