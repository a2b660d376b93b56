-- levqor 0.1.0 -> 0.2.0 (assembled by scripts/upgrade-script.py)
--
-- 0.2.0 adds the tenant lifecycle, the isolation report, schema-per-tenant
-- isolation with fleet migrations, adoption of legacy databases, the
-- tamper-evident audit log and tenant export. Run by ALTER EXTENSION levqor
-- UPDATE; tests/e2e/tests/upgrade.rs checks that the result is the same
-- catalog as a fresh 0.2.0 install, with data kept. Install the 0.2.0
-- library first (and restart, with levqor preloaded).

-- 1. Catalog: lifecycle and schema columns on tenants, the template schema,
--    the migration ledger.
ALTER TABLE levqor.tenants
    ADD COLUMN schema_name       name CONSTRAINT tenants_schema_name_key UNIQUE,
    ADD COLUMN suspension_mode   text CONSTRAINT tenants_suspension_mode_check CHECK (suspension_mode IN ('read_only', 'blocked')),
    ADD COLUMN suspension_reason text,
    ADD COLUMN trial_ends_at     timestamptz,
    ADD COLUMN offboarded_at     timestamptz,
    ADD COLUMN purge_after       timestamptz;
-- A tenant suspended under 0.1.0 had no mode: it stays blocked (fail closed).
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
SELECT pg_catalog.pg_extension_config_dump('levqor.migrations', '');

-- 2. Changed functions.
CREATE OR REPLACE FUNCTION levqor._guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    cmd      record;
    tbl      oid;
    problems text;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        tbl := CASE cmd.classid
                   WHEN 'pg_class'::regclass THEN cmd.objid
                   WHEN 'pg_policy'::regclass THEN (SELECT p.polrelid FROM pg_policy p WHERE p.oid = cmd.objid)
                   WHEN 'pg_trigger'::regclass THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = cmd.objid)
               END;
        CONTINUE WHEN tbl IS NULL OR levqor._being_disabled(tbl);
        IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname LIKE 'levqor\_audit\_%'
                                               AND t.tgenabled NOT IN ('O', 'A')) THEN
            RAISE EXCEPTION 'levqor: % would switch auditing off on %', cmd.command_tag, tbl::regclass
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.disable_audit().';
        END IF;
        CONTINUE WHEN NOT levqor._is_protected(tbl);
        SELECT string_agg(x, '; ') INTO problems FROM levqor._tenancy_problems(tbl::regclass, false) x;
        IF problems IS NOT NULL THEN
            RAISE EXCEPTION 'levqor: % would weaken tenant isolation on %: %', cmd.command_tag, tbl::regclass, problems
                USING ERRCODE = '42501',
                      HINT = 'A levqor_admin can remove levqor tenancy with levqor.disable_tenancy().';
        END IF;
    END LOOP;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    obj record;
    tbl regclass;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() o
                WHERE o.object_type = 'extension' AND o.object_name = 'levqor') THEN
        RETURN;
    END IF;
    FOR obj IN
        SELECT o.object_type, o.address_names
          FROM pg_event_trigger_dropped_objects() o
         WHERE o.object_type IN ('policy', 'trigger')
           AND (o.address_names[3] LIKE 'levqor\_tenant\_%'
                OR o.address_names[3] IN ('levqor_no_truncate', 'levqor_write_guard')
                OR o.address_names[3] LIKE 'levqor\_audit\_%')
    LOOP
        tbl := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
        CONTINUE WHEN tbl IS NULL;  -- the table itself is going away
        CONTINUE WHEN levqor._being_disabled(tbl);
        IF obj.address_names[3] LIKE 'levqor\_audit\_%' THEN
            RAISE EXCEPTION 'levqor: dropping % % on % would switch auditing off',
                obj.object_type, quote_ident(obj.address_names[3]), tbl
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.disable_audit().';
        END IF;
        RAISE EXCEPTION 'levqor: dropping % % on % would remove tenant isolation',
            obj.object_type, quote_ident(obj.address_names[3]), tbl
            USING ERRCODE = '42501',
                  HINT = 'A levqor_admin can remove levqor tenancy with levqor.disable_tenancy().';
    END LOOP;
    DELETE FROM levqor.protected_tables pt
     WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = pt.tbl);
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._tenancy_problems(tbl regclass, complete boolean)
RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    c        record;
    p        record;
    col      name;
    want_cmd text;
BEGIN
    SELECT rel.relrowsecurity, rel.relforcerowsecurity INTO c FROM pg_class rel WHERE rel.oid = tbl;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT c.relrowsecurity THEN
        RETURN NEXT 'row level security is disabled';
    END IF;
    IF NOT c.relforcerowsecurity THEN
        RETURN NEXT 'row level security is not forced (the owner would bypass it)';
    END IF;
    SELECT pt.tenant_column INTO col FROM levqor.protected_tables pt WHERE pt.tbl = $1;

    FOR p IN
        SELECT pol.polname, pol.polcmd, pol.polpermissive,
               pg_get_expr(pol.polqual, pol.polrelid) AS qual,
               pg_get_expr(pol.polwithcheck, pol.polrelid) AS chk
          FROM pg_policy pol
         WHERE pol.polrelid = tbl
    LOOP
        IF p.polname LIKE 'levqor\_tenant\_%' THEN
            IF p.polpermissive THEN
                RETURN NEXT format('policy %I must be restrictive', p.polname);
            END IF;
            want_cmd := (CASE p.polname WHEN 'levqor_tenant_select' THEN 'r'
                                        WHEN 'levqor_tenant_insert' THEN 'a'
                                        WHEN 'levqor_tenant_update' THEN 'w'
                                        WHEN 'levqor_tenant_delete' THEN 'd' END);
            IF want_cmd IS NULL OR p.polcmd::text <> want_cmd THEN
                RETURN NEXT format('policy %I applies to the wrong command', p.polname);
            END IF;
            -- The expression must be the canonical one for a real column
            -- (the registered one, when the table is registered).
            IF NOT EXISTS (
                SELECT 1 FROM pg_attribute a
                 WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                   AND (col IS NULL OR a.attname = col)
                   AND (p.qual IS NULL OR p.qual = levqor._tenant_qual(a.attname))
                   AND (p.chk IS NULL OR p.chk = levqor._tenant_qual(a.attname))
                   AND (p.polcmd <> 'w' OR (p.qual IS NOT NULL AND p.chk IS NOT NULL))
                   AND coalesce(p.qual, p.chk) IS NOT NULL)
            THEN
                RETURN NEXT format('policy %I no longer compares the tenant column with levqor.current_tenant()', p.polname);
            END IF;
        ELSIF NOT p.polpermissive
              AND (p.qual LIKE '%levqor.current_tenant()%' OR p.chk LIKE '%levqor.current_tenant()%')
              AND (p.qual IS NULL OR p.qual ~ '^\(.* = levqor\.current_tenant\(\)\)$') THEN
            -- A renamed levqor policy could later be dropped unnoticed.
            RETURN NEXT format('policy %I looks like a renamed levqor policy', p.polname);
        END IF;
    END LOOP;

    IF complete THEN
        FOR p IN SELECT unnest(ARRAY['levqor_tenant_select', 'levqor_tenant_insert',
                                     'levqor_tenant_update', 'levqor_tenant_delete']) AS polname
        LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = p.polname) THEN
                RETURN NEXT format('policy %I is missing', p.polname);
            END IF;
        END LOOP;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_no_truncate') THEN
            RETURN NEXT 'the TRUNCATE guard trigger is missing';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_write_guard') THEN
            RETURN NEXT 'the write guard trigger is missing';
        END IF;
    END IF;
    -- A trigger fires in ordinary sessions only when enabled 'O' (origin) or
    -- 'A' (always): 'D' (disabled) and 'R' (ENABLE REPLICA) both switch it off.
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_no_truncate'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the TRUNCATE guard trigger is disabled';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_write_guard'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the write guard trigger is disabled';
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.disable_tenancy(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    pol   name;
    child regclass;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'disable_tenancy: table must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF NOT levqor._is_protected(tbl) THEN
        RAISE NOTICE 'levqor: % is not under tenancy; nothing to do', tbl;
        RETURN;
    END IF;
    FOR child IN SELECT inh.inhrelid::regclass FROM pg_inherits inh WHERE inh.inhparent = tbl LOOP
        PERFORM levqor.disable_tenancy(child);
    END LOOP;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    FOR pol IN SELECT p.polname FROM pg_policy p
                WHERE p.polrelid = tbl AND (p.polname LIKE 'levqor\_tenant\_%' OR p.polname = 'levqor_base') LOOP
        EXECUTE format('DROP POLICY %I ON %s', pol, tbl);
    END LOOP;
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_no_truncate ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_write_guard ON %s', tbl);
    EXECUTE format('ALTER TABLE %s NO FORCE ROW LEVEL SECURITY', tbl);
    IF NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = tbl) THEN
        EXECUTE format('ALTER TABLE %s DISABLE ROW LEVEL SECURITY', tbl);
    END IF;
    DELETE FROM levqor.protected_tables pt WHERE pt.tbl = $1;
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
    PERFORM levqor._log_event(NULL, 'tenancy_disabled', jsonb_build_object('table', tbl::text));
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.enable_tenancy(tbl regclass, tenant_column name DEFAULT 'tenant_id')
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    rel      record;
    col      record;
    qual     text;
    spec     record;
    existing record;
    have     boolean;
    child    regclass;
BEGIN
    IF tbl IS NULL OR tenant_column IS NULL THEN
        RAISE EXCEPTION 'enable_tenancy: table and tenant column must not be NULL' USING ERRCODE = '22023';
    END IF;
    SELECT c.relkind, c.relowner, n.nspname INTO rel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '42809',
            HINT = 'Protect the tables a view reads; create views WITH (security_invoker = true).';
    END IF;
    IF rel.nspname IN ('levqor', 'pg_catalog', 'information_schema') OR rel.nspname LIKE 'pg\_%' THEN
        RAISE EXCEPTION 'cannot enable tenancy on % (system or levqor table)', tbl USING ERRCODE = '42501';
    END IF;
    IF NOT pg_has_role(current_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table % to enable tenancy', tbl USING ERRCODE = '42501';
    END IF;

    SELECT a.attnum, a.atttypid, a.attnotnull, a.atthasdef INTO col
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        BEGIN
            EXECUTE format('ALTER TABLE %s ADD COLUMN %I uuid NOT NULL DEFAULT levqor.current_tenant()',
                           tbl, tenant_column);
        EXCEPTION WHEN not_null_violation THEN
            RAISE EXCEPTION '% already has rows, which belong to no tenant', tbl
                USING ERRCODE = '23502',
                      HINT = format('Add the column yourself and fill it (ALTER TABLE %s ADD COLUMN %I uuid; UPDATE …), then call enable_tenancy again.',
                                    tbl, tenant_column);
        END;
        SELECT a.attnum, a.atttypid, a.attnotnull, a.atthasdef INTO col
          FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = tenant_column AND NOT a.attisdropped;
    ELSE
        IF col.atttypid <> 'uuid'::regtype THEN
            RAISE EXCEPTION 'column %.% has type %, not uuid', tbl, quote_ident(tenant_column),
                format_type(col.atttypid, NULL) USING ERRCODE = '42804';
        END IF;
        IF NOT col.atthasdef THEN
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT levqor.current_tenant()', tbl, tenant_column);
        END IF;
        IF NOT col.attnotnull THEN
            BEGIN
                EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL', tbl, tenant_column);
            EXCEPTION WHEN not_null_violation THEN
                RAISE EXCEPTION 'column %.% has NULLs: rows that belong to no tenant', tbl, quote_ident(tenant_column)
                    USING ERRCODE = '23502', HINT = 'Assign those rows to a tenant first.';
            END;
        END IF;
    END IF;

    -- An index led by the tenant column, so the policy is an index condition.
    IF NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = tbl AND i.indkey[0] = col.attnum) THEN
        EXECUTE format('CREATE INDEX ON %s (%I)', tbl, tenant_column);
    END IF;

    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);

    qual := levqor._tenant_qual(tenant_column);
    FOR spec IN
        SELECT * FROM (VALUES ('levqor_tenant_select', 'SELECT', 'r', true,  false),
                              ('levqor_tenant_insert', 'INSERT', 'a', false, true),
                              ('levqor_tenant_update', 'UPDATE', 'w', true,  true),
                              ('levqor_tenant_delete', 'DELETE', 'd', true,  false))
               AS s(polname, cmd, polcmd, has_using, has_check)
    LOOP
        SELECT pol.polcmd, pol.polpermissive INTO existing
          FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = spec.polname;
        have := FOUND;
        IF have AND (existing.polcmd <> spec.polcmd OR existing.polpermissive) THEN
            EXECUTE format('DROP POLICY %I ON %s', spec.polname, tbl);
            have := false;
        END IF;
        IF NOT have THEN
            EXECUTE format('CREATE POLICY %I ON %s AS RESTRICTIVE FOR %s TO PUBLIC %s %s',
                           spec.polname, tbl, spec.cmd,
                           CASE WHEN spec.has_using THEN 'USING ' || qual ELSE '' END,
                           CASE WHEN spec.has_check THEN 'WITH CHECK ' || qual ELSE '' END);
        ELSE
            EXECUTE format('ALTER POLICY %I ON %s TO PUBLIC %s %s',
                           spec.polname, tbl,
                           CASE WHEN spec.has_using THEN 'USING ' || qual ELSE '' END,
                           CASE WHEN spec.has_check THEN 'WITH CHECK ' || qual ELSE '' END);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = 'levqor_base') THEN
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)', tbl);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_no_truncate') THEN
        EXECUTE format('CREATE TRIGGER levqor_no_truncate BEFORE TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._refuse_truncate()', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_write_guard') THEN
        EXECUTE format('CREATE TRIGGER levqor_write_guard BEFORE INSERT OR UPDATE OR DELETE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._write_guard()', tbl);
    END IF;

    -- A unique constraint without the tenant column answers, through its
    -- errors, whether another tenant already has a value. Warn; rewriting a
    -- constraint others may reference is the owner's decision.
    DECLARE
        u record;
    BEGIN
        FOR u IN SELECT i.indexrelid::regclass AS idx FROM pg_index i
                  WHERE i.indrelid = tbl AND i.indisunique AND NOT i.indisprimary
                    AND NOT (col.attnum = ANY (i.indkey::int2[])) LOOP
            RAISE WARNING 'levqor: unique index % on % does not include %: its errors tell one tenant what another has',
                u.idx, tbl, quote_ident(tenant_column)
                USING HINT = format('Make it UNIQUE (%I, …) unless the values must be unique across tenants.', tenant_column);
        END LOOP;
    END;

    -- Partitions can be queried directly, so each one is protected too.
    FOR child IN SELECT inh.inhrelid::regclass FROM pg_inherits inh WHERE inh.inhparent = tbl LOOP
        PERFORM levqor.enable_tenancy(child, tenant_column);
    END LOOP;

    PERFORM levqor._register_protected(tbl, tenant_column);
END
$fn$;
-- create_tenant gained trial_ends_at: a new signature.
DROP FUNCTION levqor.create_tenant(text, text, text, text, text, text);
CREATE FUNCTION levqor.create_tenant(
    slug      text,
    name      text,
    plan      text DEFAULT 'free',
    region    text DEFAULT NULL,
    isolation text DEFAULT 'shared',
    parent    text DEFAULT NULL,
    trial_ends_at timestamptz DEFAULT NULL
) RETURNS TABLE (tenant_id uuid, api_key text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    new_id     uuid;
    parent_id  uuid;
    schema     name;
    k          record;
BEGIN
    IF slug IS NULL OR slug !~ '^[a-z0-9_-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid tenant slug %', coalesce(quote_literal(slug), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'A slug is 1 to 63 characters: lowercase letters, digits, "-" and "_".';
    END IF;
    IF name IS NULL OR length(btrim(name)) NOT BETWEEN 1 AND 200 OR name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid tenant name'
            USING ERRCODE = '22023', HINT = 'A name is 1 to 200 characters without control characters.';
    END IF;
    IF plan IS NULL OR NOT EXISTS (SELECT 1 FROM levqor.plans p WHERE p.name = plan) THEN
        RAISE EXCEPTION 'unknown plan %', coalesce(quote_literal(plan), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'Plans are listed in levqor.plans.';
    END IF;
    IF region IS NOT NULL AND region !~ '^[a-z0-9-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid region %', quote_literal(region)
            USING ERRCODE = '22023', HINT = 'A region is lowercase letters, digits and "-", e.g. eu-west-1.';
    END IF;
    IF isolation = 'schema' THEN
        IF length(slug) > 56 THEN
            RAISE EXCEPTION 'the slug of a schema tenant is at most 56 characters'
                USING ERRCODE = '22023', HINT = 'Its schema is tenant_<slug>, and names are at most 63 characters.';
        END IF;
        schema := 'tenant_' || replace(slug, '-', '_');
    ELSIF isolation IS DISTINCT FROM 'shared' THEN
        RAISE EXCEPTION 'unknown isolation %', coalesce(quote_literal(isolation), 'NULL')
            USING ERRCODE = '22023', HINT = 'isolation is ''shared'' or ''schema''.';
    END IF;
    IF parent IS NOT NULL THEN
        parent_id := levqor._tenant_id(parent);
    END IF;

    BEGIN
        INSERT INTO levqor.tenants (slug, name, plan, region, isolation, parent, status, trial_ends_at, schema_name)
        VALUES (slug, btrim(name), plan, region, isolation, parent_id,
                CASE WHEN trial_ends_at IS NULL THEN 'active' ELSE 'trial' END, trial_ends_at, schema)
        RETURNING id INTO new_id;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'tenant slug % already exists%', quote_literal(slug),
            CASE WHEN schema IS NULL THEN '' ELSE format(' (or a tenant with schema %I)', schema) END
            USING ERRCODE = '23505';
    END;
    IF schema IS NOT NULL THEN
        IF to_regnamespace(quote_ident(schema)) IS NOT NULL THEN
            RAISE EXCEPTION 'schema % already exists', quote_ident(schema) USING ERRCODE = '42P06';
        END IF;
        PERFORM levqor._clone_template(schema, new_id);
    END IF;

    SELECT * INTO k FROM levqor._new_api_key();
    INSERT INTO levqor.tenant_keys (key_id, tenant_id, key_hash, role, label)
    VALUES (k.key_id, new_id, k.key_hash, 'admin', 'created with tenant');

    PERFORM levqor._log_event(new_id, 'tenant_created',
        jsonb_build_object('slug', slug, 'plan', plan, 'region', region,
                           'isolation', isolation, 'schema', schema, 'parent', parent_id, 'key_id', k.key_id,
                           'trial_ends_at', trial_ends_at));

    tenant_id := new_id;
    api_key := k.api_key;
    RETURN NEXT;
END
$fn$;

-- 3. New trigger functions in the library.
-- src/lifecycle.rs:79
-- levqor::lifecycle::_write_guard
CREATE FUNCTION "_write_guard"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_write_guard_wrapper';

-- src/lifecycle.rs:94
-- levqor::lifecycle::_schema_guard
CREATE FUNCTION "_schema_guard"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_schema_guard_wrapper';

-- src/audit.rs:110
-- levqor::audit::_audit_row
CREATE FUNCTION "_audit_row"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_audit_row_wrapper';

-- 4. Lifecycle (sql/lifecycle.sql, new in 0.2.0).
-- Tenant lifecycle: suspend, resume, change plan, offboard, purge, rotate keys.
-- SECURITY DEFINER with a pinned search_path; only levqor_admin may call them
-- (grants.sql). Every call is recorded in levqor.tenant_events. Enforcement is
-- in Rust: authenticate & co. refuse new contexts, the write guard refuses
-- writes, and existing contexts are re-checked (src/lifecycle.rs).

-- Lock and return a tenant's row; raises 42704 when there is none.
CREATE FUNCTION levqor._tenant_for_update(tenant text) RETURNS levqor.tenants
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t levqor.tenants;
BEGIN
    SELECT * INTO t FROM levqor.tenants WHERE id = levqor._tenant_id(tenant) FOR UPDATE;
    RETURN t;
END
$fn$;

CREATE FUNCTION levqor.suspend_tenant(tenant text, reason text, mode text DEFAULT 'read_only')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF mode IS NULL OR mode NOT IN ('read_only', 'blocked') THEN
        RAISE EXCEPTION 'unknown suspension mode %', coalesce(quote_literal(mode), 'NULL')
            USING ERRCODE = '22023', HINT = 'mode is ''read_only'' (reads work, writes fail) or ''blocked'' (no access).';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a suspension needs a reason' USING ERRCODE = '22023';
    END IF;
    IF t.status = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded and cannot be suspended', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    UPDATE levqor.tenants
       SET status = 'suspended', suspension_mode = mode, suspension_reason = btrim(reason), updated_at = now()
     WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_suspended',
        jsonb_build_object('mode', mode, 'reason', btrim(reason), 'previous_status', t.status));
END
$fn$;

CREATE FUNCTION levqor.resume_tenant(tenant text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF t.status = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded and cannot be resumed', quote_literal(t.slug)
            USING ERRCODE = '55000', HINT = 'An offboarded tenant''s data waits for levqor.purge_tenant(); create a new tenant instead.';
    END IF;
    IF t.status <> 'suspended' THEN
        RAISE NOTICE 'levqor: tenant % is not suspended; nothing to do', t.slug;
        RETURN;
    END IF;
    UPDATE levqor.tenants
       SET status = CASE WHEN t.trial_ends_at IS NOT NULL THEN 'trial' ELSE 'active' END,
           suspension_mode = NULL, suspension_reason = NULL, updated_at = now()
     WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_resumed', jsonb_build_object('was', t.suspension_mode));
END
$fn$;

-- Bytes of the tenant's rows in every protected table (row data as stored,
-- without indexes). Measured, not estimated; it reads every row of the tenant.
CREATE FUNCTION levqor.tenant_storage_bytes(tenant text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tid   uuid := levqor._tenant_id(tenant);
    p     record;
    n     bigint;
    total bigint := 0;
BEGIN
    FOR p IN SELECT pt.tbl, pt.tenant_column FROM levqor.protected_tables pt
              WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = pt.tbl) LOOP
        EXECUTE format('SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM %s t WHERE %I = $1', p.tbl, p.tenant_column)
           INTO n USING tid;
        total := total + n;
    END LOOP;
    RETURN total;
END
$fn$;

CREATE FUNCTION levqor.change_plan(tenant text, plan text, force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t       levqor.tenants := levqor._tenant_for_update(tenant);
    lim     jsonb;
    storage bigint;
BEGIN
    SELECT p.limits INTO lim FROM levqor.plans p WHERE p.name = plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan %', coalesce(quote_literal(plan), 'NULL')
            USING ERRCODE = '22023', HINT = 'Plans are listed in levqor.plans.';
    END IF;
    IF t.status = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    IF t.plan = plan THEN
        RAISE NOTICE 'levqor: tenant % is already on plan %', t.slug, plan;
        RETURN;
    END IF;
    -- A downgrade below what the tenant already uses is refused unless forced.
    IF NOT force AND jsonb_typeof(lim->'storage_bytes') = 'number' THEN
        storage := levqor.tenant_storage_bytes(t.id::text);
        IF storage > (lim->>'storage_bytes')::bigint THEN
            RAISE EXCEPTION 'plan % allows % of storage; tenant % uses %', plan,
                pg_size_pretty((lim->>'storage_bytes')::bigint), t.slug, pg_size_pretty(storage)
                USING ERRCODE = '23514', HINT = 'Free space first, or pass force => true.';
        END IF;
    END IF;
    UPDATE levqor.tenants SET plan = plan, updated_at = now() WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'plan_changed', jsonb_build_object('from', t.plan, 'to', plan, 'forced', force));
END
$fn$;

CREATE FUNCTION levqor.offboard_tenant(tenant text, grace interval DEFAULT '30 days') RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace must be zero or positive' USING ERRCODE = '22023';
    END IF;
    IF t.status = 'offboarded' THEN
        RAISE NOTICE 'levqor: tenant % is already offboarded; its data may be purged after %', t.slug, t.purge_after;
        RETURN t.purge_after;
    END IF;
    IF EXISTS (SELECT 1 FROM levqor.tenants c WHERE c.parent = t.id AND c.status <> 'offboarded') THEN
        RAISE EXCEPTION 'tenant % has tenants under it that are not offboarded', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    UPDATE levqor.tenants
       SET status = 'offboarded', offboarded_at = now(), purge_after = now() + grace,
           suspension_mode = NULL, updated_at = now()
     WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_offboarded',
        jsonb_build_object('previous_status', t.status, 'grace', grace::text, 'purge_after', now() + grace));
    RETURN now() + grace;
END
$fn$;

CREATE FUNCTION levqor.purge_tenant(tenant text, force boolean DEFAULT false)
RETURNS TABLE (table_name text, rows_deleted bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t      levqor.tenants := levqor._tenant_for_update(tenant);
    p      record;
    n      bigint;
    counts jsonb := '{}';
BEGIN
    IF t.status <> 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is %, not offboarded', quote_literal(t.slug), t.status
            USING ERRCODE = '55000', HINT = 'Offboard it first: levqor.offboard_tenant().';
    END IF;
    IF t.purge_after > now() AND NOT force THEN
        RAISE EXCEPTION 'the grace period of tenant % ends at %', quote_literal(t.slug), t.purge_after
            USING ERRCODE = '55000', HINT = 'Wait, or pass force => true.';
    END IF;
    IF EXISTS (SELECT 1 FROM levqor.tenants c WHERE c.parent = t.id) THEN
        RAISE EXCEPTION 'tenant % still has tenants under it', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    FOR p IN SELECT pt.tbl, pt.tenant_column FROM levqor.protected_tables pt ORDER BY pt.tbl::text LOOP
        EXECUTE format('DELETE FROM ONLY %s WHERE %I = $1', p.tbl, p.tenant_column) USING t.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            table_name := p.tbl::text;
            rows_deleted := n;
            counts := counts || jsonb_build_object(p.tbl::text, n);
            RETURN NEXT;
        END IF;
    END LOOP;
    IF t.schema_name IS NOT NULL AND to_regnamespace(quote_ident(t.schema_name)) IS NOT NULL THEN
        EXECUTE format('DROP SCHEMA %I CASCADE', t.schema_name);
        table_name := t.schema_name || '.*';
        rows_deleted := NULL;
        counts := counts || jsonb_build_object('schema', t.schema_name);
        RETURN NEXT;
    END IF;
    DELETE FROM levqor.tenant_keys k WHERE k.tenant_id = t.id;
    DELETE FROM levqor.tenants WHERE id = t.id;
    -- The tombstone: who was purged, when, by whom, and how much.
    PERFORM levqor._log_event(t.id, 'tenant_purged',
        jsonb_build_object('slug', t.slug, 'name', t.name, 'forced', force, 'rows', counts));
END
$fn$;

CREATE FUNCTION levqor.rotate_keys(tenant text, overlap interval DEFAULT '0') RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t       levqor.tenants := levqor._tenant_for_update(tenant);
    new_key text;
    retired int;
BEGIN
    IF overlap IS NULL OR overlap < interval '0' THEN
        RAISE EXCEPTION 'overlap must be zero or positive' USING ERRCODE = '22023';
    END IF;
    -- The old keys: revoked now, or expiring when the overlap ends.
    IF overlap = interval '0' THEN
        UPDATE levqor.tenant_keys k SET revoked_at = now()
         WHERE k.tenant_id = t.id AND k.revoked_at IS NULL;
    ELSE
        UPDATE levqor.tenant_keys k SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + overlap)
         WHERE k.tenant_id = t.id AND k.revoked_at IS NULL;
    END IF;
    GET DIAGNOSTICS retired = ROW_COUNT;
    new_key := levqor.issue_key(t.id::text, 'admin', label => 'rotated');
    PERFORM levqor._log_event(t.id, 'keys_rotated',
        jsonb_build_object('overlap', overlap::text, 'old_keys', retired, 'new_key_id', substr(new_key, 5, 16)));
    RETURN new_key;
END
$fn$;

-- 5. Isolation report and view prevention (sql/report.sql, new in 0.2.0).
-- The isolation report, and the prevention that goes with it: views over
-- protected tables become security_invoker by default.

-- Tables that hold no tenant data (reference tables, say) can be exempted
-- from the "unprotected table" finding, with a reason.
CREATE TABLE levqor.report_exemptions (
    tbl        regclass PRIMARY KEY,
    reason     text NOT NULL CONSTRAINT report_exemptions_reason CHECK (btrim(reason) <> ''),
    exempted_at timestamptz NOT NULL DEFAULT now(),
    exempted_by name NOT NULL DEFAULT session_user
);
SELECT pg_catalog.pg_extension_config_dump('levqor.report_exemptions', '');

CREATE FUNCTION levqor.exempt_from_report(tbl regclass, reason text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    INSERT INTO levqor.report_exemptions (tbl, reason) VALUES ($1, $2)
    ON CONFLICT ON CONSTRAINT report_exemptions_pkey DO UPDATE SET reason = EXCLUDED.reason;
    PERFORM levqor._log_event(NULL, 'report_exemption', jsonb_build_object('table', $1::text, 'reason', $2));
END
$fn$;

-- Protected tables and their tenant column: the registry, plus any table
-- carrying levqor policies (a restored database, say).
CREATE FUNCTION levqor._protected() RETURNS TABLE (tbl oid, tenant_column name)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pt.tbl::oid, pt.tenant_column FROM levqor.protected_tables pt
    UNION
    SELECT pol.polrelid, a.attname
      FROM pg_policy pol
      JOIN pg_attribute a ON a.attrelid = pol.polrelid AND a.attnum > 0 AND NOT a.attisdropped
     WHERE pol.polname = 'levqor_tenant_select'
       AND pg_get_expr(pol.polqual, pol.polrelid) = levqor._tenant_qual(a.attname)
$fn$;

CREATE FUNCTION levqor.isolation_report()
RETURNS TABLE (severity text, kind text, object text, detail text, fix text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- 1. Tables in tenant-facing schemas (those holding a protected table)
    --    without tenancy.
    RETURN QUERY
    SELECT 'high', 'unprotected_table', c.oid::regclass::text,
           'table in a schema with protected tables, but not protected itself',
           format('SELECT levqor.enable_tenancy(%L); or, if it holds no tenant data, SELECT levqor.exempt_from_report(%L, ''why'');',
                  c.oid::regclass::text, c.oid::regclass::text)
      FROM pg_class c
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
       AND c.relnamespace IN (SELECT k.relnamespace FROM pg_class k JOIN levqor._protected() p ON p.tbl = k.oid)
       AND c.oid NOT IN (SELECT p.tbl FROM levqor._protected() p)
       AND c.oid NOT IN (SELECT e.tbl FROM levqor.report_exemptions e);

    -- 2. Row level security enabled but not forced: the owner bypasses it.
    RETURN QUERY
    SELECT 'high', 'rls_not_forced', c.oid::regclass::text,
           'row level security is enabled but not forced, so the table owner sees every row',
           format('ALTER TABLE %s FORCE ROW LEVEL SECURITY;', c.oid::regclass::text)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity AND NOT c.relforcerowsecurity
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%';

    -- 3. Views over protected tables that run with their owner's rights.
    RETURN QUERY
    SELECT DISTINCT ON (v.oid)
           CASE WHEN o.rolsuper OR o.rolbypassrls THEN 'high' ELSE 'medium' END,
           'view_not_security_invoker', v.oid::regclass::text,
           format('view reads protected table %s with the rights of its owner %I%s', t.tbl::regclass::text, o.rolname,
                  CASE WHEN o.rolsuper OR o.rolbypassrls THEN ', who bypasses row level security: every tenant''s rows' ELSE '' END),
           format('ALTER VIEW %s SET (security_invoker = true);', v.oid::regclass::text)
      FROM pg_class v
      JOIN pg_roles o ON o.oid = v.relowner
      JOIN pg_rewrite rw ON rw.ev_class = v.oid
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid AND d.refclassid = 'pg_class'::regclass
      JOIN levqor._protected() t ON t.tbl = d.refobjid
     WHERE v.relkind = 'v'
       AND NOT coalesce('security_invoker=true' = ANY (v.reloptions) OR 'security_invoker=on' = ANY (v.reloptions), false);

    -- 4. SECURITY DEFINER functions that read protected tables.
    RETURN QUERY
    SELECT CASE WHEN o.rolsuper OR o.rolbypassrls THEN 'high' ELSE 'medium' END,
           'security_definer_reads_protected', f.oid::regprocedure::text,
           format('SECURITY DEFINER function owned by %I mentions protected table %s%s', o.rolname, t.tbl::regclass::text,
                  CASE WHEN o.rolsuper OR o.rolbypassrls THEN '; its owner bypasses row level security' ELSE '' END),
           'Make it SECURITY INVOKER, or have it owned by a role without BYPASSRLS that is subject to the policies.'
      FROM pg_proc f
      JOIN pg_roles o ON o.oid = f.proowner
      JOIN pg_namespace n ON n.oid = f.pronamespace
      JOIN levqor._protected() t ON f.prosrc ~* ('\m' || regexp_replace((SELECT relname FROM pg_class WHERE oid = t.tbl), '([.^$*+?()\[\]{}|\\])', '\\\1', 'g') || '\M')
     WHERE f.prosecdef AND n.nspname NOT IN ('levqor', 'pg_catalog', 'information_schema');

    -- 5. Tenant columns no index leads with.
    RETURN QUERY
    SELECT 'medium', 'tenant_column_unindexed', t.tbl::regclass::text,
           format('no index starts with tenant column %I: every tenant''s query scans the table', t.tenant_column),
           format('CREATE INDEX ON %s (%I);', t.tbl::regclass::text, t.tenant_column)
      FROM levqor._protected() t
      JOIN pg_attribute a ON a.attrelid = t.tbl AND a.attname = t.tenant_column
     WHERE NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.tbl AND i.indkey[0] = a.attnum);

    -- 6. Unique constraints without the tenant column: a unique-violation
    -- error tells one tenant that another tenant has that value.
    RETURN QUERY
    SELECT 'medium', 'unique_without_tenant', i.indexrelid::regclass::text,
           format('unique index on %s does not include tenant column %I: its errors reveal other tenants'' values',
                  t.tbl::regclass::text, t.tenant_column),
           format('Include the tenant column, e.g. UNIQUE (%I, …), unless the values are meant to be unique across tenants (like surrogate keys).', t.tenant_column)
      FROM levqor._protected() t
      JOIN pg_attribute a ON a.attrelid = t.tbl AND a.attname = t.tenant_column
      JOIN pg_index i ON i.indrelid = t.tbl AND i.indisunique AND NOT i.indisprimary
     WHERE NOT (a.attnum = ANY (i.indkey::int2[]));

    -- 7. Roles that bypass row level security and that an application uses.
    RETURN QUERY
    SELECT 'high', 'bypassrls_role', r.rolname::text,
           format('%s can log in, bypasses row level security%s',
                  CASE WHEN r.rolsuper THEN 'superuser' ELSE 'BYPASSRLS role' END,
                  CASE WHEN pg_has_role(r.oid, 'levqor_app', 'MEMBER') THEN ' and is a member of levqor_app (an application role)' ELSE '' END),
           format('ALTER ROLE %I NOBYPASSRLS%s;', r.rolname, CASE WHEN r.rolsuper THEN ' NOSUPERUSER' ELSE '' END)
      FROM pg_roles r
     WHERE r.rolcanlogin AND (r.rolsuper OR r.rolbypassrls) AND r.oid <> 10
       AND (pg_has_role(r.oid, 'levqor_app', 'MEMBER') OR pg_has_role(r.oid, 'levqor_context_admin', 'MEMBER')
            OR (r.rolbypassrls AND NOT r.rolsuper));
END
$fn$;

-- Prevention: a view created over a protected table gets security_invoker,
-- unless its creator said WITH (security_invoker = false) on purpose.
CREATE FUNCTION levqor._views_invoker_by_default() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    cmd record;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE object_type = 'view' LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_class v WHERE v.oid = cmd.objid
                                AND v.reloptions && ARRAY['security_invoker=false', 'security_invoker=off',
                                                          'security_invoker=true', 'security_invoker=on']);
        IF EXISTS (SELECT 1 FROM pg_rewrite rw
                     JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
                                     AND d.refclassid = 'pg_class'::regclass
                     JOIN levqor._protected() p ON p.tbl = d.refobjid
                    WHERE rw.ev_class = cmd.objid) THEN
            EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', cmd.objid::regclass);
            RAISE NOTICE 'levqor: view % reads protected tables; it was made security_invoker', cmd.objid::regclass
                USING HINT = 'Say WITH (security_invoker = false) when creating it to opt out on purpose.';
        END IF;
    END LOOP;
END
$fn$;

CREATE EVENT TRIGGER levqor_views_invoker ON ddl_command_end
    WHEN TAG IN ('CREATE VIEW')
    EXECUTE FUNCTION levqor._views_invoker_by_default();

-- 6. Schema tenants and migrations (sql/schemas.sql, new in 0.2.0).
-- Schema-per-tenant isolation ("Strategy A" of the seeds) and fleet migrations.
--
-- A schema tenant gets the schema tenant_<slug>, holding a clone of every
-- table of levqor_template. Isolation does not rest on search_path: each
-- cloned table has row level security forced with a restrictive policy that
-- admits only its own tenant's context, and a statement guard trigger
-- (TRUNCATE included, which row level security ignores). The tenant context
-- sets search_path to the tenant's schema, so application SQL is the same
-- for shared and schema tenants.

-- Protect one table of a tenant schema.
CREATE FUNCTION levqor._protect_schema_table(tbl regclass, tenant uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    qual text := format('(levqor.current_tenant() = %L::uuid)', tenant);
BEGIN
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);
    IF NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = tbl AND p.polname = 'levqor_schema_tenant') THEN
        EXECUTE format('CREATE POLICY levqor_schema_tenant ON %s AS RESTRICTIVE FOR ALL TO PUBLIC USING %s WITH CHECK %s',
                       tbl, qual, qual);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = tbl AND p.polname = 'levqor_base') THEN
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_schema_guard') THEN
        EXECUTE format('CREATE TRIGGER levqor_schema_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._schema_guard(%L)', tbl, tenant);
    END IF;
END
$fn$;

-- Copy a relation's grants (from the template) to its clone.
CREATE FUNCTION levqor._copy_grants(src regclass, dst regclass, kind text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT a.privilege_type, a.grantee
               FROM pg_class c, aclexplode(c.relacl) a
              WHERE c.oid = src AND a.grantee <> c.relowner LOOP
        EXECUTE format('GRANT %s ON %s %s TO %s', g.privilege_type, kind, dst,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END);
    END LOOP;
END
$fn$;

-- Clone every table of levqor_template into schema target, for tenant.
CREATE FUNCTION levqor._clone_template(target name, tenant uuid) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tb     record;
    col    record;
    fk     record;
    gr     record;
    seq    name;
    cloned int := 0;
BEGIN
    EXECUTE format('CREATE SCHEMA %I', target);
    FOR gr IN SELECT a.grantee, a.privilege_type
               FROM pg_namespace n, aclexplode(n.nspacl) a
              WHERE n.nspname = 'levqor_template' AND a.grantee <> n.nspowner LOOP
        EXECUTE format('GRANT %s ON SCHEMA %I TO %s', gr.privilege_type, target,
                       CASE WHEN gr.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(gr.grantee::regrole::text) END);
    END LOOP;

    FOR tb IN SELECT c.oid, c.relname, c.relkind FROM pg_class c
              WHERE c.relnamespace = 'levqor_template'::regnamespace AND c.relkind IN ('r', 'p')
              ORDER BY c.oid LOOP
        IF tb.relkind = 'p' THEN
            RAISE EXCEPTION 'levqor_template.% is partitioned; partitioned template tables are not supported yet', tb.relname
                USING ERRCODE = '0A000';
        END IF;
        EXECUTE format('CREATE TABLE %I.%I (LIKE levqor_template.%I INCLUDING ALL)', target, tb.relname, tb.relname);
        -- serial columns: a sequence of the tenant's own, not the template's
        FOR col IN SELECT a.attname, pg_get_serial_sequence(format('levqor_template.%I', tb.relname), a.attname) AS s
                   FROM pg_attribute a
                  WHERE a.attrelid = tb.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attidentity = '' LOOP
            CONTINUE WHEN col.s IS NULL;
            seq := (SELECT relname FROM pg_class WHERE oid = col.s::regclass);
            EXECUTE format('CREATE SEQUENCE %I.%I OWNED BY %I.%I.%I', target, seq, target, tb.relname, col.attname);
            EXECUTE format('ALTER TABLE %I.%I ALTER COLUMN %I SET DEFAULT nextval(%L::regclass)',
                           target, tb.relname, col.attname, format('%I.%I', target, seq));
            PERFORM levqor._copy_grants(col.s::regclass, format('%I.%I', target, seq)::regclass, 'SEQUENCE');
        END LOOP;
        FOR col IN SELECT a.attname FROM pg_attribute a
                  WHERE a.attrelid = tb.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attidentity <> '' LOOP
            FOR gr IN SELECT a.privilege_type, a.grantee
                       FROM pg_class s, aclexplode(s.relacl) a
                      WHERE s.oid = pg_get_serial_sequence(format('levqor_template.%I', tb.relname), col.attname)::regclass
                        AND a.grantee <> s.relowner LOOP
                EXECUTE format('GRANT %s ON SEQUENCE %s TO %s', gr.privilege_type,
                               pg_get_serial_sequence(format('%I.%I', target, tb.relname), col.attname),
                               CASE WHEN gr.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(gr.grantee::regrole::text) END);
            END LOOP;
        END LOOP;
        PERFORM levqor._copy_grants(tb.oid, format('%I.%I', target, tb.relname)::regclass, 'TABLE');
        PERFORM levqor._protect_schema_table(format('%I.%I', target, tb.relname)::regclass, tenant);
        cloned := cloned + 1;
    END LOOP;

    -- Foreign keys between template tables point at the tenant's own copies.
    FOR fk IN SELECT con.conname, cl.relname, pg_get_constraintdef(con.oid) AS def
               FROM pg_constraint con JOIN pg_class cl ON cl.oid = con.conrelid
              WHERE con.contype = 'f' AND cl.relnamespace = 'levqor_template'::regnamespace LOOP
        EXECUTE format('ALTER TABLE %I.%I ADD CONSTRAINT %I %s', target, fk.relname, fk.conname,
                       replace(fk.def, 'REFERENCES levqor_template.', format('REFERENCES %I.', target)));
    END LOOP;
    RETURN cloned;
END
$fn$;

-- Fleet migrations. migrate() runs arbitrary DDL in every tenant schema, so
-- it is not a definer function (that would hand superuser to whoever may
-- call it): it runs with the caller's rights, and the caller must be a
-- superuser.
CREATE FUNCTION levqor._require_superuser(what text) RETURNS void
LANGUAGE plpgsql STABLE AS $fn$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION '% runs DDL in every tenant schema; only a superuser may run it', what USING ERRCODE = '42501';
    END IF;
END
$fn$;

-- Apply ddl to one schema in a subtransaction; record the outcome. NULL on
-- success, the error message on failure (the schema is left as it was).
CREATE FUNCTION levqor._migrate_schema(name text, ddl text, target name, tenant uuid) RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    err text;
    rel oid;
BEGIN
    BEGIN
        PERFORM set_config('search_path', format('%I, public', target), true);
        EXECUTE ddl;
        PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
        -- Tables the migration created in a tenant's schema are protected like the rest.
        IF tenant IS NOT NULL THEN
            FOR rel IN SELECT c.oid FROM pg_class c
                        WHERE c.relnamespace = to_regnamespace(quote_ident(target)) AND c.relkind IN ('r', 'p')
                          AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid AND p.polname = 'levqor_schema_tenant') LOOP
                PERFORM levqor._protect_schema_table(rel::regclass, tenant);
            END LOOP;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        err := SQLERRM;
    END;
    INSERT INTO levqor.migrations AS m (name, schema_name, status, error)
    VALUES (name, target, CASE WHEN err IS NULL THEN 'done' ELSE 'failed' END, err)
    ON CONFLICT ON CONSTRAINT migrations_pkey DO UPDATE
       SET status = EXCLUDED.status, error = EXCLUDED.error, attempts = m.attempts + 1,
           ran_at = clock_timestamp(), ran_by = session_user;
    RETURN err;
END
$fn$;

-- The schemas a migration still has to visit, template first.
CREATE FUNCTION levqor._migration_targets(name text) RETURNS TABLE (target name, tenant uuid, ord bigint)
LANGUAGE sql STABLE AS $fn$
    SELECT s.target, s.tenant, s.ord FROM (
        SELECT 'levqor_template'::name AS target, NULL::uuid AS tenant, 0::bigint AS ord
        UNION ALL
        SELECT t.schema_name, t.id, row_number() OVER (ORDER BY t.created_at, t.id)
          FROM levqor.tenants t WHERE t.schema_name IS NOT NULL
    ) s
    WHERE NOT EXISTS (SELECT 1 FROM levqor.migrations m
                       WHERE m.name = $1 AND m.schema_name = s.target AND m.status = 'done')
    ORDER BY s.ord
$fn$;

CREATE FUNCTION levqor.migrate(name text, ddl text, progress_every int DEFAULT 100)
RETURNS TABLE (schema_name name, status text, error text)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_variable
DECLARE
    tgt     record;
    err     text;
    total   bigint;
    done    bigint := 0;
    failed  bigint := 0;
    started timestamptz := clock_timestamp();
BEGIN
    PERFORM levqor._require_superuser('levqor.migrate()');
    IF name IS NULL OR btrim(name) = '' OR ddl IS NULL OR btrim(ddl) = '' THEN
        RAISE EXCEPTION 'a migration needs a name and DDL' USING ERRCODE = '22023';
    END IF;
    SELECT count(*) INTO total FROM levqor._migration_targets(name);
    IF total = 0 THEN
        RAISE NOTICE 'levqor: migration % has already run everywhere', name;
        RETURN;
    END IF;
    FOR tgt IN SELECT * FROM levqor._migration_targets(name) LOOP
        err := levqor._migrate_schema(name, ddl, tgt.target, tgt.tenant);
        schema_name := tgt.target;
        status := CASE WHEN err IS NULL THEN 'done' ELSE 'failed' END;
        error := err;
        RETURN NEXT;
        done := done + 1;
        IF err IS NOT NULL THEN
            failed := failed + 1;
            -- The template is the source of every new tenant: stop there.
            IF tgt.tenant IS NULL THEN
                RAISE WARNING 'levqor: migration % failed on levqor_template (%); no tenant schema was touched', name, err;
                RETURN;
            END IF;
        END IF;
        IF progress_every > 0 AND done % progress_every = 0 THEN
            RAISE NOTICE 'levqor: migration %: %/% schemas, % failed, %/s', name, done, total, failed,
                round(done / greatest(extract(epoch FROM clock_timestamp() - started), 0.001))::bigint;
        END IF;
    END LOOP;
    RAISE NOTICE 'levqor: migration % finished: % schemas, % failed%', name, done, failed,
        CASE WHEN failed > 0 THEN ' (run it again to retry only those)' ELSE '' END;
END
$fn$;

-- The same, committing every batch: for thousands of schemas, where one
-- transaction would hold too many locks. CALL it outside a transaction block.
CREATE PROCEDURE levqor.migrate_in_batches(name text, ddl text, batch int DEFAULT 100)
LANGUAGE plpgsql AS $fn$
DECLARE
    tgt     record;
    n       bigint := 0;
    failed  bigint := 0;
    total   bigint;
    started timestamptz := clock_timestamp();
BEGIN
    PERFORM levqor._require_superuser('levqor.migrate_in_batches()');
    IF name IS NULL OR btrim(name) = '' OR ddl IS NULL OR btrim(ddl) = '' OR batch IS NULL OR batch < 1 THEN
        RAISE EXCEPTION 'a migration needs a name, DDL and a positive batch size' USING ERRCODE = '22023';
    END IF;
    SELECT count(*) INTO total FROM levqor._migration_targets(name);
    FOR tgt IN SELECT * FROM levqor._migration_targets(name) LOOP
        IF levqor._migrate_schema(name, ddl, tgt.target, tgt.tenant) IS NOT NULL THEN
            failed := failed + 1;
            IF tgt.tenant IS NULL THEN
                COMMIT;
                RAISE WARNING 'levqor: migration % failed on levqor_template; no tenant schema was touched', name;
                RETURN;
            END IF;
        END IF;
        n := n + 1;
        IF n % batch = 0 THEN
            COMMIT;
            RAISE NOTICE 'levqor: migration %: %/% schemas, % failed, %/s', name, n, total, failed,
                round(n / greatest(extract(epoch FROM clock_timestamp() - started), 0.001))::bigint;
        END IF;
    END LOOP;
    COMMIT;
    RAISE NOTICE 'levqor: migration % finished: % schemas, % failed (see levqor.migrations)', name, n, failed;
END
$fn$;

-- 7. Adopting legacy databases (sql/adopt.sql, new in 0.2.0).
-- Adopting a single-tenant database (the seeds' Genesis cutover): every
-- existing row goes to a first tenant, tenant_000 / "Levqor Core", and the
-- tables are protected. Procedures, so the backfill commits in batches
-- instead of holding locks for the whole table; CALL them outside a
-- transaction block. Superuser only: they alter every table they adopt.

CREATE TABLE levqor.adoptions (
    tbl           regclass PRIMARY KEY,
    tenant_id     uuid NOT NULL,
    tenant_column name NOT NULL,
    added_column  boolean NOT NULL,
    rows_assigned bigint NOT NULL DEFAULT 0,
    adopted_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.adoptions', '');

CREATE PROCEDURE levqor.adopt_legacy(
    tables        regclass[] DEFAULT NULL,
    slug          text DEFAULT 'tenant-000',
    name          text DEFAULT 'Levqor Core',
    plan          text DEFAULT 'enterprise',
    batch         int DEFAULT 10000,
    tenant_column name DEFAULT 'tenant_id'
)
LANGUAGE plpgsql AS $fn$
DECLARE
    core     uuid;
    admin_key text;
    rel      regclass;
    added    boolean;
    n        bigint;
    total    bigint;
    todo     regclass[];
BEGIN
    PERFORM levqor._require_superuser('levqor.adopt_legacy()');
    IF batch IS NULL OR batch < 1 THEN
        RAISE EXCEPTION 'batch must be positive' USING ERRCODE = '22023';
    END IF;
    -- Default: every ordinary table of public that levqor does not protect yet.
    todo := coalesce(tables, ARRAY(
        SELECT c.oid::regclass FROM pg_catalog.pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND NOT c.relispartition
           AND NOT levqor._is_protected(c.oid)
         ORDER BY c.oid));

    SELECT t.id INTO core FROM levqor.tenants t WHERE t.slug = adopt_legacy.slug;
    IF core IS NULL THEN
        SELECT c.tenant_id, c.api_key INTO core, admin_key
          FROM levqor.create_tenant(adopt_legacy.slug, adopt_legacy.name, adopt_legacy.plan) c;
        RAISE NOTICE 'levqor: created tenant % (%); its admin key, shown once: %', adopt_legacy.slug, core, admin_key;
    END IF;
    COMMIT;

    FOREACH rel IN ARRAY todo LOOP
        added := NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                              WHERE a.attrelid = rel AND a.attname = tenant_column AND NOT a.attisdropped);
        IF added THEN
            -- Nullable, no default: a catalog change, no rewrite.
            EXECUTE pg_catalog.format('ALTER TABLE %s ADD COLUMN %I uuid', rel, tenant_column);
        END IF;
        INSERT INTO levqor.adoptions (tbl, tenant_id, tenant_column, added_column)
        VALUES (rel, core, tenant_column, added)
        ON CONFLICT ON CONSTRAINT adoptions_pkey DO NOTHING;
        COMMIT;

        total := 0;
        LOOP
            EXECUTE pg_catalog.format(
                'UPDATE %1$s SET %2$I = $1 WHERE ctid = ANY (ARRAY(SELECT ctid FROM %1$s WHERE %2$I IS NULL LIMIT $2))',
                rel, tenant_column) USING core, batch;
            GET DIAGNOSTICS n = ROW_COUNT;
            total := total + n;
            UPDATE levqor.adoptions a SET rows_assigned = a.rows_assigned + n WHERE a.tbl = rel;
            COMMIT;
            EXIT WHEN n < batch;
            RAISE NOTICE 'levqor: %: % rows assigned to %', rel, total, adopt_legacy.slug;
        END LOOP;

        -- NOT NULL without a long exclusive scan: a NOT VALID check, validated
        -- under a lock that lets reads and writes go on, lets SET NOT NULL skip its scan.
        EXECUTE pg_catalog.format('ALTER TABLE %s ADD CONSTRAINT levqor_adopt_not_null CHECK (%I IS NOT NULL) NOT VALID',
                                  rel, tenant_column);
        COMMIT;
        EXECUTE pg_catalog.format('ALTER TABLE %s VALIDATE CONSTRAINT levqor_adopt_not_null', rel);
        COMMIT;
        PERFORM levqor.enable_tenancy(rel, tenant_column);
        EXECUTE pg_catalog.format('ALTER TABLE %s DROP CONSTRAINT levqor_adopt_not_null', rel);
        PERFORM levqor._log_event(core, 'table_adopted', pg_catalog.jsonb_build_object('table', rel::text, 'rows', total));
        COMMIT;
        RAISE NOTICE 'levqor: % adopted: % rows belong to %', rel, total, adopt_legacy.slug;
    END LOOP;
END
$fn$;

-- The way back: every adopted table becomes a plain single-tenant table
-- again. Rows of other tenants, if any were added since, are refused unless
-- keep_other_tenants_rows: a way back must not mix tenants silently.
CREATE PROCEDURE levqor.unadopt_legacy(drop_column boolean DEFAULT false, keep_other_tenants_rows boolean DEFAULT false)
LANGUAGE plpgsql AS $fn$
DECLARE
    a      record;
    others bigint;
BEGIN
    PERFORM levqor._require_superuser('levqor.unadopt_legacy()');
    -- Check every table before changing any, so a refusal changes nothing.
    IF NOT keep_other_tenants_rows THEN
        FOR a IN SELECT * FROM levqor.adoptions LOOP
            EXECUTE pg_catalog.format('SELECT count(*) FROM %s WHERE %I IS DISTINCT FROM $1', a.tbl, a.tenant_column)
               INTO others USING a.tenant_id;
            IF others > 0 THEN
                RAISE EXCEPTION '% has % rows of other tenants; nothing was changed', a.tbl, others
                    USING ERRCODE = '55000',
                          HINT = 'Purge or move them first, or CALL levqor.unadopt_legacy(keep_other_tenants_rows => true).';
            END IF;
        END LOOP;
    END IF;
    FOR a IN SELECT * FROM levqor.adoptions ORDER BY adopted_at DESC LOOP
        PERFORM levqor.disable_tenancy(a.tbl);
        IF drop_column AND a.added_column THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s DROP COLUMN %I', a.tbl, a.tenant_column);
        END IF;
        DELETE FROM levqor.adoptions d WHERE d.tbl = a.tbl;
        PERFORM levqor._log_event(a.tenant_id, 'table_unadopted', pg_catalog.jsonb_build_object('table', a.tbl::text));
        COMMIT;
    END LOOP;
END
$fn$;

-- 8. The audit log (sql/audit.sql, new in 0.2.0).
-- The audit log: every change to an audited table and every levqor event,
-- per tenant, in a SHA-256 hash chain.
--
-- Writers (the Rust trigger levqor._audit_row, and levqor._log_event) only
-- append *unchained* entries, so no writer waits for another's transaction.
-- levqor.seal_audit() links committed entries into their tenant's chain, one
-- sealer at a time, in id order of what has committed: entry N of a chain
-- stores hash_N = sha256(hash_{N-1} || canonical(entry N)).

CREATE TABLE levqor.audit_log (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        uuid,                      -- NULL: platform-level entries
    at               timestamptz NOT NULL DEFAULT statement_timestamp(),
    xid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    db_role          name NOT NULL DEFAULT current_user,
    user_id          uuid DEFAULT levqor.current_user_id(),
    member_role      text DEFAULT levqor.current_member_role(),
    application_name text DEFAULT current_setting('application_name'),
    client_addr      inet DEFAULT inet_client_addr(),
    kind             text NOT NULL CONSTRAINT audit_log_kind_check CHECK (kind IN ('row', 'event')),
    table_name       text,
    operation        text,
    pk               jsonb,
    old_row          jsonb,
    new_row          jsonb,
    changed          text[],
    event            text,
    detail           jsonb,
    -- the chain, set by seal_audit()
    seq              bigint,
    prev_hash        bytea,
    hash             bytea,
    sealed_at        timestamptz
);
CREATE UNIQUE INDEX audit_log_chain_idx ON levqor.audit_log
    ((coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)), seq) WHERE seq IS NOT NULL;
CREATE INDEX audit_log_unsealed_idx ON levqor.audit_log (id) WHERE seq IS NULL;
CREATE INDEX audit_log_tenant_idx ON levqor.audit_log (tenant_id, id);

-- The head of each chain: its length and last hash.
CREATE TABLE levqor.audit_heads (
    chain      uuid PRIMARY KEY,   -- the tenant, or the nil uuid for the platform
    seq        bigint NOT NULL,
    hash       bytea NOT NULL,
    -- Retention removed entries 1..floor_seq; verification starts after them,
    -- from floor_hash (the hash of the last removed entry).
    floor_seq  bigint NOT NULL DEFAULT 0,
    floor_hash bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
    updated_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_heads', '');

-- Tenants read their own trail, as auditor, admin or owner. Nobody else
-- reads, and nobody at all writes through SQL (see the guards below).
ALTER TABLE levqor.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE levqor.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_read ON levqor.audit_log FOR SELECT TO PUBLIC
    USING (tenant_id = levqor.current_tenant() AND levqor.current_member_role() IN ('auditor', 'admin', 'owner'));

-- The canonical serialization an entry's hash covers: a JSON array in a fixed
-- order (jsonb text output is deterministic), including its chain position.
CREATE FUNCTION levqor._audit_canonical(e levqor.audit_log, chain_seq bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT convert_to(jsonb_build_array(
        e.id, e.tenant_id, to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), e.xid::text,
        e.db_role, e.user_id, e.member_role, e.application_name, host(e.client_addr), e.kind,
        e.table_name, e.operation, e.pk, e.old_row, e.new_row, to_jsonb(e.changed), e.event, e.detail,
        chain_seq)::text, 'UTF8')
$fn$;

CREATE FUNCTION levqor.seal_audit(max_entries int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    e      levqor.audit_log;
    head   record;
    ch     uuid;
    nseq   bigint;
    prev   bytea;
    h      bytea;
    sealed int := 0;
BEGIN
    -- One sealer at a time; a second one has nothing to do.
    IF NOT pg_try_advisory_xact_lock(hashtext('levqor.seal_audit')) THEN
        RETURN 0;
    END IF;
    SET LOCAL levqor_audit.sealing = 'on';
    FOR e IN SELECT * FROM levqor.audit_log a WHERE a.seq IS NULL ORDER BY a.id LIMIT max_entries LOOP
        ch := coalesce(e.tenant_id, '00000000-0000-0000-0000-000000000000');
        SELECT hd.seq, hd.hash INTO head FROM levqor.audit_heads hd WHERE hd.chain = ch;
        nseq := coalesce(head.seq, 0) + 1;
        prev := coalesce(head.hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
        h := sha256(prev || levqor._audit_canonical(e, nseq));
        UPDATE levqor.audit_log a SET seq = nseq, prev_hash = prev, hash = h, sealed_at = clock_timestamp()
         WHERE a.id = e.id;
        INSERT INTO levqor.audit_heads AS hd (chain, seq, hash) VALUES (ch, nseq, h)
        ON CONFLICT (chain) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, updated_at = now();
        sealed := sealed + 1;
    END LOOP;
    RETURN sealed;
END
$fn$;

CREATE FUNCTION levqor.verify_audit(tenant text DEFAULT NULL)
RETURNS TABLE (ok boolean, checked bigint, first_bad_id bigint, reason text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    ch    uuid := CASE WHEN tenant IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid
                       ELSE levqor._tenant_id(tenant) END;
    e     levqor.audit_log;
    prev  bytea;
    n     bigint;
    head  record;
BEGIN
    checked := 0;
    SELECT hd.seq, hd.hash, hd.floor_seq, hd.floor_hash INTO head FROM levqor.audit_heads hd WHERE hd.chain = ch;
    n := coalesce(head.floor_seq, 0);
    prev := coalesce(head.floor_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    FOR e IN SELECT * FROM levqor.audit_log a
              WHERE coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000') = ch AND a.seq IS NOT NULL
              ORDER BY a.seq LOOP
        n := n + 1;
        IF e.seq <> n THEN
            RETURN QUERY SELECT false, checked, e.id, format('entry %s of the chain is missing (found %s next)', n, e.seq);
            RETURN;
        END IF;
        IF e.prev_hash IS DISTINCT FROM prev THEN
            RETURN QUERY SELECT false, checked, e.id, format('entry %s does not link to the entry before it', n);
            RETURN;
        END IF;
        IF e.hash IS DISTINCT FROM sha256(prev || levqor._audit_canonical(e, e.seq)) THEN
            RETURN QUERY SELECT false, checked, e.id, format('entry %s was changed after it was sealed', n);
            RETURN;
        END IF;
        prev := e.hash;
        checked := checked + 1;
    END LOOP;
    IF coalesce(head.seq, 0) <> n OR (n > 0 AND head.hash IS DISTINCT FROM prev) THEN
        RETURN QUERY SELECT false, checked, NULL::bigint,
            format('the chain ends at entry %s but its recorded head is entry %s: entries were removed from its end', n, coalesce(head.seq, 0));
        RETURN;
    END IF;
    RETURN QUERY SELECT true, checked, NULL::bigint, NULL::text;
END
$fn$;

-- The latest chain hash, for an outside party to anchor.
CREATE FUNCTION levqor.audit_head(tenant text DEFAULT NULL)
RETURNS TABLE (seq bigint, hash text, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT hd.seq, encode(hd.hash, 'hex'), hd.updated_at FROM levqor.audit_heads hd
     WHERE hd.chain = CASE WHEN $1 IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE levqor._tenant_id($1) END
$fn$;

-- Nobody edits or deletes entries through SQL: the only change allowed is
-- sealing (filling the chain columns once), and deletion only through
-- levqor.purge_audit_before() (retention), both marked with a local setting
-- that only levqor's definer functions set.
CREATE FUNCTION levqor._audit_immutable() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' AND current_setting('levqor_audit.sealing', true) = 'on'
       AND OLD.seq IS NULL AND NEW.seq IS NOT NULL
       AND (OLD.id, OLD.tenant_id, OLD.at, OLD.kind, OLD.table_name, OLD.operation, OLD.pk, OLD.old_row, OLD.new_row, OLD.event, OLD.detail)
           IS NOT DISTINCT FROM
           (NEW.id, NEW.tenant_id, NEW.at, NEW.kind, NEW.table_name, NEW.operation, NEW.pk, NEW.old_row, NEW.new_row, NEW.event, NEW.detail) THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' AND current_setting('levqor_audit.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the levqor audit log is append-only: % refused', TG_OP
        USING ERRCODE = '42501', HINT = 'Retention is levqor.purge_audit_before(), for superusers.';
END
$fn$;
CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE OR DELETE ON levqor.audit_log
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_truncate BEFORE TRUNCATE ON levqor.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_immutable();

-- Retention (superusers): delete sealed entries older than a point, a prefix
-- of each chain. The chain keeps verifying from its recorded floor; the
-- deletion itself is recorded as a platform event.
CREATE FUNCTION levqor.purge_audit_before(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    n bigint;
BEGIN
    PERFORM levqor._require_superuser('levqor.purge_audit_before()');
    SET LOCAL levqor_audit.retention = 'on';
    -- Per chain, only a prefix can go (entries sealed before the cutoff, up to
    -- the first one that is not): the floor records where the chain now starts.
    WITH doomed AS (
        SELECT coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) AS chain, a.seq, a.hash, a.id
          FROM levqor.audit_log a
         WHERE a.seq IS NOT NULL
           AND a.seq < coalesce((SELECT min(b.seq) FROM levqor.audit_log b
                                  WHERE coalesce(b.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                                        = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                                    AND b.seq IS NOT NULL AND b.at >= cutoff), 9223372036854775807)
    ), floors AS (
        SELECT DISTINCT ON (d.chain) d.chain, d.seq, d.hash FROM doomed d ORDER BY d.chain, d.seq DESC
    ), moved AS (
        UPDATE levqor.audit_heads hd SET floor_seq = f.seq, floor_hash = f.hash
          FROM floors f WHERE hd.chain = f.chain
    )
    DELETE FROM levqor.audit_log a USING doomed d WHERE a.id = d.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM levqor._log_event(NULL, 'audit_retention', jsonb_build_object('before', cutoff, 'deleted', n));
    RETURN n;
END
$fn$;

-- Statement-level triggers over transition tables (one set-based insert per
-- statement); updates are paired by primary key, so a table without one has
-- its updates audited row by row. TRUNCATE is recorded as one entry.
CREATE FUNCTION levqor.enable_audit(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND c.relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '42809';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_audit_insert') THEN
        RETURN;
    END IF;
    EXECUTE format('CREATE TRIGGER levqor_audit_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS levqor_new
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    EXECUTE format('CREATE TRIGGER levqor_audit_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS levqor_old
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    IF EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = tbl AND i.indisprimary) THEN
        EXECUTE format('CREATE TRIGGER levqor_audit_update AFTER UPDATE ON %s
                        REFERENCING OLD TABLE AS levqor_old NEW TABLE AS levqor_new
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    ELSE
        EXECUTE format('CREATE TRIGGER levqor_audit_update AFTER UPDATE ON %s
                        FOR EACH ROW EXECUTE FUNCTION levqor._audit_row()', tbl);
    END IF;
    EXECUTE format('CREATE TRIGGER levqor_audit_truncate AFTER TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    PERFORM levqor._log_event(levqor.current_tenant(), 'audit_enabled', jsonb_build_object('table', tbl::text));
END
$fn$;

-- Switching auditing off is for levqor_admin, and recorded: a table owner
-- cannot drop or disable the audit triggers (the DDL guards refuse).
CREATE FUNCTION levqor.disable_audit(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_truncate ON %s', tbl);
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
    PERFORM levqor._log_event(NULL, 'audit_disabled', jsonb_build_object('table', tbl::text));
END
$fn$;

CREATE POLICY audit_admin_read ON levqor.audit_log FOR SELECT TO levqor_admin USING (true);

-- levqor's own events (lifecycle, keys, plans) go into the chained log too.
CREATE OR REPLACE FUNCTION levqor._log_event(tenant uuid, event text, detail jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    INSERT INTO levqor.tenant_events (tenant_id, event, detail) VALUES (tenant, event, detail);
    INSERT INTO levqor.audit_log (tenant_id, db_role, kind, event, detail)
    VALUES (tenant, session_user, 'event', event, detail);
$fn$;

-- 9. Tenant export (sql/export.sql, new in 0.2.0).
-- GDPR portability: everything a tenant owns, as a stream of (table_name,
-- row) so a tenant with millions of rows is never one giant value in memory
-- (PostgreSQL spills the result to disk past work_mem). The first row is the
-- manifest: what is in the export and how many rows of each.

-- Where a tenant's rows are: protected shared tables (by their tenant
-- column) and every table of its own schema (tenant_column NULL).
CREATE FUNCTION levqor._export_sources(tid uuid) RETURNS TABLE (tbl regclass, tenant_column name)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pp.tbl::regclass, pp.tenant_column FROM levqor._protected() pp
     WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = pp.tbl)
    UNION ALL
    SELECT c.oid::regclass, NULL FROM levqor.tenants t
      JOIN pg_class c ON c.relnamespace = to_regnamespace(quote_ident(t.schema_name))
     WHERE t.id = tid AND c.relkind IN ('r', 'p') AND NOT c.relispartition
     ORDER BY 1
$fn$;

CREATE FUNCTION levqor._export(tid uuid) RETURNS TABLE (table_name text, row_data jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    t      levqor.tenants;
    p      record;
    counts jsonb := '{}';
    n      bigint;
BEGIN
    SELECT * INTO t FROM levqor.tenants WHERE id = tid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', tid USING ERRCODE = '42704';
    END IF;
    FOR p IN SELECT * FROM levqor._export_sources(tid) LOOP
        IF p.tenant_column IS NULL THEN
            EXECUTE format('SELECT count(*) FROM %s', p.tbl) INTO n;
        ELSE
            EXECUTE format('SELECT count(*) FROM %s WHERE %I = $1', p.tbl, p.tenant_column) INTO n USING tid;
        END IF;
        counts := counts || jsonb_build_object(p.tbl::text, n);
    END LOOP;
    counts := counts
        || jsonb_build_object('levqor.tenants', 1,
                              'levqor.tenant_keys', (SELECT count(*) FROM levqor.tenant_keys k WHERE k.tenant_id = tid),
                              'levqor.audit_log', (SELECT count(*) FROM levqor.audit_log a WHERE a.tenant_id = tid));

    table_name := 'manifest';
    row_data := jsonb_build_object('tenant', tid, 'slug', t.slug, 'exported_at', now(), 'format', 'levqor-export/1',
                              'rows', counts);
    RETURN NEXT;
    RETURN QUERY SELECT 'levqor.tenants', to_jsonb(x) FROM levqor.tenants x WHERE x.id = tid;
    -- Key metadata, never the hashes.
    RETURN QUERY SELECT 'levqor.tenant_keys', to_jsonb(k) - 'key_hash'
                   FROM levqor.tenant_keys k WHERE k.tenant_id = tid ORDER BY k.created_at;
    FOR p IN SELECT * FROM levqor._export_sources(tid) LOOP
        IF p.tenant_column IS NULL THEN
            RETURN QUERY EXECUTE format('SELECT %L::text, to_jsonb(x) FROM %s x', p.tbl::text, p.tbl);
        ELSE
            RETURN QUERY EXECUTE format('SELECT %L::text, to_jsonb(x) FROM %s x WHERE x.%I = $1',
                                        p.tbl::text, p.tbl, p.tenant_column) USING tid;
        END IF;
    END LOOP;
    RETURN QUERY SELECT 'levqor.audit_log', to_jsonb(a) FROM levqor.audit_log a WHERE a.tenant_id = tid ORDER BY a.id;
END
$fn$;

-- For levqor_admin: any tenant. The export itself is recorded.
CREATE FUNCTION levqor.export_tenant(tenant text) RETURNS TABLE (table_name text, row_data jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tid uuid := levqor._tenant_id(tenant);
BEGIN
    PERFORM levqor._log_event(tid, 'tenant_exported', '{}');
    RETURN QUERY SELECT * FROM levqor._export(tid);
END
$fn$;

-- For a tenant's own owner or admin (GDPR self-service): the context, not an
-- argument, names the tenant, so nobody exports another.
CREATE FUNCTION levqor.export_my_tenant() RETURNS TABLE (table_name text, row_data jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF levqor.current_tenant() IS NULL THEN
        RAISE EXCEPTION 'no levqor tenant context' USING ERRCODE = '42501',
            HINT = 'Call levqor.authenticate() with an owner or admin key first.';
    END IF;
    IF levqor.current_member_role() IS NULL OR levqor.current_member_role() NOT IN ('owner', 'admin') THEN
        RAISE EXCEPTION 'exporting a tenant takes its owner or admin role' USING ERRCODE = '42501';
    END IF;
    PERFORM levqor._log_event(levqor.current_tenant(), 'tenant_exported', '{"self": true}');
    RETURN QUERY SELECT * FROM levqor._export(levqor.current_tenant());
END
$fn$;

-- 10. Existing protected tables get the write guard that 0.2.0 adds to the
--     protection (enable_tenancy creates it for new ones).
DO $upgrade$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT p.tbl::regclass FROM levqor._protected() p LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = t AND g.tgname = 'levqor_write_guard') THEN
            EXECUTE pg_catalog.format('CREATE TRIGGER levqor_write_guard BEFORE INSERT OR UPDATE OR DELETE ON %s
                                       FOR EACH STATEMENT EXECUTE FUNCTION levqor._write_guard()', t);
        END IF;
    END LOOP;
END
$upgrade$;

-- 11. Privileges, as in a fresh 0.2.0 install (sql/grants.sql).
REVOKE ALL ON ALL TABLES IN SCHEMA levqor FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA levqor FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA levqor FROM PUBLIC;
-- Procedures are not "functions" to GRANT: closed separately (superusers only).
REVOKE ALL ON ALL PROCEDURES IN SCHEMA levqor FROM PUBLIC;
GRANT USAGE ON SCHEMA levqor TO PUBLIC;

-- Anyone may ask about their own context; every role that reads a protected
-- table runs current_tenant() through the policies.
GRANT EXECUTE ON FUNCTION
    levqor.current_tenant(), levqor.current_user_id(), levqor.current_member_role(),
    levqor.context_info(), levqor.clear_tenant(), levqor.preloaded()
TO PUBLIC;

-- Protecting a table is for its owner, whoever that is; registering only
-- adds a guard, and the TRUNCATE trigger function only refuses.
GRANT EXECUTE ON FUNCTION
    levqor.enable_tenancy(regclass, name), levqor._register_protected(regclass, name),
    levqor._tenant_qual(name), levqor._refuse_truncate(), levqor._write_guard(),
    levqor.enable_audit(regclass), levqor._audit_row()
TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    levqor.authenticate(text, boolean), levqor.set_tenant_token(text, boolean),
    levqor.export_my_tenant()
TO levqor_app;

GRANT EXECUTE ON FUNCTION
    levqor.set_tenant(text, boolean, uuid, text),
    levqor.sign_token(text, uuid, text, interval)
TO levqor_context_admin;

GRANT EXECUTE ON FUNCTION
    levqor.create_tenant(text, text, text, text, text, text, timestamptz),
    levqor.issue_key(text, text, interval, uuid, text),
    levqor.revoke_key(text),
    levqor.disable_tenancy(regclass),
    levqor.suspend_tenant(text, text, text),
    levqor.resume_tenant(text),
    levqor.change_plan(text, text, boolean),
    levqor.tenant_storage_bytes(text),
    levqor.offboard_tenant(text, interval),
    levqor.purge_tenant(text, boolean),
    levqor.rotate_keys(text, interval),
    levqor.isolation_report(),
    levqor.exempt_from_report(regclass, text),
    levqor.disable_audit(regclass),
    levqor.seal_audit(integer),
    levqor.verify_audit(text),
    levqor.audit_head(text),
    levqor.export_tenant(text)
TO levqor_admin;

GRANT SELECT ON levqor.plans TO levqor_app, levqor_admin;
-- The audit log: row level security shows tenants their own trail (auditor,
-- admin, owner) and levqor_admin all of it; nobody is granted any write.
GRANT SELECT ON levqor.audit_log TO PUBLIC;
GRANT SELECT ON levqor.audit_heads TO levqor_admin;
GRANT SELECT ON levqor.tenants, levqor.tenant_events, levqor.protected_tables, levqor.report_exemptions, levqor.migrations, levqor.adoptions TO levqor_admin;
-- Key metadata, never the hashes.
GRANT SELECT (key_id, tenant_id, role, user_id, label, created_at, created_by, expires_at, revoked_at)
    ON levqor.tenant_keys TO levqor_admin;

-- The policy helpers take no arguments and never raise, so they cannot leak
-- a row's values: mark them LEAKPROOF, as the planner may then push them
-- below security barriers.
ALTER FUNCTION levqor.current_tenant() LEAKPROOF;
ALTER FUNCTION levqor.current_user_id() LEAKPROOF;
ALTER FUNCTION levqor.current_member_role() LEAKPROOF;
