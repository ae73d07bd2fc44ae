"""Every SQL statement of the gateway, and the one module that issues them.

The statements live in gateway/sql/*.sql, one file per concern, each under an
aiosql header `-- name: statement<op>` (`^` one row, `$` one value, `!`
execute, none: all rows) with named parameters (`:operation_id`). They are
loaded once, at import, and rewritten to asyncpg's `$n` then: the text sent is
the same on every call, so asyncpg's statement cache prepares each once per
connection.

Each statement has one function here, of the same name, taking the pool (the
statement is its own transaction) or a connection (inside a transaction the
caller opened) and keyword-only, typed arguments: a swapped pair of ids is a
visible mistake at the call site, and a parameter the statement does not take,
or one it misses, fails on the first call. Outbox messages travel as
`messages.OutboxMessage`, the stored reply of an API request as `StoredReply`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

import aiosql
import asyncpg
import orjson
from aiosql.adapters.asyncpg import AsyncPGAdapter
from asyncpg.pool import PoolConnectionProxy

from gateway.cards import SealedCard
from gateway.domain import OperationKind, Status
from gateway.messages import OutboxMessage

Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Executor: TypeAlias = asyncpg.Pool | Connection

SQL_DIR = Path(__file__).resolve().parent / "sql"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"

# Session and transaction advisory locks of the gateway's own (the idempotency
# keys' locks are keyed by idempotency_lock_key() in schema.sql).
MIGRATION_LOCK = 0x6761746577617921  # one `gatewayctl migrate` at a time
RECONCILIATION_LOCK = 0x7265636F6E63696C  # one reconciliation pass at a time across workers


class _Adapter(AsyncPGAdapter):
    """aiosql's asyncpg adapter, minus two things.

    It calls the pool or connection it is given directly: asyncpg's Pool has
    fetch/fetchrow/fetchval/execute of its own, while the stock adapter asks
    `"acquire" in dir(client)` on every call (16 us here, a tenth of a round
    trip). And it takes exactly the statement's parameters: the stock adapter
    ignores a keyword the statement does not use.
    """

    def maybe_order_params(self, query_name: str, parameters: Any) -> list[Any]:
        names = self.var_sorted[query_name]
        try:
            if len(parameters) == len(names):
                return [parameters[name] for name in names]
        except KeyError:
            pass
        raise TypeError(f"statement {query_name} takes {sorted(names)}, got {sorted(parameters)}")

    async def select(
        self, conn: Any, query_name: str, sql: str, parameters: Any, record_class: Any = None
    ) -> AsyncGenerator[asyncpg.Record, None]:
        for row in await conn.fetch(sql, *self.maybe_order_params(query_name, parameters)):
            yield row

    async def select_one(
        self, conn: Any, query_name: str, sql: str, parameters: Any, record_class: Any = None
    ) -> asyncpg.Record | None:
        return await conn.fetchrow(sql, *self.maybe_order_params(query_name, parameters))

    async def select_value(self, conn: Any, query_name: str, sql: str, parameters: Any) -> Any:
        return await conn.fetchval(sql, *self.maybe_order_params(query_name, parameters))

    async def insert_update_delete(self, conn: Any, query_name: str, sql: str, parameters: Any) -> Any:
        """The command status, e.g. "DELETE 3"."""
        return await conn.execute(sql, *self.maybe_order_params(query_name, parameters))


def load(path: Path) -> Any:
    """The statements of one .sql file, as aiosql query functions."""
    return aiosql.from_path(path, _Adapter, mandatory_parameters=False, attribute=None)


_payments = load(SQL_DIR / "payments.sql")
_views = load(SQL_DIR / "views.sql")
_worker = load(SQL_DIR / "worker.sql")
_outbox = load(SQL_DIR / "outbox.sql")
_ops = load(SQL_DIR / "ops.sql")
_metrics = load(SQL_DIR / "metrics.sql")
_vault = load(SQL_DIR / "vault.sql")
_feed = load(SQL_DIR / "events.sql")
_webhooks = load(SQL_DIR / "webhooks.sql")
_FILES = (_payments, _views, _worker, _outbox, _ops, _metrics, _vault, _feed, _webhooks)


def statements() -> dict[str, str]:
    """Statement name -> the SQL text sent to PostgreSQL (for the bench's round-trip census)."""
    found: dict[str, str] = {}
    for queries in _FILES:
        for name in queries.available_queries:
            fn = getattr(queries, name)
            # aiosql adds a `<name>_cursor` context manager for each SELECT: not a statement of its own.
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                found[name] = fn.sql
    return found


async def _rows(query: Any, db: Executor, **params: Any) -> list[asyncpg.Record]:
    return [row async for row in query(db, **params)]


# ---- the schema -------------------------------------------------------------------------


async def apply_schema(conn: Connection) -> None:
    """Run schema.sql (every statement idempotent); the caller holds lock_migrations."""
    await conn.execute(SCHEMA_PATH.read_text())


async def lock_migrations(conn: Connection) -> None:
    """Wait for the migration lock; held until the caller's transaction ends."""
    await _ops.lock_migrations(conn, lock=MIGRATION_LOCK)


async def schema_objects(db: Executor) -> set[tuple[str, str]]:
    """(kind, name) of the tables, indexes, functions and triggers present."""
    return {(r["kind"], r["name"]) for r in await _rows(_ops.schema_objects, db)}


async def ping(db: Executor) -> bool:
    return await _ops.ping(db) == 1


# ---- the API's phases (gateway/payments.py) ---------------------------------------------


class KeyedRequest(Protocol):
    """A request under an idempotency key (payments.IdempotentRequest)."""

    @property
    def merchant(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...


class StoredReply(NamedTuple):  # a NamedTuple: built on every authorize, ~8x cheaper than a frozen dataclass
    """The 202 a request is answered with, kept under its idempotency key."""

    request: KeyedRequest
    body: bytes
    location: str | None = None


def _command(command: OutboxMessage) -> dict[str, Any]:
    return {
        "command_exchange": command.exchange,
        "command_routing_key": command.routing_key,
        "command_message_id": command.message_id,
        "command_body": command.body,
        "command_headers": command.headers,
    }


def _event(event: OutboxMessage | None) -> dict[str, Any]:
    """An optional event: every column null when there is none (the statement skips it)."""
    return {
        "event_exchange": event.exchange if event else None,
        "event_routing_key": event.routing_key if event else None,
        "event_message_id": event.message_id if event else None,
        "event_body": event.body if event else None,
        "event_headers": event.headers if event else None,
    }


def _commands(commands: Sequence[OutboxMessage]) -> dict[str, list[Any]]:
    """_command's columns as arrays, for a statement that takes a command per row."""
    return {
        "command_exchanges": [c.exchange for c in commands],
        "command_routing_keys": [c.routing_key for c in commands],
        "command_message_ids": [c.message_id for c in commands],
        "command_bodies": [c.body for c in commands],
        "command_headers": [c.headers for c in commands],
    }


def _events(events: Sequence[OutboxMessage | None]) -> dict[str, list[Any]]:
    """_event's columns as arrays, null where a row has no event."""
    return {
        "event_exchanges": [e.exchange if e else None for e in events],
        "event_routing_keys": [e.routing_key if e else None for e in events],
        "event_message_ids": [e.message_id if e else None for e in events],
        "event_bodies": [e.body if e else None for e in events],
        "event_headers": [e.headers if e else None for e in events],
    }


def _replies(replies: Sequence[StoredReply | None]) -> dict[str, list[Any]]:
    """The stored replies' columns as arrays (the request's merchant, key, method, path and
    fingerprint, and the body), null where a row has none."""
    requests = [r.request if r else None for r in replies]
    return {
        "merchants": [q.merchant if q else None for q in requests],
        "keys": [q.key if q else None for q in requests],
        "methods": [q.method if q else None for q in requests],
        "paths": [q.path if q else None for q in requests],
        "fingerprints": [q.fingerprint if q else None for q in requests],
        "response_bodies": [r.body if r else None for r in replies],
    }


async def lock_idempotency_key(db: Connection, *, merchant: str, key: str) -> asyncpg.Record:
    """`locked` (false: another request with this key is running) and the stored reply's columns."""
    return await _payments.lock_idempotency_key(db, merchant=merchant, key=key)


class Submission(NamedTuple):
    """One authorize request for submit_authorizations: the payment and all that goes with it."""

    payment_id: str
    order_id: str
    customer_id: str
    amount: int
    card_brand: str
    card_last4: str
    card_expiry_month: int
    card_expiry_year: int
    at: datetime
    operation_id: str
    bank_key: str
    sealed_card: SealedCard
    command: OutboxMessage
    reply: StoredReply


async def submit_authorizations(db: Executor, *, submissions: Sequence[Submission]) -> list[asyncpg.Record]:
    """`locked` and `inserted` of each submission (of its request's merchant), in order."""
    return await _rows(
        _payments.submit_authorizations,
        db,
        payment_ids=[s.payment_id for s in submissions],
        order_ids=[s.order_id for s in submissions],
        customer_ids=[s.customer_id for s in submissions],
        amounts=[s.amount for s in submissions],
        card_brands=[s.card_brand for s in submissions],
        card_last4s=[s.card_last4 for s in submissions],
        card_expiry_months=[s.card_expiry_month for s in submissions],
        card_expiry_years=[s.card_expiry_year for s in submissions],
        ats=[s.at for s in submissions],
        operation_ids=[s.operation_id for s in submissions],
        bank_keys=[s.bank_key for s in submissions],
        sealed_cards=[s.sealed_card.blob for s in submissions],
        card_key_ids=[s.sealed_card.key_id for s in submissions],
        **_commands([s.command for s in submissions]),
        **_replies([s.reply for s in submissions]),
        locations=[s.reply.location for s in submissions],
    )


async def live_payment_for_order(db: Executor, *, merchant: str, order_id: str) -> str | None:
    return await _payments.live_payment_for_order(db, merchant=merchant, order_id=order_id)


async def lock_payment(db: Connection, *, payment_id: str) -> asyncpg.Record | None:
    return await _payments.lock_payment(db, payment_id=payment_id)


class KeyAndPayment(NamedTuple):
    """One capture, void or refund request for lock_keys_and_payments."""

    merchant: str
    key: str
    payment_id: str


async def lock_keys_and_payments(db: Connection, *, requests: Sequence[KeyAndPayment]) -> list[asyncpg.Record]:
    """For each request, in order: lock_idempotency_key's columns and the merchant's payment
    locked, with its history (the payment's columns all null when there is none)."""
    return await _rows(
        _payments.lock_keys_and_payments,
        db,
        merchants=[r.merchant for r in requests],
        keys=[r.key for r in requests],
        payment_ids=[r.payment_id for r in requests],
    )


class OperationStart(NamedTuple):
    """A payment entering an in-progress status for start_operations; the event when the gateway
    moved it by itself, the reply when an API request did."""

    payment_id: str
    status: Status
    at: datetime
    cause: str
    operation_id: str
    kind: OperationKind
    bank_key: str
    command: OutboxMessage
    event: OutboxMessage | None = None
    reply: StoredReply | None = None


async def start_operations(db: Connection, *, starts: Sequence[OperationStart]) -> list[str]:
    """Each payment enters its status and its operation starts; the ids of the payments moved."""
    rows = await _rows(
        _payments.start_operations,
        db,
        payment_ids=[s.payment_id for s in starts],
        statuses=[s.status.value for s in starts],
        ats=[s.at for s in starts],
        causes=[s.cause for s in starts],
        operation_ids=[s.operation_id for s in starts],
        kinds=[s.kind.value for s in starts],
        bank_keys=[s.bank_key for s in starts],
        **_commands([s.command for s in starts]),
        **_events([s.event for s in starts]),
        **_replies([s.reply for s in starts]),
    )
    return [row["id"] for row in rows]


async def insert_operation(
    db: Connection,
    *,
    operation_id: str,
    payment_id: str,
    kind: OperationKind,
    bank_key: str,
    at: datetime,
    command: OutboxMessage,
) -> None:
    await _payments.insert_operation(
        db,
        operation_id=operation_id,
        payment_id=payment_id,
        kind=kind.value,
        bank_key=bank_key,
        at=at,
        **_command(command),
    )


# ---- the worker's phases ----------------------------------------------------------------


class ClaimRequest(NamedTuple):
    operation_id: str
    owner: str  # one handling of one message
    lease_seconds: float


async def claim_operations(db: Executor, *, claims: Sequence[ClaimRequest]) -> list[asyncpg.Record]:
    """The operations claimed, of those asked for, with what their bank calls need; `owner`
    names the request each row is for. A request without a row cannot be claimed now."""
    return await _rows(
        _payments.claim_operations,
        db,
        operation_ids=[c.operation_id for c in claims],
        owners=[c.owner for c in claims],
        lease_seconds=[c.lease_seconds for c in claims],
    )


async def operation_state(db: Executor, *, operation_id: str) -> asyncpg.Record | None:
    return await _payments.operation_state(db, operation_id=operation_id)


class AttemptReport(NamedTuple):
    """What a lease holder learnt of its attempts not reported yet: how many are known to have
    done nothing at the bank, and what is known of each of the others (operations.lost_answers)."""

    clean_attempts: int = 0
    lost_answers: Sequence[dict] = ()


async def release_lease(
    db: Executor,
    *,
    operation_id: str,
    owner: str,
    error: dict | None,
    bank_ms: int,
    report: AttemptReport,
    rung_taken: bool = False,
) -> None:
    """Give the lease back, with the report of the holder's attempts (and a rung counted)."""
    await _payments.release_lease(
        db,
        operation_id=operation_id,
        owner=owner,
        error=error,
        bank_ms=bank_ms,
        rung_taken=rung_taken,
        clean_attempts=report.clean_attempts,
        lost_answers=list(report.lost_answers),
    )


class AttemptNote(NamedTuple):
    operation_id: str
    owner: str  # the lease holder reporting
    report: AttemptReport


async def note_attempts(db: Executor, *, notes: Sequence[AttemptNote]) -> set[str]:
    """Record each holder's report, keeping the leases; the operations noted (one whose lease is
    no longer its owner's is not)."""
    rows = await _rows(
        _payments.note_attempts,
        db,
        operation_ids=[n.operation_id for n in notes],
        owners=[n.owner for n in notes],
        clean_attempts=[n.report.clean_attempts for n in notes],
        # JSON text: a list of lists would be read as one two-dimensional array
        lost_answers=[orjson.dumps(list(n.report.lost_answers)).decode() for n in notes],
    )
    return {row["id"] for row in rows}


async def operation_kinds_tried(db: Executor, *, payment_id: str, operation_id: str) -> frozenset[OperationKind]:
    """The kinds of the payment's other operations that were ever sent to the bank."""
    rows = await _rows(_payments.operation_kinds_tried, db, payment_id=payment_id, operation_id=operation_id)
    return frozenset(OperationKind(r["kind"]) for r in rows)


async def flag_doubt(
    db: Connection,
    *,
    payment_id: str,
    at: datetime,
    error: dict,
    event: OutboxMessage,
    run_id: str,
    finding_kind: str | None,
    finding_detail: dict | None,
) -> None:
    """Flag a payment whose recorded outcome a human must check; the finding when one is named."""
    await _payments.flag_doubt(
        db,
        payment_id=payment_id,
        at=at,
        error=error,
        run_id=run_id,
        finding_kind=finding_kind,
        finding_detail=finding_detail,
        **_event(event),
    )


async def lock_operation(db: Connection, *, operation_id: str) -> asyncpg.Record | None:
    """The pending operation (operation_id, kind, bank_key) with its payment row, both locked."""
    return await _payments.lock_operation(db, operation_id=operation_id)


class Finish(NamedTuple):
    """One final outcome for finish_operations: the operation settled and its payment moved to
    `payment_status` while `owner` holds the lease. A bank id left None keeps the payment's
    value; `status_moved` writes the history row, `drop_card` deletes the sealed card,
    `notify` is the payload for the long polls."""

    operation_id: str
    owner: str
    operation_status: Literal["succeeded", "failed"]
    at: datetime
    error: dict | None
    bank_response: dict | None
    bank_ms: int
    payment_status: Status
    cause: str
    status_moved: bool
    drop_card: bool
    event: OutboxMessage | None
    notify: str
    authorization_id: str | None = None
    authorization_expires_at: datetime | None = None
    capture_id: str | None = None
    void_id: str | None = None
    refund_id: str | None = None


async def finish_operations(db: Executor, *, finishes: Sequence[Finish]) -> set[tuple[str, str]]:
    """Record every outcome in one statement; the (operation_id, owner) pairs recorded (one whose
    lease is no longer its owner's is not: another handling records it)."""
    rows = await _rows(
        _payments.finish_operations,
        db,
        operation_ids=[f.operation_id for f in finishes],
        owners=[f.owner for f in finishes],
        operation_statuses=[f.operation_status for f in finishes],
        ats=[f.at for f in finishes],
        errors=[f.error for f in finishes],
        bank_responses=[f.bank_response for f in finishes],
        bank_ms=[f.bank_ms for f in finishes],
        payment_statuses=[f.payment_status.value for f in finishes],
        authorization_ids=[f.authorization_id for f in finishes],
        authorization_expires_ats=[f.authorization_expires_at for f in finishes],
        capture_ids=[f.capture_id for f in finishes],
        void_ids=[f.void_id for f in finishes],
        refund_ids=[f.refund_id for f in finishes],
        causes=[f.cause for f in finishes],
        statuses_moved=[f.status_moved for f in finishes],
        drop_cards=[f.drop_card for f in finishes],
        **_events([f.event for f in finishes]),
        notifies=[f.notify for f in finishes],
    )
    return {(row["operation_id"], row["owner"]) for row in rows}


async def park_operation(db: Connection, *, operation_id: str, at: datetime, error: dict, event: OutboxMessage) -> None:
    await _payments.park_operation(db, operation_id=operation_id, at=at, error=error, **_event(event))


async def unpark_operation(db: Executor, *, operation_id: str, forced: bool) -> bool:
    """False when the operation is no longer pending."""
    return await _payments.unpark_operation(db, operation_id=operation_id, forced=forced) is not None


# ---- the read side (gateway/views.py) ---------------------------------------------------


class PageCursor(NamedTuple):
    """Where a page of payments starts: after this (created_at, id), newest first."""

    created_at: datetime
    id: str


async def payment_by_id(db: Executor, *, payment_id: str, merchant: str) -> asyncpg.Record | None:
    return await _views.payment_by_id(db, payment_id=payment_id, merchant=merchant)


async def payment_cursor(db: Executor, *, payment_id: str, merchant: str) -> PageCursor | None:
    row = await _views.payment_cursor(db, payment_id=payment_id, merchant=merchant)
    return PageCursor(row["created_at"], row["id"]) if row else None


async def payments_by_order(
    db: Executor, *, merchant: str, order_id: str, after: PageCursor | None, limit: int
) -> list[asyncpg.Record]:
    return await _rows(
        _views.payments_by_order,
        db,
        merchant=merchant,
        order_id=order_id,
        cursor_at=after.created_at if after else None,
        cursor_id=after.id if after else None,
        limit=limit,
    )


async def payments_by_customer(
    db: Executor, *, merchant: str, customer_id: str, after: PageCursor | None, limit: int
) -> list[asyncpg.Record]:
    return await _rows(
        _views.payments_by_customer,
        db,
        merchant=merchant,
        customer_id=customer_id,
        cursor_at=after.created_at if after else None,
        cursor_id=after.id if after else None,
        limit=limit,
    )


# ---- the sweeper (worker/sweeper.py) ----------------------------------------------------


async def lock_stuck_operations(db: Connection, *, idle_seconds: float, limit: int) -> list[asyncpg.Record]:
    """id, kind and payment_id of pending operations nobody works on, locked (SKIP LOCKED)."""
    return await _rows(_worker.lock_stuck_operations, db, idle_seconds=idle_seconds, limit=limit)


async def requeue_operations(db: Connection, *, commands: Mapping[str, OutboxMessage]) -> None:
    """A fresh command (operation id -> command) through the outbox for each still pending operation."""
    await _worker.requeue_operations(
        db,
        operation_ids=list(commands),
        exchanges=[c.exchange for c in commands.values()],
        routing_keys=[c.routing_key for c in commands.values()],
        message_ids=[c.message_id for c in commands.values()],
        bodies=[c.body for c in commands.values()],
        headers=[c.headers for c in commands.values()],
    )


async def lapsed_holds(db: Executor, *, limit: int) -> list[str]:
    """Ids of authorized payments whose hold has expired."""
    return [r["id"] for r in await _rows(_worker.lapsed_holds, db, limit=limit)]


async def lapsed_doubts(db: Executor, *, margin_seconds: float, limit: int) -> list[asyncpg.Record]:
    """Payments flagged with a possible second hold whose own hold expired over `margin_seconds` ago:
    id, authorization_id, authorization_expires_at."""
    return await _rows(_worker.lapsed_doubts, db, margin_seconds=margin_seconds, limit=limit)


async def lock_old_cards(db: Connection, *, max_age_seconds: float, limit: int) -> list[asyncpg.Record]:
    """Cards sealed longer ago than `max_age_seconds`: payment_id, the pending authorize's
    operation_id and parked (null when there is none), the payment row and history; locked."""
    return await _rows(_worker.lock_old_cards, db, max_age_seconds=max_age_seconds, limit=limit)


async def purge_card(
    db: Connection,
    *,
    payment_id: str,
    operation_id: str | None,
    at: datetime,
    error: dict,
    event: OutboxMessage | None,
) -> None:
    """Delete the card; park its pending authorization (unless leased) with `error`, and the event."""
    await _worker.purge_card(db, payment_id=payment_id, operation_id=operation_id, at=at, error=error, **_event(event))


async def prune_idempotency_keys(db: Executor, *, retention_seconds: float, limit: int) -> int:
    """Delete up to `limit` stored responses older than `retention_seconds`; returns how many."""
    status = await _worker.prune_idempotency_keys(db, retention_seconds=retention_seconds, limit=limit)
    return int(status.split()[-1])


async def try_lock_reconciliation(db: Connection) -> bool:
    """Take the session lock of a reconciliation pass, unless another session holds it."""
    return await _ops.try_lock_reconciliation(db, lock=RECONCILIATION_LOCK)


async def unlock_reconciliation(db: Connection) -> None:
    await _ops.unlock_reconciliation(db, lock=RECONCILIATION_LOCK)


# ---- the events feed (gateway/feed.py) ------------------------------------------------


class FeedPosition(NamedTuple):
    """An event's place in its merchant's feed: (writing transaction, row id)."""

    txid: int
    id: int


FEED_START = FeedPosition(0, 0)


async def event_position(db: Executor, *, merchant: str, event_id: str) -> FeedPosition | None:
    row = await _feed.event_position(db, merchant=merchant, event_id=event_id)
    return FeedPosition(row["txid"], row["id"]) if row else None


async def events_after(db: Executor, *, merchant: str, after: FeedPosition, limit: int) -> list[asyncpg.Record]:
    """Up to `limit` events (id, event_id, body) of the merchant after `after`, in feed order."""
    return await _rows(_feed.events_after, db, merchant=merchant, txid=after.txid, id=after.id, limit=limit)


async def prune_events(db: Executor, *, retention_seconds: float, limit: int) -> int:
    """Delete up to `limit` events older than `retention_seconds`; returns how many."""
    status = await _feed.prune_events(db, retention_seconds=retention_seconds, limit=limit)
    return int(status.split()[-1])


# ---- webhooks (gateway/webhooks.py, worker/webhook_delivery.py) -------------------------


async def upsert_webhook_endpoint(db: Executor, *, merchant: str, url: str, secret: bytes) -> asyncpg.Record:
    """merchant, url, secret (the stored one: `secret` only for a new endpoint), created."""
    return await _webhooks.upsert_webhook_endpoint(db, merchant=merchant, url=url, secret=secret)


async def rotate_webhook_secret(
    db: Executor, *, merchant: str, secret: bytes, overlap_seconds: float
) -> asyncpg.Record | None:
    """merchant, old_secret_until; None when the merchant has no endpoint."""
    return await _webhooks.rotate_webhook_secret(db, merchant=merchant, secret=secret, overlap_seconds=overlap_seconds)


async def disable_webhook_endpoint(db: Executor, *, merchant: str) -> bool:
    return await _webhooks.disable_webhook_endpoint(db, merchant=merchant) is not None


async def webhook_endpoints(db: Executor) -> list[asyncpg.Record]:
    return await _rows(_webhooks.webhook_endpoints, db)


async def webhook_endpoint(db: Executor, *, merchant: str) -> asyncpg.Record | None:
    return await _webhooks.webhook_endpoint(db, merchant=merchant)


async def failed_webhook_deliveries(db: Executor, *, merchant: str | None, limit: int) -> list[asyncpg.Record]:
    return await _rows(_webhooks.failed_webhook_deliveries, db, merchant=merchant, limit=limit)


async def resend_webhook_events(db: Executor, *, event_ids: Sequence[str]) -> list[str]:
    """The event ids queued again (unknown ones, pending ones and those without an endpoint are not)."""
    return [r["event_id"] for r in await _rows(_webhooks.resend_webhook_events, db, event_ids=list(event_ids))]


async def resend_failed_webhook_deliveries(db: Executor, *, merchant: str | None) -> int:
    status = await _webhooks.resend_failed_webhook_deliveries(db, merchant=merchant)
    return int(status.split()[-1])


async def claim_webhook_deliveries(
    db: Executor, *, limit: int, per_endpoint: int, busy: Sequence[str], lease_seconds: float
) -> list[asyncpg.Record]:
    return await _rows(
        _webhooks.claim_webhook_deliveries,
        db,
        limit=limit,
        per_endpoint=per_endpoint,
        busy=list(busy),
        lease_seconds=lease_seconds,
    )


class WebhookAttempt(NamedTuple):
    """How one attempt ended: status delivered, failed, or pending with `next_at`."""

    id: int
    status: Literal["delivered", "failed", "pending"]
    next_at: datetime | None
    error: str | None


async def record_webhook_attempts(db: Executor, *, attempts: Sequence[WebhookAttempt]) -> None:
    await _webhooks.record_webhook_attempts(
        db,
        ids=[a.id for a in attempts],
        statuses=[a.status for a in attempts],
        next_at=[a.next_at for a in attempts],
        errors=[a.error for a in attempts],
    )


# ---- the relay (worker/relay.py) --------------------------------------------------------


async def take_outbox_batch(db: Connection, *, limit: int, held_back: Sequence[int]) -> list[asyncpg.Record]:
    """Up to `limit` rows, oldest first, deleted in the caller's transaction (SKIP LOCKED: rows
    another relay holds are left to it); ids in `held_back` are skipped."""
    rows = await _rows(_outbox.take_outbox_batch, db, limit=limit, held_back=list(held_back))
    return sorted(rows, key=lambda r: r["id"])


async def restore_outbox_rows(db: Connection, *, rows: Sequence[asyncpg.Record]) -> None:
    """Rows of take_outbox_batch put back as they were, in the same transaction."""
    await _outbox.restore_outbox_rows(
        db,
        ids=[r["id"] for r in rows],
        exchanges=[r["exchange"] for r in rows],
        routing_keys=[r["routing_key"] for r in rows],
        message_ids=[r["message_id"] for r in rows],
        bodies=[r["body"] for r in rows],
        headers=[r["headers"] for r in rows],
        created=[r["created_at"] for r in rows],
    )


# ---- ops: gatewayctl and reconciliation -------------------------------------------------


async def ops_operations(db: Executor, *, operation_ids: Sequence[str]) -> list[asyncpg.Record]:
    """The operations (with payment_status and merchant) of these ids; unknown ids are left out."""
    return await _rows(_ops.ops_operations, db, operation_ids=list(operation_ids))


async def ops_parked_operations(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    """Parked operations, longest parked first, as ops_operations reads them."""
    return await _rows(_ops.ops_parked_operations, db, limit=limit)


async def ops_operation(db: Executor, *, operation_id: str) -> asyncpg.Record | None:
    """Every column an operator may want about one operation."""
    return await _ops.ops_operation(db, operation_id=operation_id)


async def ops_payment_operations(db: Executor, *, payment_id: str) -> list[asyncpg.Record]:
    return await _rows(_ops.ops_payment_operations, db, payment_id=payment_id)


async def ops_payment(db: Executor, *, payment_id: str) -> asyncpg.Record | None:
    """Any merchant's payment, with its history as the receipt shows it."""
    return await _ops.ops_payment(db, payment_id=payment_id)


async def ops_payment_history(db: Executor, *, payment_id: str) -> list[asyncpg.Record]:
    """status, cause and at of every history row, oldest first."""
    return await _rows(_ops.ops_payment_history, db, payment_id=payment_id)


async def reconcile_candidates(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    return await _rows(_ops.reconcile_candidates, db, limit=limit)


async def reconcile_lock_payment(db: Connection, *, payment_id: str) -> asyncpg.Record | None:
    """The payment locked, with history and `busy` (an operation is pending)."""
    return await _ops.reconcile_lock_payment(db, payment_id=payment_id)


async def reconcile_set_expiry(db: Connection, *, payment_id: str, expires_at: datetime, at: datetime) -> None:
    await _ops.reconcile_set_expiry(db, payment_id=payment_id, expires_at=expires_at, at=at)


async def flag_attention(db: Connection, *, payment_id: str, at: datetime, event: OutboxMessage) -> None:
    """Set attention_required and announce it, unless the payment is flagged already."""
    await _ops.flag_attention(db, payment_id=payment_id, at=at, **_event(event))


async def insert_finding(
    db: Connection, *, run_id: str, payment_id: str, kind: str, detail: dict, repaired: bool, found_at: datetime
) -> None:
    await _ops.insert_finding(
        db, run_id=run_id, payment_id=payment_id, kind=kind, detail=detail, repaired=repaired, found_at=found_at
    )


class BankReferences(NamedTuple):
    """Bank ids to record where the receipt has none (None: leave the column as it is)."""

    authorization_id: str | None = None
    capture_id: str | None = None
    void_id: str | None = None
    refund_id: str | None = None


async def ops_lock_operation(db: Connection, *, operation_id: str) -> asyncpg.Record | None:
    """The operation (operation_id, kind, operation_status, parked, bank_key, leased, parked_seconds)
    with its payment row and history, both locked; None when there is no such operation."""
    return await _ops.ops_lock_operation(db, operation_id=operation_id)


async def ops_finish_operation(
    db: Connection,
    *,
    operation_id: str,
    operation_status: Literal["succeeded", "failed"],
    at: datetime,
    error: dict | None,
    payment_status: Status,
    attention_required: bool,
    references: BankReferences,
    cause: str,
    event: OutboxMessage | None,
) -> bool:
    """Ops finishes a parked operation: payment, history row, card gone, event. False if it
    was no longer parked and pending."""
    finished = await _ops.ops_finish_operation(
        db,
        operation_id=operation_id,
        operation_status=operation_status,
        at=at,
        error=error,
        payment_status=payment_status.value,
        attention_required=attention_required,
        **references._asdict(),
        cause=cause,
        **_event(event),
    )
    return finished == 1


async def ops_resolve_payment(
    db: Connection, *, payment_id: str, at: datetime, references: BankReferences, clear_flag: bool, cause: str
) -> bool:
    """Fill missing references (and clear attention_required, with `clear_flag`), with a history
    row; False when an operation is in flight (or there is no such payment)."""
    status = await _ops.ops_resolve_payment(
        db, payment_id=payment_id, at=at, clear_flag=clear_flag, cause=cause, **references._asdict()
    )
    return status == "INSERT 0 1"


# ---- the ops console (gateway/api/ops/) -------------------------------------------------


async def ops_payment_counts(db: Executor) -> list[asyncpg.Record]:
    """status, payments and flagged (attention_required) per payment status."""
    return await _rows(_ops.ops_payment_counts, db)


async def ops_backlog(db: Executor) -> asyncpg.Record:
    """outbox_unsent, outbox_oldest_unsent_at, parked_operations, last_finding_at."""
    return await _ops.ops_backlog(db)


async def ops_flagged_payments(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    """Payments with attention_required, most recently changed first, with their pending operation."""
    return await _rows(_ops.ops_flagged_payments, db, limit=limit)


async def ops_findings(db: Executor, *, limit: int) -> list[asyncpg.Record]:
    """Reconciliation findings, newest first, with payment_status and attention_required."""
    return await _rows(_ops.ops_findings, db, limit=limit)


async def ops_search_payments(db: Executor, *, term: str, limit: int) -> list[asyncpg.Record]:
    """Payments (any merchant) whose id, order id or customer id is `term`, newest first."""
    return await _rows(_ops.ops_search_payments, db, term=term, limit=limit)


async def ops_timeline_operations(db: Executor, *, payment_id: str) -> list[asyncpg.Record]:
    return await _rows(_ops.ops_timeline_operations, db, payment_id=payment_id)


async def ops_timeline_messages(db: Executor, *, needles: Sequence[str]) -> list[asyncpg.Record]:
    """Outbox rows whose body contains any of `needles` (a payment id, its operation ids), oldest first."""
    return await _rows(_ops.ops_timeline_messages, db, needles=list(needles))


async def record_ops_action(db: Connection, *, operation_id: str, cause: str, at: datetime) -> None:
    """A history row for the operation's payment, in its current status, with `cause`."""
    await _ops.record_ops_action(db, operation_id=operation_id, cause=cause, at=at)


async def record_circuit_state(
    db: Executor, *, worker_id: str, open: bool, changed_at: datetime, detail: str | None
) -> None:
    """Upsert one worker's bank circuit breaker state (bank_circuit)."""
    await _ops.record_circuit_state(db, worker_id=worker_id, open=open, changed_at=changed_at, detail=detail)


async def circuit_states(db: Executor) -> list[asyncpg.Record]:
    """worker_id, open, changed_at, detail of every worker that reported, by worker id."""
    return await _rows(_ops.circuit_states, db)


# ---- the card vault's key rotation (gateway/ops/cardkeys.py) ---------------------------------


async def lock_cards_to_reseal(db: Connection, *, key_id: str, after: str, limit: int) -> list[asyncpg.Record]:
    """payment_id, key_id and sealed of up to `limit` cards not under `key_id`, payment ids
    after `after`, locked (SKIP LOCKED)."""
    return await _rows(_vault.lock_cards_to_reseal, db, key_id=key_id, after=after, limit=limit)


async def reseal_cards(db: Connection, *, key_id: str, sealed: Mapping[str, bytes]) -> None:
    """The cards (payment id -> sealed) stored again, under `key_id`."""
    await _vault.reseal_cards(db, key_id=key_id, payment_ids=list(sealed), sealed=list(sealed.values()))


async def cards_by_key(db: Executor) -> dict[str, int]:
    """Key id -> how many cards are sealed under it."""
    return {r["key_id"]: r["cards"] for r in await _rows(_vault.cards_by_key, db)}


# ---- gauges of gateway-relay and gateway-worker (worker/metrics.py); the API's backlog ---------


async def outbox_backlog(db: Executor) -> asyncpg.Record:
    """unsent (rows not yet published) and oldest_seconds (the oldest one's age, None if none)."""
    return await _metrics.outbox_backlog(db)


async def pipeline_backlog(db: Executor) -> asyncpg.Record:
    """parked (operations waiting for ops) and flagged (payments with attention_required)."""
    return await _metrics.pipeline_backlog(db)


async def work_waiting(db: Executor, *, most: int) -> int:
    """Operations waiting for a worker (pending, not parked), counted up to `most`; 0 while a
    worker reports the bank's circuit open."""
    return await _metrics.work_waiting(db, most=most)
