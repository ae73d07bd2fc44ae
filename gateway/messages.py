"""The messages the gateway writes to its outbox: commands for workers and events for FicMart.

Each carries the current trace (gateway.tracing) in its headers, so the relay publishes it as
the AMQP `traceparent` header: whoever writes a message inside an API request or a worker's
handling of a command needs to pass nothing for the payment's trace to go on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import orjson

from gateway import tracing
from gateway.timefmt import iso

COMMANDS_EXCHANGE = "payments.commands"
EVENTS_EXCHANGE = "payments.events"
MERCHANT_HEADER = "merchant"


@dataclass(frozen=True)
class OutboxMessage:
    exchange: str
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, str] | None = None  # AMQP headers the relay publishes with


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def command(operation_id: str, kind: str) -> OutboxMessage:
    """Ask a worker to run one operation at the bank; the body names it, nothing more."""
    body = orjson.dumps({"operation_id": operation_id})
    return OutboxMessage(COMMANDS_EXCHANGE, kind, new_id("cmd"), body, tracing.inject({}) or None)


def event(event_type: str, payment: dict, occurred_at: datetime, *, merchant: str) -> OutboxMessage:
    """A payment event for FicMart. The merchant (the API key's caller the payment belongs to)
    is in the body and in a header, so a consumer can tell two callers' payments apart and
    bind to its own (README: events by merchant)."""
    event_id = new_id("evt")
    body = {
        "event_id": event_id,
        "type": event_type,
        "occurred_at": iso(occurred_at),
        "merchant": merchant,
        "payment": payment,
    }
    headers = tracing.inject({MERCHANT_HEADER: merchant})
    return OutboxMessage(EVENTS_EXCHANGE, event_type, event_id, orjson.dumps(body), headers)
