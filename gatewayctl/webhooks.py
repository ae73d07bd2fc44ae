"""gatewayctl webhooks: the merchants' webhook endpoints and their failed deliveries.

    gatewayctl webhooks set --merchant NAME --url URL     register or change; prints secret=<value>
    gatewayctl webhooks rotate-secret --merchant NAME     a new secret; the old one signs 24 h more
    gatewayctl webhooks list                              endpoints, deliveries pending and failed
    gatewayctl webhooks disable --merchant NAME           stop delivering (set enables it again)
    gatewayctl webhooks failed [--merchant NAME]          deliveries that ran out of retries
    gatewayctl webhooks resend EVENT_ID... | --all-failed [--merchant NAME]

What each does is gateway/webhooks.py (the /ops console calls the same); this module parses,
prints and picks the exit code (gatewayctl/kit.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable
from typing import Any

from gateway import config, webhooks
from gateway.config import PUBLISHED_CARD_KEYS
from gateway.timefmt import iso
from gateway.webhook_rules import SecretBox, UrlRefused
from gatewayctl.kit import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, FORMATTER, connect, emit_json, json_flag, table


class _Usage(Exception):
    """Bad input or configuration for this command (exit 2)."""


def _box(settings: config.Settings) -> SecretBox:
    """Secrets are sealed under the card keys: the deliverer must be given the same ones."""
    keys = settings.card_keyring
    if not keys:
        raise _Usage("CARD_ENCRYPTION_KEY (or CARD_ENCRYPTION_KEYS) is required: webhook secrets are sealed with it")
    if not settings.development and any(key.secret in PUBLISHED_CARD_KEYS for key in keys):
        raise _Usage("the card key is a published development key: refused unless GATEWAY_ENV=development")
    return SecretBox(keys)


async def register(settings: config.Settings, merchant: str, url: str, *, as_json: bool) -> int:
    box = _box(settings)
    pool = await connect(settings)
    try:
        done = await webhooks.register(pool, box, merchant, url, development=settings.development)
    finally:
        await pool.close()
    if as_json:
        emit_json({"merchant": done.merchant, "url": done.url, "created": done.created, "secret": done.secret})
        return EXIT_OK
    print(f"{'registered' if done.created else 'changed'} the webhook endpoint of {done.merchant}: {done.url}")
    print("give the shop its signing secret (it verifies Gateway-Signature with it):")
    print(f"secret={done.secret}")
    return EXIT_OK


async def rotate_secret(settings: config.Settings, merchant: str, *, as_json: bool) -> int:
    box = _box(settings)
    pool = await connect(settings)
    try:
        done = await webhooks.rotate(pool, box, merchant)
    finally:
        await pool.close()
    if as_json:
        emit_json({"merchant": done.merchant, "secret": done.secret, "old_secret_until": iso(done.old_secret_until)})
        return EXIT_OK
    print(f"new signing secret of {done.merchant}; the old one still signs until {iso(done.old_secret_until)}")
    print(f"secret={done.secret}")
    return EXIT_OK


async def list_endpoints(settings: config.Settings, *, as_json: bool) -> int:
    pool = await connect(settings)
    try:
        rows = await webhooks.endpoints(pool)
    finally:
        await pool.close()
    if as_json:
        emit_json([{**r, "old_secret_until": iso(r["old_secret_until"])} for r in rows])
        return EXIT_OK
    if not rows:
        print("no webhook endpoints (gatewayctl webhooks set --merchant NAME --url URL)")
        return EXIT_OK
    print(
        table(
            ["MERCHANT", "URL", "ENABLED", "PENDING", "FAILED", "OLD SECRET UNTIL"],
            (
                (r["merchant"], r["url"], "yes" if r["enabled"] else "no", r["pending"], r["failed"])
                + (iso(r["old_secret_until"]),)
                for r in rows
            ),
        )
    )
    return EXIT_OK


async def disable(settings: config.Settings, merchant: str, *, as_json: bool) -> int:
    pool = await connect(settings)
    try:
        await webhooks.disable(pool, merchant)
    finally:
        await pool.close()
    if as_json:
        emit_json({"merchant": merchant, "enabled": False})
    else:
        print(f"webhook endpoint of {merchant} disabled; `webhooks set` enables it again")
    return EXIT_OK


def _failed_json(row: dict[str, Any]) -> dict[str, Any]:
    return {k: iso(v) if k in ("retry_since", "finished_at", "created_at") else v for k, v in row.items()}


async def failed(settings: config.Settings, merchant: str | None, limit: int, *, as_json: bool) -> int:
    pool = await connect(settings)
    try:
        rows = await webhooks.failed(pool, merchant, limit)
    finally:
        await pool.close()
    if as_json:
        emit_json([_failed_json(r) for r in rows])
        return EXIT_OK
    if not rows:
        print("no failed webhook deliveries")
        return EXIT_OK
    print(
        table(
            ["EVENT", "MERCHANT", "ATTEMPTS", "FAILED AT", "LAST ERROR"],
            ((r["event_id"], r["merchant"], r["attempts"], iso(r["finished_at"]), r["last_error"]) for r in rows),
        )
    )
    print(f"\n{len(rows)} failed; resend with: gatewayctl webhooks resend EVENT_ID... (or --all-failed)")
    return EXIT_OK


async def resend(
    settings: config.Settings, event_ids: list[str], merchant: str | None, *, all_failed: bool, as_json: bool
) -> int:
    if bool(event_ids) == all_failed:
        raise _Usage("name the events to resend, or --all-failed (not both)")
    pool = await connect(settings)
    try:
        if all_failed:
            count = await webhooks.resend_failed(pool, merchant)
            queued, missing = count, []
        else:
            done = await webhooks.resend(pool, event_ids)
            queued, missing = len(done), [e for e in event_ids if e not in set(done)]
    finally:
        await pool.close()
    if as_json:
        emit_json({"queued": queued, "not_queued": missing})
    else:
        print(f"{queued} delivery(ies) queued again")
        for event_id in missing:
            print(f"  not queued: {event_id} (unknown, already pending, or its merchant has no endpoint)")
    return EXIT_ATTENTION if missing else EXIT_OK


async def _guarded(work: Awaitable[int]) -> int:
    """Bad input to this group (a refused URL, no such endpoint) is exit 2 or 1 with a message."""
    try:
        return await work
    except (_Usage, UrlRefused, ValueError) as exc:
        print(f"gatewayctl webhooks: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except webhooks.NoEndpoint as exc:
        print(f"gatewayctl webhooks: {exc} has no webhook endpoint", file=sys.stderr)
        return EXIT_ATTENTION


def add_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser(
        "webhooks",
        formatter_class=FORMATTER,
        help="merchants' webhook endpoints: set, rotate-secret, list, disable, failed, resend",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    sub = group.add_subparsers(dest="webhooks_command", metavar="WEBHOOKS_COMMAND", required=True)

    def merchant(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--merchant", required=required, metavar="NAME", help="the caller name (GATEWAY_API_KEYS)")

    p = sub.add_parser(
        "set",
        parents=[json_flag()],
        help="register or change an endpoint; prints its signing secret as secret=<value>",
        description="Register the merchant's endpoint, or point it at URL and enable it (secret kept). "
        "https only (a loopback http URL in development mode); private addresses are refused.",
    )
    merchant(p)
    p.add_argument("--url", required=True, help="https://... the shop's receiver")
    p.set_defaults(
        handler=lambda args, settings: _guarded(register(settings, args.merchant, args.url, as_json=args.json))
    )

    p = sub.add_parser(
        "rotate-secret", parents=[json_flag()], help="new secret; the old one keeps signing beside it for 24 h"
    )
    merchant(p)
    p.set_defaults(handler=lambda args, settings: _guarded(rotate_secret(settings, args.merchant, as_json=args.json)))

    p = sub.add_parser("list", parents=[json_flag()], help="endpoints, with deliveries pending and failed")
    p.set_defaults(handler=lambda args, settings: _guarded(list_endpoints(settings, as_json=args.json)))

    p = sub.add_parser("disable", parents=[json_flag()], help="stop delivering to the merchant's endpoint")
    merchant(p)
    p.set_defaults(handler=lambda args, settings: _guarded(disable(settings, args.merchant, as_json=args.json)))

    p = sub.add_parser("failed", parents=[json_flag()], help="deliveries that ran out of retries (3 days)")
    merchant(p, required=False)
    p.add_argument("--limit", type=int, default=webhooks.FAILED_LIST_LIMIT, metavar="N", help="newest N (100)")
    p.set_defaults(
        handler=lambda args, settings: _guarded(failed(settings, args.merchant, args.limit, as_json=args.json))
    )

    p = sub.add_parser("resend", parents=[json_flag()], help="deliver events again, by id or every failed one")
    p.add_argument("event_ids", nargs="*", metavar="EVENT_ID", help="evt_... ids")
    p.add_argument("--all-failed", action="store_true", help="every failed delivery (of --merchant, or all)")
    merchant(p, required=False)
    p.set_defaults(
        handler=lambda args, settings: _guarded(
            resend(settings, args.event_ids, args.merchant, all_failed=args.all_failed, as_json=args.json)
        )
    )
