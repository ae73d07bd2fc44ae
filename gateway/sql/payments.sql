-- The write side: each statement is one step of an atomic phase in gateway/payments.py.

-- name: lock_idempotency_key
-- "Is another request with this key running right now?" is answered by a
-- transaction-scoped advisory lock; the stored response, if any, comes back
-- in the same round trip.
SELECT pg_try_advisory_xact_lock(hashtextextended($1 || E'\x1f' || $2, 0)) AS locked,
       k.method, k.path, k.fingerprint, k.response_status, k.response_body, k.location
  FROM (SELECT 1) AS one
  LEFT JOIN idempotency_keys k ON k.merchant = $1 AND k.key = $2;

-- name: submit_authorization
-- The whole authorize request in ONE statement (one round trip, its own
-- transaction): take the key's advisory lock and look for a stored response
-- (`k`); only when the lock was taken and the key is new, insert the payment,
-- its first history row, the authorize operation, the sealed card, the command
-- for a worker and the stored response. Every INSERT reads `payment`, so none
-- runs unless the first did.
WITH k AS (
    SELECT pg_try_advisory_xact_lock(hashtextextended($2 || E'\x1f' || $18, 0)) AS locked,
           (SELECT fingerprint FROM idempotency_keys WHERE merchant = $2 AND key = $18) AS fingerprint
), payment AS (
    INSERT INTO payments (id, merchant, order_id, customer_id, amount, currency, status,
                          card_brand, card_last4, card_expiry_month, card_expiry_year,
                          created_at, updated_at)
    SELECT $1, $2, $3, $4, $5, 'USD', 'pending', $6, $7, $8, $9, $10, $10
      FROM k WHERE k.locked AND k.fingerprint IS NULL
    RETURNING id
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT id, 'pending', 'api:authorize', $10 FROM payment
), operation AS (
    INSERT INTO operations (id, payment_id, kind, bank_key, created_at, updated_at)
    SELECT $11, id, 'authorize', $12, $10, $10 FROM payment
), vault AS (
    INSERT INTO card_vault (payment_id, sealed, created_at)
    SELECT id, $13, $10 FROM payment
), command AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body)
    SELECT $14, $15, $16, $17 FROM payment
), stored AS (
    INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status,
                                  response_body, location, created_at)
    SELECT $2, $18, $19, $20, $21, 202, $22, $23, $10 FROM payment
    RETURNING 1
)
SELECT k.locked, EXISTS (SELECT 1 FROM stored) AS inserted FROM k;

-- name: live_payment_for_order
SELECT id FROM payments
 WHERE merchant = $1 AND order_id = $2 AND status NOT IN ('declined', 'voided', 'expired');

-- name: lock_payment
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.id = $1
   FOR UPDATE;

-- name: lock_key_and_payment
-- lock_idempotency_key and lock_payment in one round trip: the key's lock and
-- stored response, and the payment row locked FOR UPDATE (its columns are
-- null when this merchant has no such payment).
SELECT k.*, p.*, payment_history_json(p.id) AS history
  FROM (SELECT pg_try_advisory_xact_lock(hashtextextended($1 || E'\x1f' || $2, 0)) AS locked,
               i.method, i.path, i.fingerprint, i.response_status, i.response_body, i.location
          FROM (SELECT 1) AS one
          LEFT JOIN idempotency_keys i ON i.merchant = $1 AND i.key = $2) AS k
  LEFT JOIN LATERAL (SELECT * FROM payments WHERE id = $3 AND merchant = $1 FOR UPDATE) AS p ON true;

-- name: start_operation
-- The payment enters an in-progress status, with its history row, the new
-- operation, the command for a worker and (for API requests) the stored response.
WITH payment AS (
    UPDATE payments SET status = $2, last_error = NULL, updated_at = $3
     WHERE id = $1
    RETURNING id
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT id, $2, $4, $3 FROM payment
), operation AS (
    INSERT INTO operations (id, payment_id, kind, bank_key, created_at, updated_at)
    SELECT $5, id, $6, $7, $3, $3 FROM payment
), command AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body)
    SELECT $8, $9, $10, $11 FROM payment
), event AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body)
    SELECT $12, $13, $14, $15 FROM payment WHERE $12::text IS NOT NULL
)
INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status,
                              response_body, location, created_at)
SELECT $16, $17, $18, $19, $20, 202, $21, NULL, $3 FROM payment WHERE $17::text IS NOT NULL;

-- name: insert_operation
-- Bank work the gateway starts by itself (the release of an expired hold).
WITH operation AS (
    INSERT INTO operations (id, payment_id, kind, bank_key, created_at, updated_at)
    VALUES ($1, $2, $3, $4, $5, $5)
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body)
SELECT $6, $7, $8, $9 FROM operation;

-- name: claim_operation
-- Take the lease for one bank attempt. Fails (no row) when the operation is
-- finished or another worker's lease has not run out: a bank call of that
-- worker may still be running, and the bank has no in-flight lock. A parked
-- operation waits for ops (unpark_operation) and is not claimed either.
WITH claimed AS (
    UPDATE operations
       SET attempts = attempts + 1,
           lease_owner = $2,
           lease_until = now() + make_interval(secs => $3),
           first_attempt_at = coalesce(first_attempt_at, now()),
           updated_at = now()
     WHERE id = $1 AND status = 'pending' AND NOT parked
       AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $2)
    RETURNING *
)
SELECT c.id, c.kind, c.bank_key, c.attempts, c.first_attempt_at, c.payment_id,
       p.amount, p.authorization_id, p.capture_id, p.card_expiry_month, p.card_expiry_year,
       v.sealed
  FROM claimed c
  JOIN payments p ON p.id = c.payment_id
  LEFT JOIN card_vault v ON v.payment_id = c.payment_id;

-- name: operation_state
SELECT o.id, o.kind, o.status, o.parked, o.attempts, o.first_attempt_at, o.payment_id, o.last_error,
       greatest(extract(epoch FROM o.lease_until - now()), 0)::float8 AS lease_left
  FROM operations o
 WHERE o.id = $1;

-- name: release_lease
UPDATE operations SET lease_owner = NULL, lease_until = NULL, last_error = $3,
                      bank_ms = bank_ms + $4, updated_at = now()
 WHERE id = $1 AND lease_owner = $2 AND status = 'pending';

-- name: lock_operation
-- The operation with its payment, both locked, while it is still pending.
SELECT o.id AS operation_id, o.kind, o.bank_key, p.*, payment_history_json(p.id) AS history
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.id = $1 AND o.status = 'pending'
   FOR UPDATE;

-- name: finish_operation
-- A final outcome: the operation, the payment (with history row when the
-- status moves), the sealed card gone once the authorization is decided, and
-- the completion event, in one statement.
WITH operation AS (
    UPDATE operations
       SET status = $2, finished_at = $3, updated_at = $3, last_error = $4, bank_response = $5,
           bank_ms = bank_ms + $6, lease_owner = NULL, lease_until = NULL, parked = false
     WHERE id = $1 AND status = 'pending'
    RETURNING payment_id
), payment AS (
    UPDATE payments
       SET status = $7, last_error = $4, attention_required = false, updated_at = $3,
           authorization_id = coalesce($8, authorization_id),
           authorization_expires_at = coalesce($9, authorization_expires_at),
           capture_id = coalesce($10, capture_id),
           void_id = coalesce($11, void_id),
           refund_id = coalesce($12, refund_id)
     WHERE id = (SELECT payment_id FROM operation)
    RETURNING id
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT id, $7, $13, $3 FROM payment WHERE $14
), vault AS (
    DELETE FROM card_vault WHERE payment_id = (SELECT id FROM payment) AND $15
), event AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body)
    SELECT $16, $17, $18, $19 FROM payment WHERE $16::text IS NOT NULL
)
SELECT count(*) FROM payment;

-- name: park_operation
-- Retries are exhausted: the operation waits in the dead-letter queue and the
-- payment shows attention_required, announced by an event.
WITH operation AS (
    UPDATE operations
       SET parked = true, last_error = $3, lease_owner = NULL, lease_until = NULL, updated_at = $2
     WHERE id = $1 AND status = 'pending'
    RETURNING payment_id
), payment AS (
    UPDATE payments SET attention_required = true, last_error = $3, updated_at = $2
     WHERE id = (SELECT payment_id FROM operation)
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body)
SELECT $4, $5, $6, $7 FROM payment;

-- name: unpark_operation
-- Ops replays a dead-lettered operation: it is back in the normal flow.
WITH operation AS (
    UPDATE operations SET parked = false, updated_at = now()
     WHERE id = $1 AND status = 'pending'
    RETURNING payment_id
)
UPDATE payments SET attention_required = false, updated_at = now()
 WHERE id = (SELECT payment_id FROM operation)
RETURNING id;
