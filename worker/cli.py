"""gatewayctl: the operator's tool.

    gatewayctl migrate                       apply schema.sql (safe to repeat)
    gatewayctl dlq list                      dead-lettered operations, queue left as it was
    gatewayctl dlq show OPERATION_ID|HANDLE  operation, receipt, history, dead letters; or one letter
    gatewayctl dlq replay OPERATION_ID       put one back in the normal flow
    gatewayctl dlq replay --all [--force]    ... every one
    gatewayctl dlq drop HANDLE...|--unreadable   remove letters from the queue
    gatewayctl settle OPERATION_ID --outcome succeeded|failed --reason TEXT --by NAME [--bank-id ID]
    gatewayctl resolve PAYMENT_ID --reason TEXT --by NAME [--set FIELD=ID]...
    gatewayctl payments set-reference PAYMENT_ID --capture-id ID|--authorization-id ID|... --reason TEXT --by NAME
    gatewayctl abandon PAYMENT_ID --reason TEXT --by NAME
    gatewayctl reconcile [--repair] [--rate N] [--limit N]
    gatewayctl rekey-cards [--batch N]       seal every vaulted card under the newest card key
    gatewayctl ops-key NAME                  a new /ops key (worker/keycommands.py)
    gatewayctl broker-account --merchant NAME   a merchant's own RabbitMQ account (worker/brokeraccount.py)
    gatewayctl webhooks set|rotate-secret|list|disable|failed|resend   (worker/webhooks_cli.py)

Every command takes --json (machine output on stdout). Exit codes: 0 done /
nothing to report, 1 something needs a human (findings, a refused or failed
replay, an unknown id, a decision that does not fit the payment), 2 bad
usage or configuration, 3 PostgreSQL or RabbitMQ cannot be reached (an
unreachable bank makes reconcile report `unverified` findings). Log lines
(LOG_LEVEL; only errors unless it is set) go to stderr, never into the output.

This module parses arguments, prints and chooses the exit code. Reading and
giving back payments.dead is gateway/ops/deadletters.py; what list, show, replay
and drop decide about each operation and letter is gateway/ops/replay.py; settle,
resolve, set-reference and abandon are phases of gateway/payments.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import textwrap
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import structlog

from gateway import config, db, domain, logs, payments, store, topology
from gateway.ops import reconcile, replay
from gateway.ops.deadletters import MAX_DEAD_LETTERS, BrokerUnavailable, DeadLetterQueue
from gateway.ops.rules import OpsRules
from gateway.redact import hide_passwords
from gateway.timefmt import iso
from worker import brokeraccount, keycommands, webhooks_cli
from worker.bank import BankClient
from worker.ctlkit import (
    EXIT_ATTENTION,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Unavailable,
)
from worker.ctlkit import connect as _pool
from worker.ctlkit import emit_json as _emit_json
from worker.ctlkit import table as _table

BANK_TIMEOUT = 20.0


# ---- output -----------------------------------------------------------------------------


def _error_text(error: Any) -> str | None:
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


# ---- migrate ----------------------------------------------------------------------------


def _count(n: int, kind: str) -> str:
    return f"{n} {kind}" if n == 1 else f"{n} {'indexes' if kind == 'index' else kind + 's'}"


async def cmd_migrate(args, settings: config.Settings) -> int:
    pool = await _pool(settings)
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
    if args.json:
        _emit_json(
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


# ---- dlq list ---------------------------------------------------------------------------


async def cmd_dlq_list(args, settings: config.Settings) -> int:
    async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
        letters = await dlq.take_all()
        await dlq.give_back()  # read everything we need first, hold nothing while we query
    pool = await _pool(settings)
    try:
        entries = await replay.listing(letters, replay.StoreOperations(pool), args.key_age_limit)
    finally:
        await pool.close()
    if args.json:
        _emit_json(
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
        _table(
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
                    _error_text(e.last_error),
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


# ---- dlq show ---------------------------------------------------------------------------


async def cmd_dlq_show(args, settings: config.Settings) -> int:
    async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
        letters = await dlq.take_all()
        await dlq.give_back()
    pool = await _pool(settings)
    try:
        shown = await replay.show(args.operation_id, letters, replay.StoreOperations(pool), args.key_age_limit)
    finally:
        await pool.close()
    if shown is None:
        return _show_letters(args, replay.by_handle(args.operation_id, letters))
    details = shown.details
    if args.json:
        _emit_json(
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
        print(f"operation {args.operation_id}: not in the database (unknown operation)")
    else:
        _print_details(details, shown.state)
    print(f"\n{topology.DEAD_QUEUE}: {len(shown.dead_letters)} message(s) for this operation")
    for v in map(replay.view, shown.dead_letters):
        print(
            f"  {v.handle}  parked_at {v.headers.get('parked_at', '-')}  attempts "
            f"{v.headers.get('attempts', '-')}  error {_error_text(v.headers.get('last_error'))}"
        )
    print(f"\nreplay: {shown.advice}")
    return EXIT_OK


def _show_letters(args, letters: list) -> int:
    """`dlq show HANDLE`: the letter(s) of a handle, redacted and cut."""
    if not letters:
        print(
            f"no operation {args.operation_id} in the database and no dead letter for it or with that handle",
            file=sys.stderr,
        )
        return EXIT_ATTENTION
    views = [replay.view(lt) for lt in letters]
    if args.json:
        _emit_json({"letters": [asdict(v) for v in views]})
        return EXIT_OK
    for v in views:
        _print_letter(v)
    print(f"\nremove it: gatewayctl dlq drop {views[0].handle}")
    return EXIT_OK


def _print_letter(v: replay.LetterView) -> None:
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
        ("last error", _error_text(op["last_error"])),
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
        ("last error", _error_text(payment["last_error"])),
    ):
        print(f"  {label:<14}{'-' if value is None else value}")
    print("\nhistory")
    print(_table(["AT", "STATUS", "CAUSE"], ((h["at"], h["status"], h["cause"]) for h in details.history)))
    print("\noperations of this payment")
    print(
        _table(
            ["OPERATION", "KIND", "STATUS", "PARKED", "ATTEMPTS", "CREATED"],
            (
                (o["id"], o["kind"], o["status"], o["parked"], o["attempts"], iso(o["created_at"]))
                for o in details.operations
            ),
        )
    )


# ---- dlq replay -------------------------------------------------------------------------


async def cmd_dlq_replay(args, settings: config.Settings) -> int:
    if bool(args.operation_id) == bool(args.all):
        print("gatewayctl dlq replay: give one OPERATION_ID or --all", file=sys.stderr)
        return EXIT_USAGE
    pool = await _pool(settings)
    try:
        async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
            letters = await dlq.take_all()
            try:
                results = await replay.replay(
                    letters,
                    dlq,
                    replay.StoreOperations(pool),
                    operation_id=None if args.all else args.operation_id,
                    force=args.force,
                    limit=args.key_age_limit,
                )
            finally:
                await dlq.give_back()
    finally:
        await pool.close()
    failed = [r for r in results if not r.done]
    if args.json:
        _emit_json(
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


async def cmd_dlq_drop(args, settings: config.Settings) -> int:
    if not args.handles and not args.unreadable:
        print("gatewayctl dlq drop: give one or more HANDLEs or --unreadable", file=sys.stderr)
        return EXIT_USAGE
    async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
        letters = await dlq.take_all()
        try:
            plan = replay.to_drop(letters, handles=args.handles, unreadable=args.unreadable)
            views = [replay.view(lt) for lt in plan.letters]
            if not args.json:
                for v in views:
                    print("dropping ", end="")
                    _print_letter(v)
            await dlq.drop(plan.letters)
        finally:
            await dlq.give_back()
    if args.json:
        _emit_json({"dropped": [asdict(v) for v in views], "not_found": plan.not_found})
    else:
        print(f"{len(views)} letter(s) dropped from {topology.DEAD_QUEUE}")
    for handle in plan.not_found:
        print(f"gatewayctl dlq drop: no letter {handle} in {topology.DEAD_QUEUE}", file=sys.stderr)
    return EXIT_ATTENTION if plan.not_found else EXIT_OK


# ---- settle, resolve, abandon -----------------------------------------------------------


def _references(pairs: list[str]) -> dict[str, str]:
    """--set FIELD=ID pairs, each checked for its shape (prefix + lowercase UUID)."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        problem = "expected FIELD=ID" if not sep else domain.reference_problem(name, value)
        if problem:
            raise ValueError(f"--set {pair}: {problem}")
        if name in found:
            raise ValueError(f"--set {name} given twice")
        found[name] = value
    return found


async def _decide(args, settings: config.Settings, decide, act: str | None = None) -> int:
    """Run one ops phase (`act`, the history's name for it: the command's by default); OpsRefused
    is a human's matter (exit 1), ValueError bad usage (2)."""
    act = act or args.command
    try:
        payments.ops_cause(args.by, act, args.reason)  # bad names and empty reasons, before connecting
    except ValueError as exc:
        print(f"gatewayctl {act}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    pool = await _pool(settings)
    try:
        decision = await decide(pool)
    except payments.OpsRefused as exc:
        print(f"gatewayctl {act}: refused: {exc}", file=sys.stderr)
        return EXIT_ATTENTION
    except ValueError as exc:
        print(f"gatewayctl {act}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await pool.close()
    if args.json:
        _emit_json(
            {
                "payment": decision.payment,
                "operation_id": decision.operation_id,
                "kind": decision.kind,
                "follow_up": decision.follow_up,
            }
        )
        return EXIT_OK
    payment = decision.payment
    print(_summary(act, decision))
    bank = payment["bank"]
    flag = ", attention_required" if payment["attention_required"] else ""
    print(f"  payment       {payment['id']}: {payment['status']}{flag}")
    for name in domain.BANK_REFERENCES:
        if bank[name]:
            print(f"  {name:<14}{bank[name]}")
    if payment["last_error"]:
        print(f"  last error    {_error_text(payment['last_error'])}")
    print(f"  history       {decision.cause}")
    return EXIT_OK


def _summary(command: str, decision: payments.OpsDecision) -> str:
    kind = decision.kind
    if command == "settle" and kind is not None:
        text = f"settled {kind.value} operation {decision.operation_id} by hand"
        if decision.payment["attention_required"]:
            text += (
                f"; the bank's {domain.REFERENCE_OF[kind]} is unknown, so the payment stays flagged: once "
                f"you have it, `gatewayctl resolve PAYMENT_ID --set {domain.REFERENCE_OF[kind]}=ID`"
            )
        return text
    if command == "abandon" and kind is not None:
        text = f"abandoned the parked {kind.value} operation {decision.operation_id}; the card is purged"
        if decision.follow_up:
            text += f"; the hold is being voided (operation {decision.follow_up}): voided once the bank confirms"
        return text
    if command == "set-reference":
        text = "recorded the bank reference: FicMart's requests sent with it are accepted again"
        if decision.payment["attention_required"]:
            text += "; the payment stays flagged until `gatewayctl resolve` (once its findings are checked too)"
        return text
    return "resolved: attention_required cleared"


async def cmd_settle(args, settings: config.Settings) -> int:
    if args.bank_id is not None and args.outcome != "succeeded":
        print("gatewayctl settle: --bank-id only goes with --outcome succeeded", file=sys.stderr)
        return EXIT_USAGE
    return await _decide(
        args,
        settings,
        lambda pool: payments.settle_by_hand(
            pool,
            args.operation_id,
            succeeded=args.outcome == "succeeded",
            reason=args.reason,
            by=args.by,
            bank_id=args.bank_id,
        ),
    )


async def cmd_resolve(args, settings: config.Settings) -> int:
    try:
        references = _references(args.set or [])
    except ValueError as exc:
        print(f"gatewayctl resolve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return await _decide(
        args,
        settings,
        lambda pool: payments.resolve(pool, args.payment_id, reason=args.reason, by=args.by, references=references),
    )


async def cmd_set_reference(args, settings: config.Settings) -> int:
    name, value = args.reference
    return await _decide(
        args,
        settings,
        lambda pool: payments.set_reference(pool, args.payment_id, name, value, reason=args.reason, by=args.by),
        act="set-reference",
    )


async def cmd_abandon(args, settings: config.Settings) -> int:
    return await _decide(
        args,
        settings,
        lambda pool: payments.abandon(
            pool, args.payment_id, reason=args.reason, by=args.by, parked_at_least=args.abandon_after
        ),
    )


# ---- reconcile --------------------------------------------------------------------------


def _action(f: reconcile.Finding, repair: bool) -> str:
    if f.repaired:
        return "repaired" + (f" ({f.note})" if f.note else "")
    if f.flagged:
        return "attention_required set"
    if f.money:
        return "needs a human" + ("" if repair else " (--repair flags it)")
    if f.kind == reconcile.EXPIRY_MISMATCH:
        return "--repair takes the bank's value"
    return "checked again next run"


async def cmd_reconcile(args, settings: config.Settings) -> int:
    pool = await _pool(settings)
    try:
        async with BankClient(settings.bank_url, timeout=BANK_TIMEOUT) as bank:
            report = await reconcile.run_reconciliation(
                pool, bank, rate_per_second=args.rate, limit=args.limit, repair=args.repair
            )
    finally:
        await pool.close()
    if args.json:
        _emit_json(report.to_json())
        return EXIT_OK if report.ok else EXIT_ATTENTION
    print(
        f"reconciliation {report.run_id} ({'repair' if report.repair else 'report only'}): "
        f"{report.checked} payment(s) checked, {report.bank_calls} bank request(s) in {report.seconds:.1f} s"
        + (f", {report.moved} moved during the check (next run)" if report.moved else "")
    )
    if report.ok:
        print("no disagreements")
        return EXIT_OK
    print()
    print(
        _table(
            ["PAYMENT", "KIND", "OBJECT", "ID", "OURS", "BANK", "ACTION"],
            (
                [
                    f.payment_id,
                    f.kind,
                    f.detail.get("object"),
                    f.detail.get("id") or f.detail.get("field"),
                    f.detail.get("ours"),
                    f.detail.get("bank", f.detail.get("code") or f.detail.get("outcome")),
                    _action(f, report.repair),
                ]
                for f in report.findings
            ),
        )
    )
    print()
    print(_table(["KIND", "COUNT"], report.counts().items()))
    repaired = sum(f.repaired for f in report.findings)
    flagged = sum(f.flagged for f in report.findings)
    print(
        f"\n{len(report.findings)} finding(s): {repaired} repaired, {flagged} flagged for attention; "
        f"stored under run {report.run_id}" + ("" if report.repair else "; nothing else changed (no --repair)")
    )
    return EXIT_ATTENTION


# ---- the parser -------------------------------------------------------------------------


def _positive(number: type[int] | type[float]):
    """An argparse type: a finite number of that type, above zero."""
    kind = "an integer" if number is int else "a number"

    def parse(text: str):
        try:
            value = number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


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


def _reference(name: str):
    """An argparse type: a bank reference of this name, checked for its shape."""

    def parse(text: str) -> tuple[str, str]:
        problem = domain.reference_problem(name, text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return name, text

    return parse


def _para(*paragraphs: str) -> str:
    """Help text wrapped here, so that RawDescriptionHelpFormatter keeps the paragraphs."""
    return "\n\n".join(textwrap.fill(p, 79) for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output (one JSON document on stdout)",
    )
    fmt = argparse.RawDescriptionHelpFormatter

    parser = argparse.ArgumentParser(
        prog="gatewayctl",
        formatter_class=fmt,
        epilog=_para(*ENVIRONMENT),
        description=_para(
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

    p = commands.add_parser(
        "migrate",
        parents=[json_flag],
        formatter_class=fmt,
        help="apply schema.sql (safe to repeat)",
        description=_para(
            "Apply schema.sql in one transaction and print what it created. Every statement is "
            "idempotent: safe to run twice and on a live database."
        ),
    )
    p.set_defaults(handler=cmd_migrate)

    dlq = commands.add_parser(
        "dlq",
        formatter_class=fmt,
        help="dead-lettered (parked) operations: list, show, replay, drop",
        description=_para(
            f"Operations that exhausted their retries are parked: their payment shows "
            f"attention_required and a message waits in {topology.DEAD_QUEUE}. The operations "
            "table is the truth; the queue only carries messages about it."
        ),
        epilog=_para(*ENVIRONMENT),
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", metavar="DLQ_COMMAND", required=True)

    p = dlq_commands.add_parser(
        "list",
        parents=[json_flag],
        formatter_class=fmt,
        help="dead letters and parked operations",
        description=_para(
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
    p.set_defaults(handler=cmd_dlq_list)

    p = dlq_commands.add_parser(
        "show",
        parents=[json_flag],
        formatter_class=fmt,
        help="everything about one operation, or one dead letter",
        description=_para(
            "The operations row, the payment's receipt (whatever the merchant), its full history "
            "with causes, the payment's other operations, its dead letters and what a replay "
            "would do. The queue is read as by `dlq list`.",
            "Given the HANDLE of a letter instead (`dlq list` names a letter without a readable operation "
            "id by its handle: its message id, or sha- and a hash of its body and headers), that letter: "
            "its headers and body, with card numbers and CVVs redacted and long values cut.",
        ),
    )
    p.add_argument("operation_id", metavar="OPERATION_ID|HANDLE", help="op_... or a letter's handle")
    p.set_defaults(handler=cmd_dlq_show)

    p = dlq_commands.add_parser(
        "replay",
        parents=[json_flag],
        formatter_class=fmt,
        help="put parked operations back in the flow",
        usage="gatewayctl dlq replay [-h] [--json] [--force] (OPERATION_ID | --all)",
        description=_para(
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
        epilog=_para(
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
    p.set_defaults(handler=cmd_dlq_replay)

    p = dlq_commands.add_parser(
        "drop",
        parents=[json_flag],
        formatter_class=fmt,
        help="remove letters from the queue (unreadable ones, or any by handle)",
        usage="gatewayctl dlq drop [-h] [--json] (HANDLE... | --unreadable)",
        description=_para(
            f"Print each letter (redacted and cut), then acknowledge it: it leaves {topology.DEAD_QUEUE} for "
            "good. The others are given back in their order. HANDLEs are those of `dlq list` and `dlq "
            "show`; --unreadable takes every letter without a readable operation id.",
            "Dropping the letter of a parked operation does not unpark it: the database is the truth, and "
            "the operation is still listed and replayed from its row.",
        ),
        epilog=_para("Exit code 1 when a HANDLE names no letter; the others are still dropped."),
    )
    p.add_argument("handles", metavar="HANDLE", nargs="*", help="a letter's handle")
    p.add_argument("--unreadable", action="store_true", help="every letter without a readable operation id")
    p.set_defaults(handler=cmd_dlq_drop)

    who = argparse.ArgumentParser(add_help=False)
    who.add_argument(
        "--reason", required=True, metavar="TEXT", help="why (kept, redacted and cut, in the payment's history)"
    )
    who.add_argument("--by", required=True, metavar="NAME", help="who decides (1-64 letters, digits, . _ @ -)")

    p = commands.add_parser(
        "settle",
        parents=[json_flag, who],
        formatter_class=fmt,
        help="record a parked operation's outcome, checked at the bank by hand",
        description=_para(
            "For a parked operation whose outcome you checked at the bank (e.g. `bank_outcome_uncertain`: the "
            "bank says already done and will not name what it did). Records it as the worker would: the "
            "payment's status (succeeded: authorized, captured, voided, refunded, expired; failed: declined "
            "for an authorization, back to the status it had otherwise), the card deleted, the completion "
            "event, and a history row `ops:NAME:settle:REASON`.",
            "--bank-id records the bank's id of what was done (auth_, cap_, void_ or ref_ and a lowercase "
            "UUID, as the operation's kind needs). Without it the reference is unknown and the payment keeps "
            "attention_required until `gatewayctl resolve --set` fills it. An authorization settled by hand "
            "has no hold expiry until reconciliation takes the bank's.",
            "Refused (exit 1) when the operation is unknown, already final, or not parked (a worker is "
            "still on it). Its letters stay in the queue; `dlq replay` drops them as already final.",
        ),
    )
    p.add_argument("operation_id", metavar="OPERATION_ID", help="op_...")
    p.add_argument("--outcome", required=True, choices=("succeeded", "failed"), help="what the bank did")
    p.add_argument("--bank-id", metavar="ID", help="the bank's id of what it did (with --outcome succeeded)")
    p.set_defaults(handler=cmd_settle)

    p = commands.add_parser(
        "resolve",
        parents=[json_flag, who],
        formatter_class=fmt,
        help="clear attention_required on a payment with nothing in flight",
        description=_para(
            "For a payment flagged by reconciliation, or settled with an unknown bank reference, once you "
            "have looked: clears attention_required and writes a history row `ops:NAME:resolve:REASON`; the "
            "status does not move. --set fills a missing bank reference (authorization_id, capture_id, "
            "void_id, refund_id; its prefix and a lowercase UUID) only where the receipt has none and the "
            "status has one.",
            "Refused (exit 1) when the payment is unknown, has an operation in flight (settle or abandon "
            "it), already has that reference, or is neither flagged nor given one.",
        ),
    )
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="pay_...")
    p.add_argument("--set", action="append", metavar="FIELD=ID", help="a missing bank reference (repeatable)")
    p.set_defaults(handler=cmd_resolve)

    group = commands.add_parser(
        "payments",
        formatter_class=fmt,
        help="one payment's bank references: set-reference",
        description=_para(
            "What an operator records on one payment after checking the bank by hand.",
        ),
        epilog=_para(*ENVIRONMENT),
    )
    payment_commands = group.add_subparsers(dest="payments_command", metavar="PAYMENTS_COMMAND", required=True)
    p = payment_commands.add_parser(
        "set-reference",
        parents=[json_flag, who],
        formatter_class=fmt,
        help="record a bank reference the bank never gave us (found at the bank)",
        description=_para(
            "When the bank did a step but forgot our idempotency key, it never named what it did: the "
            "receipt shows the step's reference as null (last_error `bank_reference_unknown`, "
            "attention_required), and FicMart's next step that is sent with it (a refund needs the "
            "capture_id; a capture or void the authorization_id) is refused with 409 "
            "`bank_reference_unknown`. Find the reference at the bank (the payment's card, amount and "
            "time; `gatewayctl dlq show` has the operation's bank key), then record it here: FicMart's "
            "request is accepted from then on.",
            "The reference must be the bank's shape (auth_, cap_, void_ or ref_ and a lowercase UUID), fit "
            "the payment's status, and be missing from the receipt: a known reference is never "
            "overwritten. The status and attention_required do not move (`gatewayctl resolve` clears the "
            "flag once everything about the payment, its findings too, has been checked). History row "
            "`ops:NAME:set-reference:FIELD=ID REASON`.",
            "Refused (exit 1) when the payment is unknown, has an operation in flight, already has that "
            "reference or its status has none.",
        ),
    )
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="pay_...")
    which = p.add_mutually_exclusive_group(required=True)
    for name in domain.BANK_REFERENCES:
        which.add_argument(
            f"--{name.replace('_', '-')}",
            dest="reference",
            type=_reference(name),
            metavar="ID",
            help=f"the {name} ({domain.BANK_REFERENCES[name][0]}...)",
        )
    p.set_defaults(handler=cmd_set_reference)

    p = commands.add_parser(
        "abandon",
        parents=[json_flag, who],
        formatter_class=fmt,
        help="give up on a payment whose operation is parked too long",
        description=_para(
            "For a payment whose operation has been parked for ABANDON_AFTER_HOURS (24) or more. Nothing "
            "guesses money: the operation fails with last_error `abandoned` and the reason, the card is "
            "purged, and the payment: authorize -> declined (a hold the bank may have placed lapses by itself; "
            "a reconciliation finding `abandoned_authorization` records it); capture or void -> voiding, with "
            "a new void of the hold (voided once the bank confirms); refund -> captured, last_error "
            "`abandoned`; release -> stays expired. History row `ops:NAME:abandon:REASON`; events as usual.",
            "Refused (exit 1) when nothing is parked, or it was parked less than ABANDON_AFTER_HOURS ago: "
            "replay it, or settle it by hand after checking the bank.",
        ),
    )
    p.add_argument("payment_id", metavar="PAYMENT_ID", help="pay_...")
    p.set_defaults(handler=cmd_abandon)

    p = commands.add_parser(
        "reconcile",
        parents=[json_flag],
        formatter_class=fmt,
        help="compare receipts with the bank",
        description=_para(
            "Compare the newest settled payments that have bank ids with the bank's GET endpoints "
            "(authorization: exists, amount, expires_at; capture: exists, amount, authorization; refund: "
            "exists, amount, capture) at a bounded rate, retrying transient bank errors. Payments with a "
            "pending or parked operation are skipped. Findings (missing_at_bank, amount_mismatch, "
            "link_mismatch, receipt_incomplete, expiry_mismatch, unverified) are printed and stored in "
            "reconciliation_findings. Exit code 0 when there are none, 1 when there are findings.",
            "Voids cannot be checked: the bank has no GET for them.",
        ),
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="take the bank's hold expiry (and expire the payment if the hold has lapsed); flag "
        "money disagreements with attention_required. Money is never changed.",
    )
    p.add_argument(
        "--rate",
        type=_positive(float),
        default=reconcile.DEFAULT_RATE,
        metavar="N",
        help=f"bank requests per second, retries included (default {reconcile.DEFAULT_RATE:g})",
    )
    p.add_argument(
        "--limit",
        type=_positive(int),
        default=reconcile.DEFAULT_LIMIT,
        metavar="N",
        help=f"payments to check, newest first (default {reconcile.DEFAULT_LIMIT})",
    )
    p.set_defaults(handler=cmd_reconcile)
    keycommands.add_commands(commands, parents=[json_flag], formatter_class=fmt, open_pool=_pool)
    brokeraccount.add_parser(commands, parents=[json_flag], formatter_class=fmt)
    webhooks_cli.add_parser(commands, json_flag, fmt)
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
    if args.command == "dlq":  # decided with the worker's values (ops.rules)
        rules = OpsRules.load()
        args.ladder = rules.retry_ladder
        args.key_age_limit = timedelta(hours=rules.authorize_key_max_age_hours)
    if args.command == "abandon":
        args.abandon_after = timedelta(hours=OpsRules.load().abandon_after_hours)
    _setup_logs(settings)
    try:
        return asyncio.run(args.handler(args, settings))
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
