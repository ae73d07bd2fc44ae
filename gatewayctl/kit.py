"""What every gatewayctl command shares: exit codes, the database connection, output
helpers, argument types and the help text's common parts."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import asyncpg
import orjson

from gateway import config, db, domain
from gateway.redact import hide_passwords

EXIT_OK = 0
EXIT_ATTENTION = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

CONNECT_TIMEOUT = 10.0

# What a subcommand's parser stores as `handler`: it reads the parsed arguments into typed values
# (before the event loop starts: a bad environment value exits 2 there) and returns the work to run.
Handler = Callable[[argparse.Namespace, config.Settings], Coroutine[Any, Any, int]]
FORMATTER = argparse.RawDescriptionHelpFormatter

ENVIRONMENT = (
    "Environment: DATABASE_URL, AMQP_URL, BANK_URL (reconcile), CARD_ENCRYPTION_KEYS (rekey-cards; webhooks "
    "set and rotate-secret seal secrets with it), "
    "LOG_LEVEL (log lines go to stderr; only "
    "errors unless it is set), WORKER_RETRY_LADDER (the topology it declares), "
    "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS (default 23, as the worker) and ABANDON_AFTER_HOURS (abandon; "
    "default 24, as the worker's card vault), GATEWAY_API_KEYS and RABBITMQ_MANAGEMENT_URL (broker-account).",
    "Exit codes: 0 done, 1 needs a human (findings, a refused or failed replay, an unknown id, a decision "
    "that does not fit the payment), 2 bad usage or configuration, 3 PostgreSQL or RabbitMQ cannot be reached.",
)


class Unavailable(Exception):
    """PostgreSQL cannot be reached (exit 3, as is deadletters.BrokerUnavailable)."""


def json_flag() -> argparse.ArgumentParser:
    """The --json every command takes (a parent parser)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output (one JSON document on stdout)",
    )
    return parser


def para(*paragraphs: str) -> str:
    """Help text wrapped here, so that RawDescriptionHelpFormatter keeps the paragraphs."""
    return "\n\n".join(textwrap.fill(p, 79) for p in paragraphs)


def positive(number: type[int] | type[float]) -> Callable[[str], Any]:
    """An argparse type: a finite number of that type, above zero."""
    kind = "an integer" if number is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def reference(name: str) -> Callable[[str], tuple[str, str]]:
    """An argparse type: a bank reference of this name, checked for its shape."""

    def parse(text: str) -> tuple[str, str]:
        problem = domain.reference_problem(name, text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return name, text

    return parse


def emit_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def error_text(error: Any) -> str | None:
    """A stored last_error (a JSON document, text or a dict) as `code: message`."""
    if not error:
        return None
    if isinstance(error, str):
        try:
            error = orjson.loads(error)
        except orjson.JSONDecodeError:
            return error
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"
    return str(error)


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
