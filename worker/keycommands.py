"""gatewayctl's key commands (mounted by worker/cli.py with add_commands):

    gatewayctl rekey-cards [--batch N]    seal every vaulted card under the newest card key
    gatewayctl ops-key NAME               a new /ops key, as the NAME:KEY pair of GATEWAY_OPS_KEYS

Exit codes as every gatewayctl command: 0 done, 1 needs a human (cards left under an
older key), 2 configuration (no card key), 3 PostgreSQL cannot be reached.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import textwrap
from collections.abc import Awaitable, Callable
from functools import partial

import asyncpg
import orjson

from gateway import config
from gateway.cards import CardVault
from gateway.ops import cardkeys

EXIT_OK = 0
EXIT_ATTENTION = 1
EXIT_USAGE = 2
# 32 random bytes, URL-safe base64 (43 characters): well above the 128 bits config asks of an ops key.
OPS_KEY_BYTES = 32
OPS_KEY_PREFIX = "ops_"  # says what the key is where it turns up (a log, a ticket, GATEWAY_API_KEYS)

OpenPool = Callable[[config.Settings], Awaitable[asyncpg.Pool]]


def add_commands(
    commands: argparse._SubParsersAction,
    *,
    parents: list[argparse.ArgumentParser],
    formatter_class: type[argparse.HelpFormatter],
    open_pool: OpenPool,
) -> None:
    p = commands.add_parser(
        "rekey-cards",
        parents=parents,
        formatter_class=formatter_class,
        help="seal every vaulted card under the newest card key (after a key rotation)",
        description=textwrap.fill(
            "Seal every card of the vault that is under an older card key under the newest one "
            "(the first of CARD_ENCRYPTION_KEYS), a batch per transaction, skipping cards a worker holds at "
            "that moment. Safe while the gateway runs and to repeat. Exit 0 when no card is left under an "
            "older key: that key can then be dropped from CARD_ENCRYPTION_KEYS; exit 1 when cards are left "
            "(held by a worker meanwhile: run it again; or unreadable: listed).",
            79,
        ),
    )
    p.add_argument(
        "--batch",
        type=int,
        default=cardkeys.DEFAULT_BATCH,
        metavar="N",
        help=f"cards per transaction (default {cardkeys.DEFAULT_BATCH})",
    )
    p.set_defaults(handler=partial(rekey_cards, open_pool=open_pool))

    p = commands.add_parser(
        "ops-key",
        parents=parents,
        formatter_class=formatter_class,
        help="make a key for the /ops console",
        description=textwrap.fill(
            f"Print NAME:KEY with a new key of {OPS_KEY_BYTES * 8} random bits, to add to "
            "GATEWAY_OPS_KEYS (comma-separated). The key is printed once, nowhere else: keep it in the "
            "operator's password manager. Outside development the configuration refuses ops keys weaker than "
            "128 bits.",
            79,
        ),
    )
    p.add_argument("name", metavar="NAME", help="the operator, as payment histories will name them")
    p.set_defaults(handler=ops_key)


async def rekey_cards(args: argparse.Namespace, settings: config.Settings, *, open_pool: OpenPool) -> int:
    if args.batch < 1:
        print("gatewayctl: --batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if not settings.card_keyring:
        print("gatewayctl: rekey-cards needs the card keys: set CARD_ENCRYPTION_KEYS (newest first)", file=sys.stderr)
        return EXIT_USAGE
    vault = CardVault(settings.card_keyring)
    pool = await open_pool(settings)
    try:
        report = await cardkeys.reseal_all(pool, vault, batch=args.batch)
    finally:
        await pool.close()
    if args.json:
        doc = {
            "key_id": report.key_id,
            "resealed": report.resealed,
            "unreadable": [{"payment_id": p, "key_id": k} for p, k in report.unreadable],
            "left": report.left,
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"{report.resealed} card(s) sealed again under card key {report.key_id!r}")
        for payment_id, key_id in report.unreadable:
            print(f"cannot open the card of {payment_id} (sealed under {key_id!r}): left as it is")
        if report.left:
            left = ", ".join(f"{n} under {key_id!r}" for key_id, n in sorted(report.left.items()))
            print(f"cards left under older keys: {left}; keep those keys configured (and run this again)")
        else:
            print("no card is left under an older key: older keys can be dropped from CARD_ENCRYPTION_KEYS")
    return EXIT_ATTENTION if report.left else EXIT_OK


async def ops_key(args: argparse.Namespace, _settings: config.Settings) -> int:
    problem = config.ops_name_problem(args.name)
    if problem:
        print(f"gatewayctl: {problem}", file=sys.stderr)
        return EXIT_USAGE
    key = OPS_KEY_PREFIX + secrets.token_urlsafe(OPS_KEY_BYTES)
    if args.json:
        sys.stdout.write(orjson.dumps({"name": args.name, "key": key, "pair": f"{args.name}:{key}"}).decode() + "\n")
    else:
        print(f"{args.name}:{key}")
    return EXIT_OK
