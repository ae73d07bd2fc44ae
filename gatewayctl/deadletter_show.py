"""gatewayctl dlq show: everything about one operation (its row, the payment's receipt and
history, its other operations, its dead letters, what a replay would do), or one letter by
its handle, as text or JSON. print_letter is also how `dlq drop` shows what it drops."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

import orjson

from gateway import config, topology
from gateway.ops import replay
from gateway.ops.deadletters import DeadLetter, DeadLetterQueue
from gateway.timefmt import iso
from gatewayctl.kit import EXIT_ATTENTION, EXIT_OK, connect, emit_json, error_text, table

if TYPE_CHECKING:
    from gatewayctl.deadletters import Rules


async def show(settings: config.Settings, rules: Rules, operation_id: str, *, as_json: bool) -> int:
    async with DeadLetterQueue(settings.amqp_url, rules.ladder) as dlq:
        letters = await dlq.take_all()
        await dlq.give_back()
    pool = await connect(settings)
    try:
        shown = await replay.show(operation_id, letters, replay.StoreOperations(pool), rules.key_age_limit)
    finally:
        await pool.close()
    if shown is None:
        return _show_letters(operation_id, replay.by_handle(operation_id, letters), as_json=as_json)
    details = shown.details
    if as_json:
        emit_json(
            {
                "operation": details.operation if details else None,
                "state": shown.state,
                "needs_force": shown.needs_force,
                "payment": details.payment if details else None,
                "history": details.history if details else None,
                "operations": details.operations if details else None,
                "dead_letters": [asdict(replay.view(lt)) for lt in shown.dead_letters],
                "replay": shown.advice,
            }
        )
        return EXIT_OK
    if details is None:
        print(f"operation {operation_id}: not in the database (unknown operation)")
    else:
        _print_details(details, shown.state)
    print(f"\n{topology.DEAD_QUEUE}: {len(shown.dead_letters)} message(s) for this operation")
    for v in map(replay.view, shown.dead_letters):
        print(
            f"  {v.handle}  parked_at {v.headers.get('parked_at', '-')}  attempts "
            f"{v.headers.get('attempts', '-')}  error {error_text(v.headers.get('last_error'))}"
        )
    print(f"\nreplay: {shown.advice}")
    return EXIT_OK


def _show_letters(handle: str, letters: list[DeadLetter], *, as_json: bool) -> int:
    """`dlq show HANDLE`: the letter(s) of a handle, redacted and cut."""
    if not letters:
        print(
            f"no operation {handle} in the database and no dead letter for it or with that handle",
            file=sys.stderr,
        )
        return EXIT_ATTENTION
    views = [replay.view(lt) for lt in letters]
    if as_json:
        emit_json({"letters": [asdict(v) for v in views]})
        return EXIT_OK
    for v in views:
        print_letter(v)
    print(f"\nremove it: gatewayctl dlq drop {views[0].handle}")
    return EXIT_OK


def print_letter(v: replay.LetterView) -> None:
    named = v.operation_id or "none readable"
    print(f"letter {v.handle} (operation {named}, message id {v.message_id or '-'})")
    for name, value in v.headers.items():
        print(f"  {name}: {value}")
    print(f"  body ({v.body_bytes} bytes): {v.body}")


def _print_details(details: replay.Details, state: str) -> None:
    op, payment = details.operation, details.payment
    print(f"operation {op['id']}")
    for label, value in (
        ("kind", op["kind"]),
        ("state", state),
        ("attempts", op["attempts"]),
        (
            "first attempt",
            f"{iso(op['first_attempt_at'])} ({replay.age(op['first_attempt_at'])} ago)"
            if op["first_attempt_at"]
            else None,
        ),
        ("last error", error_text(op["last_error"])),
        ("bank key", op["bank_key"]),
        ("bank time", f"{op['bank_ms']} ms"),
        ("lease", f"{op['lease_owner']} until {iso(op['lease_until'])}" if op["lease_owner"] else None),
        ("created", iso(op["created_at"])),
        ("updated", iso(op["updated_at"])),
        ("finished", iso(op["finished_at"])),
        ("bank response", orjson.dumps(op["bank_response"]).decode() if op["bank_response"] else None),
    ):
        print(f"  {label:<14}{'-' if value is None else value}")
    bank = payment["bank"]
    print(f"\npayment {payment['id']} (merchant {payment['merchant']})")
    for label, value in (
        ("status", payment["status"] + (", attention_required" if payment["attention_required"] else "")),
        ("amount", f"{payment['amount']} {payment['currency']}"),
        ("order", payment["order_id"]),
        ("customer", payment["customer_id"]),
        ("card", f"{payment['card']['brand']} ...{payment['card']['last4']}"),
        ("authorization", f"{bank['authorization_id'] or '-'} (expires {bank['authorization_expires_at'] or '-'})"),
        ("capture", bank["capture_id"]),
        ("void", bank["void_id"]),
        ("refund", bank["refund_id"]),
        ("last error", error_text(payment["last_error"])),
    ):
        print(f"  {label:<14}{'-' if value is None else value}")
    print("\nhistory")
    print(table(["AT", "STATUS", "CAUSE"], ((h["at"], h["status"], h["cause"]) for h in details.history)))
    print("\noperations of this payment")
    print(
        table(
            ["OPERATION", "KIND", "STATUS", "PARKED", "ATTEMPTS", "CREATED"],
            (
                (o["id"], o["kind"], o["status"], o["parked"], o["attempts"], iso(o["created_at"]))
                for o in details.operations
            ),
        )
    )
