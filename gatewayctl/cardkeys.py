"""gatewayctl's key commands:

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

import orjson

from gateway import config
from gateway.cards import CardVault
from gateway.ops import cardkeys
from gatewayctl.kit import EXIT_ATTENTION, EXIT_OK, EXIT_USAGE, FORMATTER, connect, emit_json, json_flag

# 32 random bytes, URL-safe base64 (43 characters): well above the 128 bits config asks of an ops key.
OPS_KEY_BYTES = 32
OPS_KEY_PREFIX = "ops_"  # says what the key is where it turns up (a log, a ticket, GATEWAY_API_KEYS)


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "rekey-cards",
        parents=[json_flag()],
        formatter_class=FORMATTER,
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
    p.set_defaults(handler=lambda args, settings: rekey_cards(settings, batch=args.batch, as_json=args.json))

    p = commands.add_parser(
        "ops-key",
        parents=[json_flag()],
        formatter_class=FORMATTER,
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
    p.set_defaults(handler=lambda args, settings: ops_key(args.name, as_json=args.json))


async def rekey_cards(settings: config.Settings, *, batch: int, as_json: bool) -> int:
    if batch < 1:
        print("gatewayctl: --batch must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if not settings.card_keyring:
        print("gatewayctl: rekey-cards needs the card keys: set CARD_ENCRYPTION_KEYS (newest first)", file=sys.stderr)
        return EXIT_USAGE
    vault = CardVault(settings.card_keyring)
    pool = await connect(settings)
    try:
        report = await cardkeys.reseal_all(pool, vault, batch=batch)
    finally:
        await pool.close()
    if as_json:
        doc = {
            "key_id": report.key_id,
            "resealed": report.resealed,
            "unreadable": [{"payment_id": p, "key_id": k} for p, k in report.unreadable],
            "left": report.left,
        }
        emit_json(doc)
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


async def ops_key(name: str, *, as_json: bool) -> int:
    problem = config.ops_name_problem(name)
    if problem:
        print(f"gatewayctl: {problem}", file=sys.stderr)
        return EXIT_USAGE
    key = OPS_KEY_PREFIX + secrets.token_urlsafe(OPS_KEY_BYTES)
    if as_json:
        sys.stdout.write(orjson.dumps({"name": name, "key": key, "pair": f"{name}:{key}"}).decode() + "\n")
    else:
        print(f"{name}:{key}")
    return EXIT_OK
