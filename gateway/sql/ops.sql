-- Ops: gatewayctl and the /ops console (gateway/ops/), reconciliation
-- (worker/reconcile.py, worker/sweeper.py) and the readiness probe. Nothing here
-- is scoped by merchant: these are the operator's views.

-- name: schema_objects
-- What `gatewayctl migrate` can report as created: tables, indexes, functions
-- and triggers of the current schema.
SELECT 'table' AS kind, c.relname AS name
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'index', c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind = 'i'
UNION ALL
SELECT 'function', p.proname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = current_schema()
UNION ALL
SELECT 'trigger', t.tgname
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND NOT t.tgisinternal;

-- name: ops_operations
-- Operations by id, with what ops needs to judge a dead letter.
SELECT o.id, o.payment_id, o.kind, o.status, o.parked, o.attempts, o.last_error,
       o.first_attempt_at, o.created_at, o.updated_at, o.finished_at,
       p.status AS payment_status, p.merchant
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.id = ANY(:operation_ids::text[]);

-- name: ops_parked_operations
-- Operations waiting for ops, oldest park first (the database is the truth;
-- the dead-letter queue may have lost or never received their message).
SELECT o.id, o.payment_id, o.kind, o.status, o.parked, o.attempts, o.last_error,
       o.first_attempt_at, o.created_at, o.updated_at, o.finished_at,
       p.status AS payment_status, p.merchant
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.status = 'pending' AND o.parked
 ORDER BY o.updated_at, o.id
 LIMIT :limit;

-- name: ops_operation^
SELECT o.id, o.payment_id, o.kind, o.status, o.parked, o.bank_key, o.attempts, o.lease_owner,
       o.lease_until, o.last_error, o.bank_response, o.bank_ms, o.first_attempt_at,
       o.created_at, o.updated_at, o.finished_at
  FROM operations o
 WHERE o.id = :operation_id;

-- name: ops_payment_operations
SELECT o.id, o.kind, o.status, o.parked, o.attempts, o.created_at, o.finished_at
  FROM operations o
 WHERE o.payment_id = :payment_id
 ORDER BY o.created_at, o.id;

-- name: ops_payment^
-- The receipt of any merchant's payment (views.payment_by_id is merchant-scoped).
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.id = :payment_id;

-- name: ops_payment_history
-- The full history, with what moved the payment each time.
SELECT h.status, h.cause, h.at
  FROM payment_history h
 WHERE h.payment_id = :payment_id
 ORDER BY h.id;

-- name: reconcile_candidates
-- Payments the bank knows about, newest first, that no operation is working
-- on right now (pending, parked included): their receipt is settled, so it
-- must agree with the bank.
SELECT p.id, p.status, p.amount, p.authorization_id, p.authorization_expires_at,
       p.capture_id, p.void_id, p.refund_id, p.attention_required
  FROM payments p
 WHERE p.authorization_id IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.payment_id = p.id AND o.status = 'pending')
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT :limit;

-- name: reconcile_lock_payment^
-- The payment again, locked, before acting on findings about it; `busy` when
-- an operation started meanwhile.
SELECT p.*, payment_history_json(p.id) AS history,
       EXISTS (SELECT 1 FROM operations o WHERE o.payment_id = p.id AND o.status = 'pending') AS busy
  FROM payments p
 WHERE p.id = :payment_id
   FOR UPDATE;

-- name: reconcile_set_expiry!
-- A safe repair: the hold's expiry as the bank has it.
UPDATE payments SET authorization_expires_at = :expires_at, updated_at = :at
 WHERE id = :payment_id;

-- name: flag_attention!
-- A disagreement about money that nobody may settle by guessing: the payment
-- shows attention_required (announced like a parked operation) until a human
-- has looked. Only when it is not flagged already, so repeated runs do not
-- repeat the event.
WITH payment AS (
    UPDATE payments SET attention_required = true, updated_at = :at
     WHERE id = :payment_id AND NOT attention_required
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
SELECT :event_exchange, :event_routing_key, :event_message_id, :event_body, :event_headers FROM payment;

-- name: insert_finding!
INSERT INTO reconciliation_findings (run_id, payment_id, kind, detail, repaired, found_at)
VALUES (:run_id, :payment_id, :kind, :detail, :repaired, :found_at);

-- name: try_lock_reconciliation$
-- One reconciliation pass at a time across workers: a session-level lock, held
-- on one pooled connection for the pass and released explicitly (our pools
-- skip asyncpg's reset query).
SELECT pg_try_advisory_lock(:lock);

-- name: unlock_reconciliation$
SELECT pg_advisory_unlock(:lock);

-- name: lock_migrations$
-- One `gatewayctl migrate` at a time: held until its transaction ends.
SELECT pg_advisory_xact_lock(:lock);

-- name: ping$
-- The readiness probe: the database answers.
SELECT 1;

-- name: ops_lock_operation^
-- An operation (whatever its status) and its payment, both locked, before ops
-- decides it by hand. parked_seconds: how long it has been parked (a parked
-- operation's updated_at is the time it was parked; nothing else writes it
-- meanwhile). leased: a worker's bank call may be running.
SELECT o.id AS operation_id, o.kind, o.status AS operation_status, o.parked, o.bank_key,
       coalesce(o.lease_until > now(), false) AS leased,
       extract(epoch FROM now() - o.updated_at)::float8 AS parked_seconds,
       p.*, payment_history_json(p.id) AS history
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.id = :operation_id
   FOR UPDATE;

-- name: ops_finish_operation$
-- Ops settles or abandons a parked operation: the operation final, the
-- payment's status, error, flag and (only where the receipt has none) bank
-- reference, a history row naming who and why whether or not the status
-- moved, the sealed card gone, and the event when there is one. Unlike the
-- worker's finish_operation there is no bank answer to keep, and
-- attention_required is the caller's decision.
WITH operation AS (
    UPDATE operations
       SET status = :operation_status, finished_at = :at, updated_at = :at, last_error = :error,
           lease_owner = NULL, lease_until = NULL, parked = false
     WHERE id = :operation_id AND status = 'pending' AND parked
    RETURNING payment_id
), payment AS (
    UPDATE payments
       SET status = :payment_status, last_error = :error, attention_required = :attention_required,
           updated_at = :at,
           authorization_id = coalesce(authorization_id, :authorization_id),
           capture_id = coalesce(capture_id, :capture_id),
           void_id = coalesce(void_id, :void_id),
           refund_id = coalesce(refund_id, :refund_id)
     WHERE id = (SELECT payment_id FROM operation)
    RETURNING id
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT id, :payment_status, :cause, :at FROM payment
), vault AS (
    DELETE FROM card_vault WHERE payment_id = (SELECT id FROM payment)
), event AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
    SELECT :event_exchange, :event_routing_key, :event_message_id, :event_body, :event_headers
      FROM payment WHERE :event_exchange::text IS NOT NULL
)
-- Out of an in-progress status: the wake-up is this statement's to send (schema.sql).
SELECT count(*) FROM payment, LATERAL (SELECT pg_notify('payment_updated', payment.id)) AS n;

-- name: ops_resolve_payment!
-- Ops fills bank references the receipt lacks (never overwriting one) on a
-- payment with no operation in flight, and with :clear_flag clears
-- attention_required (resolve), with a history row naming who and why; the
-- status does not move.
WITH payment AS (
    UPDATE payments
       SET attention_required = attention_required AND NOT :clear_flag, updated_at = :at,
           authorization_id = coalesce(authorization_id, :authorization_id),
           capture_id = coalesce(capture_id, :capture_id),
           void_id = coalesce(void_id, :void_id),
           refund_id = coalesce(refund_id, :refund_id)
     WHERE id = :payment_id
       AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.payment_id = :payment_id AND o.status = 'pending')
    RETURNING id, status
)
INSERT INTO payment_history (payment_id, status, cause, at)
SELECT id, status, :cause, :at FROM payment;

-- ---- the ops console (gateway/api/ops/) ------------------------------------------------

-- name: ops_payment_counts
-- The overview's payments by status, and how many of each are flagged. A full
-- scan of payments: the overview is opened by a person, not polled by a machine.
SELECT p.status, count(*) AS payments, count(*) FILTER (WHERE p.attention_required) AS flagged
  FROM payments p
 GROUP BY p.status
 ORDER BY p.status;

-- name: ops_backlog^
-- The overview's queues in one round trip: the outbox (every row not yet
-- published), operations parked for ops (operations_pending holds the pending
-- ones), and the latest reconciliation finding.
SELECT (SELECT count(*) FROM outbox) AS outbox_unsent,
       (SELECT min(created_at) FROM outbox) AS outbox_oldest_unsent_at,
       (SELECT count(*) FROM operations WHERE status = 'pending' AND parked) AS parked_operations,
       (SELECT max(found_at) FROM reconciliation_findings) AS last_finding_at;

-- name: ops_flagged_payments
-- Payments showing attention_required, most recently changed first, with the
-- parked operation that holds each one, if any (reconciliation flags without one).
-- No index has the flag: a scan of payments, for a page a person opens.
SELECT p.id, p.merchant, p.order_id, p.customer_id, p.amount, p.currency, p.status,
       p.last_error, p.updated_at, o.id AS operation_id, o.kind AS operation_kind, o.parked
  FROM payments p
  LEFT JOIN operations o ON o.payment_id = p.id AND o.status = 'pending'
 WHERE p.attention_required
 ORDER BY p.updated_at DESC, p.id DESC
 LIMIT :limit;

-- name: ops_findings
-- Reconciliation findings, newest first, with the payment's status now.
SELECT f.id, f.run_id, f.payment_id, f.kind, f.detail, f.repaired, f.found_at,
       p.status AS payment_status, p.attention_required
  FROM reconciliation_findings f
  JOIN payments p ON p.id = f.payment_id
 ORDER BY f.found_at DESC, f.id DESC
 LIMIT :limit;

-- name: ops_search_payments
-- The console's search box: a payment id, an order id or a customer id, of any
-- merchant. The order and customer indexes lead with the merchant, so the last
-- two are a scan of payments; ops searches are rare and a person waits for them.
SELECT p.id, p.merchant, p.order_id, p.customer_id, p.amount, p.currency, p.status,
       p.attention_required, p.created_at, p.updated_at
  FROM payments p
 WHERE p.id = :term OR p.order_id = :term OR p.customer_id = :term
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT :limit;

-- name: ops_timeline_operations
-- Every operation of a payment with everything the bank said, oldest first.
SELECT o.id, o.kind, o.status, o.parked, o.bank_key, o.attempts, o.lease_owner, o.lease_until,
       o.last_error, o.bank_response, o.bank_ms, o.first_attempt_at, o.created_at, o.updated_at,
       o.finished_at
  FROM operations o
 WHERE o.payment_id = :payment_id
 ORDER BY o.created_at, o.id;

-- name: ops_timeline_messages
-- The outbox rows about a payment still waiting to be published: its events
-- (their body holds the payment id) and its operations' commands (theirs the
-- operation id). The outbox has no payment column; it holds only the backlog,
-- so this scans a small table, byte search rather than JSON parsing.
SELECT m.id, m.exchange, m.routing_key, m.message_id, m.body, m.created_at
  FROM outbox m
 WHERE EXISTS (SELECT 1 FROM unnest(:needles::text[]) AS n(needle)
                WHERE position(convert_to(n.needle, 'UTF8') IN m.body) > 0)
 ORDER BY m.id;

-- name: record_ops_action!
-- An operator's action on an operation, in its payment's history: the status
-- stays what it is, the cause names the action and who took it.
INSERT INTO payment_history (payment_id, status, cause, at)
SELECT p.id, p.status, :cause, :at
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.id = :operation_id;

-- name: record_circuit_state!
-- A worker's bank circuit breaker, as it last reported it (one row per worker).
INSERT INTO bank_circuit (worker_id, open, changed_at, detail)
VALUES (:worker_id, :open, :changed_at, :detail)
    ON CONFLICT (worker_id) DO UPDATE
   SET open = EXCLUDED.open, changed_at = EXCLUDED.changed_at, detail = EXCLUDED.detail;

-- name: circuit_states
SELECT c.worker_id, c.open, c.changed_at, c.detail
  FROM bank_circuit c
 ORDER BY c.worker_id;
