"""The mock card bank: an aiohttp server honouring docs/bank.md (the bank contract).

Run ``mockbank [--host 127.0.0.1] [--port 8787]``. State lives in memory and is
lost at exit. Environment variables are described in ``mockbank.config``
(MIN_LATENCY_MS, MAX_LATENCY_MS, FAILURE_RATE, RESPONSE_LOSS_RATE,
KEY_FORGET_RATE, KEY_LOOKUP_FAILURE_RATE, RESPONSE_CUTOFF_SECONDS,
DB_TRANSACTION_MS, DB_POOL_SIZE, AUTH_EXPIRY_HOURS, MOCKBANK_EXTRA_ACCOUNTS,
LOG_LEVEL); a bad value makes the process print a message naming the variable
and exit with code 2.

SIGTERM/SIGINT: stop accepting, give in-flight requests 0.5 s, exit 0.
uvloop is used when importable.

The contract's endpoints and the chaos on their way (the order in which each request is
processed) are documented in ``mockbank.bank_api``; the test endpoints under /_mock/ in
``mockbank.mock_api``; the validation order of each operation in ``mockbank.ledger``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from aiohttp import web

from gateway import process
from gateway.config import epilog
from mockbank import bank_api, mock_api
from mockbank.config import Chaos, Config
from mockbank.contention import Database
from mockbank.ledger import Bank
from mockbank.state import STATE, State

log = logging.getLogger("mockbank")

SWEEP_INTERVAL_S = 60.0


async def _sweeper(app: web.Application):
    async def loop() -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            app[STATE].bank.idempotency.sweep()

    task = asyncio.get_running_loop().create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_app(config: Config) -> web.Application:
    app = web.Application()
    bank = Bank(auth_expiry_hours=config.auth_expiry_hours, extra_accounts=config.extra_accounts)
    database = Database(pool_size=config.db_pool_size, transaction_ms=config.db_transaction_ms)
    app[STATE] = State(config=config, bank=bank, chaos=Chaos(**config.chaos.as_dict()), database=database)
    app.cleanup_ctx.append(_sweeper)
    bank_api.add_routes(app.router)
    mock_api.add_routes(app.router)
    return app


async def serve(host: str, port: int, config: Config, stop: asyncio.Event) -> None:
    app = build_app(config)
    debug = config.log_level == "debug"
    runner = web.AppRunner(app, access_log=log if debug else None, shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"mockbank: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    addresses = ", ".join(f"{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple))
    chaos = config.chaos
    log.info(
        "mockbank listening on %s (latency %g-%g ms, failure_rate %g, response_loss_rate %g, "
        "key_forget_rate %g, key_lookup_failure_rate %g, response_cutoff_seconds %g, "
        "db_transaction_ms %g, db_pool_size %d, auth_expiry_hours %g, extra_accounts %d)",
        addresses,
        chaos.min_latency_ms,
        chaos.max_latency_ms,
        chaos.failure_rate,
        chaos.response_loss_rate,
        chaos.key_forget_rate,
        chaos.key_lookup_failure_rate,
        config.response_cutoff_seconds,
        config.db_transaction_ms,
        config.db_pool_size,
        config.auth_expiry_hours,
        config.extra_accounts,
    )
    try:
        await stop.wait()
    finally:
        log.info("mockbank stopping")
        await runner.cleanup()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mockbank",
        description="In-memory mock of the card bank (docs/bank.md) with chaos switches.",
        epilog=epilog(Config) + " Test endpoints live under /_mock/ (see the mockbank.mock_api "
        "module docstring). A bad environment value exits with code 2.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8787, help="TCP port to listen on (default 8787; 0 picks a free one)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        print(f"mockbank: --port {args.port} is out of range 0-65535", file=sys.stderr)
        return 2
    config = Config.load()
    process.give_way(config.nice)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    process.run(lambda stop: serve(args.host, args.port, config, stop))
    return 0


if __name__ == "__main__":
    sys.exit(main())
