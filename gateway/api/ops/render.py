"""The console's HTML: Jinja2 templates (gateway/api/ops/templates) with autoescaping.

Every value is escaped by Jinja2; text that came from outside (bank answers,
error messages, dead-letter headers and bodies, outbox bodies, reconciliation
details, ids FicMart chose) also goes through the `outside` filter, which
redacts card-like numbers and cuts it to a size (gateway/redact.py).
Undefined names fail the render instead of printing nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import jinja2
import orjson

from gateway import redact
from gateway.timefmt import now, parse

TEXT_LIMIT = 500
BODY_LIMIT = 4000


def outside(value: Any, limit: int = TEXT_LIMIT) -> str:
    """Text from outside, redacted and cut; structured values as compact JSON first."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        text = orjson.dumps(value, default=str).decode()
    return redact.clean(text, limit)


def pretty(value: Any, limit: int = BODY_LIMIT) -> str:
    """A JSON value (or JSON text or bytes) indented for reading, redacted and cut."""
    if isinstance(value, (bytes, str)):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return outside(value, limit)
    return redact.clean(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode(), limit)


def error_text(error: Any) -> str:
    """A stored last_error ({"code", "message", ...}, maybe as JSON text) as one line, redacted."""
    if isinstance(error, str):
        try:
            error = orjson.loads(error)
        except orjson.JSONDecodeError:
            return outside(error)
    if isinstance(error, dict):
        return outside(f"{error.get('code')}: {error.get('message')}")
    return outside(error)


def timestamp(value: datetime | str | None) -> str:
    """One format on every page, whether the value comes as a datetime or as the receipt's text."""
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            value = parse(value)
        except ValueError:
            return outside(value, 64)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(value: datetime | None) -> str:
    """How long ago, to the most significant two units: 42 s, 5 min 10 s, 3 h 2 min, 2 d 4 h."""
    if value is None:
        return "-"
    seconds = max(0, int((now() - value).total_seconds()))
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    for (name, size), (next_name, next_size) in zip(units, units[1:], strict=False):
        if seconds >= size:
            rest = seconds % size // next_size
            return f"{seconds // size} {name} {rest} {next_name}" if rest else f"{seconds // size} {name}"
    return f"{seconds} s"


def segment(value: str) -> str:
    """A value as one URL path segment (ids from dead letters may hold anything)."""
    return quote(value, safe="")


def money(cents: int | None, currency: str = "USD") -> str:
    if cents is None:
        return "-"
    return f"{cents // 100:,}.{cents % 100:02d} {currency}"


_env = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.api.ops", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters.update(
    outside=outside, pretty=pretty, error_text=error_text, ts=timestamp, ago=ago, money=money, seg=segment
)


def page(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)
