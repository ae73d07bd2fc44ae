-- Webhook endpoints (gateway/webhooks.py: gatewayctl webhooks, /ops) and their deliveries
-- (worker/webhook_delivery.py: gateway-webhooks).

-- name: upsert_webhook_endpoint^
-- Register the merchant's endpoint, or point it at another URL (and enable it again): the
-- secret of an existing endpoint stays as it is.
INSERT INTO webhook_endpoints (merchant, url, secret)
VALUES (:merchant, :url, :secret)
ON CONFLICT (merchant) DO UPDATE SET url = EXCLUDED.url, enabled = true, updated_at = now()
RETURNING merchant, url, secret, (xmax = 0) AS created;

-- name: rotate_webhook_secret^
-- A new secret; the current one still signs for :overlap_seconds beside it (an older one,
-- from a rotation less than that ago, is dropped).
UPDATE webhook_endpoints
   SET old_secret = secret,
       old_secret_until = now() + make_interval(secs => :overlap_seconds),
       secret = :secret,
       updated_at = now()
 WHERE merchant = :merchant
RETURNING merchant, old_secret_until;

-- name: disable_webhook_endpoint^
-- No more deliveries to it; what is pending waits (set enables it again).
UPDATE webhook_endpoints SET enabled = false, updated_at = now()
 WHERE merchant = :merchant
RETURNING merchant;

-- name: webhook_endpoints
-- Every endpoint with its deliveries waiting and failed (ops: a handful of rows).
SELECT w.merchant, w.url, w.enabled, w.created_at, w.updated_at,
       CASE WHEN w.old_secret_until > now() THEN w.old_secret_until END AS old_secret_until,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.merchant = w.merchant AND d.status = 'pending') AS pending,
       (SELECT count(*) FROM webhook_deliveries d WHERE d.merchant = w.merchant AND d.status = 'failed') AS failed
  FROM webhook_endpoints w
 ORDER BY w.merchant;

-- name: failed_webhook_deliveries
-- Deliveries that ran out of retries, newest first; :merchant null: every merchant's.
SELECT e.event_id, d.merchant, d.attempts, d.last_error, d.retry_since, d.finished_at, e.created_at
  FROM webhook_deliveries d
  JOIN events e ON e.id = d.event_id
 WHERE d.status = 'failed' AND (:merchant::text IS NULL OR d.merchant = :merchant)
 ORDER BY d.finished_at DESC, d.event_id DESC
 LIMIT :limit;

-- name: resend_webhook_events
-- Deliver these events (by evt_ id) again, from a fresh retry window: failed or delivered
-- ones, and those from before the endpoint existed. One still pending is left as it is (it
-- may be in flight). Events of a merchant without an endpoint are not found.
WITH chosen AS (
    SELECT e.id, e.event_id, e.merchant
      FROM events e
      JOIN webhook_endpoints w ON w.merchant = e.merchant
     WHERE e.event_id = ANY(:event_ids::text[])
), queued AS (
    INSERT INTO webhook_deliveries (event_id, merchant)
    SELECT id, merchant FROM chosen
    ON CONFLICT (event_id) DO UPDATE
        SET status = 'pending', attempts = 0, next_attempt_at = now(), retry_since = now(),
            last_error = NULL, finished_at = NULL
        WHERE webhook_deliveries.status <> 'pending'
    RETURNING event_id
)
SELECT c.event_id FROM chosen c JOIN queued q ON q.event_id = c.id;

-- name: resend_failed_webhook_deliveries!
-- Every failed delivery (of one merchant, or all) again, from a fresh retry window.
UPDATE webhook_deliveries
   SET status = 'pending', attempts = 0, next_attempt_at = now(), retry_since = now(),
       last_error = NULL, finished_at = NULL
 WHERE status = 'failed' AND (:merchant::text IS NULL OR merchant = :merchant);

-- name: claim_webhook_deliveries
-- Due deliveries, up to :per_endpoint of each enabled endpoint not in :busy (its endpoint
-- has all it may take in flight here), oldest due first, at most :limit, leased:
-- next_attempt_at moves past the attempt, so a deliverer that dies leaves them due again
-- after :lease_seconds. SKIP LOCKED: several deliverers share the work.
WITH due AS (
    SELECT d.event_id
      FROM webhook_endpoints w
     CROSS JOIN LATERAL (
           SELECT p.event_id, p.next_attempt_at
             FROM webhook_deliveries p
            WHERE p.merchant = w.merchant AND p.status = 'pending' AND p.next_attempt_at <= now()
            ORDER BY p.next_attempt_at
            LIMIT :per_endpoint
              FOR UPDATE SKIP LOCKED) d
     WHERE w.enabled AND NOT (w.merchant = ANY(:busy::text[]))
     ORDER BY d.next_attempt_at
     LIMIT :limit
)
UPDATE webhook_deliveries d
   SET next_attempt_at = now() + make_interval(secs => :lease_seconds), attempts = d.attempts + 1
  FROM due, events e, webhook_endpoints w
 WHERE d.event_id = due.event_id AND e.id = d.event_id AND w.merchant = d.merchant
RETURNING d.event_id AS id, e.event_id, e.body, d.merchant, d.attempts, d.retry_since,
          w.url, w.secret, w.old_secret, w.old_secret_until, now() AS now;

-- name: record_webhook_attempts!
-- The attempts' outcomes, one statement for a batch: delivered, failed, or pending with its
-- next try. A delivery ops resent meanwhile is pending too, and takes the outcome.
UPDATE webhook_deliveries d
   SET status = r.status,
       next_attempt_at = coalesce(r.next_at, d.next_attempt_at),
       last_error = r.error,
       finished_at = CASE WHEN r.status <> 'pending' THEN now() END
  FROM unnest(:ids::bigint[], :statuses::text[], :next_at::timestamptz[], :errors::text[])
       AS r(id, status, next_at, error)
 WHERE d.event_id = r.id AND d.status = 'pending';
