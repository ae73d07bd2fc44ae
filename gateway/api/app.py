"""The HTTP API process: app factory and the `gateway-api` console script.

create_app() wires everything once: settings, the Postgres pool (given, as
in tests, or owned by the app), the card vault, the long-poll watcher, the
readiness probe, admission, metrics and the OpenAPI document. main() also
sets up tracing (gateway.tracing: exported only when an OTLP endpoint variable
is set), serves the admin listener (gateway.api.admin: /metrics, /healthz,
/readyz, /ops) beside the public port and, with --workers N, runs N processes
sharing the public port (SO_REUSEPORT: the kernel spreads the connections),
each with an admin port of its own, under a parent that only supervises them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import AsyncIterator

import asyncpg
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

from gateway import config, db, logs, monitoring, process, store, tracing
from gateway.api import admin, openapi, routes, server
from gateway.api.admission import Admission
from gateway.api.health import Readiness
from gateway.api.longpoll import PaymentWatcher
from gateway.api.middleware import (
    ADMISSION,
    MERCHANT,
    METRICS,
    REFUSALS,
    HttpMetrics,
    RefusalLog,
    api_middleware,
    merchants_by_digest,
)
from gateway.cards import CardVault
from gateway.fingerprints import Fingerprinter

log = logs.get("gateway.api")

MAX_BODY = 64 * 1024
DEFAULT_POOL_SIZE = 12
# Admission (gateway/api/admission.py), per process; the memory bounds scale with the cores, as
# the requests a process can carry do.
_CORES = os.cpu_count() or 1
DEFAULT_MAX_IN_FLIGHT = 2000 * _CORES
DEFAULT_MAX_LONG_POLLS = 5000 * _CORES
DEFAULT_MAX_TIME_TO_FINAL = 30.0  # seconds: the long-poll window
DEFAULT_POST_RATE = 1000.0 * _CORES  # POSTs per second per API key: stops a runaway client only
_CONNECT_ATTEMPTS = 8


class StartupError(Exception):
    """A dependency the process cannot start without is missing."""


def create_app(
    settings: config.Settings,
    pool: asyncpg.Pool | None = None,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    admission: Admission | None = None,
) -> web.Application:
    """The aiohttp application. With `pool` given the app uses it and leaves closing it to the caller."""
    if not settings.card_keyring:
        raise ValueError("the API needs card keys (CARD_ENCRYPTION_KEYS or CARD_ENCRYPTION_KEY) to seal cards")
    app = web.Application(middlewares=[api_middleware], client_max_size=MAX_BODY)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    app[METRICS] = HttpMetrics(registry)
    refusals = app[REFUSALS] = RefusalLog()
    shedding = app[ADMISSION] = admission or Admission(
        max_in_flight=DEFAULT_MAX_IN_FLIGHT,
        max_long_polls=DEFAULT_MAX_LONG_POLLS,
        max_time_to_final=DEFAULT_MAX_TIME_TO_FINAL,
        post_rate=DEFAULT_POST_RATE,
        post_rates=settings.post_rates,
    )
    Gauge("gateway_http_requests_in_flight", "Requests under /v1 being worked on", registry=registry).set_function(
        lambda: shedding.in_flight
    )
    app[MERCHANT] = merchants_by_digest(settings.api_keys)
    document = openapi.build()
    watcher = PaymentWatcher(settings.database_url)
    Gauge(
        "gateway_api_work_waiting", "Operations waiting for a worker as admission last saw them", registry=registry
    ).set_function(lambda: shedding.backlog)
    Gauge(
        "gateway_api_completion_rate", "Payments finished per second, as admission measures it", registry=registry
    ).set_function(lambda: shedding.rate.per_second or 0.0)
    Gauge("gateway_longpoll_waiters", "Requests waiting for a payment to settle", registry=registry).set_function(
        lambda: watcher.waiting
    )
    state = routes.State(
        vault=CardVault(settings.card_keyring),
        fingerprinter=Fingerprinter([key.secret for key in settings.card_keyring]),
        watcher=watcher,
        registry=registry,
        openapi=orjson.dumps(document),
    )
    app[routes.STATE] = state

    def current_pool() -> asyncpg.Pool | None:
        try:
            return state.pool
        except RuntimeError:  # not started yet
            return None

    monitoring.pool_gauges(registry, current_pool)
    routes.setup(app)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own_pool = pool is None
        opened = pool if pool is not None else await _create_pool(settings, pool_size)
        state.connect(opened, Readiness(opened, settings.amqp_url))
        await watcher.start()
        shedding.start(lambda most: store.work_waiting(opened, most=most), watcher.finished_so_far)
        try:
            yield
        finally:
            await shedding.close()
            refusals.flush()
            await watcher.close()
            if own_pool:
                await opened.close()

    async def stop_waiting(_app: web.Application) -> None:
        await watcher.close()  # long polls answer now rather than hold the shutdown up

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(stop_waiting)
    return app


async def _create_pool(settings: config.Settings, size: int) -> asyncpg.Pool:
    try:
        pool = await process.start_with_retries(
            lambda: db.create_pool(
                settings.database_url, min_size=min(4, size), max_size=size, timeouts=settings.db_timeouts
            ),
            what="gateway-api",
            attempts=_CONNECT_ATTEMPTS,
            retry_on=(OSError, asyncpg.PostgresError),
            first_delay=0.25,
            max_delay=5.0,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise StartupError(f"cannot reach the database: {type(exc).__name__}: {exc}") from None
    assert pool is not None  # without a stop event it returns a pool or raises
    return pool


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gateway-api",
        description="FicMart payment gateway HTTP API.",
        epilog=config.epilog(config.Settings, admin.AdminSettings, unused=("BANK_URL",)),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument(
        "--admin-host",
        default="127.0.0.1",
        help="address of /metrics, /healthz, /readyz and /ops (API_ADMIN_PORT; default 127.0.0.1, "
        "0.0.0.0 in a container whose network only the monitoring shares)",
    )
    parser.add_argument(
        "--db-pool-size",
        type=int,
        default=DEFAULT_POOL_SIZE,
        help=f"most Postgres connections this process opens (default {DEFAULT_POOL_SIZE})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the port (SO_REUSEPORT), under a supervising parent (default 1: no parent)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help="requests worked on at once per process before new ones get 503: a memory bound "
        "(default 2000 per core: %(default)s)",
    )
    parser.add_argument(
        "--max-long-polls",
        type=int,
        default=DEFAULT_MAX_LONG_POLLS,
        help="long polls waiting at once per process, shared among API keys (default 5000 per core: %(default)s)",
    )
    parser.add_argument(
        "--max-time-to-final",
        type=float,
        default=DEFAULT_MAX_TIME_TO_FINAL,
        help="new payments get 503 while the work waiting would take longer than this to finish "
        "at the measured rate (default %(default)g s)",
    )
    parser.add_argument(
        "--post-rate",
        type=float,
        default=DEFAULT_POST_RATE,
        help="POSTs per second per API key and process before 429, in bursts of up to 5 s of it; "
        "GATEWAY_POST_RATES sets it per merchant (default 1000 per core: %(default)g)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0-65535")
    for name in ("db_pool_size", "workers", "max_in_flight", "max_long_polls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_time_to_final", "post_rate"):
        if not 0 < getattr(args, name) < math.inf:
            parser.error(f"--{name.replace('_', '-')} must be a number above 0")
    if args.workers > 1 and args.port == 0:
        parser.error("--workers above 1 needs a --port: the processes share it")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    settings = config.load(uses_card_key=True)
    admin_port = config.exit_on_error(lambda: _admin_port(args.workers))
    logs.setup(settings.log_level, "gateway-api")
    if args.workers > 1:
        raise SystemExit(
            process.supervise(args.workers, lambda index: _serve(args, settings, admin_port and admin_port + index))
        )
    _serve(args, settings, admin_port)


def _admin_port(workers: int) -> int:
    """API_ADMIN_PORT (0: no admin listener), with room for one port per process."""
    port = admin.AdminSettings.from_environment().port
    if port and port + workers - 1 > 65535:
        raise config.ConfigError(f"API_ADMIN_PORT {port} leaves no room for the admin ports of {workers} processes")
    return port


def _serve(args: argparse.Namespace, settings: config.Settings, admin_port: int) -> None:
    """One process serving the port (and its admin port, unless 0) until SIGTERM/SIGINT."""
    tracing.setup("gateway-api")
    admission = Admission(
        max_in_flight=args.max_in_flight,
        max_long_polls=args.max_long_polls,
        max_time_to_final=args.max_time_to_final,
        post_rate=args.post_rate,
        post_rates=settings.post_rates,
    )
    app = create_app(settings, pool_size=args.db_pool_size, admission=admission)
    internal = server.Listener(admin.create_app(app, settings), args.admin_host, admin_port) if admin_port else None
    try:
        process.run(
            lambda stop: server.serve(app, args.host, args.port, stop, reuse_port=args.workers > 1, admin=internal)
        )
    except StartupError as exc:
        log.error("gateway-api cannot start", error=str(exc))
        print(f"gateway-api: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except server.AdminListenError as exc:
        print(f"gateway-api: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:  # the address is taken or cannot be bound
        print(f"gateway-api: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
