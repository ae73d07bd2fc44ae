"""The Payment type (gateway.domain) and its one serializer, the receipt (gateway.views).

The receipt must be exactly what /openapi.json says a payment is (gateway.api.schemas.Payment,
the response model): every field it names, no other, each valid. A store row read into a
Payment must read back the receipt's own history format (payment_history_json builds it in
SQL; tests/integration/test_receipts.py holds the SQL to it).
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gateway import messages
from gateway.api import schemas
from gateway.domain import ATTENTION_EVENT, BANK_REFERENCES, EVENT_STATUSES, HistoryEntry, Payment, Status, event_type
from gateway.views import receipt

AT = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC))
hex32 = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
refs = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
bank_ids = st.none() | st.uuids().map(str)
errors = st.none() | st.fixed_dictionaries({"code": refs, "message": st.text(max_size=40), "retryable": st.booleans()})


@st.composite
def payments(draw: st.DrawFn) -> Payment:
    history = draw(st.lists(st.builds(HistoryEntry, st.sampled_from(Status), times), min_size=1, max_size=6))
    return Payment(
        id="pay_" + draw(hex32),
        order_id=draw(refs),
        customer_id=draw(refs),
        amount=draw(st.integers(1, schemas.MAX_AMOUNT)),
        currency="USD",
        status=draw(st.sampled_from(Status)),
        card_brand=draw(st.sampled_from(["visa", "mastercard", "amex", "discover", "unknown"])),
        card_last4=draw(st.text(alphabet="0123456789", min_size=4, max_size=4)),
        card_expiry_month=draw(st.integers(1, 12)),
        card_expiry_year=draw(st.integers(2000, 2099)),
        authorization_id=draw(bank_ids.map(lambda u: u and f"auth_{u}")),
        authorization_expires_at=draw(st.none() | times),
        capture_id=draw(bank_ids.map(lambda u: u and f"cap_{u}")),
        void_id=draw(bank_ids.map(lambda u: u and f"void_{u}")),
        refund_id=draw(bank_ids.map(lambda u: u and f"ref_{u}")),
        last_error=draw(errors),
        attention_required=draw(st.booleans()),
        created_at=draw(times),
        updated_at=draw(times),
        history=tuple(history),
    )


def row_of(payment: Payment) -> dict[str, Any]:
    """The store's row of `payment`: its columns, and the history as payment_history_json builds it."""
    row = {f.name: getattr(payment, f.name) for f in fields(Payment)}
    return {**row, "status": payment.status.value, "history": receipt(payment)["history"]}


def _model_fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


@settings(max_examples=300, deadline=None)
@given(payments())
def test_the_receipt_is_exactly_the_openapi_payment(payment):
    body = receipt(payment)
    validated = schemas.Payment.model_validate_json(orjson.dumps(body))
    assert set(body) == _model_fields(schemas.Payment)
    assert set(body["card"]) == _model_fields(schemas.CardOut)
    assert set(body["bank"]) == _model_fields(schemas.BankRefs)
    assert body["last_error"] is None or set(body["last_error"]) == _model_fields(schemas.LastError)
    assert all(set(entry) == _model_fields(schemas.HistoryEntry) for entry in body["history"])
    assert validated.status == payment.status
    assert [(h.status, h.at) for h in validated.history] == [(h.status, h.at) for h in payment.history]


@settings(max_examples=300, deadline=None)
@given(payments())
def test_a_row_reads_into_the_payment_it_was_written_from(payment):
    assert Payment.from_row(row_of(payment)) == payment


EVENT_TYPES = sorted({event_type(s) for s in EVENT_STATUSES} | {ATTENTION_EVENT})


@settings(max_examples=100, deadline=None)
@given(payments(), st.sampled_from(EVENT_TYPES))
def test_an_event_carries_the_receipt_as_openapi_describes_it(payment, kind):
    body = orjson.loads(messages.event(kind, receipt(payment), AT, merchant="ficmart").body)
    schemas.Event.model_validate(body)
    assert body["payment"] == receipt(payment)


def test_the_receipt_groups_the_card_and_the_bank_and_formats_times():
    payment = Payment.pending(
        id="pay_" + "a" * 32,
        order_id="ord_1",
        customer_id="cus_1",
        amount=5000,
        card_brand="visa",
        card_last4="1111",
        card_expiry_month=12,
        card_expiry_year=2030,
        at=AT,
    )
    assert receipt(payment) == {
        "id": "pay_" + "a" * 32,
        "order_id": "ord_1",
        "customer_id": "cus_1",
        "amount": 5000,
        "currency": "USD",
        "status": "pending",
        "card": {"brand": "visa", "last4": "1111", "expiry_month": 12, "expiry_year": 2030},
        "bank": {
            "authorization_id": None,
            "authorization_expires_at": None,
            "capture_id": None,
            "void_id": None,
            "refund_id": None,
        },
        "last_error": None,
        "attention_required": False,
        "history": [{"status": "pending", "at": "2030-01-02T03:04:05.678901Z"}],
        "created_at": "2030-01-02T03:04:05.678901Z",
        "updated_at": "2030-01-02T03:04:05.678901Z",
    }


@settings(max_examples=200, deadline=None)
@given(payments(), st.sampled_from(Status), times, errors)
def test_entering_a_status_adds_history_only_when_the_status_moves(payment, status, at, error):
    entered = payment.entering(status, at, last_error=error)
    assert (entered.status, entered.updated_at, entered.last_error) == (status, at, error)
    if status is payment.status:
        assert entered.history == payment.history
    else:
        assert entered.history == (*payment.history, HistoryEntry(status, at))
    assert entered.created_at == payment.created_at
    assert entered.references == payment.references


def test_entering_keeps_the_payment_it_came_from():
    payment = Payment.from_row(row_of(_authorized()))
    captured = payment.entering(Status.CAPTURED, AT + timedelta(seconds=1), capture_id="cap_1")
    assert (payment.status, payment.capture_id, len(payment.history)) == (Status.AUTHORIZED, None, 2)
    assert (captured.status, captured.capture_id, len(captured.history)) == (Status.CAPTURED, "cap_1", 3)
    with pytest.raises(FrozenInstanceError):
        payment.status = Status.CAPTURED  # type: ignore[misc]
    with pytest.raises(TypeError):
        payment.entering(Status.CAPTURED, AT, no_such_field=1)


def test_references_are_the_bank_references_by_name():
    payment = _authorized()
    assert list(payment.references) == list(BANK_REFERENCES)
    assert payment.references["authorization_id"] == "auth_1"
    assert payment.references["capture_id"] is None


def _authorized() -> Payment:
    pending = Payment.pending(
        id="pay_" + "b" * 32,
        order_id="ord_2",
        customer_id="cus_2",
        amount=100,
        card_brand="amex",
        card_last4="0005",
        card_expiry_month=1,
        card_expiry_year=2031,
        at=AT,
    )
    return pending.entering(Status.AUTHORIZED, AT, authorization_id="auth_1")
