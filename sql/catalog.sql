-- levqor catalog: roles, plans, tenants, keys, events, protected tables.
-- Runs first (bootstrap). Everything here is owned by the installing superuser
-- and closed to PUBLIC; grants.sql opens exactly what each levqor role needs.

DO $roles$
BEGIN
    -- Roles are cluster-wide and outlive the extension, so create them only
    -- when absent and never drop them.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_app') THEN
        CREATE ROLE levqor_app NOLOGIN NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_context_admin') THEN
        CREATE ROLE levqor_context_admin NOLOGIN NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_admin') THEN
        CREATE ROLE levqor_admin NOLOGIN NOBYPASSRLS;
    END IF;
    -- The sidecar's (docs/sidecar.md): billing, streams, metrics; never a
    -- tenant's context, never a tenant's rows.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_sidecar') THEN
        CREATE ROLE levqor_sidecar NOLOGIN NOBYPASSRLS;
    END IF;
    -- The sidecar's backups (docs/backups.md): reads and restores one tenant's
    -- rows at a time, through that tenant's context.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_backup') THEN
        CREATE ROLE levqor_backup NOLOGIN NOBYPASSRLS;
    END IF;
END
$roles$;

-- Plans and their limits (seed: tenant lifecycle ops doc, section 5.3).
-- A NULL limit means unlimited; enterprise "custom" limits are per-tenant
-- overrides (quota issue).
CREATE TABLE levqor.plans (
    name        text PRIMARY KEY CONSTRAINT plans_name_format CHECK (name ~ '^[a-z0-9_-]{1,63}$'),
    description text NOT NULL DEFAULT '',
    limits      jsonb NOT NULL DEFAULT '{}' CONSTRAINT plans_limits_object CHECK (jsonb_typeof(limits) = 'object'),
    features    text[] NOT NULL DEFAULT '{}',
    sla         text,
    builtin     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO levqor.plans (name, description, limits, features, sla, builtin) VALUES
  ('free', 'Free tier',
   '{"users": 5, "projects": 10, "storage_bytes": 104857600, "api_calls_per_15min": 100}',
   '{}', NULL, true),
  ('starter', 'Paid starter',
   '{"users": 20, "projects": 50, "storage_bytes": 1073741824, "api_calls_per_15min": 500}',
   '{templates}', '99%', true),
  ('professional', 'Professional tier',
   '{"users": 100, "projects": 200, "storage_bytes": 10737418240, "api_calls_per_15min": 2000}',
   '{templates,packs,marketplace}', '99.5%', true),
  ('enterprise', 'Enterprise tier (custom limits per tenant)',
   '{"users": null, "projects": null, "storage_bytes": null, "api_calls_per_15min": null}',
   '{templates,packs,marketplace,sso,scim,rbac,audit_stream,db_per_tenant}', '99.9%', true);

CREATE TABLE levqor.tenants (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    slug        text NOT NULL
                CONSTRAINT tenants_slug_key UNIQUE
                CONSTRAINT tenants_slug_format CHECK (slug ~ '^[a-z0-9_-]{1,63}$'),
    name        text NOT NULL
                CONSTRAINT tenants_name_format CHECK (length(btrim(name)) BETWEEN 1 AND 200 AND name !~ '[[:cntrl:]]'),
    plan        text NOT NULL DEFAULT 'free',   -- levqor.plans (name); see "References" below
    status      text NOT NULL DEFAULT 'active'
                CONSTRAINT tenants_status_check CHECK (status IN ('trial', 'active', 'suspended', 'offboarded')),
    region      text CONSTRAINT tenants_region_format CHECK (region ~ '^[a-z0-9-]{1,63}$'),
    isolation   text NOT NULL DEFAULT 'shared'
                CONSTRAINT tenants_isolation_check CHECK (isolation IN ('shared', 'schema')),
    parent      uuid,                           -- levqor.tenants (id)
    -- The hierarchy (sql/hierarchy.sql): platform -> tenant -> organization(s).
    kind        text NOT NULL DEFAULT 'tenant'
                CONSTRAINT tenants_kind_check CHECK (kind IN ('platform', 'tenant', 'organization')),
    settings    jsonb NOT NULL DEFAULT '{}' CONSTRAINT tenants_settings_object CHECK (jsonb_typeof(settings) = 'object'),
    -- Lifecycle (sql/lifecycle.sql). A suspended tenant without a mode is
    -- treated as blocked: fail closed.
    schema_name       name CONSTRAINT tenants_schema_name_key UNIQUE,
    suspension_mode   text CONSTRAINT tenants_suspension_mode_check CHECK (suspension_mode IN ('read_only', 'blocked')),
    suspension_reason text,
    trial_ends_at     timestamptz,
    offboarded_at     timestamptz,
    purge_after       timestamptz,
    -- Set by levqor.refresh_storage() (sql/quota.sql): at or over the
    -- storage limit, so inserts and updates are refused.
    storage_exceeded  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenants_parent_idx ON levqor.tenants (parent);
ALTER TABLE levqor.tenants
    ADD CONSTRAINT tenants_platform_has_no_parent CHECK (kind <> 'platform' OR parent IS NULL),
    ADD CONSTRAINT tenants_organization_has_parent CHECK (kind <> 'organization' OR parent IS NOT NULL);

-- Only the SHA-256 of a key is kept; key_id is the public half that finds it.
CREATE TABLE levqor.tenant_keys (
    key_id      text PRIMARY KEY CONSTRAINT tenant_keys_id_format CHECK (key_id ~ '^[0-9a-f]{16}$'),
    tenant_id   uuid NOT NULL,                  -- levqor.tenants (id), deleted with it
    key_hash    bytea NOT NULL CONSTRAINT tenant_keys_hash_len CHECK (length(key_hash) = 32),
    role        text NOT NULL DEFAULT 'admin'
                CONSTRAINT tenant_keys_role_check CHECK (role IN ('owner', 'admin', 'operator', 'auditor', 'viewer')),
    user_id     uuid,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name NOT NULL DEFAULT session_user,
    expires_at  timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX tenant_keys_tenant_idx ON levqor.tenant_keys (tenant_id);

-- References between levqor's catalog tables are kept by triggers, not by
-- foreign keys. pg_restore -j loads the data of an extension's tables in
-- parallel, each in its own transaction and in no particular order (pg_dump
-- records no dependency between them), so a foreign key among them fails the
-- load of whichever table comes first, and its rows are lost. The triggers
-- check what a foreign key checks (and lock the referenced row, FOR KEY
-- SHARE, as one does), except while a dump is being restored (a superuser
-- session with row_security = off, as pg_dump's scripts and pg_restore run):
-- the dump is of a consistent catalog, and its tables arrive in any order.
CREATE FUNCTION levqor._restoring() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT current_setting('row_security') = 'off'
           AND coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user), false)
$fn$;

-- AFTER INSERT OR UPDATE of the referencing column, FOR EACH ROW.
-- Arguments: the column, the referenced table, its column, their type.
CREATE FUNCTION levqor._check_reference() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    val text := to_jsonb(NEW) ->> TG_ARGV[0];
    hit int;
BEGIN
    IF val IS NULL OR levqor._restoring() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND (to_jsonb(OLD) ->> TG_ARGV[0]) IS NOT DISTINCT FROM val THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT 1 FROM %s WHERE %I = $1::%s FOR KEY SHARE', TG_ARGV[1], TG_ARGV[2], TG_ARGV[3]) INTO hit USING val;
    IF hit IS NULL THEN
        RAISE EXCEPTION 'insert or update on table "%" violates the reference of %.% to %', TG_TABLE_NAME,
            TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1]
            USING ERRCODE = '23503', DETAIL = format('Key (%s)=(%s) is not present in table %s.', TG_ARGV[0], val, TG_ARGV[1]);
    END IF;
    RETURN NULL;
END
$fn$;

-- What the foreign keys' ON DELETE / ON UPDATE did, for the catalog tables
-- that reference a tenant, a plan or a metric.
CREATE FUNCTION levqor._tenant_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.parent = OLD.id) THEN
        RAISE EXCEPTION 'tenant % still has tenants under it', OLD.slug USING ERRCODE = '23503';
    END IF;
    DELETE FROM levqor.tenant_keys k WHERE k.tenant_id = OLD.id;
    DELETE FROM levqor.members m WHERE m.tenant_id = OLD.id;
    DELETE FROM levqor.tenant_sso s WHERE s.tenant_id = OLD.id;
    DELETE FROM levqor.quota_overrides o WHERE o.tenant_id = OLD.id;
    RETURN NULL;
END
$fn$;

CREATE FUNCTION levqor._plan_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name IS DISTINCT FROM OLD.name THEN
            UPDATE levqor.tenants t SET plan = NEW.name WHERE t.plan = OLD.name;
        END IF;
    ELSIF EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.plan = OLD.name) THEN
        RAISE EXCEPTION 'plan % is in use by tenants', OLD.name USING ERRCODE = '23503',
            HINT = 'Move them to another plan first (levqor.change_plan).';
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER levqor_reference_plan AFTER INSERT OR UPDATE OF plan ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('plan', 'levqor.plans', 'name', 'text');
CREATE TRIGGER levqor_reference_parent AFTER INSERT OR UPDATE OF parent ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('parent', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_references AFTER DELETE ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._tenant_deleted();
CREATE TRIGGER levqor_references AFTER UPDATE OF name OR DELETE ON levqor.plans
    FOR EACH ROW EXECUTE FUNCTION levqor._plan_changed();
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.tenant_keys
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');

-- Who did what to which tenant. No foreign key: a purged tenant's events
-- stay as its tombstone. (The audit issue chains these entries.)
CREATE TABLE levqor.tenant_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid,
    event       text NOT NULL,
    actor       name NOT NULL DEFAULT session_user,
    detail      jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX tenant_events_tenant_idx ON levqor.tenant_events (tenant_id, id);

-- Inventory of tables under levqor tenancy (what enable_tenancy did).
-- The DDL guard does not trust this list; it reads the policies themselves,
-- so a dump restored in any order is still guarded.
CREATE TABLE levqor.protected_tables (
    tbl            regclass PRIMARY KEY,
    tenant_column  name NOT NULL,
    -- Set by enable_tenancy(tbl, tenant_column, scope_column): rows shared at
    -- organization, tenant or platform scope (sql/hierarchy.sql).
    scope_column   name,
    enabled_at     timestamptz NOT NULL DEFAULT now(),
    enabled_by     name NOT NULL DEFAULT session_user
);

-- The template for schema-isolation tenants: every table here is cloned
-- into each new tenant's schema (sql/schemas.sql).
CREATE SCHEMA IF NOT EXISTS levqor_template;
COMMENT ON SCHEMA levqor_template IS 'levqor: tables created here are cloned into every schema-isolation tenant';

-- What levqor.migrate() ran where.
CREATE TABLE levqor.migrations (
    name        text NOT NULL,
    schema_name name NOT NULL,
    status      text NOT NULL CONSTRAINT migrations_status_check CHECK (status IN ('done', 'failed')),
    error       text,
    attempts    int NOT NULL DEFAULT 1,
    ran_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    ran_by      name NOT NULL DEFAULT session_user,
    PRIMARY KEY (name, schema_name)
);

-- pg_dump keeps the rows of extension tables only when asked. Built-in plans
-- are recreated by CREATE EXTENSION, so only custom ones are dumped.
SELECT pg_catalog.pg_extension_config_dump('levqor.plans', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('levqor.tenants', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_keys', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_events', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.protected_tables', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.migrations', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_events_id_seq', '');
