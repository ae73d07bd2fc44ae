-- The read side: payments as FicMart sees them.

-- name: payment_by_id
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.id = $1 AND p.merchant = $2;

-- name: payments_by_order
-- Newest first; $3/$4 are the cursor (created_at, id) of starting_after, or null.
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.merchant = $1 AND p.order_id = $2
   AND ($3::timestamptz IS NULL OR (p.created_at, p.id) < ($3, $4::text))
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT $5;

-- name: payments_by_customer
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.merchant = $1 AND p.customer_id = $2
   AND ($3::timestamptz IS NULL OR (p.created_at, p.id) < ($3, $4::text))
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT $5;

-- name: payment_cursor
SELECT created_at, id FROM payments WHERE id = $1 AND merchant = $2;
