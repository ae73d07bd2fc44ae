"""The store: every SQL statement of the gateway, and the one package that issues them.

The statements live in gateway/sql/*.sql, named and with named parameters; each module
here reads its own file and gives each statement one function of the same name, taking
the pool (the statement is its own transaction) or a connection (inside a transaction the
caller opened) and keyword-only, typed arguments: a swapped pair of ids is a visible
mistake at the call site, and a parameter the statement does not take, or one it misses,
fails on the first call.

One module per capability, each reading the .sql file of its name:

    loader          the aiosql adapter: .sql files loaded, statements sent (Executor, Connection)
    database        schema.sql applied under the migration lock, what it holds, the ping
    intake          the API's phases: authorize, capture, void and refund requests recorded
    settlement      the worker's phases: claims under a lease, attempts, outcomes, parking
    outbox          messages as statement columns, and the relay's side of the outbox
    views           the read side: payments as FicMart sees them
    feed            the events feed and its retention
    webhooks        webhook endpoints and their deliveries
    housekeeping    the sweeper: stuck work, lapsed holds and doubts, old cards and keys;
                    the busy tables' upkeep when autovacuum is off
    reconciliation  payments compared with the bank, repairs, findings, one pass at a time
    ops             the operator's operations and payments, and decisions taken by hand
    console         the /ops console's pages
    circuit         each worker's bank circuit breaker as it last reported it
    vault           the card vault's key rotation
    backlog         how much work waits: the relay's and worker's gauges, the API's admission

Callers use the package, not its modules (`from gateway import store`, then
`store.submit_authorizations(...)`): the names below are the store's whole interface.
"""

from gateway.store.backlog import outbox_backlog, pipeline_backlog, work_waiting
from gateway.store.circuit import circuit_states, record_circuit_state
from gateway.store.console import (
    ops_backlog,
    ops_findings,
    ops_flagged_payments,
    ops_payment_counts,
    ops_search_payments,
    ops_timeline_messages,
    ops_timeline_operations,
    record_ops_action,
)
from gateway.store.database import SCHEMA_PATH, apply_schema, lock_migrations, ping, schema_objects
from gateway.store.feed import FEED_START, FeedPosition, event_position, events_after, prune_events
from gateway.store.housekeeping import (
    lapsed_doubts,
    lapsed_holds,
    lock_old_cards,
    lock_payment,
    lock_stuck_operations,
    prune_idempotency_keys,
    purge_card,
    requeue_operations,
    tables_due_upkeep,
    vacuum_or_analyze,
)
from gateway.store.intake import (
    KeyAndPayment,
    KeyedRequest,
    OperationStart,
    StoredReply,
    Submission,
    live_payment_for_order,
    lock_idempotency_key,
    lock_keys_and_payments,
    start_operations,
    submit_authorizations,
)
from gateway.store.loader import SQL_DIR, Connection, Executor, load, statements
from gateway.store.ops import (
    BankReferences,
    ops_finish_operation,
    ops_lock_operation,
    ops_operation,
    ops_operations,
    ops_parked_operations,
    ops_payment,
    ops_payment_history,
    ops_payment_operations,
    ops_resolve_payment,
)
from gateway.store.outbox import restore_outbox_rows, take_outbox_batch
from gateway.store.reconciliation import (
    flag_attention,
    insert_finding,
    reconcile_candidates,
    reconcile_lock_payment,
    reconcile_set_expiry,
    try_lock_reconciliation,
    unlock_reconciliation,
)
from gateway.store.settlement import (
    AttemptNote,
    AttemptReport,
    ClaimRequest,
    Finish,
    claim_operations,
    finish_operations,
    flag_doubt,
    insert_operation,
    lock_operation,
    note_attempts,
    operation_kinds_tried,
    operation_state,
    park_operation,
    release_lease,
    unpark_operation,
)
from gateway.store.vault import cards_by_key, lock_cards_to_reseal, reseal_cards
from gateway.store.views import PageCursor, payment_by_id, payment_cursor, payments_by_customer, payments_by_order
from gateway.store.webhooks import (
    WebhookAttempt,
    claim_webhook_deliveries,
    disable_webhook_endpoint,
    failed_webhook_deliveries,
    record_webhook_attempts,
    resend_failed_webhook_deliveries,
    resend_webhook_events,
    rotate_webhook_secret,
    upsert_webhook_endpoint,
    webhook_endpoints,
)

__all__ = [
    "SQL_DIR",
    "Connection",
    "Executor",
    "load",
    "statements",
    "SCHEMA_PATH",
    "apply_schema",
    "lock_migrations",
    "ping",
    "schema_objects",
    "KeyAndPayment",
    "KeyedRequest",
    "OperationStart",
    "StoredReply",
    "Submission",
    "live_payment_for_order",
    "lock_idempotency_key",
    "lock_keys_and_payments",
    "start_operations",
    "submit_authorizations",
    "AttemptNote",
    "AttemptReport",
    "ClaimRequest",
    "Finish",
    "claim_operations",
    "finish_operations",
    "flag_doubt",
    "insert_operation",
    "lock_operation",
    "note_attempts",
    "operation_kinds_tried",
    "operation_state",
    "park_operation",
    "release_lease",
    "unpark_operation",
    "restore_outbox_rows",
    "take_outbox_batch",
    "PageCursor",
    "payment_by_id",
    "payment_cursor",
    "payments_by_customer",
    "payments_by_order",
    "FEED_START",
    "FeedPosition",
    "event_position",
    "events_after",
    "prune_events",
    "WebhookAttempt",
    "claim_webhook_deliveries",
    "disable_webhook_endpoint",
    "failed_webhook_deliveries",
    "record_webhook_attempts",
    "resend_failed_webhook_deliveries",
    "resend_webhook_events",
    "rotate_webhook_secret",
    "upsert_webhook_endpoint",
    "webhook_endpoints",
    "lapsed_doubts",
    "lapsed_holds",
    "lock_old_cards",
    "lock_payment",
    "lock_stuck_operations",
    "prune_idempotency_keys",
    "purge_card",
    "tables_due_upkeep",
    "vacuum_or_analyze",
    "requeue_operations",
    "flag_attention",
    "insert_finding",
    "reconcile_candidates",
    "reconcile_lock_payment",
    "reconcile_set_expiry",
    "try_lock_reconciliation",
    "unlock_reconciliation",
    "BankReferences",
    "ops_finish_operation",
    "ops_lock_operation",
    "ops_operation",
    "ops_operations",
    "ops_parked_operations",
    "ops_payment",
    "ops_payment_history",
    "ops_payment_operations",
    "ops_resolve_payment",
    "ops_backlog",
    "ops_findings",
    "ops_flagged_payments",
    "ops_payment_counts",
    "ops_search_payments",
    "ops_timeline_messages",
    "ops_timeline_operations",
    "record_ops_action",
    "circuit_states",
    "record_circuit_state",
    "cards_by_key",
    "lock_cards_to_reseal",
    "reseal_cards",
    "outbox_backlog",
    "pipeline_backlog",
    "work_waiting",
]
