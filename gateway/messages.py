"""The messages the gateway writes to its outbox: commands for workers and events for FicMart.

Each carries the current trace (gateway.tracing) in its headers, so the relay publishes it as
the AMQP `traceparent` header: whoever writes a message inside an API request or a worker's
handling of a command needs to pass nothing for the payment's trace to go on.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime

import orjson

from gateway import tracing
from gateway.timefmt import iso

COMMANDS_EXCHANGE = "payments.commands"
# Each merchant's events go to a topic exchange of its own, payments.events.<merchant>, which
# its broker account alone may read (README: events by merchant; gatewayctl/brokeraccount.py).
EVENTS_EXCHANGE_PREFIX = "payments.events."
# The exchange every merchant's events shared before: rows an earlier version wrote may still
# name it (schema.sql moves those it finds to their merchant's exchange).
SHARED_EVENTS_EXCHANGE = "payments.events"
MERCHANT_HEADER = "merchant"


@dataclass(frozen=True)
class OutboxMessage:
    exchange: str
    routing_key: str
    message_id: str
    body: bytes
    headers: dict[str, str] | None = None  # AMQP headers the relay publishes with


def events_exchange(merchant: str) -> str:
    return EVENTS_EXCHANGE_PREFIX + merchant


def is_events_exchange(name: str) -> bool:
    return name.startswith(EVENTS_EXCHANGE_PREFIX) or name == SHARED_EVENTS_EXCHANGE


def new_id(prefix: str) -> str:
    # The 128 bits uuid4 takes from the kernel, without building a UUID: 0.47 against 2.08 µs
    # (timeit), and a payment makes several ids.
    return f"{prefix}_{os.urandom(16).hex()}"


# An operation id as the gateway writes them (op_ + hex) fits this; anything else in a command
# (a NUL byte, a megabyte of text, no id at all) makes it unreadable: it never reaches SQL.
_OPERATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def is_operation_id(value: object) -> bool:
    return isinstance(value, str) and _OPERATION_ID.fullmatch(value) is not None


def operation_id_of(body: bytes) -> str | None:
    """The operation a command names, or None when the body is not a readable command."""
    try:
        operation_id = orjson.loads(body)["operation_id"]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        return None
    return operation_id if is_operation_id(operation_id) else None


def command(operation_id: str, kind: str) -> OutboxMessage:
    """Ask a worker to run one operation at the bank; the body names it, nothing more."""
    body = orjson.dumps({"operation_id": operation_id})
    return OutboxMessage(COMMANDS_EXCHANGE, kind, new_id("cmd"), body, tracing.inject({}) or None)


def event(event_type: str, payment: dict, occurred_at: datetime, *, merchant: str) -> OutboxMessage:
    """A payment event for the merchant (the API key's caller) the payment belongs to: to its
    own exchange, and named in the body and in a header (README: events by merchant)."""
    event_id = new_id("evt")
    body = {
        "event_id": event_id,
        "type": event_type,
        "occurred_at": iso(occurred_at),
        "merchant": merchant,
        "payment": payment,
    }
    headers = tracing.inject({MERCHANT_HEADER: merchant})
    return OutboxMessage(events_exchange(merchant), event_type, event_id, orjson.dumps(body), headers)
