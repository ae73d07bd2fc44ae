-- The worker's phases (gateway/store/settlement.py): an operation's bank attempts claimed
-- under a lease and reported, its outcome recorded or the operation parked for ops, and
-- the bank work an outcome makes necessary.
--
-- The statements that take a batch of operations by id test `(o.status = 'pending') IS
-- TRUE`, not `o.status = 'pending'`: the same test, which the partial indexes on pending
-- operations cannot serve, so that each operation is found by its key. With the plain
-- form the planner chose, whenever its estimate of pending operations was stale (a
-- backlog grows faster than autoanalyze runs: an overload, the bank back after an
-- outage), a hash join over EVERY pending operation, once per batch: draining a backlog
-- of 5,000 cost PostgreSQL about 3 ms of CPU per payment instead of 0.6 (bench
-- --scenario overload; tests/integration/test_query_plans.py keeps it so).

-- name: claim_operations
-- Take the lease for one bank attempt of each operation asked for (`owners[i]`
-- for `operation_ids[i]`, for `lease_seconds[i]`; the worker sends the claims of its concurrent handlings
-- together, gateway/batching.py). An operation is not claimed (no row) when it is
-- finished or another worker's lease has not run out: a bank call of that
-- worker may still be running, and the bank has no in-flight lock. A parked
-- operation waits for ops (unpark_operation) and is not claimed either. Asked
-- twice in one batch (a duplicate command), an operation goes to one owner: the
-- row's `owner` says which.
-- (updated_at, which is indexed, is left alone: the lease says the operation is
-- being worked on, and an update touching no indexed column can stay on its page.)
-- A claim is the last step before the bank request is written out, so an attempt
-- counted here may have reached the bank. Its handler reports it (clean_attempts,
-- lost_answers) when it next writes; one still unreported when the operation is
-- claimed again belongs to a handler that stopped (killed, or cut off from the
-- database) after claiming it: it goes into lost_answers as `worker_stopped`.
WITH asked AS (
    SELECT * FROM unnest(:operation_ids::text[], :owners::text[], :lease_seconds::float8[])
                      AS a(operation_id, owner, lease_seconds)
), claimed AS (
    UPDATE operations o
       SET attempts = o.attempts + 1,
           lease_owner = a.owner,
           lease_until = now() + make_interval(secs => a.lease_seconds),
           first_attempt_at = coalesce(o.first_attempt_at, now()),
           claimed_at = now(),
           lost_answers = CASE
               WHEN o.attempts > o.clean_attempts + coalesce(jsonb_array_length(o.lost_answers), 0)
               THEN coalesce(o.lost_answers, '[]') || jsonb_build_array(jsonb_build_object(
                        'attempt', o.attempts, 'at', o.claimed_at, 'worker', o.lease_owner,
                        'code', 'worker_stopped'))
               ELSE o.lost_answers END
      FROM asked a
     WHERE o.id = a.operation_id AND (o.status = 'pending') IS TRUE AND NOT o.parked
       AND (o.lease_until IS NULL OR o.lease_until < now() OR o.lease_owner = a.owner)
    RETURNING o.*
)
-- unknown_outcomes: the earlier attempts not known to have done nothing (their
-- answer was lost, or their handler died before saying). With the payment as it
-- stands, history included: while this lease is held nothing
-- else changes it (one operation in flight per payment), so the outcome is recorded
-- from this snapshot without reading it again.
SELECT c.lease_owner AS owner, c.id AS operation_id, c.kind AS operation_kind, c.bank_key, c.attempts,
       c.first_attempt_at, c.attempts - 1 - c.clean_attempts AS unknown_outcomes, c.lost_answers,
       c.rungs, c.forced_replay,
       p.*, payment_history_json(p.id) AS history, v.sealed, v.key_id AS card_key_id
  FROM claimed c
  JOIN payments p ON p.id = c.payment_id
  LEFT JOIN card_vault v ON v.payment_id = c.payment_id;

-- name: operation_state^
SELECT o.id, o.kind, o.status, o.parked, o.attempts, o.first_attempt_at, o.payment_id, o.last_error,
       greatest(extract(epoch FROM o.lease_until - now()), 0)::float8 AS lease_left
  FROM operations o
 WHERE o.id = :operation_id;

-- name: release_lease!
-- The lease given back, with the report of the holder's attempts not reported yet, and one
-- more rung counted when the operation goes to the next rung of the retry ladder.
UPDATE operations SET lease_owner = NULL, lease_until = NULL, last_error = :error,
                      rungs = rungs + CASE WHEN :rung_taken::boolean THEN 1 ELSE 0 END,
                      bank_ms = bank_ms + :bank_ms,
                      clean_attempts = clean_attempts + :clean_attempts,
                      lost_answers = nullif(coalesce(lost_answers, '[]') || :lost_answers::jsonb, '[]'),
                      updated_at = now()
 WHERE id = :operation_id AND lease_owner = :owner AND status = 'pending';

-- name: note_attempts
-- What the lease holders learnt of their latest attempts, reported at once (one row
-- per holder: the worker sends those of its concurrent handlings together) rather
-- than with the next claim or release, so that an attempt known to have done
-- nothing is not counted as one that may have, should the handler die before then.
-- Returns the operations noted (none when the lease is no longer the owner's).
-- (updated_at is left alone, as by a claim.)
WITH noted AS (
    SELECT * FROM unnest(:operation_ids::text[], :owners::text[], :clean_attempts::integer[],
                         :lost_answers::text[])
                      AS n(operation_id, owner, clean_attempts, lost_answers)
)
UPDATE operations o
   SET clean_attempts = o.clean_attempts + n.clean_attempts,
       lost_answers = nullif(coalesce(o.lost_answers, '[]') || n.lost_answers::jsonb, '[]')
  FROM noted n
 WHERE o.id = n.operation_id AND o.lease_owner = n.owner AND (o.status = 'pending') IS TRUE
RETURNING o.id;

-- name: lock_operation^
-- The operation with its payment, both locked, while it is still pending.
SELECT o.id AS operation_id, o.kind, o.bank_key, p.*, payment_history_json(p.id) AS history
  FROM operations o
  JOIN payments p ON p.id = o.payment_id
 WHERE o.id = :operation_id AND o.status = 'pending'
   FOR UPDATE;

-- name: finish_operations
-- Final outcomes, one per row of the arrays (the worker sends those of its
-- concurrent handlings together, gateway/batching.py): the operation, the
-- payment (with a history row when the status moves), the sealed card gone once
-- the authorization is decided, the completion event, and the payment as it now
-- reads to the API's long polls (NOTIFY at commit, after the trigger's bare
-- one). Returns the (operation, owner) pairs recorded; one is missing when the
-- lease is no longer the owner's (another handling records it). A bank id left null keeps
-- the payment's value. attention_required is left as it is: the operation itself
-- was not parked (or ops' unpark cleared its flag), and a flag for a human
-- (reconciliation, a doubt) stays until one has looked.
WITH settled AS (
    SELECT *
      FROM unnest(:operation_ids::text[], :owners::text[], :operation_statuses::text[], :ats::timestamptz[],
                  :errors::jsonb[], :bank_responses::jsonb[], :bank_ms::integer[], :payment_statuses::text[],
                  :authorization_ids::text[], :authorization_expires_ats::timestamptz[], :capture_ids::text[],
                  :void_ids::text[], :refund_ids::text[], :causes::text[], :statuses_moved::boolean[],
                  :drop_cards::boolean[], :event_exchanges::text[], :event_routing_keys::text[],
                  :event_message_ids::text[], :event_bodies::bytea[], :event_headers::jsonb[], :notifies::text[])
           WITH ORDINALITY
        AS s(operation_id, owner, operation_status, at, error, bank_response, bank_ms, payment_status,
             authorization_id, authorization_expires_at, capture_id, void_id, refund_id, cause, status_moved,
             drop_card, event_exchange, event_routing_key, event_message_id, event_body, event_headers, notify, n)
), operation AS (
    UPDATE operations o
       SET status = s.operation_status, finished_at = s.at, updated_at = s.at, last_error = s.error,
           bank_response = s.bank_response, bank_ms = o.bank_ms + s.bank_ms,
           lease_owner = NULL, lease_until = NULL, parked = false
      FROM settled s
     WHERE o.id = s.operation_id AND (o.status = 'pending') IS TRUE AND o.lease_owner = s.owner
    RETURNING o.payment_id, s.n
), payment AS (
    UPDATE payments p
       SET status = s.payment_status, last_error = s.error, updated_at = s.at,
           authorization_id = coalesce(s.authorization_id, p.authorization_id),
           authorization_expires_at = coalesce(s.authorization_expires_at, p.authorization_expires_at),
           capture_id = coalesce(s.capture_id, p.capture_id),
           void_id = coalesce(s.void_id, p.void_id),
           refund_id = coalesce(s.refund_id, p.refund_id)
      FROM operation o JOIN settled s ON s.n = o.n
     WHERE p.id = o.payment_id
    RETURNING p.id, s.n
), history AS (
    INSERT INTO payment_history (payment_id, status, cause, at)
    SELECT p.id, s.payment_status, s.cause, s.at
      FROM payment p JOIN settled s ON s.n = p.n
     WHERE s.status_moved
     ORDER BY p.n
), vault AS (
    DELETE FROM card_vault v
     USING payment p JOIN settled s ON s.n = p.n
     WHERE v.payment_id = p.id AND s.drop_card
), event AS (
    INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
    SELECT s.event_exchange, s.event_routing_key, s.event_message_id, s.event_body, s.event_headers
      FROM payment p JOIN settled s ON s.n = p.n
     WHERE s.event_exchange IS NOT NULL
     ORDER BY p.n
)
SELECT s.operation_id, s.owner
  FROM payment p JOIN settled s ON s.n = p.n, LATERAL (SELECT pg_notify('payment_updated', s.notify)) AS w
 ORDER BY p.n;

-- name: park_operation!
-- Retries are exhausted: the operation waits in the dead-letter queue and the
-- payment shows attention_required, announced by an event. The operation
-- remembers whether its park raised the flag (the caller holds the payment's
-- row lock, so the flag read is the one this statement replaces).
WITH operation AS (
    UPDATE operations
       SET parked = true, last_error = :error, lease_owner = NULL, lease_until = NULL, updated_at = :at,
           flagged_payment = CASE WHEN parked THEN flagged_payment
                                  ELSE NOT (SELECT attention_required FROM payments WHERE id = payment_id) END
     WHERE id = :operation_id AND status = 'pending'
    RETURNING payment_id
), payment AS (
    UPDATE payments SET attention_required = true, last_error = :error, updated_at = :at
     WHERE id = (SELECT payment_id FROM operation)
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
SELECT :event_exchange, :event_routing_key, :event_message_id, :event_body, :event_headers FROM payment;

-- name: unpark_operation$
-- Ops replays a dead-lettered operation: it is back in the normal flow, at the
-- foot of the retry ladder, forced or not as ops said. The
-- payment's attention_required goes down only if this operation's park put it
-- up: a flag that was up before (a possible second hold) stays for a human.
WITH operation AS (
    SELECT id, payment_id, parked AND flagged_payment AS lowers_flag
      FROM operations
     WHERE id = :operation_id AND status = 'pending'
       FOR UPDATE
), unparked AS (
    UPDATE operations o SET parked = false, flagged_payment = false, rungs = 0, forced_replay = :forced,
                            updated_at = now()
      FROM operation WHERE o.id = operation.id
), payment AS (
    UPDATE payments SET attention_required = false, updated_at = now()
     WHERE id = (SELECT payment_id FROM operation WHERE lowers_flag)
)
SELECT payment_id FROM operation;

-- name: operation_kinds_tried
-- The kinds of the payment's other operations that ever reached the bank (an
-- attempt was made): what an "already done" refusal could be the work of.
SELECT DISTINCT kind FROM operations
 WHERE payment_id = :payment_id AND id <> :operation_id AND attempts > 0;

-- name: flag_doubt!
-- Recorded, but with a doubt only a human can clear (a bank reference the bank
-- never gave us, or a possible second hold): the payment is flagged with the
-- reason, announced, and, where it names one, a reconciliation finding is kept.
WITH payment AS (
    UPDATE payments SET attention_required = true, last_error = :error, updated_at = :at
     WHERE id = :payment_id
    RETURNING id
), finding AS (
    INSERT INTO reconciliation_findings (run_id, payment_id, kind, detail, repaired, found_at)
    SELECT :run_id, id, :finding_kind, :finding_detail, false, :at FROM payment
     WHERE :finding_kind::text IS NOT NULL
)
INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
SELECT :event_exchange, :event_routing_key, :event_message_id, :event_body, :event_headers FROM payment;

-- name: insert_operation!
-- Bank work the gateway starts by itself (the release of an expired hold).
WITH operation AS (
    INSERT INTO operations (id, payment_id, kind, bank_key, created_at, updated_at)
    VALUES (:operation_id, :payment_id, :kind, :bank_key, :at, :at)
    RETURNING id
)
INSERT INTO outbox (exchange, routing_key, message_id, body, headers)
SELECT :command_exchange, :command_routing_key, :command_message_id, :command_body, :command_headers FROM operation;
