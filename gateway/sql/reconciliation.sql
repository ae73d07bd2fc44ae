-- Reconciliation (gateway/store/reconciliation.py, gateway/ops/reconcile.py): settled
-- payments compared with the bank, safe repairs, findings and flags, one pass at a time.

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
