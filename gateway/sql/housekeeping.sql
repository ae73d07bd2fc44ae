-- The sweeper's housekeeping (gateway/store/housekeeping.py, worker/sweeper.py): stuck work
-- sent again, lapsed holds and doubts, old cards and old idempotency keys.

-- name: lock_stuck_operations
-- Pending operations nobody is working on: not parked, no live lease and idle
-- for longer than idle_seconds (the worker sizes it above its longest retry
-- delay, so an operation waiting in a retry queue is not "stuck"). Rows
-- another sweeper holds are skipped.
SELECT o.id, o.kind, o.payment_id
  FROM operations o
 WHERE o.status = 'pending' AND NOT o.parked
   AND (o.lease_until IS NULL OR o.lease_until < now())
   AND o.updated_at < now() - make_interval(secs => :idle_seconds)
 ORDER BY o.updated_at
 LIMIT :limit
   FOR UPDATE OF o SKIP LOCKED;

-- name: requeue_operations!
-- A fresh command for each stuck operation, through the outbox; updated_at is
-- bumped so the next pass leaves them alone. The bank key is unchanged, so a
-- duplicate command is harmless. The arrays run in parallel, one element per
-- operation.
WITH bumped AS (
    UPDATE operations SET updated_at = now()
     WHERE id = ANY(:operation_ids::text[]) AND (status = 'pending') IS TRUE  -- by key: see settlement.sql
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
SELECT m.exchange, m.routing_key, m.message_id, m.body, m.headers
  FROM unnest(:operation_ids::text[], :exchanges::text[], :routing_keys::text[], :message_ids::text[],
              :bodies::bytea[], :headers::jsonb[])
       AS m(operation_id, exchange, routing_key, message_id, body, headers)
  JOIN bumped b ON b.id = m.operation_id;

-- name: lapsed_holds
-- Authorized payments whose hold has expired at the bank; expire_hold() locks
-- and re-checks each one.
SELECT id
  FROM payments
 WHERE status = 'authorized' AND authorization_expires_at < now()
 ORDER BY authorization_expires_at
 LIMIT :limit;

-- name: lock_payment^
-- A lapsed hold's payment, locked with its history: expire_hold() re-checks it
-- before the payment expires and its release starts.
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.id = :payment_id
   FOR UPDATE;

-- name: lapsed_doubts
-- Payments flagged because an attempt's answer was lost before the approval (a
-- possible second hold) whose own hold expired more than margin_seconds ago. A
-- second hold was placed before ours, so it has lapsed at the bank too.
SELECT id, authorization_id, authorization_expires_at
  FROM payments
 WHERE attention_required
   AND last_error->>'code' = 'possible_duplicate_hold'
   AND authorization_expires_at < now() - make_interval(secs => :margin_seconds)
 ORDER BY authorization_expires_at
 LIMIT :limit;

-- name: lock_old_cards
-- Sealed cards kept longer than max_age_seconds, with their payment (locked)
-- and the authorize operation still pending for it, if any. A card whose
-- operation holds a live lease is left for a later pass: a bank call with it
-- may be running. Rows another sweeper holds are skipped.
SELECT v.payment_id, o.id AS operation_id, o.parked, p.*, payment_history_json(p.id) AS history
  FROM card_vault v
  JOIN payments p ON p.id = v.payment_id
  LEFT JOIN operations o ON o.payment_id = v.payment_id AND o.status = 'pending' AND o.kind = 'authorize'
 WHERE v.created_at < now() - make_interval(secs => :max_age_seconds)
   AND (o.lease_until IS NULL OR o.lease_until < now())
 ORDER BY v.created_at
 LIMIT :limit
   FOR UPDATE OF v, p SKIP LOCKED;

-- name: purge_card!
-- The card is deleted; its authorization, if still pending, can never be
-- sent: it is parked for ops (who abandon it) with the reason on the
-- operation and the payment, and the event when the payment was not flagged
-- yet. An operation parked already keeps its updated_at, which says since
-- when it is parked (ops may abandon it once that is long enough ago). Not
-- while a worker holds the lease (it claimed after lock_old_cards read): that
-- worker finds no card on its next claim and parks the operation itself.
WITH card AS (
    DELETE FROM card_vault WHERE payment_id = :payment_id
), operation AS (
    UPDATE operations
       SET parked = true, last_error = :error, lease_owner = NULL, lease_until = NULL,
           updated_at = CASE WHEN parked THEN updated_at ELSE :at END,
           flagged_payment = CASE WHEN parked THEN flagged_payment
                                  ELSE NOT (SELECT attention_required FROM payments WHERE id = payment_id) END
     WHERE id = :operation_id AND status = 'pending' AND (lease_until IS NULL OR lease_until < now())
    RETURNING payment_id
), payment AS (
    UPDATE payments SET attention_required = true, last_error = :error, updated_at = :at
     WHERE id = (SELECT payment_id FROM operation)
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
SELECT :event_exchange, :event_routing_key, :event_message_id, :event_body, :event_headers
  FROM payment WHERE :event_exchange::text IS NOT NULL;

-- name: prune_idempotency_keys!
-- Stored responses past the retention, a small slice per call (its own
-- transaction), oldest first along idempotency_keys_age. SKIP LOCKED: a row
-- another sweeper is deleting is left to it. The API never updates or deletes
-- these rows, it only inserts new keys, so nothing it does waits for this.
DELETE FROM idempotency_keys
 WHERE (merchant, key) IN (SELECT merchant, key
                             FROM idempotency_keys
                            WHERE created_at < now() - make_interval(secs => :retention_seconds)
                            ORDER BY created_at
                            LIMIT :limit
                              FOR UPDATE SKIP LOCKED);

-- name: tables_due_upkeep
-- When the server's autovacuum is off (some deployments, and the CI machine,
-- run it so): which of `tables` autovacuum would now vacuum or analyze, by its
-- default thresholds (50 rows plus 20% of the table dead; 50 plus 10% changed
-- since the last ANALYZE). Nothing while autovacuum is on: it does this itself.
SELECT table_name, vacuum
  FROM (SELECT s.relname AS table_name,
               s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0) AS vacuum,
               s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0) AS stale
          FROM pg_stat_user_tables s
          JOIN pg_class c ON c.oid = s.relid
         WHERE current_setting('autovacuum') = 'off'
           AND s.schemaname = current_schema()
           AND s.relname = ANY(:tables::text[])) due
 WHERE vacuum OR stale
 ORDER BY table_name;
