-- How much work waits (gateway/store/backlog.py): the gauges gateway-relay and
-- gateway-worker refresh every few seconds (worker/metrics.py), and the count the API's
-- admission asks for: one round trip each, over tables or partial indexes that hold
-- exactly the rows counted, so their cost follows the backlog.

-- name: outbox_backlog^
-- Rows not yet published (the relay deletes what it published) and the oldest
-- one's age, on the database's clock like the rows' created_at; null when none.
SELECT count(*) AS unsent,
       extract(epoch FROM now() - min(created_at))::float8 AS oldest_seconds
  FROM outbox;

-- name: pipeline_backlog^
-- Operations parked for ops (operations_pending holds the pending ones) and
-- payments flagged attention_required (payments_flagged).
SELECT (SELECT count(*) FROM operations WHERE status = 'pending' AND parked) AS parked,
       (SELECT count(*) FROM payments WHERE attention_required) AS flagged;

-- name: work_waiting$
-- Operations waiting for a worker (pending, not parked), counted up to :most and
-- no further: the API's load shedding asks often and only needs to know whether
-- the backlog passed its bound (operations_pending holds exactly these rows).
-- 0 while a worker reports the bank's circuit open (reported within 3 minutes,
-- as the ops console counts a report fresh): that backlog waits for the bank,
-- costs us nothing, and taking payments while the bank is away is the point.
SELECT CASE
    WHEN EXISTS (SELECT 1 FROM bank_circuit WHERE open AND changed_at > now() - interval '3 minutes') THEN 0
    ELSE (SELECT count(*) FROM (
              SELECT 1 FROM operations WHERE status = 'pending' AND NOT parked LIMIT :most
          ) AS waiting)
END;
