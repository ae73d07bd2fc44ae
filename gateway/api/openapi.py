"""The OpenAPI 3.1 document, generated from the pydantic models of schemas.py.

Built once at start-up and served at /openapi.json; /docs shows it with
Swagger UI (gateway/api/docs.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.api import schemas
from gateway.api.errors import JSON

REF = "#/components/schemas/{model}"

_MODELS: list[type[BaseModel]] = [
    schemas.AuthorizeIn,
    schemas.ActionIn,
    schemas.Payment,
    schemas.PaymentList,
    schemas.EventList,
    schemas.ErrorResponse,
]

DESCRIPTION = """\
The payment gateway between FicMart's order service and its card bank.

* JSON bodies, UTF-8; amounts are integer cents; currency is always `USD`.
* Every `/v1` request needs `Authorization: Bearer <api key>` (401 otherwise). Payments and
  idempotency keys are scoped to the caller the key belongs to.
* Every POST under `/v1` needs an `Idempotency-Key` header: 1-255 printable ASCII characters
  (400 otherwise). The same key with the same method, path and body returns the original
  answer with `Idempotent-Replayed: true`; with another body or path, 422
  `idempotency_key_reused`; while the first request is still running, 409
  `request_in_progress` with `Retry-After`. Keys are kept at least 24 hours.
* Errors are always `{"error": {"code": "...", "message": "...", ...}}`. Unknown JSON
  fields and unknown query parameters are rejected with 422, and JSON types are strict:
  an amount is `5000`, not `"5000"` nor `5000.0`. Bodies larger than 64 KiB get 413; a
  non-empty body sent with a Content-Type other than JSON gets 415.
* Every response carries `X-Request-Id` (the request's own, if it sent a sane one:
  1-128 characters of `A-Z a-z 0-9 . _ : -`).
* 503 `service_unavailable` (with `Retry-After`, the seconds until there should be room)
  means the database could not take the request, or the gateway could not finish more work
  soon (it refuses at once rather than queueing), and 429 `too_many_requests` that this API
  key holds its share of the capacity or is over its rate of new requests. Nothing was done:
  repeating the request with the same Idempotency-Key is safe.

Payment lifecycle: `pending -> authorized -> capturing -> captured -> refunding -> refunded`;
`authorized -> voiding -> voided`; `authorized -> expired`; `pending -> declined`.
`pending`, `capturing`, `voiding` and `refunding` mean the bank call is in progress.
"""

_ERROR_CODES = {
    400: "`invalid_json`, `idempotency_key_missing`, `idempotency_key_invalid`",
    401: "`unauthorized`: missing or unknown API key",
    404: "`payment_not_found`",
    409: "",
    413: "`payload_too_large`: body over 64 KiB",
    415: "`unsupported_media_type`: the body must be application/json",
    422: "",
    429: "`too_many_requests`: this API key holds its share of the API's capacity, or is over its rate; retry later",
    500: "`internal_error`: a bug; logged with the request id",
    503: "`service_unavailable`: at capacity, or the database is unreachable; retry with the same Idempotency-Key",
}


def _error(status: int, codes: str | None = None) -> dict:
    headers: dict[str, dict[str, Any]] = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
    if status in (409, 429, 503):
        headers["Retry-After"] = {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer"},
        }
    return {
        "description": codes or _ERROR_CODES[status],
        "headers": headers,
        "content": {JSON: {"schema": {"$ref": REF.format(model="ErrorResponse")}}},
    }


def _ok(description: str, model: str | None, extra_headers: dict | None = None, content_type: str = JSON) -> dict:
    headers = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}, **(extra_headers or {})}
    out: dict[str, Any] = {"description": description, "headers": headers}
    if model is not None:
        out["content"] = {content_type: {"schema": {"$ref": REF.format(model=model)}}}
    return out


def _query_params(model: type[BaseModel]) -> list[dict]:
    schema = model.model_json_schema()
    params = []
    for name, prop in schema["properties"].items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        if "anyOf" in prop:  # optional: a query parameter is either there or not, never null
            (branch,) = [b for b in prop.pop("anyOf") if b.get("type") != "null"]
            prop = {**branch, **prop}
        if prop.get("default", 0) is None:
            prop.pop("default")
        param = {"name": name, "in": "query", "required": False, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def build() -> dict:
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template=REF)
    auth: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    v1_errors = {401: _error(401), 429: _error(429), 500: _error(500), 503: _error(503)}
    post_errors = {
        400: _error(400),
        413: _error(413),
        415: _error(415),
    }
    payment_id = {"$ref": "#/components/parameters/PaymentId"}
    idem = {"$ref": "#/components/parameters/IdempotencyKey"}
    request_id = {"$ref": "#/components/parameters/RequestId"}
    replayed = {"Idempotent-Replayed": {"$ref": "#/components/headers/Idempotent-Replayed"}}

    def action(name: str, status: str, refusal: str) -> dict:
        return {
            "post": {
                "operationId": f"{name}_payment",
                "summary": f"{name.capitalize()} a payment",
                "description": (
                    f"Moves the payment to `{status}` and hands the {name} to the bank in the background; "
                    f"follow it with `GET /v1/payments/{{id}}?wait=N` or the `payment.*` events. "
                    f'The body is empty, `{{}}` or `{{"amount": N}}` with N equal to the full amount '
                    f"(no partial operations). {refusal}"
                ),
                "tags": ["payments"],
                "security": auth,
                "parameters": [payment_id, idem, request_id],
                "requestBody": {
                    "required": False,
                    "content": {JSON: {"schema": {"$ref": REF.format(model="ActionIn")}}},
                },
                "responses": {
                    "202": _ok(f"accepted: the payment, now `{status}`", "Payment", replayed),
                    **{str(k): v for k, v in post_errors.items()},
                    "404": _error(404, "`payment_not_found`: no such payment for this API key"),
                    "409": _error(
                        409,
                        "`invalid_state_transition` (the error names the current `status`), `request_in_progress`, "
                        "`bank_reference_unknown`: the bank did the step before this one but never named it "
                        "(`reference`, e.g. `capture_id`, is null on the receipt, which is flagged "
                        "`attention_required`). The money is safe: nothing was started and the payment keeps its "
                        "status; once ops have recorded the reference, the same request (same Idempotency-Key "
                        "too: nothing was stored for it) is accepted",
                    ),
                    "422": _error(
                        422,
                        "`validation_error` (with `details`), `amount_mismatch` "
                        "(with `expected_amount`), `idempotency_key_reused`",
                    ),
                    **{str(k): v for k, v in v1_errors.items()},
                },
            }
        }

    paths = {
        "/v1/payments": {
            "post": {
                "operationId": "authorize_payment",
                "summary": "Authorize a payment",
                "description": (
                    "Records the payment as `pending` and hands the authorization to the bank in the "
                    "background. Input the gateway can judge alone (Luhn, card expired by its own expiry "
                    "date, CVV format, amount, currency, missing or unknown fields) gets 422 at once. "
                    "An order with a live payment (anything but declined, voided, expired) gets 409 "
                    "`order_already_paid` naming it in `payment_id`. The card number and CVV never "
                    "appear in any response."
                ),
                "tags": ["payments"],
                "security": auth,
                "parameters": [idem, request_id],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": {"$ref": REF.format(model="AuthorizeIn")}}},
                },
                "responses": {
                    "202": _ok(
                        "accepted: the payment, `pending`",
                        "Payment",
                        {
                            "Location": {"description": "/v1/payments/{id}", "schema": {"type": "string"}},
                            **replayed,
                        },
                    ),
                    **{str(k): v for k, v in post_errors.items()},
                    "409": _error(409, "`order_already_paid` (with `payment_id`), `request_in_progress`"),
                    "422": _error(
                        422, "`validation_error` (with `details`: field, code, message), `idempotency_key_reused`"
                    ),
                    **{str(k): v for k, v in v1_errors.items()},
                },
            },
            "get": {
                "operationId": "list_payments",
                "summary": "List the payments of an order or a customer",
                "description": (
                    "Exactly one of `order_id` or `customer_id` (422 `validation_error` otherwise). "
                    "Newest first, `limit` per page (default 10); pass the last id of a page as "
                    "`starting_after` to get the next one while `has_more` is true. An unknown "
                    "`starting_after` gets 404 `payment_not_found`."
                ),
                "tags": ["payments"],
                "security": auth,
                "parameters": [*_query_params(schemas.ListQuery), request_id],
                "responses": {
                    "200": _ok("a page of payments", "PaymentList"),
                    "404": _error(404, "`payment_not_found`: `starting_after` names no payment"),
                    "422": _error(422, "`validation_error` (with `details`)"),
                    **{str(k): v for k, v in v1_errors.items()},
                },
            },
        },
        "/v1/payments/{payment_id}": {
            "get": {
                "operationId": "get_payment",
                "summary": "Get a payment (optionally long poll)",
                "description": (
                    "With `wait=N` (0-30 seconds) and the payment in an in-progress status "
                    "(pending, capturing, voiding, refunding), the request is held until the payment "
                    "leaves it or N seconds pass, then answers with the payment as it is."
                ),
                "tags": ["payments"],
                "security": auth,
                "parameters": [payment_id, *_query_params(schemas.GetQuery), request_id],
                "responses": {
                    "200": _ok("the payment", "Payment"),
                    "404": _error(404, "`payment_not_found`"),
                    "422": _error(422, "`validation_error`: bad `wait`"),
                    **{str(k): v for k, v in v1_errors.items()},
                },
            }
        },
        "/v1/payments/{payment_id}/capture": action(
            "capture", "capturing", "Only an `authorized` payment can be captured (409 otherwise)."
        ),
        "/v1/payments/{payment_id}/void": action(
            "void", "voiding", "Only an `authorized` payment can be voided (409 otherwise)."
        ),
        "/v1/payments/{payment_id}/refund": action(
            "refund", "refunding", "Only a `captured` payment can be refunded, once (409 otherwise)."
        ),
        "/v1/events": {
            "get": {
                "operationId": "list_events",
                "summary": "The events feed: this API key's payment events since a cursor",
                "description": (
                    "Every event published on RabbitMQ for this API key's payments, with the same body, "
                    "oldest first, kept 30 days. Pass the last event id you processed as `after` "
                    "(`next_after` of the previous page; none: from the start of what is kept) and ask "
                    "again while `has_more` is true. Events appear in the order their transactions "
                    "committed, once no earlier transaction can still commit, so a cursor never skips "
                    "an event that was committed late; the events of one payment are always in order. "
                    "With `wait=N` (0-30 seconds) and nothing after the cursor, the request is held "
                    "until an event arrives or N seconds pass, then answers (possibly an empty page). "
                    "Delivery is at least once: dedupe on `event_id`. An unknown `after` (another "
                    "key's event, or one pruned after 30 days) gets 404 `event_not_found`."
                ),
                "tags": ["events"],
                "security": auth,
                "parameters": [*_query_params(schemas.EventsQuery), request_id],
                "responses": {
                    "200": _ok("a page of events", "EventList"),
                    "404": _error(404, "`event_not_found`: `after` names no event of this API key"),
                    "422": _error(422, "`validation_error` (with `details`): bad `after`, `limit` or `wait`"),
                    **{str(k): v for k, v in v1_errors.items()},
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/docs": {
            "get": {
                "operationId": "docs",
                "summary": "This document in Swagger UI (assets served locally)",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "HTML",
                        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    for item in paths.values():
        for op in item.values():
            op["responses"] = dict(sorted(op["responses"].items()))
    return {
        "openapi": "3.1.0",
        "info": {"title": "FicMart payment gateway", "version": "1.0.0", "description": DESCRIPTION},
        "tags": [
            {"name": "payments", "description": "authorize, capture, void, refund, read"},
            {"name": "events", "description": "the events feed: every payment event since a cursor"},
            {"name": "operations", "description": "this document"},
        ],
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "an API key from GATEWAY_API_KEYS"},
            },
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": True,
                    "description": "1-255 printable ASCII characters (0x20-0x7E); HTTP drops leading and "
                    "trailing spaces. Scoped to the API key's caller; kept at least 24 hours.",
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 255,
                        "pattern": r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$",
                    },
                },
                "RequestId": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "required": False,
                    "description": "echoed in the response when it is 1-128 characters of A-Z a-z 0-9 . _ : - ; "
                    "any other value (or none) is replaced by a generated `req_...` id",
                    "schema": {"type": "string"},
                },
                "PaymentId": {
                    "name": "payment_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": schemas.PAYMENT_ID_PATTERN},
                },
            },
            "headers": {
                "X-Request-Id": {
                    "description": "the request's id, also in every log line",
                    "schema": {"type": "string"},
                },
                "Idempotent-Replayed": {
                    "description": "`true` when this is the stored answer to an earlier request with the same key",
                    "schema": {"type": "string", "enum": ["true"]},
                },
            },
        },
    }
