-- The operator's operations and payments, and the decisions ops records by hand
-- (gateway/store/ops.py: gateway/ops/, gatewayctl, the /ops console). Nothing here is
-- scoped by merchant: these are the operator's views.

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
