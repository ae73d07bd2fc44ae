-- The API's phases (gateway/store/intake.py): each statement is one step of the one
-- transaction that records a request (authorize; capture, void, refund) under its
-- idempotency key.

-- name: lock_idempotency_key^
-- "Is another request with this key running right now?" is answered by a
-- transaction-scoped advisory lock; the stored response, if any, comes back
-- in the same round trip.
SELECT pg_try_advisory_xact_lock(idempotency_lock_key(:merchant, :key)) AS locked,
       k.method, k.path, k.fingerprint, k.response_status, k.response_body, k.location
  FROM (SELECT 1) AS one
  LEFT JOIN idempotency_keys k ON k.merchant = :merchant AND k.key = :key;

-- name: submit_authorizations
-- Whole authorize requests, one per row of the arrays, in ONE statement (one
-- round trip, its own transaction; the API sends concurrent requests together,
-- gateway/batching.py). For each: take the key's advisory lock and look for a
-- stored response (`fingerprint`); only when the lock was taken and the key is
-- new, insert the payment, its first history row, the authorize operation, the
-- sealed card, the command for a worker and the stored response. Returns, in
-- the order asked, whether the lock was taken and whether the request was
-- recorded. A conflict (an order with a live payment, a key stored meanwhile)
-- fails the whole statement: the API then sends each request alone. So every
-- row of `new` is inserted or none is, and each insert reads `new` alone: joined
-- to another insert's RETURNING, the planner (which guesses a handful of rows for
-- unnest) compared every row with every other, 5 x 260^2 times in a batch of 260.
WITH asked AS (
    SELECT *
      FROM unnest(:payment_ids::text[], :merchants::text[], :order_ids::text[], :customer_ids::text[],
                  :amounts::bigint[], :card_brands::text[], :card_last4s::text[], :card_expiry_months::smallint[],
                  :card_expiry_years::smallint[], :ats::timestamptz[], :operation_ids::text[], :bank_keys::text[],
                  :sealed_cards::bytea[], :card_key_ids::text[], :command_exchanges::text[],
                  :command_routing_keys::text[], :command_message_ids::text[], :command_bodies::bytea[],
                  :command_headers::jsonb[],
                  :keys::text[], :methods::text[], :paths::text[], :fingerprints::text[],
                  :response_bodies::bytea[], :locations::text[])
           WITH ORDINALITY
        AS a(payment_id, merchant, order_id, customer_id, amount, card_brand, card_last4, card_expiry_month,
             card_expiry_year, at, operation_id, bank_key, sealed_card, card_key_id, command_exchange,
             command_routing_key, command_message_id, command_body, command_headers, key, method, path, fingerprint,
             response_body, location, n)
), k AS MATERIALIZED (
    SELECT a.n, pg_try_advisory_xact_lock(idempotency_lock_key(a.merchant, a.key)) AS locked,
           (SELECT i.fingerprint FROM idempotency_keys i WHERE i.merchant = a.merchant AND i.key = a.key) AS fingerprint
      FROM asked a
), new AS MATERIALIZED (
    SELECT a.* FROM asked a JOIN k ON k.n = a.n WHERE k.locked AND k.fingerprint IS NULL
), payment AS (
    INSERT INTO payments (id, merchant, order_id, customer_id, amount, currency, status,
                          card_brand, card_last4, card_expiry_month, card_expiry_year,
                          created_at, updated_at)
    SELECT payment_id, merchant, order_id, customer_id, amount, 'USD', 'pending',
           card_brand, card_last4, card_expiry_month, card_expiry_year, at, at
      FROM new ORDER BY n
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT payment_id, 'pending', 'api:authorize', at FROM new ORDER BY n
), operation AS (
    INSERT INTO operations (id, payment_id, kind, bank_key, created_at, updated_at)
    SELECT operation_id, payment_id, 'authorize', bank_key, at, at FROM new
), vault AS (
    INSERT INTO card_vault (payment_id, sealed, key_id, created_at)
    SELECT payment_id, sealed_card, card_key_id, at FROM new
), command AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
    SELECT command_exchange, command_routing_key, command_message_id, command_body, command_headers
      FROM new ORDER BY n
), stored AS (
    INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status,
                                  response_body, location, created_at)
    SELECT merchant, key, method, path, fingerprint, 202, response_body, location, at FROM new
)
SELECT k.locked, k.locked AND k.fingerprint IS NULL AS inserted FROM k ORDER BY k.n;

-- name: live_payment_for_order$
SELECT id FROM payments
 WHERE merchant = :merchant AND order_id = :order_id AND status NOT IN ('declined', 'voided', 'expired');

-- name: lock_keys_and_payments
-- Capture, void and refund requests, one per row of the arrays, in one round
-- trip (the API sends concurrent requests together, gateway/batching.py): for
-- each, lock_idempotency_key's columns (the key's lock and stored response)
-- and the merchant's payment with its history, locked FOR UPDATE (its columns
-- are null when this merchant has no such payment), in the order asked. The
-- payments are locked in id order, so that two batches wanting the same rows
-- queue rather than deadlock.
WITH asked AS (
    SELECT * FROM unnest(:merchants::text[], :keys::text[], :payment_ids::text[]) WITH ORDINALITY
        AS a(merchant, key, payment_id, n)
), locked AS MATERIALIZED (
    SELECT p.* FROM payments p
     WHERE (p.id, p.merchant) IN (SELECT payment_id, merchant FROM asked)
     ORDER BY p.id
       FOR UPDATE
)
SELECT k.*, p.*, payment_history_json(p.id) AS history
  FROM asked a
 CROSS JOIN LATERAL (
        SELECT pg_try_advisory_xact_lock(idempotency_lock_key(a.merchant, a.key)) AS locked,
               i.method, i.path, i.fingerprint, i.response_status, i.response_body, i.location
          FROM (SELECT 1) AS one
          LEFT JOIN idempotency_keys i ON i.merchant = a.merchant AND i.key = a.key) AS k
  LEFT JOIN locked p ON p.id = a.payment_id AND p.merchant = a.merchant
 ORDER BY a.n;

-- name: start_operations
-- Payments entering an in-progress status, one per row of the arrays: with
-- each its history row, the new operation, the command for a worker, the
-- event (when the gateway moved the payment by itself; null columns: none)
-- and the stored response (for API requests; a null key: none).
WITH started AS (
    SELECT *
      FROM unnest(:payment_ids::text[], :statuses::text[], :ats::timestamptz[], :causes::text[],
                  :operation_ids::text[], :kinds::text[], :bank_keys::text[],
                  :command_exchanges::text[], :command_routing_keys::text[], :command_message_ids::text[],
                  :command_bodies::bytea[], :command_headers::jsonb[],
                  :event_exchanges::text[], :event_routing_keys::text[], :event_message_ids::text[],
                  :event_bodies::bytea[], :event_headers::jsonb[],
                  :merchants::text[], :keys::text[], :methods::text[], :paths::text[], :fingerprints::text[],
                  :response_bodies::bytea[])
           WITH ORDINALITY
        AS s(payment_id, status, at, cause, operation_id, kind, bank_key, command_exchange, command_routing_key,
             command_message_id, command_body, command_headers, event_exchange, event_routing_key,
             event_message_id, event_body, event_headers, merchant, key, method, path, fingerprint,
             response_body, n)
), payment AS (
    UPDATE payments p SET status = s.status, last_error = NULL, updated_at = s.at
      FROM started s
     WHERE p.id = s.payment_id
    RETURNING p.id, s.n
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT s.payment_id, s.status, s.cause, s.at FROM payment p JOIN started s ON s.n = p.n ORDER BY s.n
), operation AS (
    INSERT INTO operations (id, payment_id, kind, bank_key, created_at, updated_at)
    SELECT s.operation_id, s.payment_id, s.kind, s.bank_key, s.at, s.at FROM payment p JOIN started s ON s.n = p.n
), command AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
    SELECT s.command_exchange, s.command_routing_key, s.command_message_id, s.command_body, s.command_headers
      FROM payment p JOIN started s ON s.n = p.n ORDER BY s.n
), event AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
    SELECT s.event_exchange, s.event_routing_key, s.event_message_id, s.event_body, s.event_headers
      FROM payment p JOIN started s ON s.n = p.n
     WHERE s.event_exchange IS NOT NULL
     ORDER BY s.n
), stored AS (
    INSERT INTO idempotency_keys (merchant, key, method, path, fingerprint, response_status,
                                  response_body, location, created_at)
    SELECT s.merchant, s.key, s.method, s.path, s.fingerprint, 202, s.response_body, NULL, s.at
      FROM payment p JOIN started s ON s.n = p.n
     WHERE s.key IS NOT NULL
)
SELECT p.id FROM payment p ORDER BY p.n;
