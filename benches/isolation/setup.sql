-- Same data for the three ways of isolating tenants; run as a superuser.
\set QUIET on
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS levqor;
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_app') THEN
    CREATE ROLE bench_app LOGIN IN ROLE levqor_app;
  END IF;
END $$;

-- 1,000 tenants, created the levqor way; bench_keys stands in for the
-- application's copy of each tenant's key (all three variants read it the same way).
CREATE TABLE bench_keys (n int PRIMARY KEY, tenant_id uuid NOT NULL, api_key text NOT NULL);
INSERT INTO bench_keys
SELECT g, c.tenant_id, c.api_key
  FROM generate_series(1, 1000) g,
       LATERAL levqor.create_tenant('bench-' || g, 'Bench tenant ' || g) c;

-- (a) no RLS: the application looks the key up itself and filters by hand.
CREATE TABLE app_api_keys (key_hash bytea PRIMARY KEY, tenant_id uuid NOT NULL);
INSERT INTO app_api_keys SELECT sha256(convert_to(api_key, 'UTF8')), tenant_id FROM bench_keys;

CREATE TABLE items_plain (id bigint PRIMARY KEY, tenant_id uuid NOT NULL, body text NOT NULL);
INSERT INTO items_plain
SELECT (k.n - 1) * 200 + r, k.tenant_id, md5(k.n::text || '-' || r)
  FROM bench_keys k, generate_series(1, 200) r;
CREATE INDEX ON items_plain (tenant_id);

-- (b) the usual hand-written policy on a custom setting.
CREATE TABLE items_setting (LIKE items_plain INCLUDING ALL);
INSERT INTO items_setting SELECT * FROM items_plain;
ALTER TABLE items_setting ENABLE ROW LEVEL SECURITY;
ALTER TABLE items_setting FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON items_setting
    USING (tenant_id = current_setting('app.tenant', true)::uuid)
    WITH CHECK (tenant_id = current_setting('app.tenant', true)::uuid);

-- (c) levqor.
CREATE TABLE items_levqor (LIKE items_plain INCLUDING ALL);
INSERT INTO items_levqor SELECT * FROM items_plain;
SELECT levqor.enable_tenancy('items_levqor');

-- (d) the same tenants, each with a member (an operator) holding a key
-- issued for that user: authenticate() checks the membership too.
CREATE TABLE bench_user_keys (n int PRIMARY KEY, api_key text NOT NULL);
DO $$
DECLARE
    k record;
    u uuid;
BEGIN
    FOR k IN SELECT n, tenant_id FROM bench_keys ORDER BY n LOOP
        u := gen_random_uuid();
        PERFORM levqor.add_member(k.tenant_id::text, u, 'operator');
        INSERT INTO bench_user_keys VALUES (k.n, levqor.issue_key(k.tenant_id::text, 'operator', user_id => u));
    END LOOP;
END $$;

GRANT SELECT ON bench_keys, app_api_keys, bench_user_keys TO bench_app;
GRANT SELECT, UPDATE ON items_plain, items_setting, items_levqor TO bench_app;
VACUUM ANALYZE;
