-- The gateway's whole schema. Applied by `gatewayctl migrate`: every
-- statement is idempotent, so it is safe to run twice and on a live database.

CREATE TABLE IF NOT EXISTS payments (
    id                        text PRIMARY KEY,            -- pay_<32 hex>
    merchant                  text NOT NULL,               -- the API key's caller name: scope of everything
    order_id                  text NOT NULL,
    customer_id               text NOT NULL,
    amount                    bigint NOT NULL CHECK (amount > 0),
    currency                  text NOT NULL CHECK (currency = 'USD'),
    status                    text NOT NULL CHECK (status IN (
                                  'pending', 'authorized', 'capturing', 'captured', 'voiding',
                                  'voided', 'refunding', 'refunded', 'declined', 'expired')),
    card_brand                text NOT NULL,
    card_last4                text NOT NULL CHECK (card_last4 ~ '^[0-9]{4}$'),
    card_expiry_month         smallint NOT NULL CHECK (card_expiry_month BETWEEN 1 AND 12),
    card_expiry_year          smallint NOT NULL,
    authorization_id          text,
    authorization_expires_at  timestamptz,
    capture_id                text,
    void_id                   text,
    refund_id                 text,
    last_error                jsonb,
    attention_required        boolean NOT NULL DEFAULT false,
    created_at                timestamptz NOT NULL,
    updated_at                timestamptz NOT NULL
) WITH (fillfactor = 80);

-- One live payment per order: declined, voided and expired ones make room for a new attempt.
CREATE UNIQUE INDEX IF NOT EXISTS payments_one_live_per_order
    ON payments (merchant, order_id) WHERE status NOT IN ('declined', 'voided', 'expired');
CREATE INDEX IF NOT EXISTS payments_by_order ON payments (merchant, order_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS payments_by_customer ON payments (merchant, customer_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS payments_hold_expiry ON payments (authorization_expires_at) WHERE status = 'authorized';
-- Payments flagged for ops, few at any time: workers count them every few seconds (a gauge).
CREATE INDEX IF NOT EXISTS payments_flagged ON payments (id) WHERE attention_required;

CREATE TABLE IF NOT EXISTS payment_history (
    id          bigserial PRIMARY KEY,
    payment_id  text NOT NULL REFERENCES payments (id),
    status      text NOT NULL,
    cause       text NOT NULL,                               -- what moved it: api, bank outcome, sweeper...
    at          timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS payment_history_by_payment ON payment_history (payment_id, id);

CREATE TABLE IF NOT EXISTS operations (
    id                text PRIMARY KEY,                     -- op_<32 hex>
    payment_id        text NOT NULL REFERENCES payments (id),
    kind              text NOT NULL CHECK (kind IN ('authorize', 'capture', 'void', 'refund', 'release')),
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    -- Sent to the bank on every attempt; built from our own id, never from client input.
    bank_key          text NOT NULL UNIQUE,
    attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- A worker holds the lease while a bank call may be running, so no second
    -- request for the same operation can start before the first is over.
    lease_owner       text,
    lease_until       timestamptz,
    parked            boolean NOT NULL DEFAULT false,       -- in the dead-letter queue
    -- Its park raised the payment's attention_required: a replay lowers that flag, and
    -- only then (a flag that was up already, a possible second hold, stays for a human).
    flagged_payment   boolean NOT NULL DEFAULT false,
    -- Attempts known to have done nothing (refused, never sent, the contract's 500).
    -- Every other attempt may have done the work without our learning it (the answer
    -- was lost, or its handler died): one such makes an "already done" refusal proof
    -- of our own work and a fresh approval a possible second hold; two make even a
    -- replayed approval one (the other may have held money too).
    clean_attempts    integer NOT NULL DEFAULT 0 CHECK (clean_attempts >= 0),
    -- The others, once reported (an attempt is reported when its handler next writes, or
    -- by the claim that takes over from a handler that stopped): what is known of each,
    -- for a finding to say which attempt may have done the work, when, and how it ended
    -- ({"attempt", "at", "worker", "code", "message"}; null while there is none).
    lost_answers      jsonb,
    claimed_at        timestamptz,                          -- the latest attempt's claim
    last_error        jsonb,
    bank_response     jsonb,
    bank_ms           integer NOT NULL DEFAULT 0,           -- time spent waiting for the bank
    first_attempt_at  timestamptz,
    -- What decides a worker's next step is kept here, never in a message header (anyone who
    -- can publish could set one): retry-ladder rungs taken since the operation started or
    -- ops last replayed it, and whether that replay was forced (an authorization older than
    -- the bank's key horizon is sent anyway: ops checked the bank for a hold).
    rungs             integer NOT NULL DEFAULT 0 CHECK (rungs >= 0),
    forced_replay     boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    finished_at       timestamptz
) WITH (fillfactor = 80);
ALTER TABLE operations ADD COLUMN IF NOT EXISTS clean_attempts integer NOT NULL DEFAULT 0
    CHECK (clean_attempts >= 0);
-- Operations parked before this column existed read false: their replay leaves the flag up.
ALTER TABLE operations ADD COLUMN IF NOT EXISTS flagged_payment boolean NOT NULL DEFAULT false;
ALTER TABLE operations ADD COLUMN IF NOT EXISTS lost_answers jsonb;
ALTER TABLE operations ADD COLUMN IF NOT EXISTS claimed_at timestamptz;
-- Before these, the rungs and a forced replay travelled in the command's headers (x-retries,
-- x-force), now ignored: an operation on the ladder at the upgrade starts it again, and an old
-- authorization forced then parks again (bank_key_expired) until ops force it once more.
ALTER TABLE operations ADD COLUMN IF NOT EXISTS rungs integer NOT NULL DEFAULT 0 CHECK (rungs >= 0);
ALTER TABLE operations ADD COLUMN IF NOT EXISTS forced_replay boolean NOT NULL DEFAULT false;
-- Room on each page for the updates a payment and its operations go through, so that
-- those touching no indexed column (a claim, for one) stay on the page (HOT).
ALTER TABLE payments SET (fillfactor = 80);
ALTER TABLE operations SET (fillfactor = 80);
-- One operation in flight per payment.
CREATE UNIQUE INDEX IF NOT EXISTS operations_one_in_flight
    ON operations (payment_id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS operations_by_payment ON operations (payment_id, created_at);
CREATE INDEX IF NOT EXISTS operations_pending ON operations (updated_at) WHERE status = 'pending';

-- The card for an authorization still to be sent, AES-GCM encrypted; deleted
-- in the transaction that records the authorization's final outcome.
CREATE TABLE IF NOT EXISTS card_vault (
    payment_id  text PRIMARY KEY REFERENCES payments (id),
    sealed      bytea NOT NULL,
    key_id      text NOT NULL,                           -- the card key it is sealed under (gateway/cards.py)
    created_at  timestamptz NOT NULL
);
-- Cards sealed before keys had ids were sealed under CARD_ENCRYPTION_KEY, whose id is "default".
ALTER TABLE card_vault ADD COLUMN IF NOT EXISTS key_id text NOT NULL DEFAULT 'default';
ALTER TABLE card_vault ALTER COLUMN key_id DROP DEFAULT;
-- The vault and the outbox empty out from their end as fast as they fill: a VACUUM
-- would cut the empty pages off the end under an ACCESS EXCLUSIVE lock, which holds
-- up every insert (every payment's commit) meanwhile, for pages refilled moments later.
ALTER TABLE card_vault SET (vacuum_truncate = false);

-- Responses to the gateway's own POSTs. A row is only ever committed together
-- with the work it answers, so a key either has its final response or nothing;
-- "in progress" is a transaction-scoped advisory lock on the key.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    merchant         text NOT NULL,
    key              text NOT NULL,
    method           text NOT NULL,
    path             text NOT NULL,
    fingerprint      text NOT NULL,                          -- gateway/fingerprints.py: keyed, no card data
    response_status  smallint NOT NULL,
    response_body    bytea NOT NULL,
    location         text,
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (merchant, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys (created_at);
-- Fingerprints of an earlier version were a plain SHA-256 of the body, CVV and card number
-- included: a guessable digest of card data. They are overwritten, not kept; such a key
-- still replays its answer to the same method and path (its body can no longer be compared).
UPDATE idempotency_keys SET fingerprint = 'legacy' WHERE fingerprint NOT LIKE 'hmac1:%' AND fingerprint <> 'legacy';

-- Messages to publish: written in the same transaction as the state they announce.
CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    exchange      text NOT NULL,
    routing_key   text NOT NULL,
    message_id    text NOT NULL,
    body          bytea NOT NULL,
    headers       jsonb,                                   -- AMQP headers (merchant of an event, trace context)
    created_at    timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS headers jsonb;
-- A row lives until the broker confirmed it: the relay deletes what it published (every
-- row here is unsent). Deleting costs no index entries; marking rows sent and pruning
-- them later cost two writes each. (An outbox of an earlier version kept sent rows.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
                WHERE table_schema = current_schema() AND table_name = 'outbox' AND column_name = 'published_at') THEN
        DELETE FROM outbox WHERE published_at IS NOT NULL;
        ALTER TABLE outbox DROP COLUMN published_at;
    END IF;
END $$;
ALTER TABLE outbox SET (vacuum_truncate = false);  -- as card_vault's, above
DROP INDEX IF EXISTS outbox_unsent;
DROP INDEX IF EXISTS outbox_sent_age;
-- Events went to one exchange, payments.events, shared by every merchant, before each
-- merchant had its own (payments.events.<merchant>, which only its broker account reads):
-- an event still unsent from then goes to its merchant's exchange.
UPDATE outbox
   SET exchange = 'payments.events.' || coalesce(headers ->> 'merchant',
                                                 convert_from(body, 'UTF8')::jsonb ->> 'merchant')
 WHERE exchange = 'payments.events'
   AND coalesce(headers ->> 'merchant', convert_from(body, 'UTF8')::jsonb ->> 'merchant') IS NOT NULL;

-- What reconciliation found where our receipts and the bank disagree.
CREATE TABLE IF NOT EXISTS reconciliation_findings (
    id          bigserial PRIMARY KEY,
    run_id      text NOT NULL,
    payment_id  text NOT NULL REFERENCES payments (id),
    kind        text NOT NULL,
    detail      jsonb NOT NULL,
    repaired    boolean NOT NULL DEFAULT false,
    found_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS reconciliation_findings_by_run ON reconciliation_findings (run_id);

-- Each gateway-worker's bank circuit breaker as it last reported it: the ops
-- console shows it (a row not rewritten for a few minutes is shown as stale:
-- its worker is gone or stuck). Written by the worker on every change and
-- periodically, so changed_at is the time of the last report.
CREATE TABLE IF NOT EXISTS bank_circuit (
    worker_id   text PRIMARY KEY,
    open        boolean NOT NULL,
    changed_at  timestamptz NOT NULL,
    detail      text
);

-- Wake the relay when there is something to publish.
-- The relay drains the outbox until it is empty before it waits again, so a
-- NOTIFY is only needed when no older row is still unsent. Skipping it under
-- load matters: a committing transaction that notified holds a database-wide
-- lock through its commit, which serialises every submit.
CREATE OR REPLACE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM outbox o WHERE o.id < (SELECT min(id) FROM inserted)) THEN
        PERFORM pg_notify('outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER outbox_inserted AFTER INSERT ON outbox REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();

-- A change of a payment wakes the long polls with its id (and makes the API
-- processes forget what they remember of it, gateway/api/longpoll.py). Except
-- where a payment leaves an in-progress status: the statements doing that send
-- the wake-up themselves, the worker's (finish_operations) with the payment in
-- it, so that a waiting long poll answers without reading it.
CREATE OR REPLACE FUNCTION notify_payment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('payment_updated', NEW.id);
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER payment_updated AFTER UPDATE ON payments
    FOR EACH ROW
    WHEN (NOT (OLD.status IN ('pending', 'capturing', 'voiding', 'refunding')
               AND NEW.status NOT IN ('pending', 'capturing', 'voiding', 'refunding')))
    EXECUTE FUNCTION notify_payment();

-- The advisory-lock key of a merchant's idempotency key: "a request with this
-- key is running" is a transaction-scoped lock on it (gateway/sql/intake.sql).
-- The unit separator keeps ('ab', 'c') and ('a', 'bc') apart. IMMUTABLE and
-- plain SQL, so the planner inlines it: no function call per statement.
CREATE OR REPLACE FUNCTION idempotency_lock_key(merchant text, key text) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtextextended(merchant || E'\x1f' || key, 0)
$$;

-- A payment's history as the receipt shows it: each status it entered, oldest
-- first; timestamps in the API's format. The one part of the receipt built in
-- SQL: gateway.views.receipt defines the shape, Payment.entering adds entries
-- the same way, tests/integration/test_receipts.py holds the two equal. A row that left the status where it
-- was (ops resolving a flag, or abandoning the release of an expired hold:
-- each names who and why in its cause) is for ops, who read every row with
-- `gatewayctl dlq show`; FicMart sees statuses, one event for each.
-- PL/pgSQL rather than SQL: a SQL function called from another statement has its
-- query planned on every call (0.11 of the 0.17 ms of planning per payment); PL/pgSQL
-- keeps the plan for the session.
CREATE OR REPLACE FUNCTION payment_history_json(pid text) RETURNS json LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT coalesce(json_agg(json_build_object(
                   'status', h.status,
                   'at', to_char(h.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) ORDER BY h.id), '[]')
          FROM (SELECT id, status, at, lag(status) OVER (ORDER BY id) AS before
                  FROM payment_history
                 WHERE payment_id = pid) h
         WHERE h.before IS DISTINCT FROM h.status);
END
$$;

-- The events feed (GET /v1/events) and the webhooks' source: every payment event written
-- to the outbox, kept EVENT_RETENTION_DAYS (30) after the relay has deleted its outbox row.
-- `txid` is the writing transaction's id. A reader orders by (txid, id) and shows only
-- events of transactions older than every transaction still running
-- (pg_snapshot_xmin): an event committed late belongs to a transaction that was running
-- when a reader looked, so the reader had not gone past it, and a cursor never skips it.
-- No counter row serialises the payment transactions (docs/api.md, TRADEOFFS.md).
CREATE TABLE IF NOT EXISTS events (
    id          bigserial PRIMARY KEY,
    merchant    text NOT NULL,
    event_id    text NOT NULL UNIQUE,                   -- evt_..., the body's event_id
    body        bytea NOT NULL,                         -- exactly the RabbitMQ message's body
    txid        bigint NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS events_feed ON events (merchant, txid, id);
CREATE INDEX IF NOT EXISTS events_age ON events (created_at);

-- A merchant's webhook endpoint (gatewayctl webhooks, /ops): every event of the merchant is
-- POSTed to it, signed (gateway/webhook_rules.py). Secrets are sealed with AES-GCM under a key
-- derived from CARD_ENCRYPTION_KEY, so a reader of the database cannot sign a request.
CREATE TABLE IF NOT EXISTS webhook_endpoints (
    merchant          text PRIMARY KEY,
    url               text NOT NULL,
    enabled           boolean NOT NULL DEFAULT true,
    secret            bytea NOT NULL,
    -- The secret before the last rotation, still signed with until old_secret_until.
    old_secret        bytea,
    old_secret_until  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- One delivery per event of a merchant with an enabled endpoint (gateway-webhooks), written
-- with the event. Pending until a 2xx (delivered) or until the retries run out (failed: shown
-- by gatewayctl webhooks failed and /ops, from where it is resent). A claimed delivery's
-- next_attempt_at is pushed past the attempt (a lease): a deliverer that dies leaves it due again.
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    event_id         bigint PRIMARY KEY REFERENCES events (id) ON DELETE CASCADE,
    merchant         text NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    retry_since      timestamptz NOT NULL DEFAULT now(),  -- the retry window (3 days) starts here
    last_error       text,
    finished_at      timestamptz
);
-- Per endpoint, so that a claim reads only what each enabled endpoint with room may take: a
-- backlog behind a slow or disabled endpoint is never scanned for the others.
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (merchant, next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_failed ON webhook_deliveries (merchant, finished_at) WHERE status = 'failed';

-- Every event row of the outbox is recorded as it is written, in its transaction, whatever
-- statement writes it, with a delivery when its merchant has an enabled webhook endpoint.
-- The relay putting back a row it could not publish records nothing twice.
CREATE OR REPLACE FUNCTION record_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH recorded AS (
        INSERT INTO events (merchant, event_id, body, created_at)
        SELECT i.headers ->> 'merchant', i.message_id, i.body, i.created_at
          FROM inserted i
         WHERE i.exchange LIKE 'payments.events%' AND i.headers ? 'merchant'
        ON CONFLICT (event_id) DO NOTHING
        RETURNING id, merchant)
    INSERT INTO webhook_deliveries (event_id, merchant)
    SELECT r.id, r.merchant
      FROM recorded r JOIN webhook_endpoints w ON w.merchant = r.merchant AND w.enabled;
    RETURN NULL;
END $$;

CREATE OR REPLACE TRIGGER outbox_events AFTER INSERT ON outbox REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION record_events();
