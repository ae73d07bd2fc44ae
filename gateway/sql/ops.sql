-- Ops: gatewayctl (worker/cli.py, worker/replay.py), reconciliation
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
INSERT INTO outbox (exchange, routing_key, message_id, body)
SELECT :event_exchange, :event_routing_key, :event_message_id, :event_body FROM payment;

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
