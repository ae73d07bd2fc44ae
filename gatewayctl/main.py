"""gatewayctl's entry point: the parser, assembled from each command group's add_commands,
the log set-up, and main(), which runs the command and turns what cannot be reached into exit 3."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import aio_pika
import asyncpg
import structlog

from gateway import config, logs
from gateway.ops.deadletters import BrokerUnavailable
from gateway.redact import hide_passwords
from gatewayctl import brokeraccount, cardkeys, deadletters, decisions, migrate, reconcile, webhooks
from gatewayctl.kit import ENVIRONMENT, EXIT_UNAVAILABLE, FORMATTER, Handler, Unavailable, para


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatewayctl",
        formatter_class=FORMATTER,
        epilog=para(*ENVIRONMENT),
        description=para(
            "Operate the payment gateway: the schema, dead-lettered operations, decisions a human "
            "takes after checking the bank (settle, resolve, payments set-reference, abandon) and "
            "reconciliation with the "
            "bank. Every command has --help."
        ),
    )
    parser.add_argument(
        "--json", action="store_true", default=False, help="machine-readable output (one JSON document on stdout)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for group in (migrate, deadletters, decisions, reconcile, cardkeys, brokeraccount, webhooks):
        group.add_commands(commands)
    return parser


def _setup_logs(settings: config.Settings) -> None:
    explicit = bool(os.environ.get("LOG_LEVEL"))
    logs.setup(settings.log_level if explicit else "error", "gatewayctl")
    if not explicit:  # a broker that is down is reported once, by us, not also by the AMQP library
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # stdout is the command's output: log lines go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = config.Settings.load()  # a bad value: message on stderr, exit 2 (no secrets needed)
    command: Handler = args.handler
    work = command(args, settings)  # typed values read, the worker's rules too (exit 2 on a bad one)
    _setup_logs(settings)
    try:
        return asyncio.run(work)
    except Unavailable as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except BrokerUnavailable as exc:
        print(f"gatewayctl: cannot connect to RabbitMQ at {hide_passwords(settings.amqp_url)}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except asyncpg.UndefinedTableError as exc:
        print(f"gatewayctl: the schema is not applied ({exc}): run `gatewayctl migrate`", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, aio_pika.exceptions.AMQPError) as exc:
        print(f"gatewayctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
