"""What every gatewayctl command shares: exit codes, output, the database connection.

worker/cli.py (the parser and most commands) and the command groups in modules of their
own (worker/webhooks_cli.py) use it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson

from gateway import config, db
from gateway.redact import hide_passwords

EXIT_OK = 0
EXIT_ATTENTION = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

CONNECT_TIMEOUT = 10.0


class Unavailable(Exception):
    """PostgreSQL cannot be reached (exit 3, as is deadletters.BrokerUnavailable)."""


def emit_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


async def connect(settings: config.Settings) -> asyncpg.Pool:
    try:
        return await db.create_pool(
            settings.database_url, min_size=1, max_size=10, timeouts=settings.db_timeouts, timeout=CONNECT_TIMEOUT
        )
    except asyncpg.InvalidCatalogNameError:
        raise Unavailable(
            f"the database of {hide_passwords(settings.database_url)} does not exist: "
            "create it (createdb), then run `gatewayctl migrate`"
        ) from None
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(
            f"cannot connect to PostgreSQL at {hide_passwords(settings.database_url)}: {type(exc).__name__}: {exc}"
        ) from None
