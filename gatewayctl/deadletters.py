"""gatewayctl dlq: dead-lettered (parked) operations: list, show, replay, drop.

Reading and giving back payments.dead is gateway/ops/deadletters.py; what list, show, replay
and drop decide about each operation and letter is gateway/ops/replay.py. This module parses,
prints and picks the exit code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta

from gateway import config, topology
from gateway.ops import replay
from gateway.ops.deadletters import MAX_DEAD_LETTERS, DeadLetterQueue
from gateway.ops.rules import OpsRules
from gatewayctl.deadletter_show import print_letter, show
from gatewayctl.kit import (
    ENVIRONMENT,
    EXIT_ATTENTION,
    EXIT_OK,
    EXIT_USAGE,
    FORMATTER,
    connect,
    emit_json,
    error_text,
    json_flag,
    para,
    table,
)


@dataclass(frozen=True)
class Rules:
    """What the dlq commands decide with: the worker's own values (gateway/ops/rules.py)."""

    ladder: tuple[int, ...]
    key_age_limit: timedelta

    @classmethod
    def load(cls) -> Rules:
        rules = OpsRules.load()  # a bad value: message on stderr, exit 2
        return cls(rules.retry_ladder, timedelta(hours=rules.authorize_key_max_age_hours))


def add_commands(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser(
        "dlq",
        formatter_class=FORMATTER,
        help="dead-lettered (parked) operations: list, show, replay, drop",
        description=para(
            f"Operations that exhausted their retries are parked: their payment shows "
            f"attention_required and a message waits in {topology.DEAD_QUEUE}. The operations "
            "table is the truth; the queue only carries messages about it."
        ),
        epilog=para(*ENVIRONMENT),
    )
    dlq_commands = group.add_subparsers(dest="dlq_command", metavar="DLQ_COMMAND", required=True)

    p = dlq_commands.add_parser(
        "list",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="dead letters and parked operations",
        description=para(
            f"Each operation with a message in {topology.DEAD_QUEUE} (in queue order), then each operation "
            "parked in the database without one: operation, payment, kind, attempts, age, messages, state and "
            "last error (attempts and error from the operations table).",
            "The queue is read without losing or reordering anything: every message is taken with basic.get "
            "and manual acknowledgement, so all are held at once, then each is given back with "
            "basic.nack(requeue=True) in delivery order; RabbitMQ puts returned messages back at the head of "
            "the queue in that order. Nothing is acknowledged; if gatewayctl dies meanwhile, the broker "
            "returns them by itself.",
        ),
    )
    p.set_defaults(handler=lambda args, settings: list_letters(settings, Rules.load(), as_json=args.json))

    p = dlq_commands.add_parser(
        "show",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="everything about one operation, or one dead letter",
        description=para(
            "The operations row, the payment's receipt (whatever the merchant), its full history "
            "with causes, the payment's other operations, its dead letters and what a replay "
            "would do. The queue is read as by `dlq list`.",
            "Given the HANDLE of a letter instead (`dlq list` names a letter without a readable operation "
            "id by its handle: its message id, or sha- and a hash of its body and headers), that letter: "
            "its headers and body, with card numbers and CVVs redacted and long values cut.",
        ),
    )
    p.add_argument("operation_id", metavar="OPERATION_ID|HANDLE", help="op_... or a letter's handle")
    p.set_defaults(handler=lambda args, settings: show(settings, Rules.load(), args.operation_id, as_json=args.json))

    p = dlq_commands.add_parser(
        "replay",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="put parked operations back in the flow",
        usage="gatewayctl dlq replay [-h] [--json] [--force] (OPERATION_ID | --all)",
        description=para(
            'For each operation: finished meanwhile -> its dead letters are dropped ("already final, nothing '
            'to do"); still pending -> unparked, its command published to payments.commands (persistent, '
            "publisher confirm; the row back at the foot of the retry ladder, and marked forced with --force) "
            "and only "
            "then its dead letters acknowledged. An operation parked in the database whose message is gone "
            "is re-enqueued from its row. --all: every dead letter and every parked operation.",
            "An authorization first sent to the bank more than WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS (23) hours "
            "ago is refused: the bank forgets idempotency keys after 24 h, so a resend of a request whose "
            "answer was lost could place a second hold. Check the bank, then use --force.",
        ),
        epilog=para(
            "Exit code 1 when any operation was refused, unknown, unreadable or could not be "
            "published; the others are still replayed."
        ),
    )
    p.add_argument("operation_id", metavar="OPERATION_ID", nargs="?", help="op_...")
    p.add_argument("--all", action="store_true", help="every dead letter and every parked operation")
    p.add_argument(
        "--force",
        action="store_true",
        help="also send authorizations older than the key horizon (after checking the bank)",
    )
    p.set_defaults(
        handler=lambda args, settings: replay_parked(
            settings, Rules.load(), args.operation_id, every=args.all, force=args.force, as_json=args.json
        )
    )

    p = dlq_commands.add_parser(
        "drop",
        parents=[json_flag()],
        formatter_class=FORMATTER,
        help="remove letters from the queue (unreadable ones, or any by handle)",
        usage="gatewayctl dlq drop [-h] [--json] (HANDLE... | --unreadable)",
        description=para(
            f"Print each letter (redacted and cut), then acknowledge it: it leaves {topology.DEAD_QUEUE} for "
            "good. The others are given back in their order. HANDLEs are those of `dlq list` and `dlq "
            "show`; --unreadable takes every letter without a readable operation id.",
            "Dropping the letter of a parked operation does not unpark it: the database is the truth, and "
            "the operation is still listed and replayed from its row.",
        ),
        epilog=para("Exit code 1 when a HANDLE names no letter; the others are still dropped."),
    )
    p.add_argument("handles", metavar="HANDLE", nargs="*", help="a letter's handle")
    p.add_argument("--unreadable", action="store_true", help="every letter without a readable operation id")
    p.set_defaults(
        handler=lambda args, settings: drop(
            settings, Rules.load(), args.handles, unreadable=args.unreadable, as_json=args.json
        )
    )


# ---- dlq list ---------------------------------------------------------------------------


async def list_letters(settings: config.Settings, rules: Rules, *, as_json: bool) -> int:
    async with DeadLetterQueue(settings.amqp_url, rules.ladder) as dlq:
        letters = await dlq.take_all()
        await dlq.give_back()  # read everything we need first, hold nothing while we query
    pool = await connect(settings)
    try:
        entries = await replay.listing(letters, replay.StoreOperations(pool), rules.key_age_limit)
    finally:
        await pool.close()
    if as_json:
        emit_json(
            {
                "queue": topology.DEAD_QUEUE,
                "messages": len(letters),
                "operations": [asdict(e) for e in entries],
                "truncated": len(letters) >= MAX_DEAD_LETTERS,
            }
        )
        return EXIT_OK
    if not entries:
        print(f"{topology.DEAD_QUEUE} is empty and no operation is parked")
        return EXIT_OK
    print(
        table(
            ["OPERATION", "PAYMENT", "KIND", "ATTEMPTS", "AGE", "MSGS", "STATE", "LAST ERROR"],
            (
                [
                    e.operation_id or e.handles[0],  # an unreadable letter goes by its handle
                    e.payment_id,
                    e.kind,
                    e.attempts,
                    e.age,
                    e.messages,
                    e.state + (" (replay needs --force)" if e.needs_force else ""),
                    error_text(e.last_error),
                ]
                for e in entries
            ),
        )
    )
    print(
        f"\n{len(letters)} message(s) in {topology.DEAD_QUEUE}, {len(entries)} operation(s); "
        "the queue was read and put back as it was."
    )
    if len(letters) >= MAX_DEAD_LETTERS:
        print(f"(only the first {MAX_DEAD_LETTERS} messages were read)")
    if any(e.operation_id is None for e in entries):
        print(
            "Unreadable letters are listed by their handle: read one with `gatewayctl dlq show HANDLE`, "
            "remove them with `gatewayctl dlq drop HANDLE...` (or `--unreadable`)."
        )
    return EXIT_OK


# ---- dlq replay -------------------------------------------------------------------------


async def replay_parked(
    settings: config.Settings, rules: Rules, operation_id: str | None, *, every: bool, force: bool, as_json: bool
) -> int:
    if bool(operation_id) == bool(every):
        print("gatewayctl dlq replay: give one OPERATION_ID or --all", file=sys.stderr)
        return EXIT_USAGE
    pool = await connect(settings)
    try:
        async with DeadLetterQueue(settings.amqp_url, rules.ladder) as dlq:
            letters = await dlq.take_all()
            try:
                results = await replay.replay(
                    letters,
                    dlq,
                    replay.StoreOperations(pool),
                    operation_id=None if every else operation_id,
                    force=force,
                    limit=rules.key_age_limit,
                )
            finally:
                await dlq.give_back()
    finally:
        await pool.close()
    failed = [r for r in results if not r.done]
    if as_json:
        emit_json(
            {
                "results": [asdict(r) for r in results],
                "replayed": sum(r.result == "replayed" for r in results),
                "already_final": sum(r.result == "already_final" for r in results),
                "not_done": len(failed),
            }
        )
    elif not results:
        print("nothing to replay: the dead-letter queue is empty and no operation is parked")
    else:
        for r in results:
            print(f"{r.operation_id or '(unreadable)'} ({r.kind or '?'}, {r.payment_id or '?'}): {r.message}")
        if len(results) > 1:
            print(
                f"\n{sum(r.result == 'replayed' for r in results)} replayed, "
                f"{sum(r.result == 'already_final' for r in results)} already final, {len(failed)} not done"
            )
    return EXIT_ATTENTION if failed else EXIT_OK


# ---- dlq drop ---------------------------------------------------------------------------


async def drop(settings: config.Settings, rules: Rules, handles: list[str], *, unreadable: bool, as_json: bool) -> int:
    if not handles and not unreadable:
        print("gatewayctl dlq drop: give one or more HANDLEs or --unreadable", file=sys.stderr)
        return EXIT_USAGE
    async with DeadLetterQueue(settings.amqp_url, rules.ladder) as dlq:
        letters = await dlq.take_all()
        try:
            plan = replay.to_drop(letters, handles=handles, unreadable=unreadable)
            views = [replay.view(lt) for lt in plan.letters]
            if not as_json:
                for v in views:
                    print("dropping ", end="")
                    print_letter(v)
            await dlq.drop(plan.letters)
        finally:
            await dlq.give_back()
    if as_json:
        emit_json({"dropped": [asdict(v) for v in views], "not_found": plan.not_found})
    else:
        print(f"{len(views)} letter(s) dropped from {topology.DEAD_QUEUE}")
    for handle in plan.not_found:
        print(f"gatewayctl dlq drop: no letter {handle} in {topology.DEAD_QUEUE}", file=sys.stderr)
    return EXIT_ATTENTION if plan.not_found else EXIT_OK
