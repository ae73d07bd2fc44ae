"""gatewayctl: the operator's tool.

    gatewayctl migrate                       apply schema.sql (safe to repeat)
    gatewayctl dlq list                      dead-lettered operations, queue left as it was
    gatewayctl dlq show OPERATION_ID         operation, receipt, history, dead letters
    gatewayctl dlq replay OPERATION_ID       put one back in the normal flow
    gatewayctl dlq replay --all [--force]    ... every one
    gatewayctl reconcile [--repair] [--rate N] [--limit N]

Every command takes --json (machine output on stdout). Exit codes: 0 done /
nothing to report, 1 something needs a human (findings, a refused or failed
replay, an unknown id), 2 bad usage or configuration, 3 PostgreSQL or
RabbitMQ cannot be reached (an unreachable bank makes reconcile report
`unverified` findings). Log lines (LOG_LEVEL; only errors unless it is
set) go to stderr, never into the output.

The database is the truth about an operation; payments.dead only carries
messages about it. A replay therefore decides from the operations row (and
works when the message is gone), and drops dead letters of an operation that
has meanwhile finished.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse, urlunparse

import aio_pika
import asyncpg
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage

from gateway import config, db, logs, messages, payments
from gateway.db import Q
from gateway.domain import OperationKind
from gateway.timefmt import iso, now, parse
from gateway.views import payment_json
from worker import reconcile, topology
from worker import settings as wsettings
from worker.bank import BankClient

EXIT_OK = 0
EXIT_ATTENTION = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

CONNECT_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 30.0
BANK_TIMEOUT = 20.0
MAX_DEAD_LETTERS = 10_000  # held at once by one command; more are left in the queue untouched


class Unavailable(Exception):
    """PostgreSQL or RabbitMQ cannot be reached (exit 3)."""


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlparse(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunparse(parts._replace(netloc=netloc))


# ---- output -----------------------------------------------------------------------------


def _emit_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _age(then: datetime | None) -> str | None:
    if then is None:
        return None
    seconds = max(0, int((now() - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            rest = seconds % size
            sub = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            return f"{seconds // size}{unit}{rest // sub[1]}{sub[0]}" if rest // sub[1] else f"{seconds // size}{unit}"
    return f"{seconds}s"


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


# ---- connections ------------------------------------------------------------------------


async def _pool(settings: config.Settings) -> asyncpg.Pool:
    try:
        return await db.create_pool(settings.database_url, min_size=1, max_size=10, timeout=CONNECT_TIMEOUT)
    except asyncpg.InvalidCatalogNameError:
        raise Unavailable(
            f"the database of {_safe_url(settings.database_url)} does not exist: "
            "create it (createdb), then run `gatewayctl migrate`"
        ) from None
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unavailable(
            f"cannot connect to PostgreSQL at {_safe_url(settings.database_url)}: {type(exc).__name__}: {exc}"
        ) from None


@dataclass
class DeadLetter:
    message: AbstractIncomingMessage
    operation_id: str | None
    headers: dict[str, Any]

    @property
    def parked_at(self) -> datetime | None:
        value = self.headers.get("parked_at")
        try:
            return parse(value) if isinstance(value, str) else None
        except ValueError:
            return None


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _letter(message: AbstractIncomingMessage) -> DeadLetter:
    headers = {k: _text(v) for k, v in (message.headers or {}).items()}
    op_id = headers.get("operation_id")
    if not isinstance(op_id, str) or not op_id:
        try:
            op_id = orjson.loads(message.body)["operation_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            op_id = None
        op_id = op_id if isinstance(op_id, str) and op_id else None
    return DeadLetter(message, op_id, headers)


class DeadLetterQueue:
    """payments.dead, read without losing or reordering anything.

    Reading: every message is taken with basic.get and manual acknowledgement,
    so all of them are held, unacknowledged, by this one channel at the same
    time (up to MAX_DEAD_LETTERS). What is not replayed or dropped is given
    back with basic.nack(requeue=True), one message at a time in delivery
    order: RabbitMQ puts returned messages back at the head of the queue in
    the order they come back, so the queue reads as before. basic.nack, not
    basic.reject: from RabbitMQ 4.3 a reject counts as a failed delivery
    towards a quorum queue's delivery limit, a nack does not. If this process
    dies while holding them, the broker returns them all by itself when the
    connection drops: nothing is acked before its work is done.
    """

    def __init__(self, amqp_url: str, ladder: tuple[int, ...]):
        self.amqp_url = amqp_url
        self.ladder = ladder
        self.connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> DeadLetterQueue:
        try:
            self.connection = await aio_pika.connect(
                self.amqp_url, timeout=CONNECT_TIMEOUT, client_properties={"connection_name": "gatewayctl"}
            )
        except Exception as exc:
            raise Unavailable(
                f"cannot connect to RabbitMQ at {_safe_url(self.amqp_url)}: {type(exc).__name__}: {exc}"
            ) from None
        try:
            # Publishing on its own channel: a failed publish that closes a channel must not
            # take the held deliveries with it.
            self._publish_channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
            exchanges = await topology.declare(self._publish_channel, self.ladder)
            self._commands = exchanges[messages.COMMANDS_EXCHANGE]
            self._get_channel = await self.connection.channel(publisher_confirms=False)
            self._queue = await self._get_channel.get_queue(topology.DEAD_QUEUE, ensure=True)
        except BaseException:
            await self.connection.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def take_all(self) -> list[DeadLetter]:
        """Every message in the queue (oldest first), held unacknowledged by us."""
        letters: list[DeadLetter] = []
        while len(letters) < MAX_DEAD_LETTERS:
            message = await self._queue.get(no_ack=False, fail=False, timeout=CONNECT_TIMEOUT)
            if message is None:
                break
            letters.append(_letter(message))
        return letters

    async def give_back(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:  # in delivery order: the queue keeps its order
            if not letter.message.processed:
                await letter.message.nack(requeue=True)

    async def drop(self, letters: Iterable[DeadLetter]) -> None:
        for letter in letters:
            if not letter.message.processed:
                await letter.message.ack()

    async def send_command(self, operation_id: str, kind: str, force: bool) -> None:
        """The operation's command, as the relay sends it, with the ladder count reset;
        returns once the broker has confirmed it (persistent, mandatory)."""
        cmd = messages.command(operation_id, kind)
        headers: dict[str, Any] = {topology.RETRIES_HEADER: 0}
        if force:
            headers[topology.FORCE_HEADER] = True
        message = aio_pika.Message(
            body=cmd.body,
            headers=headers,
            message_id=cmd.message_id,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._commands.publish(message, routing_key=cmd.routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT)


def _group(letters: list[DeadLetter]) -> dict[str | None, list[DeadLetter]]:
    """Dead letters by operation id, in queue order (the consumer may dead-letter one twice)."""
    out: dict[str | None, list[DeadLetter]] = {}
    for letter in letters:
        out.setdefault(letter.operation_id, []).append(letter)
    return out


def _needs_force(row: asyncpg.Record | dict | None, limit: timedelta) -> bool:
    return bool(
        row
        and row["kind"] == OperationKind.AUTHORIZE.value
        and row["status"] == "pending"
        and row["first_attempt_at"] is not None
        and row["first_attempt_at"] < now() - limit
    )


def _state(row: asyncpg.Record | dict | None) -> str:
    if row is None:
        return "unknown operation"
    if row["status"] != "pending":
        return f"final ({row['status']})"
    return "parked" if row["parked"] else "pending, not parked"


# ---- migrate ----------------------------------------------------------------------------


async def _schema_objects(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    return {(r["kind"], r["name"]) for r in await conn.fetch(Q["schema_objects"])}


def _count(n: int, kind: str) -> str:
    return f"{n} {kind}" if n == 1 else f"{n} {'indexes' if kind == 'index' else kind + 's'}"


async def cmd_migrate(args, settings: config.Settings) -> int:
    pool = await _pool(settings)
    try:
        async with pool.acquire() as conn:
            before = await _schema_objects(conn)
        await db.migrate(settings.database_url)
        async with pool.acquire() as conn:
            after = await _schema_objects(conn)
    finally:
        await pool.close()
    created: dict[str, list[str]] = {}
    for kind, name in sorted(after - before):
        created.setdefault(kind, []).append(name)
    totals: dict[str, int] = {}
    for kind, _ in after:
        totals[kind] = totals.get(kind, 0) + 1
    target = _safe_url(settings.database_url)
    if args.json:
        _emit_json(
            {
                "database": target,
                "schema": str(db.SCHEMA_PATH),
                "created": created,
                "present": dict(sorted(totals.items())),
            }
        )
        return EXIT_OK
    present = ", ".join(_count(n, k) for k, n in sorted(totals.items()))
    if created:
        print(f"applied {db.SCHEMA_PATH.name} to {target}")
        for kind, names in created.items():
            print(f"  created {_count(len(names), kind)}: {', '.join(names)}")
        print(f"now present: {present}")
    else:
        print(
            f"applied {db.SCHEMA_PATH.name} to {target}: already up to date, nothing created "
            f"(functions and triggers refreshed; present: {present})"
        )
    return EXIT_OK


# ---- dlq list ---------------------------------------------------------------------------


def _entry(op_id: str | None, row, letters: list[DeadLetter], limit: timedelta) -> dict:
    first = letters[0] if letters else None
    headers = first.headers if first else {}
    parked_at = min((lt.parked_at for lt in letters if lt.parked_at), default=None)  # the first parking
    since = parked_at or (row["updated_at"] if row else None)
    return {
        "operation_id": op_id,
        "payment_id": row["payment_id"] if row else headers.get("payment_id"),
        "kind": row["kind"] if row else headers.get("kind"),
        "attempts": row["attempts"] if row else headers.get("attempts"),
        "last_error": row["last_error"] if row else _parse_error(headers.get("last_error")),
        "state": _state(row),
        "needs_force": _needs_force(row, limit),
        "first_attempt_at": iso(row["first_attempt_at"]) if row else None,
        "parked_since": iso(since),
        "age": _age(since),
        "messages": len(letters),
    }


def _parse_error(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


async def _rows(pool: asyncpg.Pool, ids: Iterable[str | None]) -> dict[str, asyncpg.Record]:
    wanted = [i for i in ids if i]
    if not wanted:
        return {}
    return {r["id"]: r for r in await pool.fetch(Q["ops_operations"], wanted)}


async def cmd_dlq_list(args, settings: config.Settings) -> int:
    limit = args.key_age_limit
    async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
        letters = await dlq.take_all()
        await dlq.give_back(letters)  # read everything we need first, hold nothing while we query
    by_op = _group(letters)
    pool = await _pool(settings)
    try:
        rows = await _rows(pool, by_op)
        parked = await pool.fetch(Q["ops_parked_operations"], MAX_DEAD_LETTERS)
    finally:
        await pool.close()
    entries = [_entry(op_id, rows.get(op_id), group, limit) for op_id, group in by_op.items() if op_id]
    entries += [_entry(None, None, [lt], limit) for lt in by_op.get(None, [])]
    entries += [_entry(r["id"], r, [], limit) for r in parked if r["id"] not in by_op]
    for e in entries:
        if e["operation_id"] is None:
            e["state"] = "unreadable message (no operation id)"
        elif e["messages"] == 0:
            e["state"] = "parked, no message in the queue"
    if args.json:
        _emit_json(
            {
                "queue": topology.DEAD_QUEUE,
                "messages": len(letters),
                "operations": entries,
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
                    e["operation_id"],
                    e["payment_id"],
                    e["kind"],
                    e["attempts"],
                    e["age"],
                    e["messages"],
                    e["state"] + (" (replay needs --force)" if e["needs_force"] else ""),
                    _error_text(e["last_error"]),
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
    return EXIT_OK


# ---- dlq show ---------------------------------------------------------------------------


def _replay_advice(row, limit: timedelta) -> str:
    if row is None:
        return "unknown operation: nothing to replay"
    if row["status"] != "pending":
        return "already final: a replay only drops its dead letters"
    if _needs_force(row, limit):
        return (
            "refused without --force: the first authorization attempt is older than "
            f"{limit.total_seconds() / 3600:g} h (see `gatewayctl dlq replay --help`)"
        )
    if not row["parked"]:
        return "not parked (already back in the normal flow): a replay sends its command again, harmlessly"
    return "a replay unparks it and sends its command to the work queue"


async def cmd_dlq_show(args, settings: config.Settings) -> int:
    limit = args.key_age_limit
    async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
        letters = await dlq.take_all()
        await dlq.give_back(letters)
    mine = [lt for lt in letters if lt.operation_id == args.operation_id]
    pool = await _pool(settings)
    try:
        op = await pool.fetchrow(Q["ops_operation"], args.operation_id)
        payment = history = ops = None
        if op is not None:
            row = await pool.fetchrow(Q["ops_payment"], op["payment_id"])
            payment = payment_json(row)
            payment["merchant"] = row["merchant"]
            history = [
                {"status": h["status"], "cause": h["cause"], "at": iso(h["at"])}
                for h in await pool.fetch(Q["ops_payment_history"], op["payment_id"])
            ]
            ops = [dict(r) for r in await pool.fetch(Q["ops_payment_operations"], op["payment_id"])]
    finally:
        await pool.close()
    if op is None and not mine:
        print(f"no operation {args.operation_id} in the database and no dead letter for it", file=sys.stderr)
        return EXIT_ATTENTION
    advice = _replay_advice(op, limit)
    dead = [
        {"headers": lt.headers, "body": lt.message.body.decode("utf-8", "replace"), "message_id": lt.message.message_id}
        for lt in mine
    ]
    if args.json:
        _emit_json(
            {
                "operation": dict(op) if op else None,
                "state": _state(op),
                "needs_force": _needs_force(op, limit),
                "payment": payment,
                "history": history,
                "operations": ops,
                "dead_letters": dead,
                "replay": advice,
            }
        )
        return EXIT_OK
    if op is None:
        print(f"operation {args.operation_id}: not in the database (unknown operation)")
    else:
        print(f"operation {op['id']}")
        for label, value in (
            ("kind", op["kind"]),
            ("state", _state(op)),
            ("attempts", op["attempts"]),
            (
                "first attempt",
                f"{iso(op['first_attempt_at'])} ({_age(op['first_attempt_at'])} ago)"
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
        print(_table(["AT", "STATUS", "CAUSE"], ((h["at"], h["status"], h["cause"]) for h in history)))
        print("\noperations of this payment")
        print(
            _table(
                ["OPERATION", "KIND", "STATUS", "PARKED", "ATTEMPTS", "CREATED"],
                ((o["id"], o["kind"], o["status"], o["parked"], o["attempts"], iso(o["created_at"])) for o in ops),
            )
        )
    print(f"\n{topology.DEAD_QUEUE}: {len(mine)} message(s) for this operation")
    for lt in mine:
        print(
            f"  parked_at {lt.headers.get('parked_at', '-')}  {topology.RETRIES_HEADER} "
            f"{lt.headers.get(topology.RETRIES_HEADER, '-')}  error {_error_text(lt.headers.get('last_error'))}"
        )
    print(f"\nreplay: {advice}")
    return EXIT_OK


# ---- dlq replay -------------------------------------------------------------------------


@dataclass
class Replayed:
    operation_id: str | None
    payment_id: str | None
    kind: str | None
    result: str  # replayed | already_final | refused | unknown | unreadable | failed
    message: str
    dead_letters_dropped: int = 0
    forced: bool = False

    @property
    def done(self) -> bool:
        return self.result in ("replayed", "already_final")


async def _replay_one(
    pool, dlq: DeadLetterQueue, op_id: str, row, letters: list[DeadLetter], force: bool, limit: timedelta
) -> Replayed:
    base = {
        "operation_id": op_id,
        "payment_id": row["payment_id"] if row else None,
        "kind": row["kind"] if row else None,
    }
    if row is None:
        return Replayed(
            **base,
            result="unknown",
            message="no such operation in the database; its dead letters are left in the queue",
        )
    if row["status"] != "pending":
        await dlq.drop(letters)
        return Replayed(
            **base,
            result="already_final",
            dead_letters_dropped=len(letters),
            message=f"already final ({row['status']}), nothing to do"
            + (f"; dropped {len(letters)} dead letter(s)" if letters else ""),
        )
    if _needs_force(row, limit) and not force:
        hours = limit.total_seconds() / 3600
        return Replayed(
            **base,
            result="refused",
            message=(
                f"refused: this authorization was first sent to the bank {_age(row['first_attempt_at'])} ago "
                f"(limit {hours:g} h). The bank forgets idempotency keys after 24 h, so if an earlier attempt "
                "placed a hold whose answer was lost, a resend could place a second hold. Check the bank for a "
                f"hold on payment {row['payment_id']}, then replay with --force (or resolve it by hand)."
            ),
        )
    if not await payments.unpark(pool, op_id):
        await dlq.drop(letters)  # it finished between our read and the unpark
        return Replayed(
            **base,
            result="already_final",
            dead_letters_dropped=len(letters),
            message="finished meanwhile, nothing to do",
        )
    try:
        await dlq.send_command(op_id, row["kind"], force)
    except Exception as exc:
        return Replayed(
            **base,
            result="failed",
            message=(
                f"unparked, but the command could not be published ({type(exc).__name__}: {exc}); the dead "
                "letters stay in the queue and the sweeper re-enqueues the operation, or run replay again"
            ),
        )
    await dlq.drop(letters)
    how = "was parked" if row["parked"] else "was not parked (already back in the flow)"
    source = (
        f"{len(letters)} dead letter(s) removed" if letters else "no dead letter found: re-enqueued from the database"
    )
    return Replayed(
        **base,
        result="replayed",
        dead_letters_dropped=len(letters),
        forced=force,
        message=(
            f"{how}; command sent to {messages.COMMANDS_EXCHANGE} ({topology.RETRIES_HEADER} 0"
            f"{', ' + topology.FORCE_HEADER if force else ''}); {source}"
        ),
    )


async def cmd_dlq_replay(args, settings: config.Settings) -> int:
    if bool(args.operation_id) == bool(args.all):
        print("gatewayctl dlq replay: give one OPERATION_ID or --all", file=sys.stderr)
        return EXIT_USAGE
    limit = args.key_age_limit
    pool = await _pool(settings)
    results: list[Replayed] = []
    try:
        async with DeadLetterQueue(settings.amqp_url, args.ladder) as dlq:
            letters = await dlq.take_all()
            try:
                by_op = _group(letters)
                if args.all:
                    parked = await pool.fetch(Q["ops_parked_operations"], MAX_DEAD_LETTERS)
                    targets = [i for i in by_op if i] + [r["id"] for r in parked if r["id"] not in by_op]
                    results += [
                        Replayed(
                            None,
                            lt.headers.get("payment_id"),
                            lt.headers.get("kind"),
                            "unreadable",
                            "a message without an operation id: left in the queue",
                        )
                        for lt in by_op.get(None, [])
                    ]
                else:
                    targets = [args.operation_id]
                rows = await _rows(pool, targets)
                for op_id in targets:
                    results.append(
                        await _replay_one(pool, dlq, op_id, rows.get(op_id), by_op.get(op_id, []), args.force, limit)
                    )
            finally:
                await dlq.give_back(letters)
    finally:
        await pool.close()
    failed = [r for r in results if not r.done]
    if args.json:
        _emit_json(
            {
                "results": [r.__dict__ for r in results],
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
    "Environment: DATABASE_URL, AMQP_URL, BANK_URL (reconcile), LOG_LEVEL (log lines go to stderr; only "
    "errors unless it is set), WORKER_RETRY_LADDER (the topology it declares) and "
    "WORKER_AUTHORIZE_KEY_MAX_AGE_HOURS (default 23, as the worker).",
    "Exit codes: 0 done, 1 needs a human (findings, a refused or failed replay, an unknown id), 2 bad usage "
    "or configuration, 3 PostgreSQL or RabbitMQ cannot be reached.",
)


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
            "Operate the payment gateway: the schema, dead-lettered operations and "
            "reconciliation with the bank. Every command has --help."
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
        help="dead-lettered (parked) operations: list, show, replay",
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
        help="everything about one operation",
        description=_para(
            "The operations row, the payment's receipt (whatever the merchant), its full history "
            "with causes, the payment's other operations, its dead letters and what a replay "
            "would do. The queue is read as by `dlq list`."
        ),
    )
    p.add_argument("operation_id", metavar="OPERATION_ID", help="op_...")
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
            f"publisher confirm, {topology.RETRIES_HEADER} 0, {topology.FORCE_HEADER} with --force) and only "
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
    settings = config.load()  # a bad value: message on stderr, exit 2
    if args.command == "dlq":  # the worker's settings that the dead-letter commands share
        worker_cfg = wsettings.WorkerSettings.load()
        args.ladder = worker_cfg.retry_ladder
        args.key_age_limit = timedelta(hours=worker_cfg.authorize_key_max_age_hours)
    _setup_logs(settings)
    try:
        return asyncio.run(args.handler(args, settings))
    except Unavailable as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
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
