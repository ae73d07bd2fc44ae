-- The relay's side of the outbox (worker/relay.py).

-- name: take_outbox_batch
-- The oldest rows, deleted inside the relay's transaction: they are gone only if
-- it commits, which it does once the broker confirmed them. Rows another relay
-- holds are skipped, so several relays share the work without waiting.
-- held_back: rows this relay failed to publish a moment ago and retries later,
-- so that one unroutable row does not hold up the rows behind it.
DELETE FROM outbox
 WHERE id IN (SELECT id FROM outbox
               WHERE NOT (id = ANY(:held_back::bigint[]))
               ORDER BY id
               LIMIT :limit
                 FOR UPDATE SKIP LOCKED)
RETURNING id, exchange, routing_key, message_id, body, headers, created_at;

-- name: restore_outbox_rows!
-- Rows of the batch the broker did not take, back as they were (same ids, in the
-- same transaction that deleted them), to be published later.
INSERT INTO outbox (id, exchange, routing_key, message_id, body, headers, created_at)
SELECT *
  FROM unnest(:ids::bigint[], :exchanges::text[], :routing_keys::text[], :message_ids::text[],
              :bodies::bytea[], :headers::jsonb[], :created::timestamptz[]);
