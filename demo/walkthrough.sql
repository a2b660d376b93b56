-- levqor walkthrough: run by scripts/demo.sh, by the test suite, and quoted
-- in README.md. psql, connected as a superuser, in a scratch database.
\set ON_ERROR_STOP on
\set QUIET on
\pset footer off

\echo '== 1. Install levqor and make an application login role'
CREATE EXTENSION levqor;
CREATE ROLE demo_app LOGIN IN ROLE levqor_app;

\echo '== 2. A table the application uses, protected by levqor'
CREATE TABLE projects (
    id    bigserial PRIMARY KEY,
    name  text NOT NULL
);
SELECT levqor.enable_tenancy('projects');
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON projects TO demo_app;
GRANT USAGE ON SEQUENCE projects_id_seq TO demo_app;

\echo '== 3. Two tenants; each API key is shown once'
SELECT tenant_id AS acme_id, api_key AS acme_key
  FROM levqor.create_tenant('acme', 'Acme Corp', plan => 'starter') \gset
SELECT tenant_id AS globex_id, api_key AS globex_key
  FROM levqor.create_tenant('globex', 'Globex Inc', plan => 'professional') \gset
SELECT slug, plan, status FROM levqor.tenants ORDER BY slug;

\echo '== 4. The application acts for a tenant by presenting its key, per transaction'
SET ROLE demo_app;
BEGIN;
SELECT levqor.authenticate(:'acme_key') AS acting_for;
INSERT INTO projects (name) VALUES ('rocket skates'), ('giant magnet');
COMMIT;
BEGIN;
SELECT levqor.authenticate(:'globex_key') AS acting_for;
INSERT INTO projects (name) VALUES ('doomsday device');
COMMIT;

\echo '== 5. Each tenant sees only its own rows'
BEGIN;
SELECT levqor.authenticate(:'acme_key') IS NOT NULL AS acme;
SELECT name FROM projects ORDER BY name;
COMMIT;
BEGIN;
SELECT levqor.authenticate(:'globex_key') IS NOT NULL AS globex;
SELECT name FROM projects ORDER BY name;
COMMIT;

\echo '== 6. No context, no rows (fail closed)'
SELECT count(*) AS rows_without_context FROM projects;

\echo '== 7. Attacks that fail'
\set ON_ERROR_STOP off
\set VERBOSITY terse
\echo '-- forging the context:'
SET levqor.context = 'v1 00000000-0000-0000-0000-000000000000 - admin api_key';
SELECT set_config('levqor.context', 'anything', false);
\echo '-- a wrong key:'
SELECT levqor.authenticate('lvq_0123456789abcdef_not-the-right-secret-not-the-right-secret');
\echo '-- acme writing a row into globex:'
BEGIN;
SELECT levqor.authenticate(:'acme_key') IS NOT NULL AS acme;
INSERT INTO projects (name, tenant_id) VALUES ('planted', :'globex_id');
ROLLBACK;
\echo '-- wiping every tenant at once:'
TRUNCATE projects;
\set VERBOSITY default
\set ON_ERROR_STOP on
SELECT count(*) AS rows_without_context_still FROM projects;

\echo '== 8. What the superuser sees: every row, each with its tenant'
RESET ROLE;
SELECT t.slug, p.name
  FROM projects p JOIN levqor.tenants t ON t.id = p.tenant_id
 ORDER BY t.slug, p.name;
