-- The same rows in two distributed tables on a coordinator and two workers;
-- run as a superuser on the coordinator.
\set QUIET on
\set ON_ERROR_STOP on
CREATE ROLE bench_app LOGIN IN ROLE levqor_app;

-- 200 tenants; bench_keys stands in for the application's copy of each key
-- (both variants read it the same way, on the coordinator).
CREATE TABLE bench_keys (n int PRIMARY KEY, tenant_id uuid NOT NULL, api_key text NOT NULL);
INSERT INTO bench_keys
SELECT g, c.tenant_id, c.api_key
  FROM generate_series(1, 200) g,
       LATERAL levqor.create_tenant('bench-' || g, 'Bench tenant ' || g) c;

-- (a) what activerecord-multi-tenant and django-multitenant do: no RLS, the
-- application resolves the tenant and adds WHERE tenant_id = $1 itself.
CREATE TABLE app_api_keys (key_hash bytea PRIMARY KEY, tenant_id uuid NOT NULL);
INSERT INTO app_api_keys SELECT sha256(convert_to(api_key, 'UTF8')), tenant_id FROM bench_keys;
CREATE TABLE items_plain (id bigint NOT NULL, tenant_id uuid NOT NULL, body text NOT NULL, PRIMARY KEY (tenant_id, id));
SELECT create_distributed_table('items_plain', 'tenant_id');
INSERT INTO items_plain
SELECT r, k.tenant_id, md5(k.n::text || '-' || r) FROM bench_keys k, generate_series(1, 500) r;

-- (b) levqor: the same table protected and distributed by levqor.distribute;
-- the rows are loaded as the superuser (row level security does not apply).
CREATE TABLE items_levqor (id bigint NOT NULL, tenant_id uuid NOT NULL, body text NOT NULL, PRIMARY KEY (tenant_id, id));
SELECT levqor.distribute('items_levqor');
INSERT INTO items_levqor SELECT * FROM items_plain;

GRANT SELECT ON bench_keys, app_api_keys TO bench_app;
GRANT SELECT, UPDATE ON items_plain, items_levqor TO bench_app;
VACUUM ANALYZE;
