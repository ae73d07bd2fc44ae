"""What gatewayctl does about dead-lettered operations: list, show, replay and drop.

The database is the truth about an operation; payments.dead only carries
messages about it. A replay therefore decides from the operations row (and
works when the message is gone), one operation at a time:

    unknown operation                 its letters stay in the queue        not done
    already final                     its letters are dropped              done
    authorization first sent longer
      ago than the key horizon        refused unless forced                not done
    authorization whose card the
      vault no longer keeps           refused (ops abandon it)             not done
    pending (parked or not)           unparked, its command published,
                                      only then its letters dropped        done
    ... the publish fails             reported failed, letters stay        not done
    ... finished before the unpark    its letters are dropped              done

`replay --all` takes every operation with a letter (in queue order), then
every operation parked in the database without one (re-enqueued from its
row); a letter that names no readable operation id is reported unreadable
and left, with its handle (DeadLetter.handle) and the way out: `dlq show
HANDLE` reads it, `dlq drop HANDLE` removes it (to_drop picks the letters).
Whatever a letter carries is shown redacted and cut (view()): it came from
outside.

This module runs against two small interfaces, DeadLetterSink (what a replay
does to the queue) and Operations (what it reads and changes in the
database), so that the decisions are tested with fakes; the real ones are
gateway.ops.deadletters.DeadLetterQueue and StoreOperations below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import asyncpg
import orjson

from gateway import messages, store
from gateway.domain import CARD_PURGED, OperationKind, Payment
from gateway.ops.deadletters import MAX_DEAD_LETTERS, DeadLetter
from gateway.payments import settlement
from gateway.redact import clean
from gateway.timefmt import iso, now
from gateway.views import receipt

# ---- what the policy runs against --------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """The columns of an operations row that a decision reads."""

    id: str
    payment_id: str
    kind: str
    status: str  # pending | succeeded | failed
    parked: bool
    attempts: int
    last_error: Any
    first_attempt_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record | Mapping[str, Any]) -> Operation:
        return cls(
            id=row["id"],
            payment_id=row["payment_id"],
            kind=row["kind"],
            status=row["status"],
            parked=row["parked"],
            attempts=row["attempts"],
            last_error=row["last_error"],
            first_attempt_at=row["first_attempt_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class Details:
    """Everything `dlq show` prints about an operation that exists."""

    operation: dict[str, Any]  # every column of its row
    payment: dict[str, Any]  # the receipt, with `merchant`
    history: list[dict[str, Any]]  # status, cause, at
    operations: list[dict[str, Any]]  # the payment's operations, oldest first


class DeadLetterSink(Protocol):
    async def drop(self, letters: Iterable[DeadLetter]) -> None: ...

    async def send_command(self, operation_id: str, kind: str) -> None: ...


class Operations(Protocol):
    async def find(self, operation_ids: Iterable[str | None]) -> dict[str, Operation]:
        """The operations of these ids that exist (None ids are skipped)."""
        ...

    async def parked(self, limit: int) -> list[Operation]:
        """Parked operations, longest parked first."""
        ...

    async def unpark(self, operation_id: str, *, forced: bool) -> bool:
        """Back in the normal flow, at the foot of the retry ladder, forced or not (on its row:
        the worker reads it there); False when it is no longer pending."""
        ...

    async def details(self, operation_id: str) -> Details | None: ...


class StoreOperations:
    """Operations in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def find(self, operation_ids: Iterable[str | None]) -> dict[str, Operation]:
        wanted = [i for i in operation_ids if i]
        if not wanted:
            return {}
        return {r["id"]: Operation.from_row(r) for r in await store.ops_operations(self.pool, operation_ids=wanted)}

    async def parked(self, limit: int) -> list[Operation]:
        return [Operation.from_row(r) for r in await store.ops_parked_operations(self.pool, limit=limit)]

    async def unpark(self, operation_id: str, *, forced: bool) -> bool:
        return await settlement.unpark(self.pool, operation_id, forced=forced)

    async def details(self, operation_id: str) -> Details | None:
        op = await store.ops_operation(self.pool, operation_id=operation_id)
        if op is None:
            return None
        row = await store.ops_payment(self.pool, payment_id=op["payment_id"])
        if row is None:
            raise LookupError(f"payment {op['payment_id']} of {operation_id} does not exist")
        payment = {**receipt(Payment.from_row(row)), "merchant": row["merchant"]}
        history = [
            {"status": h["status"], "cause": h["cause"], "at": iso(h["at"])}
            for h in await store.ops_payment_history(self.pool, payment_id=op["payment_id"])
        ]
        others = [dict(r) for r in await store.ops_payment_operations(self.pool, payment_id=op["payment_id"])]
        return Details(operation=dict(op), payment=payment, history=history, operations=others)


# ---- judging one operation ---------------------------------------------------------------


def group(letters: Iterable[DeadLetter]) -> dict[str | None, list[DeadLetter]]:
    """Dead letters by operation id, in queue order (the consumer may dead-letter one twice)."""
    out: dict[str | None, list[DeadLetter]] = {}
    for letter in letters:
        out.setdefault(letter.operation_id, []).append(letter)
    return out


def needs_force(op: Operation | None, limit: timedelta) -> bool:
    """An authorization first sent longer ago than `limit`: the bank may have forgotten its key."""
    return bool(
        op
        and op.kind == OperationKind.AUTHORIZE.value
        and op.status == "pending"
        and op.first_attempt_at is not None
        and op.first_attempt_at < now() - limit
    )


def card_purged(op: Operation | None) -> bool:
    """A pending authorization whose card the vault no longer keeps: it can never be sent."""
    error = _parse_error(op.last_error) if op else None
    return bool(
        op
        and op.kind == OperationKind.AUTHORIZE.value
        and op.status == "pending"
        and isinstance(error, dict)
        and error.get("code") == CARD_PURGED
    )


def state(op: Operation | None) -> str:
    if op is None:
        return "unknown operation"
    if op.status != "pending":
        return f"final ({op.status})"
    return "parked" if op.parked else "pending, not parked"


def advice(op: Operation | None, limit: timedelta) -> str:
    """What a replay of this operation would do."""
    if op is None:
        return "unknown operation: nothing to replay"
    if op.status != "pending":
        return "already final: a replay only drops its dead letters"
    if card_purged(op):
        return f"refused: its card is purged, it can never be sent; abandon payment {op.payment_id}"
    if needs_force(op, limit):
        return (
            "refused without --force: the first authorization attempt is older than "
            f"{limit.total_seconds() / 3600:g} h (see `gatewayctl dlq replay --help`)"
        )
    if not op.parked:
        return "not parked (already back in the normal flow): a replay sends its command again, harmlessly"
    return "a replay unparks it and sends its command to the work queue"


def age(then: datetime | None) -> str | None:
    """How long ago, e.g. 3d4h, 2h, 5m10s, 42s."""
    if then is None:
        return None
    seconds = max(0, int((now() - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            rest = seconds % size
            sub = {"d": ("h", 3600), "h": ("m", 60), "m": ("s", 1)}[unit]
            return f"{seconds // size}{unit}{rest // sub[1]}{sub[0]}" if rest // sub[1] else f"{seconds // size}{unit}"
    return f"{seconds}s"


def _parse_error(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value


# ---- dlq list ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One line of `dlq list`: an operation with its letters, or an unreadable letter."""

    operation_id: str | None
    payment_id: str | None
    kind: str | None
    attempts: int | None
    last_error: Any
    state: str
    needs_force: bool
    first_attempt_at: str | None
    parked_since: str | None
    age: str | None
    messages: int
    handles: list[str]  # of its letters, in queue order: what `dlq show` and `dlq drop` take


def _entry(op_id: str | None, op: Operation | None, letters: list[DeadLetter], limit: timedelta) -> Entry:
    headers = letters[0].headers if letters else {}
    parked_at = min((lt.parked_at for lt in letters if lt.parked_at), default=None)  # the first parking
    since = parked_at or (op.updated_at if op else None)
    if op_id is None:
        described = "unreadable message (no operation id)"
    elif not letters:
        described = "parked, no message in the queue"
    else:
        described = state(op)
    return Entry(
        operation_id=op_id,
        payment_id=op.payment_id if op else _header(headers, "payment_id"),
        kind=op.kind if op else _header(headers, "kind"),
        attempts=op.attempts if op else _attempts(headers.get("attempts")),
        last_error=op.last_error if op else _header_error(headers.get("last_error")),
        state=described,
        needs_force=needs_force(op, limit),
        first_attempt_at=iso(op.first_attempt_at) if op else None,
        parked_since=iso(since),
        age=age(since),
        messages=len(letters),
        handles=[lt.handle for lt in letters],
    )


# Text from a letter is input: shown redacted (card numbers, CVVs) and cut to these sizes.
HEADER_LIMIT = 200
BODY_LIMIT = 2000
HEADERS_SHOWN = 50


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    return None if value is None else clean(str(value), HEADER_LIMIT)


def _attempts(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return clean(str(value), HEADER_LIMIT)


def _header_error(value: Any) -> Any:
    """The last_error header as the consumer writes it (a JSON object), redacted and cut."""
    error = _parse_error(value)
    if isinstance(error, dict):
        return {clean(str(k), HEADER_LIMIT): _scalar(v) for k, v in list(error.items())[:10]}
    return _scalar(error)


async def listing(letters: Sequence[DeadLetter], operations: Operations, limit: timedelta) -> list[Entry]:
    """Each operation with a letter (queue order), each unreadable letter, then each operation
    parked in the database without a letter."""
    by_op = group(letters)
    found = await operations.find(by_op)
    parked = await operations.parked(MAX_DEAD_LETTERS)
    entries = [_entry(op_id, found.get(op_id), group_, limit) for op_id, group_ in by_op.items() if op_id]
    entries += [_entry(None, None, [lt], limit) for lt in by_op.get(None, [])]
    entries += [_entry(op.id, op, [], limit) for op in parked if op.id not in by_op]
    return entries


# ---- dlq show ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    operation_id: str
    details: Details | None  # None: not in the database
    dead_letters: list[DeadLetter]
    state: str
    needs_force: bool
    advice: str


async def show(
    operation_id: str, letters: Sequence[DeadLetter], operations: Operations, limit: timedelta
) -> Shown | None:
    """Everything about one operation; None when neither the database nor the queue knows it."""
    mine = [lt for lt in letters if lt.operation_id == operation_id]
    details = await operations.details(operation_id)
    if details is None and not mine:
        return None
    op = Operation.from_row(details.operation) if details else None
    return Shown(operation_id, details, mine, state(op), needs_force(op, limit), advice(op, limit))


@dataclass(frozen=True)
class LetterView:
    """A dead letter as ops may read it: every text redacted and cut."""

    handle: str
    operation_id: str | None
    message_id: str | None
    headers: dict[str, str]
    body: str
    body_bytes: int


def view(letter: DeadLetter) -> LetterView:
    headers = list(letter.headers.items())
    shown = {clean(str(k), HEADER_LIMIT): clean(str(v), HEADER_LIMIT) for k, v in headers[:HEADERS_SHOWN]}
    if len(headers) > HEADERS_SHOWN:
        shown["..."] = f"{len(headers) - HEADERS_SHOWN} more header(s)"
    return LetterView(
        handle=letter.handle,
        operation_id=letter.operation_id,
        message_id=None if letter.message_id is None else clean(letter.message_id, HEADER_LIMIT),
        headers=shown,
        body=clean(letter.body.decode("utf-8", "replace"), BODY_LIMIT),
        body_bytes=len(letter.body),
    )


def by_handle(handle: str, letters: Iterable[DeadLetter]) -> list[DeadLetter]:
    """The letters of this handle (several only when they are the same message twice)."""
    return [lt for lt in letters if lt.handle == handle]


# ---- dlq drop ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DropPlan:
    letters: list[DeadLetter]  # to acknowledge, in queue order
    not_found: list[str]  # handles no letter has


def to_drop(letters: Sequence[DeadLetter], *, handles: Iterable[str] = (), unreadable: bool = False) -> DropPlan:
    """The letters named by `handles`, plus (unreadable) every letter without a readable operation id.

    Any letter may be dropped: the database, not the queue, is the truth about
    an operation, and a parked operation without a letter is still listed and
    replayed from its row.
    """
    wanted = list(dict.fromkeys(handles))
    chosen = {lt.position: lt for h in wanted for lt in by_handle(h, letters)}
    if unreadable:
        chosen.update({lt.position: lt for lt in letters if lt.operation_id is None})
    known = {lt.handle for lt in letters}
    return DropPlan([chosen[p] for p in sorted(chosen)], [h for h in wanted if h not in known])


# ---- dlq replay --------------------------------------------------------------------------


Result = Literal["replayed", "already_final", "refused", "unknown", "unreadable", "failed"]


@dataclass(frozen=True)
class Replayed:
    operation_id: str | None
    payment_id: str | None
    kind: str | None
    result: Result
    message: str
    dead_letters_dropped: int = 0
    forced: bool = False
    handles: tuple[str, ...] = ()  # of the letters left in the queue that only `dlq drop` removes

    @property
    def done(self) -> bool:
        return self.result in ("replayed", "already_final")


async def replay(
    letters: Sequence[DeadLetter],
    sink: DeadLetterSink,
    operations: Operations,
    *,
    operation_id: str | None,
    force: bool,
    limit: timedelta,
) -> list[Replayed]:
    """Replay one operation, or (operation_id None) every dead letter and every parked operation."""
    by_op = group(letters)
    results: list[Replayed] = []
    if operation_id is None:
        parked = await operations.parked(MAX_DEAD_LETTERS)
        targets = [i for i in by_op if i] + [op.id for op in parked if op.id not in by_op]
        results += [
            Replayed(
                None,
                _header(lt.headers, "payment_id"),
                _header(lt.headers, "kind"),
                "unreadable",
                f"a message without a readable operation id, letter {lt.handle}: left in the queue; read it "
                f"with `gatewayctl dlq show {lt.handle}`, remove it with `gatewayctl dlq drop {lt.handle}` "
                "(or every such letter: `gatewayctl dlq drop --unreadable`)",
                handles=(lt.handle,),
            )
            for lt in by_op.get(None, [])
        ]
    else:
        targets = [operation_id]
    found = await operations.find(targets)
    for op_id in targets:
        results.append(await _replay_one(sink, operations, op_id, found.get(op_id), by_op.get(op_id, []), force, limit))
    return results


async def _replay_one(
    sink: DeadLetterSink,
    operations: Operations,
    op_id: str,
    op: Operation | None,
    letters: list[DeadLetter],
    force: bool,
    limit: timedelta,
) -> Replayed:
    if op is None:
        handles = tuple(dict.fromkeys(lt.handle for lt in letters))
        return Replayed(
            op_id,
            None,
            None,
            "unknown",
            "no such operation in the database; its dead letters are left in the queue"
            + (f" (remove them with `gatewayctl dlq drop {' '.join(handles)}`)" if handles else ""),
            handles=handles,
        )

    def result(result: Result, message: str, dropped: int = 0) -> Replayed:
        return Replayed(op_id, op.payment_id, op.kind, result, message, dropped, force and result == "replayed")

    if op.status != "pending":
        await sink.drop(letters)
        return result(
            "already_final",
            f"already final ({op.status}), nothing to do"
            + (f"; dropped {len(letters)} dead letter(s)" if letters else ""),
            len(letters),
        )
    if card_purged(op):
        return result(
            "refused",
            "refused: the vault no longer keeps this authorization's card, so it can never be sent; "
            f"abandon payment {op.payment_id} (gatewayctl abandon)",
        )
    if needs_force(op, limit) and not force:
        hours = limit.total_seconds() / 3600
        return result(
            "refused",
            f"refused: this authorization was first sent to the bank {age(op.first_attempt_at)} ago "
            f"(limit {hours:g} h). The bank forgets idempotency keys after 24 h, so if an earlier attempt "
            "placed a hold whose answer was lost, a resend could place a second hold. Check the bank for a "
            f"hold on payment {op.payment_id}, then replay with --force (or resolve it by hand).",
        )
    if not await operations.unpark(op_id, forced=force):
        await sink.drop(letters)  # it finished between our read and the unpark
        return result("already_final", "finished meanwhile, nothing to do", len(letters))
    try:
        await sink.send_command(op_id, op.kind)
    except Exception as exc:
        return result(
            "failed",
            f"unparked, but the command could not be published ({type(exc).__name__}: {exc}); the dead "
            "letters stay in the queue and the sweeper re-enqueues the operation, or run replay again",
        )
    await sink.drop(letters)
    how = "was parked" if op.parked else "was not parked (already back in the flow)"
    source = (
        f"{len(letters)} dead letter(s) removed" if letters else "no dead letter found: re-enqueued from the database"
    )
    return result(
        "replayed",
        f"{how}; command sent to {messages.COMMANDS_EXCHANGE} (retry ladder from its foot"
        f"{', forced' if force else ''}); {source}",
        len(letters),
    )
