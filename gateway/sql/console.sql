-- The /ops console's pages (gateway/store/console.py, gateway/api/ops/): the overview,
-- flagged payments, findings, search, a payment's timeline, and an operator's action in
-- the history. Not scoped by merchant.

-- name: ops_payment_counts
-- The overview's payments by status, and how many of each are flagged. A full
-- scan of payments: the overview is opened by a person, not polled by a machine.
SELECT p.status, count(*) AS payments, count(*) FILTER (WHERE p.attention_required) AS flagged
  FROM payments p
 GROUP BY p.status
 ORDER BY p.status;

-- name: ops_backlog^
-- The overview's queues in one round trip: the outbox (every row not yet
-- published), operations parked for ops (operations_pending holds the pending
-- ones), and the latest reconciliation finding.
SELECT (SELECT count(*) FROM outbox) AS outbox_unsent,
       (SELECT min(created_at) FROM outbox) AS outbox_oldest_unsent_at,
       (SELECT count(*) FROM operations WHERE status = 'pending' AND parked) AS parked_operations,
       (SELECT max(found_at) FROM reconciliation_findings) AS last_finding_at;

-- name: ops_flagged_payments
-- Payments showing attention_required, most recently changed first, with the
-- parked operation that holds each one, if any (reconciliation flags without one).
-- No index has the flag: a scan of payments, for a page a person opens.
SELECT p.id, p.merchant, p.order_id, p.customer_id, p.amount, p.currency, p.status,
       p.last_error, p.updated_at, o.id AS operation_id, o.kind AS operation_kind, o.parked
  FROM payments p
  LEFT JOIN operations o ON o.payment_id = p.id AND o.status = 'pending'
 WHERE p.attention_required
 ORDER BY p.updated_at DESC, p.id DESC
 LIMIT :limit;

-- name: ops_findings
-- Reconciliation findings, newest first, with the payment's status now.
SELECT f.id, f.run_id, f.payment_id, f.kind, f.detail, f.repaired, f.found_at,
       p.status AS payment_status, p.attention_required
  FROM reconciliation_findings f
  JOIN payments p ON p.id = f.payment_id
 ORDER BY f.found_at DESC, f.id DESC
 LIMIT :limit;

-- name: ops_search_payments
-- The console's search box: a payment id, an order id or a customer id, of any
-- merchant. The order and customer indexes lead with the merchant, so the last
-- two are a scan of payments; ops searches are rare and a person waits for them.
SELECT p.id, p.merchant, p.order_id, p.customer_id, p.amount, p.currency, p.status,
       p.attention_required, p.created_at, p.updated_at
  FROM payments p
 WHERE p.id = :term OR p.order_id = :term OR p.customer_id = :term
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT :limit;

-- name: ops_timeline_operations
-- Every operation of a payment with everything the bank said, oldest first.
SELECT o.id, o.kind, o.status, o.parked, o.bank_key, o.attempts, o.lease_owner, o.lease_until,
       o.last_error, o.bank_response, o.bank_ms, o.first_attempt_at, o.created_at, o.updated_at,
       o.finished_at
  FROM operations o
 WHERE o.payment_id = :payment_id
 ORDER BY o.created_at, o.id;

-- name: ops_timeline_messages
-- The outbox rows about a payment still waiting to be published: its events
-- (their body holds the payment id) and its operations' commands (theirs the
-- operation id). The outbox has no payment column; it holds only the backlog,
-- so this scans a small table, byte search rather than JSON parsing.
SELECT m.id, m.exchange, m.routing_key, m.message_id, m.body, m.created_at
  FROM outbox m
 WHERE EXISTS (SELECT 1 FROM unnest(:needles::text[]) AS n(needle)
                WHERE position(convert_to(n.needle, 'UTF8') IN m.body) > 0)
 ORDER BY m.id;

-- name: record_ops_action!
-- An operator's action on an operation, in its payment's history: the status
-- stays what it is, the cause names the action and who took it.
INSERT INTO payment_history (payment_id, status, cause, at)
SELECT p.id, p.status, :cause, :at
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.id = :operation_id;
