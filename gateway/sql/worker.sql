-- The worker's sweeper (worker/sweeper.py).

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
     WHERE id = ANY(:operation_ids::text[]) AND status = 'pending'
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body)
SELECT m.exchange, m.routing_key, m.message_id, m.body
  FROM unnest(:operation_ids::text[], :exchanges::text[], :routing_keys::text[], :message_ids::text[],
              :bodies::bytea[])
       AS m(operation_id, exchange, routing_key, message_id, body)
  JOIN bumped b ON b.id = m.operation_id;

-- name: lapsed_holds
-- Authorized payments whose hold has expired at the bank; expire_hold() locks
-- and re-checks each one.
SELECT id
  FROM payments
 WHERE status = 'authorized' AND authorization_expires_at < now()
 ORDER BY authorization_expires_at
 LIMIT :limit;
