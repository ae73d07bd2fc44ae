-- The database as a whole (gateway/store/database.py): `gatewayctl migrate`'s lock and
-- what it reports as created, and the readiness probe.

-- name: schema_objects
-- What `gatewayctl migrate` can report as created: tables, indexes, functions
-- and triggers of the current schema.
SELECT 'table' AS kind, c.relname AS name
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
UNION ALL
SELECT 'index', c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND c.relkind = 'i'
UNION ALL
SELECT 'function', p.proname
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = current_schema()
UNION ALL
SELECT 'trigger', t.tgname
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = current_schema() AND NOT t.tgisinternal;

-- name: lock_migrations$
-- One `gatewayctl migrate` at a time: held until its transaction ends.
SELECT pg_advisory_xact_lock(:lock);

-- name: ping$
-- The readiness probe: the database answers.
SELECT 1;
