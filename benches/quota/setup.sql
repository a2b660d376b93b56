-- One tenant, hammered by every client: the worst case for a counter.
\set QUIET on
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS levqor;
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_app') THEN
    CREATE ROLE bench_app LOGIN IN ROLE levqor_app;
  END IF;
END $$;
CREATE TABLE bench_keys (n int PRIMARY KEY, tenant_id uuid NOT NULL, api_key text NOT NULL);
INSERT INTO bench_keys SELECT 1, c.tenant_id, c.api_key FROM levqor.create_tenant('bench-quota', 'Bench quota') c;
GRANT SELECT ON bench_keys TO bench_app;

-- The hand-written alternative: one counter row per tenant, bumped in the
-- transaction (no RLS on it, to spare it any extra cost).
CREATE TABLE counters (tenant_id uuid PRIMARY KEY, used bigint NOT NULL DEFAULT 0);
INSERT INTO counters SELECT tenant_id, 0 FROM bench_keys;
GRANT SELECT, UPDATE ON counters TO bench_app;

-- Row limits: two identical protected tables, one counted against a rows
-- metric with a (never reached) limit.
SELECT levqor.define_metric('bench_rows', 'rows', NULL, 1000000000);
CREATE TABLE items_plain (id bigserial PRIMARY KEY, body text NOT NULL);
CREATE TABLE items_limited (id bigserial PRIMARY KEY, body text NOT NULL);
SELECT levqor.enable_tenancy('items_plain'), levqor.enable_tenancy('items_limited');
SELECT levqor.limit_rows('items_limited', 'bench_rows');
GRANT SELECT, INSERT ON items_plain, items_limited TO bench_app;
GRANT USAGE ON SEQUENCE items_plain_id_seq, items_limited_id_seq TO bench_app;
