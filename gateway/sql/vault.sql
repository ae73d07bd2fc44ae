-- The card vault's key rotation (gateway/ops/cardkeys.py, `gatewayctl rekey-cards`).

-- name: lock_cards_to_reseal
-- The next batch of cards sealed under another key than :key_id, in payment id
-- order after :after (so a card that cannot be opened is passed, not met again),
-- locked until the batch is resealed. A card another transaction holds (a worker
-- recording its authorization's outcome deletes it) is skipped: it is counted
-- among the cards left at the end.
SELECT payment_id, key_id, sealed
  FROM card_vault
 WHERE key_id <> :key_id AND payment_id > :after
 ORDER BY payment_id
 LIMIT :limit
   FOR UPDATE SKIP LOCKED;

-- name: reseal_cards!
-- The locked cards, sealed again under :key_id.
UPDATE card_vault v
   SET sealed = r.sealed, key_id = :key_id
  FROM unnest(:payment_ids::text[], :sealed::bytea[]) AS r(payment_id, sealed)
 WHERE v.payment_id = r.payment_id;

-- name: cards_by_key
-- How many cards each key seals.
SELECT key_id, count(*) AS cards FROM card_vault GROUP BY key_id ORDER BY key_id;
