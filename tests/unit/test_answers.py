"""gateway.answers: a 2xx is believed only when it answers the request we sent."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.answers import AnswerMismatch, Asked, check_error, check_success
from gateway.domain import UNKNOWN_BANK_ERROR

AUTH = f"auth_{uuid.uuid4()}"
CAP = f"cap_{uuid.uuid4()}"
VOID = f"void_{uuid.uuid4()}"
REF = f"ref_{uuid.uuid4()}"

GOOD = {
    "authorize": (
        Asked("authorize", amount=700),
        {
            "authorization_id": AUTH,
            "status": "approved",
            "amount": 700,
            "currency": "USD",
            "expires_at": "2031-01-01T00:00:00Z",
            "created_at": "2030-12-25T00:00:00Z",
        },
    ),
    "capture": (
        Asked("capture", amount=700, authorization_id=AUTH),
        {
            "capture_id": CAP,
            "authorization_id": AUTH,
            "status": "captured",
            "amount": 700,
            "currency": "USD",
            "captured_at": "2030-12-25T00:00:00Z",
        },
    ),
    "void": (
        Asked("void", authorization_id=AUTH),
        {"void_id": VOID, "authorization_id": AUTH, "status": "voided", "voided_at": "2030-12-25T00:00:00Z"},
    ),
    "refund": (
        Asked("refund", amount=700, capture_id=CAP),
        {
            "refund_id": REF,
            "capture_id": CAP,
            "status": "refunded",
            "amount": 700,
            "currency": "USD",
            "refunded_at": "2030-12-25T00:00:00Z",
        },
    ),
    "get_authorization": (
        Asked("get_authorization", authorization_id=AUTH),
        {
            "authorization_id": AUTH,
            "status": "approved",
            "amount": 700,
            "currency": "USD",
            "expires_at": "2031-01-01T00:00:00Z",
            "created_at": "2030-12-25T00:00:00Z",
        },
    ),
    "get_capture": (
        Asked("get_capture", capture_id=CAP),
        {"capture_id": CAP, "authorization_id": AUTH, "status": "captured", "amount": 700, "currency": "USD"},
    ),
    "get_refund": (
        Asked("get_refund", refund_id=REF),
        {"refund_id": REF, "capture_id": CAP, "status": "refunded", "amount": 700, "currency": "USD"},
    ),
}


@pytest.mark.parametrize("call", list(GOOD))
def test_the_contracts_answer_is_kept_without_extras(call):
    asked, body = GOOD[call]
    kept = check_success(asked, {**body, "card_number": "4111111111111111", "cvv": "123", "x": "y"})
    assert kept and set(kept) <= set(body)
    assert all(kept[k] == body[k] for k in kept)
    assert not {"created_at", "captured_at", "voided_at", "refunded_at"} & set(kept)


@pytest.mark.parametrize("call", list(GOOD))
@pytest.mark.parametrize(
    "field", ["authorization_id", "capture_id", "void_id", "refund_id", "status", "amount", "currency", "expires_at"]
)
@pytest.mark.parametrize("bad", [None, "", 1, 700.0, "700", "auth_1", "x" * 10_000, ["a"], {"a": 1}])
def test_any_wrong_value_of_a_field_the_call_promises_is_a_mismatch(call, field, bad):
    asked, body = GOOD[call]
    if field not in body:
        return
    changed = {**body, field: bad}
    try:
        kept = check_success(asked, changed)
    except AnswerMismatch as exc:
        assert len(str(exc)) < 200
        return
    # Only a field the gateway does not use may carry anything, and a GET's amount is
    # whatever the bank has: reconciliation compares it with the receipt.
    if call.startswith("get_") and field == "amount" and type(bad) is int:
        assert kept["amount"] == bad
        return
    assert field not in kept, (call, field, bad, kept)


@pytest.mark.parametrize("call", list(GOOD))
def test_a_missing_field_that_is_used_is_a_mismatch(call):
    asked, body = GOOD[call]
    for field in check_success(asked, body):
        with pytest.raises(AnswerMismatch):
            check_success(asked, {k: v for k, v in body.items() if k != field})


def test_an_answer_about_someone_elses_object_is_a_mismatch():
    other_auth, other_cap = f"auth_{uuid.uuid4()}", f"cap_{uuid.uuid4()}"
    with pytest.raises(AnswerMismatch, match="authorization_id"):
        check_success(GOOD["capture"][0], {**GOOD["capture"][1], "authorization_id": other_auth})
    with pytest.raises(AnswerMismatch, match="capture_id"):
        check_success(GOOD["refund"][0], {**GOOD["refund"][1], "capture_id": other_cap})
    with pytest.raises(AnswerMismatch, match="authorization_id"):
        check_success(GOOD["void"][0], {**GOOD["void"][1], "authorization_id": other_auth})
    with pytest.raises(AnswerMismatch):
        check_success(GOOD["get_capture"][0], {**GOOD["get_capture"][1], "capture_id": other_cap})


@pytest.mark.parametrize("body", [None, [], "approved", 1])
def test_a_body_that_is_not_an_object_is_a_mismatch(body):
    with pytest.raises(AnswerMismatch):
        check_success(GOOD["authorize"][0], body)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_ids_must_be_prefix_and_lowercase_uuid(text):
    asked, body = GOOD["authorize"]
    candidate = f"auth_{text}"
    try:
        uuid_ok = str(uuid.UUID(text)) == text
    except ValueError:
        uuid_ok = False
    try:
        check_success(asked, {**body, "authorization_id": candidate})
        assert uuid_ok, candidate
    except AnswerMismatch:
        assert not uuid_ok, candidate


def test_error_codes_of_the_contract_pass_others_are_unknown():
    assert check_error({"error": "insufficient_funds"}) == ("insufficient_funds", {"error": "insufficient_funds"})
    code, kept = check_error({"error": "4111111111111111" + "y" * 1000})
    assert code == UNKNOWN_BANK_ERROR and kept["error"] == code
    assert "4111111111111111" not in kept["bank_code"] and len(kept["bank_code"]) < 200
    assert check_error({"error": None})[0] == UNKNOWN_BANK_ERROR


def test_what_the_bank_says_is_kept_printable_redacted_and_short():
    """NUL (which jsonb refuses), other controls and bidi overrides go; a card number split by
    them is joined up BEFORE the redaction, so it is redacted too."""
    said = "declined\u0000: card 4111\u00001111\u0000 1111\u001b1111 \u202ecall us" + "z" * 1000
    code, kept = check_error({"error": "invalid_card", "message": said})
    assert code == "invalid_card" and kept["message"].isprintable()
    assert "4111" not in kept["message"] and "[redacted]" in kept["message"] and len(kept["message"]) < 400
    assert kept["message"].startswith("declined: card [redacted]")
