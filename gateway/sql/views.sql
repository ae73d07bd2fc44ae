-- The read side: payments as FicMart sees them.

-- name: payment_by_id^
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.id = :payment_id AND p.merchant = :merchant;

-- name: payments_by_order
-- Newest first; cursor_at/cursor_id are (created_at, id) of starting_after, or null.
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.merchant = :merchant AND p.order_id = :order_id
   AND (:cursor_at::timestamptz IS NULL OR (p.created_at, p.id) < (:cursor_at, :cursor_id::text))
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT :limit;

-- name: payments_by_customer
SELECT p.*, payment_history_json(p.id) AS history
  FROM payments p
 WHERE p.merchant = :merchant AND p.customer_id = :customer_id
   AND (:cursor_at::timestamptz IS NULL OR (p.created_at, p.id) < (:cursor_at, :cursor_id::text))
 ORDER BY p.created_at DESC, p.id DESC
 LIMIT :limit;

-- name: payment_cursor^
SELECT created_at, id FROM payments WHERE id = :payment_id AND merchant = :merchant;
