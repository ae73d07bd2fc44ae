"""Structured JSON logs with structlog.

Context (request_id, payment_id, operation_id) is bound with contextvars so
every line inside a request or a message carries it. A last processor drops
anything that looks like card data (gateway.redact), as a safety net behind
the rule that card numbers and CVVs are never passed to a logger at all, and
cuts long values: a value sent to us (an id, a header, a bank message) must
not make a log line as long as itself. Every line written inside a trace
(gateway.tracing: an API request, a command, a publish) carries its `trace_id`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from gateway import tracing
from gateway.redact import REDACTED, clean

_FORBIDDEN_KEYS = {"card_number", "number", "cvv", "card"}
# Top-level values this module writes itself (setup, _add_trace_id, structlog's stampers):
# nothing from outside reaches them, and scrubbing them was a fifth of a line's cost.
_OWN_KEYS = frozenset({"timestamp", "level", "process", "pid", "trace_id"})
MAX_VALUE_CHARS = 1000  # per logged string (an exception's traceback gets more)
_MAX_TRACEBACK_CHARS = 8000
# These libraries log every frame or message at debug level, bodies included.
_CHATTY_LIBRARIES = ("aiormq", "aio_pika", "pamqp")


def _scrub(value, limit: int = MAX_VALUE_CHARS):
    if isinstance(value, dict):
        return {k: REDACTED if k in _FORBIDDEN_KEYS else _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_scrub(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, int) and -(10**12) < value < 10**12:
        return value  # bools too: fewer than 13 digits is no card number
    if isinstance(value, (int, str)):
        text = str(value)
        cleaned = clean(text, limit)
        return value if cleaned == text else cleaned
    return value


def _redact(_logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exception = event.pop("exception", None)
    event = {k: v if k in _OWN_KEYS else REDACTED if k in _FORBIDDEN_KEYS else _scrub(v) for k, v in event.items()}
    if exception is not None:
        event["exception"] = _scrub(exception, _MAX_TRACEBACK_CHARS)
    return event


def _add_trace_id(_logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    trace_id = tracing.trace_id()
    if trace_id is not None:
        event["trace_id"] = trace_id
    return event


def _dumps(obj, default=None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def setup(level: str, process: str) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _add_trace_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    render: list[structlog.typing.Processor] = [_redact, structlog.processors.JSONRenderer(serializer=_dumps)]
    # Libraries (aiohttp, aio-pika, asyncpg) log through the standard library:
    # the same JSON and the same redaction for their lines too.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(root.level, logging.INFO))
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process, pid=os.getpid())


get = structlog.get_logger
bind = structlog.contextvars.bind_contextvars
bound = structlog.contextvars.bound_contextvars
