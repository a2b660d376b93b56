-- Hand-written part of the 0.3.0 -> 0.4.0 update: changes to tables 0.3.0
-- already had, run before any new function is created.

-- Quota alerts get an id: the NOTIFY on levqor_quota carries only that.
ALTER TABLE levqor.quota_alerts ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT quota_alerts_id_key UNIQUE;
SELECT pg_catalog.pg_extension_config_dump('levqor.quota_alerts_id_seq', '');

-- Tables copied from protected tables with CREATE TABLE AS (sql/report.sql).
CREATE TABLE levqor.derived_tables (
    tbl        regclass PRIMARY KEY,
    sources    regclass[] NOT NULL,
    bypassed   boolean NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.derived_tables', '');

-- The sidecar's roles (sql/catalog.sql).
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_sidecar') THEN
        CREATE ROLE levqor_sidecar NOLOGIN NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_backup') THEN
        CREATE ROLE levqor_backup NOLOGIN NOBYPASSRLS;
    END IF;
END
$roles$;
