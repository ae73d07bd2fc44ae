"""Pydantic models of the HTTP API: request validation and the source of /openapi.json.

Requests are strict (no coercion: 5000 is an amount, "5000" and 50.0 are not)
and closed (unknown fields are errors). Response models are never used to
build responses (a payment's body is gateway.views.receipt's, whoever sends
it); they exist so that the OpenAPI document describes exactly what is
returned, which tests/unit/test_payment.py holds the receipt to.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.cards import luhn_ok
from gateway.domain import Status
from gateway.redact import clean
from gateway.timefmt import now

MAX_AMOUNT = 1_000_000_000  # cents: $10,000,000.00
MAX_LIMIT = 100
MAX_WAIT = 30

# Merchant-side identifiers: printable ASCII without spaces; Postgres text and logs stay clean.
REF_PATTERN = r"^[\x21-\x7e]+$"
PAYMENT_ID_PATTERN = r"^pay_[0-9a-f]{32}$"
PAYMENT_ID = re.compile(PAYMENT_ID_PATTERN)
EVENT_ID_PATTERN = r"^evt_[0-9a-f]{32}$"
IDEMPOTENCY_KEY_PATTERN = r"^[\x20-\x7e]{1,255}$"
IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

Ref = Annotated[str, Field(min_length=1, max_length=255, pattern=REF_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---- requests -----------------------------------------------------------------------


class CardIn(_Strict):
    """The card as FicMart sends it. Never stored in clear, never echoed back."""

    number: Annotated[str, Field(pattern=r"^[0-9]{13,19}$", description="13-19 digits passing the Luhn check")]
    cvv: Annotated[str, Field(pattern=r"^[0-9]{3,4}$", description="3 or 4 digits")]
    expiry_month: Annotated[int, Field(ge=1, le=12)]
    expiry_year: Annotated[int, Field(ge=2000, le=2099, description="four digits")]

    @field_validator("number")
    @classmethod
    def _luhn(cls, number: str) -> str:
        if not luhn_ok(number):
            raise PydanticCustomError("invalid_card_number", "card number fails the Luhn check")
        return number

    @model_validator(mode="after")
    def _not_expired(self) -> CardIn:
        today = now()
        if (self.expiry_year, self.expiry_month) < (today.year, today.month):
            raise PydanticCustomError(
                "card_expired",
                "the card expired at the end of {expiry}",
                {"expiry": f"{self.expiry_month:02d}/{self.expiry_year}"},
            )
        return self


class AuthorizeIn(_Strict):
    """POST /v1/payments."""

    order_id: Ref
    customer_id: Ref
    amount: Annotated[int, Field(ge=1, le=MAX_AMOUNT, description="integer cents")]
    currency: Literal["USD"]
    card: CardIn


class ActionIn(_Strict):
    """POST /v1/payments/{id}/capture|void|refund: the body may be empty or `{}`."""

    amount: Annotated[int, Field(ge=1, le=MAX_AMOUNT)] | None = Field(
        default=None, description="must equal the payment's full amount"
    )


class _Query(BaseModel):
    # Query strings are text: numbers arrive as "10", so these are lax. Unknown parameters
    # are refused like unknown JSON fields: a misspelt `custmer_id` must not pass unnoticed.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GetQuery(_Query):
    wait: Annotated[
        float,
        Field(
            default=0,
            ge=0,
            le=MAX_WAIT,
            description="seconds to hold the request while the payment is in progress (long poll)",
        ),
    ]


class ListQuery(_Query):
    order_id: Ref | None = None
    customer_id: Ref | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 10
    starting_after: Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)] | None = Field(
        default=None, description="a payment id from the previous page: the page starts after it"
    )

    @model_validator(mode="after")
    def _one_filter(self) -> ListQuery:
        if (self.order_id is None) == (self.customer_id is None):
            raise PydanticCustomError("filter_required", "give exactly one of order_id or customer_id")
        return self


class EventsQuery(_Query):
    after: Annotated[str, Field(pattern=EVENT_ID_PATTERN)] | None = Field(
        default=None,
        description="the last event id processed (`next_after` of the previous page); none: from the start",
    )
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT)] = 10
    wait: Annotated[
        float,
        Field(
            default=0,
            ge=0,
            le=MAX_WAIT,
            description="seconds to hold the request while there is no event after the cursor (long poll)",
        ),
    ]


# ---- responses (documentation) --------------------------------------------------------


class CardOut(BaseModel):
    brand: Literal["visa", "mastercard", "amex", "discover", "unknown"]
    last4: Annotated[str, Field(pattern=r"^[0-9]{4}$")]
    expiry_month: int
    expiry_year: int


class BankRefs(BaseModel):
    authorization_id: str | None
    authorization_expires_at: datetime | None
    capture_id: str | None
    void_id: str | None
    refund_id: str | None


class LastError(BaseModel):
    code: str
    message: str
    retryable: bool


class HistoryEntry(BaseModel):
    status: Status
    at: datetime


class Payment(BaseModel):
    """The receipt: what FicMart sees of a payment."""

    id: Annotated[str, Field(pattern=PAYMENT_ID_PATTERN)]
    order_id: str
    customer_id: str
    amount: int
    currency: Literal["USD"]
    status: Status
    card: CardOut
    bank: BankRefs
    last_error: LastError | None
    attention_required: bool
    history: list[HistoryEntry]
    created_at: datetime
    updated_at: datetime


class PaymentList(BaseModel):
    data: list[Payment]
    has_more: bool


class Event(BaseModel):
    """A payment event: the same body as the RabbitMQ message."""

    event_id: Annotated[str, Field(pattern=EVENT_ID_PATTERN)]
    type: Literal[
        "payment.authorized",
        "payment.declined",
        "payment.captured",
        "payment.voided",
        "payment.refunded",
        "payment.expired",
        "payment.attention_required",
    ]
    occurred_at: datetime
    merchant: str
    payment: Payment


class EventList(BaseModel):
    data: list[Event] = Field(description="oldest first, in feed order")
    has_more: bool = Field(description="more events follow now: ask again with `after` = `next_after`")
    next_after: str | None = Field(
        description="the cursor for the next page: the last event of this page (the request's own when it is empty)"
    )


class ErrorDetail(BaseModel):
    field: str
    code: str
    message: str


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="snake_case, stable: clients branch on it")
    message: str = Field(description="human text")
    details: list[ErrorDetail] | None = Field(default=None, description="validation_error: one entry per problem")
    payment_id: str | None = Field(default=None, description="order_already_paid: the live payment of the order")
    status: Status | None = Field(
        default=None, description="invalid_state_transition, bank_reference_unknown: the payment's status"
    )
    reference: Literal["authorization_id", "capture_id"] | None = Field(
        default=None, description="bank_reference_unknown: the bank reference the gateway lacks"
    )
    expected_amount: int | None = Field(default=None, description="amount_mismatch: the payment's full amount")
    param: str | None = Field(default=None, description="the query parameter at fault (unknown starting_after)")


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- turning validation errors into the API's error details -----------------------------

_MAX_FIELD_NAME = 200


def clean_field(name: str) -> str:
    """A field name as sent by the client, safe to echo in an error."""
    return clean(name, _MAX_FIELD_NAME)


def _field(loc: tuple[Any, ...], prefix: str) -> str:
    parts = [str(p) for p in loc]
    return clean_field(".".join(parts) if parts else prefix)


def error_details(exc: ValidationError, prefix: str = "body") -> list[dict]:
    """field/code/message per error. Pydantic's `input` (which could be a card number) is dropped."""
    return [
        {"field": _field(err["loc"], prefix), "code": err["type"], "message": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def is_invalid_json(exc: ValidationError) -> bool:
    return any(err["type"] == "json_invalid" for err in exc.errors(include_url=False, include_input=False))
