-- Each worker's bank circuit breaker as it last reported it (gateway/store/circuit.py):
-- written by gateway-worker, shown by the /ops console; work_waiting (backlog.sql) reads
-- it too, since a backlog behind an open circuit waits for the bank, not for us.

-- name: record_circuit_state!
-- A worker's bank circuit breaker, as it last reported it (one row per worker).
INSERT INTO bank_circuit (worker_id, open, changed_at, detail)
VALUES (:worker_id, :open, :changed_at, :detail)
    ON CONFLICT (worker_id) DO UPDATE
   SET open = EXCLUDED.open, changed_at = EXCLUDED.changed_at, detail = EXCLUDED.detail;

-- name: circuit_states
SELECT c.worker_id, c.open, c.changed_at, c.detail
  FROM bank_circuit c
 ORDER BY c.worker_id;
