"""gatewayctl migrate: apply schema.sql (idempotent) and say what it created."""

from __future__ import annotations

import argparse

from gateway import config, db, store
from gateway.redact import hide_passwords
from gatewayctl.kit import EXIT_OK, FORMATTER, connect, emit_json, json_flag, para


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "migrate",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="apply schema.sql (safe to repeat)",
        description=para(
            "Apply schema.sql in one transaction and print what it created. Every statement is "
            "idempotent: safe to run twice and on a live database."
        ),
    )
    p.set_defaults(handler=lambda args, settings: migrate(settings, as_json=args.json))


def _count(n: int, kind: str) -> str:
    return f"{n} {kind}" if n == 1 else f"{n} {'indexes' if kind == 'index' else kind + 's'}"


async def migrate(settings: config.Settings, *, as_json: bool) -> int:
    pool = await connect(settings)
    try:
        before = await store.schema_objects(pool)
        await db.migrate(settings.database_url)
        after = await store.schema_objects(pool)
    finally:
        await pool.close()
    created: dict[str, list[str]] = {}
    for kind, name in sorted(after - before):
        created.setdefault(kind, []).append(name)
    totals: dict[str, int] = {}
    for kind, _ in after:
        totals[kind] = totals.get(kind, 0) + 1
    target = hide_passwords(settings.database_url)
    if as_json:
        emit_json(
            {
                "database": target,
                "schema": str(store.SCHEMA_PATH),
                "created": created,
                "present": dict(sorted(totals.items())),
            }
        )
        return EXIT_OK
    present = ", ".join(_count(n, k) for k, n in sorted(totals.items()))
    if created:
        print(f"applied {store.SCHEMA_PATH.name} to {target}")
        for kind, names in created.items():
            print(f"  created {_count(len(names), kind)}: {', '.join(names)}")
        print(f"now present: {present}")
    else:
        print(
            f"applied {store.SCHEMA_PATH.name} to {target}: already up to date, nothing created "
            f"(functions and triggers refreshed; present: {present})"
        )
    return EXIT_OK
