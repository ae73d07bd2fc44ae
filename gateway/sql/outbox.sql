-- The relay's side of the outbox (worker/relay.py).

-- name: claim_outbox_batch
-- Unsent rows, oldest first, locked for this relay's transaction; rows another
-- relay holds are skipped, so several relays share the work without waiting.
-- held_back: rows this relay failed to publish a moment ago and retries later,
-- so that one unroutable row does not hold up the rows behind it.
SELECT id, exchange, routing_key, message_id, body
  FROM outbox
 WHERE published_at IS NULL AND NOT (id = ANY(:held_back::bigint[]))
 ORDER BY id
 LIMIT :limit
   FOR UPDATE SKIP LOCKED;

-- name: mark_outbox_published!
-- Only after the broker confirmed each of them.
UPDATE outbox SET published_at = now()
 WHERE id = ANY(:ids::bigint[]) AND published_at IS NULL;

-- name: prune_outbox!
-- Published rows past the retention, a bounded slice per call.
DELETE FROM outbox
 WHERE id IN (SELECT id FROM outbox
               WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => :retention_seconds)
               LIMIT :limit);
