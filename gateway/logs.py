"""Structured JSON logs with structlog.

Context (request_id, payment_id, operation_id) is bound with contextvars so
every line inside a request or a message carries it. A last processor drops
anything that looks like card data, as a safety net behind the rule that
card numbers and CVVs are never passed to a logger at all.
"""

from __future__ import annotations

import logging
import re
import sys

import orjson
import structlog

_FORBIDDEN_KEYS = {"card_number", "number", "cvv", "card"}
# 13-19 digits, optionally grouped by spaces or dashes, standing alone: not part of a
# longer digit run, nor of an id whose hex happens to hold a long run of digits
# (pay_..., op_..., evt_... would otherwise lose a piece now and then).
_PAN = re.compile(r"(?<![0-9A-Za-z])\d(?:[ -]?\d){12,18}(?![0-9A-Za-z])")


def _scrub(value):
    if isinstance(value, dict):
        return {k: "[redacted]" if k in _FORBIDDEN_KEYS else _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_scrub(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        text = str(value)
        return _PAN.sub("[redacted]", text) if _PAN.search(text) else value
    return value


def _redact(_logger, _name, event: dict) -> dict:
    return _scrub(event)


def _dumps(obj, default=None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def setup(level: str, process: str) -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    render = [_redact, structlog.processors.JSONRenderer(serializer=_dumps)]
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
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)


get = structlog.get_logger
bind = structlog.contextvars.bind_contextvars
bound = structlog.contextvars.bound_contextvars
