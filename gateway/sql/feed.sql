-- The events feed (GET /v1/events, gateway/feed.py) and its retention (worker/sweeper.py).

-- name: event_position^
-- Where an event sits in its merchant's feed: the cursor `after` names it.
SELECT txid, id FROM events WHERE merchant = :merchant AND event_id = :event_id;

-- name: events_after
-- The merchant's events after a position, in feed order, of transactions that ended before
-- every one still running began (schema.sql, events): none can commit behind them any more.
SELECT id, event_id, body
  FROM events
 WHERE merchant = :merchant
   AND (txid, id) > (:txid, :id)
   AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
 ORDER BY txid, id
 LIMIT :limit;

-- name: prune_events!
-- Events past the retention, a small slice per call (its own transaction), oldest first
-- along events_age; SKIP LOCKED leaves a row another sweeper is deleting to it.
DELETE FROM events
 WHERE id IN (SELECT id
                FROM events
               WHERE created_at < now() - make_interval(secs => :retention_seconds)
               ORDER BY created_at
               LIMIT :limit
                 FOR UPDATE SKIP LOCKED);
