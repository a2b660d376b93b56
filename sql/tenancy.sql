-- Protecting tables: enable_tenancy / disable_tenancy, and the guards that
-- keep a table owner from undoing the protection behind levqor's back.
--
-- Shape of a protected table t with tenant column c:
--   * c uuid NOT NULL DEFAULT levqor.current_tenant(), with an index led by c;
--   * row level security ENABLED and FORCED (the owner is not exempt);
--   * RESTRICTIVE policies levqor_tenant_{select,insert,update,delete}, each
--     exactly (c = levqor.current_tenant()), so any permissive policy a user
--     adds can only ever narrow what a tenant sees, never widen it;
--   * one PERMISSIVE policy levqor_base, USING the same expression and WITH
--     CHECK the write rule, so that a restrictive policy lost (a restore in
--     an unlucky order, a superuser's DROP with the guards bypassed) loses
--     nothing: every subset of levqor's policies admits at most the
--     context's own tenant (docs/isolation.md, "Fail closed");
--   * a BEFORE TRUNCATE trigger, because TRUNCATE ignores row level security;
--   * a BEFORE INSERT/UPDATE/DELETE statement trigger, the write guard, that
--     refuses writes while the context's tenant is suspended (lifecycle.rs).
--
-- The guards that read pg_class run with citus.override_table_visibility off:
-- on a Citus worker, Citus hides its shards from pg_class queries, and a
-- guard that cannot see a shard would find nothing wrong with it (a setting
-- of a library that is not loaded is a harmless placeholder).

-- The one expression every levqor policy must carry, for column c.
CREATE FUNCTION levqor._tenant_qual(c name) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT pg_catalog.format('(%I = levqor.current_tenant())', c)
$fn$;

-- The scope column a protected table was registered with (NULL: none).
CREATE FUNCTION levqor._scope_of(tbl regclass) RETURNS name
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pt.scope_column FROM levqor.protected_tables pt WHERE pt.tbl = $1
$fn$;

CREATE FUNCTION levqor._refuse_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of %.% is refused: it would remove every tenant''s rows',
        quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME)
        USING ERRCODE = '42501',
              HINT = 'DELETE removes only the current tenant''s rows. A levqor_admin can call levqor.disable_tenancy() first.';
END
$fn$;

-- Problems with a table's levqor protection; no rows means intact. Used by
-- enable_tenancy (which must leave no problem) and by the DDL guard.
CREATE FUNCTION levqor._tenancy_problems(tbl regclass, complete boolean)
RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET citus.override_table_visibility = off AS $fn$
#variable_conflict use_variable
DECLARE
    c        record;
    p        record;
    col      name;
    scope    name;
    fits     boolean;
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
    SELECT pt.tenant_column, pt.scope_column INTO col, scope FROM levqor.protected_tables pt WHERE pt.tbl = $1;
    IF NOT FOUND THEN
        -- Not registered (a schema-only restore, or one still under way):
        -- the table itself says which column its policies compare and which
        -- column its levqor scope check constrains.
        SELECT a.attname INTO col FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
           AND EXISTS (SELECT 1 FROM pg_policy pol
                        WHERE pol.polrelid = tbl AND pol.polname LIKE 'levqor\_%'
                          AND strpos(coalesce(pg_get_expr(pol.polqual, pol.polrelid), '')
                                     || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), ''),
                                     levqor._tenant_qual(a.attname)) > 0)
         ORDER BY a.attnum LIMIT 1;
        SELECT a.attname INTO scope
          FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
         WHERE k.conrelid = tbl AND k.conname = 'levqor_scope_check' AND cardinality(k.conkey) = 1
           AND pg_get_constraintdef(k.oid) = format('CHECK ((%I = ANY (ARRAY[''organization''::text, ''tenant''::text, ''platform''::text])))', a.attname);
        IF col IS NULL THEN
            scope := NULL;
        END IF;
    END IF;

    FOR p IN
        SELECT pol.polname, pol.polcmd, pol.polpermissive, pol.polroles,
               pg_get_expr(pol.polqual, pol.polrelid) AS qual,
               pg_get_expr(pol.polwithcheck, pol.polrelid) AS chk
          FROM pg_policy pol
         WHERE pol.polrelid = tbl
    LOOP
        -- Every levqor policy applies to every role: a restrictive one
        -- narrowed to some roles would no longer restrict the others.
        IF p.polname LIKE 'levqor\_%' AND p.polroles <> '{0}'::oid[] THEN
            RETURN NEXT format('policy %I must apply to PUBLIC', p.polname);
        END IF;
        IF p.polname = 'levqor_base' THEN
            -- Permissive, and itself admitting only the context's tenant (a
            -- schema tenant's table: only the tenant that owns the schema).
            IF NOT p.polpermissive OR p.polcmd <> '*' OR NOT (
                (p.qual ~ '^\(levqor\.current_tenant\(\) = ''[0-9a-f-]{36}''::uuid\)$' AND p.chk = p.qual)
                OR EXISTS (
                SELECT 1 FROM pg_attribute a
                 WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                   AND (col IS NULL OR a.attname = col)
                   AND p.qual = levqor._tenant_qual(a.attname)
                   AND p.chk = CASE WHEN scope IS NULL THEN levqor._tenant_qual(a.attname)
                                    ELSE levqor._scoped_write_qual(a.attname, scope) END))
            THEN
                RETURN NEXT 'policy levqor_base no longer admits only the context''s own tenant';
            END IF;
            CONTINUE;
        END IF;
        IF p.polname = 'levqor_base_shared' THEN
            -- Scoped tables: what reads may reach beyond the tenant's own rows.
            IF scope IS NULL OR NOT p.polpermissive OR p.polcmd <> 'r' OR p.chk IS NOT NULL
               OR p.qual IS DISTINCT FROM levqor._scoped_select_qual(col, scope) THEN
                RETURN NEXT format('policy levqor_base_shared no longer matches the scoped protection%s',
                                   CASE WHEN scope IS NULL THEN ' (the table has no scope column)' ELSE '' END);
            END IF;
            CONTINUE;
        END IF;
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
            -- A scoped table (sql/hierarchy.sql): reads may also reach rows
            -- shared at tenant or platform scope (or only the tenant's own,
            -- which is narrower); writes stay in the writer's organization
            -- and only a platform writes platform-scope rows.
            IF scope IS NOT NULL THEN
                fits := CASE p.polname
                       WHEN 'levqor_tenant_select' THEN p.chk IS NULL AND p.qual IN (levqor._tenant_qual(col),
                                                                  levqor._scoped_select_qual(col, scope))
                       WHEN 'levqor_tenant_insert' THEN p.qual IS NULL AND p.chk = levqor._scoped_write_qual(col, scope)
                       WHEN 'levqor_tenant_update' THEN p.qual = levqor._tenant_qual(col)
                                                        AND p.chk = levqor._scoped_write_qual(col, scope)
                       WHEN 'levqor_tenant_delete' THEN p.chk IS NULL AND p.qual = levqor._tenant_qual(col)
                       ELSE false END;
                IF NOT coalesce(fits, false) THEN
                    RETURN NEXT format('policy %I no longer matches the scoped protection of column %I', p.polname, scope);
                END IF;
                CONTINUE;
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
                                     'levqor_tenant_update', 'levqor_tenant_delete', 'levqor_base']
                               || CASE WHEN scope IS NULL THEN '{}'::text[] ELSE ARRAY['levqor_base_shared'] END) AS polname
        LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = p.polname) THEN
                RETURN NEXT format('policy %I is missing', p.polname);
            END IF;
        END LOOP;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_no_truncate(_[0-9]+)?$') THEN
            RETURN NEXT 'the TRUNCATE guard trigger is missing';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_write_guard(_[0-9]+)?$') THEN
            RETURN NEXT 'the write guard trigger is missing';
        END IF;
    END IF;
    -- (On a Citus shard the triggers' names end in the shard's id.)
    -- A trigger fires in ordinary sessions only when enabled 'O' (origin) or
    -- 'A' (always): 'D' (disabled) and 'R' (ENABLE REPLICA) both switch it off.
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_no_truncate(_[0-9]+)?$'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the TRUNCATE guard trigger is disabled';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_write_guard(_[0-9]+)?$'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the write guard trigger is disabled';
    END IF;
END
$fn$;

-- Is tbl under levqor tenancy? Decided by its policies, not by
-- levqor.protected_tables: pg_restore loads that table's rows before it
-- re-enables row level security and re-creates the policies, and the guard
-- must not trip over a restore in progress. Any one of levqor's policies
-- counts, so that the guard switches row level security on (and keeps it
-- on) from the first one a restore creates.
CREATE FUNCTION levqor._is_protected(tbl oid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = $1
                      AND (pol.polname LIKE 'levqor\_tenant\_%' OR pol.polname IN ('levqor_base', 'levqor_base_shared')))
$fn$;

-- Record tbl as protected, after checking the protection is complete. Open to
-- every role: registering only ever adds a guard.
CREATE FUNCTION levqor._register_protected(tbl regclass, tenant_column name) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    problems text;
BEGIN
    SELECT string_agg(x, '; ') INTO problems FROM levqor._tenancy_problems(tbl, true) x;
    IF problems IS NOT NULL THEN
        RAISE EXCEPTION 'levqor: % is not fully protected: %', tbl, problems USING ERRCODE = '55000';
    END IF;
    INSERT INTO levqor.protected_tables (tbl, tenant_column) VALUES (tbl, tenant_column)
    ON CONFLICT ON CONSTRAINT protected_tables_pkey DO UPDATE SET tenant_column = EXCLUDED.tenant_column;
END
$fn$;

CREATE FUNCTION levqor.enable_tenancy(tbl regclass, tenant_column name DEFAULT 'tenant_id')
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
    dist     record;
BEGIN
    IF tbl IS NULL OR tenant_column IS NULL THEN
        RAISE EXCEPTION 'enable_tenancy: table and tenant column must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF levqor._scope_of(tbl) IS NOT NULL THEN
        RAISE EXCEPTION '% is protected with a scope column', tbl USING ERRCODE = '55000',
            HINT = 'Call levqor.enable_tenancy(table, tenant_column, scope_column) for it.';
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
    -- On Citus: a distributed table is distributed by its tenant column (so
    -- each tenant's rows live on one shard), and levqor's statement triggers
    -- go to its shards (which Citus allows only when asked to).
    dist := levqor._distribution(tbl);
    IF dist.method IS NOT NULL AND (dist.method <> 'hash' OR dist.column_name IS DISTINCT FROM tenant_column) THEN
        RAISE EXCEPTION '% is a Citus % table%: levqor protects distributed tables distributed by their tenant column',
            tbl, dist.method, coalesce(' distributed by ' || quote_ident(dist.column_name), '') USING ERRCODE = '0A000',
            HINT = format('undistribute_table(%L), then levqor.distribute(%L, %L).', tbl::text, tbl::text, tenant_column);
    END IF;
    IF levqor._citus_active() THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
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
        IF NOT col.atthasdef AND dist.method = 'hash' THEN
            -- Citus refuses DDL on a distribution column. The coordinator
            -- fills defaults in before it routes a row, so the default is
            -- needed here only: set without propagation to the shards.
            PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT levqor.current_tenant()', tbl, tenant_column);
            PERFORM set_config('citus.enable_ddl_propagation', 'on', true);
        ELSIF NOT col.atthasdef THEN
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
    -- The permissive policy admits the context's tenant too, so that no
    -- subset of levqor's policies ever admits more (a scoped table's base
    -- keeps its write rule: _register_scope sets it).
    SELECT pol.polpermissive, pol.polcmd, pg_get_expr(pol.polqual, pol.polrelid) AS qual INTO existing
      FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = 'levqor_base';
    IF NOT FOUND THEN
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING %s WITH CHECK %s', tbl, qual, qual);
    ELSIF NOT existing.polpermissive OR existing.polcmd <> '*' THEN
        EXECUTE format('DROP POLICY levqor_base ON %s', tbl);
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING %s WITH CHECK %s', tbl, qual, qual);
    ELSIF existing.qual IS DISTINCT FROM qual AND levqor._scope_of(tbl) IS NULL THEN
        EXECUTE format('ALTER POLICY levqor_base ON %s TO PUBLIC USING %s WITH CHECK %s', tbl, qual, qual);
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

    -- Backups read a tenant's rows, and restores write them back, through the
    -- tenant's context (docs/backups.md): row level security still decides.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON %s TO levqor_backup', tbl);
    PERFORM levqor._register_protected(tbl, tenant_column);
    PERFORM levqor._warn_unscoped_foreign_keys(tbl);
END
$fn$;

-- Marks, for the current transaction only, tables whose protection
-- disable_tenancy is removing. Only levqor's own definer functions write it.
CREATE TABLE levqor._disabling (
    tbl oid NOT NULL,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);

-- Whether disable_tenancy is removing tbl's protection in this transaction.
CREATE FUNCTION levqor._being_disabled(tbl oid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM levqor._disabling d WHERE d.tbl = $1 AND d.xid = pg_current_xact_id())
$fn$;

CREATE FUNCTION levqor.disable_tenancy(tbl regclass) RETURNS void
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
    -- A partition is protected while its parent is: it can be read directly.
    IF EXISTS (SELECT 1 FROM pg_inherits inh JOIN pg_class k ON k.oid = inh.inhrelid AND k.relispartition
                WHERE inh.inhrelid = tbl AND levqor._is_protected(inh.inhparent) AND NOT levqor._being_disabled(inh.inhparent)) THEN
        RAISE EXCEPTION '% is a partition of a protected table', tbl USING ERRCODE = '55000',
            HINT = 'Disable tenancy on the partitioned table (it takes its partitions along), or detach the partition first.';
    END IF;
    IF (levqor._distribution(tbl)).method IS NOT NULL THEN
        RAISE EXCEPTION '% is a Citus distributed table: levqor does not remove tenancy from one', tbl
            USING ERRCODE = '0A000',
                  HINT = 'Its shards keep their policies on every worker; copy the rows into a new table without tenancy instead.';
    END IF;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    FOR child IN SELECT inh.inhrelid::regclass FROM pg_inherits inh WHERE inh.inhparent = tbl LOOP
        PERFORM levqor.disable_tenancy(child);
    END LOOP;
    FOR pol IN SELECT p.polname FROM pg_policy p
                WHERE p.polrelid = tbl AND (p.polname LIKE 'levqor\_tenant\_%' OR p.polname IN ('levqor_base', 'levqor_base_shared')) LOOP
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

-- Re-create a levqor_tenant_* policy that arrived permissive as restrictive
-- (the same command and expressions); the guards let the swap through.
CREATE FUNCTION levqor._make_restrictive(tbl oid, policy oid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    p record;
BEGIN
    SELECT pol.polname, pol.polcmd, pg_get_expr(pol.polqual, pol.polrelid) AS qual,
           pg_get_expr(pol.polwithcheck, pol.polrelid) AS chk INTO p
      FROM pg_policy pol
     WHERE pol.oid = policy AND pol.polrelid = tbl AND pol.polpermissive AND pol.polname LIKE 'levqor\_tenant\_%';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    EXECUTE format('DROP POLICY %I ON %s', p.polname, tbl::regclass);
    EXECUTE format('CREATE POLICY %I ON %s AS RESTRICTIVE FOR %s TO PUBLIC %s %s', p.polname, tbl::regclass,
                   CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                 WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                   CASE WHEN p.qual IS NOT NULL THEN 'USING (' || p.qual || ')' ELSE '' END,
                   CASE WHEN p.chk IS NOT NULL THEN 'WITH CHECK (' || p.chk || ')' ELSE '' END);
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
END
$fn$;

-- DDL guard, after every command that could weaken a protected table.
CREATE FUNCTION levqor._guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET citus.override_table_visibility = off AS $fn$
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
        IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname LIKE 'levqor\_limit\_%'
                                               AND t.tgenabled NOT IN ('O', 'A')) THEN
            RAISE EXCEPTION 'levqor: % would switch the row limit off on %', cmd.command_tag, tbl::regclass
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.unlimit_rows().';
        END IF;
        CONTINUE WHEN NOT levqor._is_protected(tbl);
        -- Citus copies a table's policies to its shards (and to the other
        -- nodes' copies of the table) without AS RESTRICTIVE. A levqor policy
        -- arriving permissive is made restrictive again: strengthening is
        -- never refused, and a permissive copy would let any other policy
        -- widen what a tenant sees.
        IF cmd.command_tag = 'CREATE POLICY' AND cmd.classid = 'pg_policy'::regclass THEN
            PERFORM levqor._make_restrictive(tbl, cmd.objid);
        END IF;
        -- A policy of levqor's arriving on a table whose row level security
        -- is off (pg_restore re-creates policies before it re-enables row
        -- level security when the table's name sorts after "levqor_"):
        -- switch it on now, rather than refuse the policy. Strengthening is
        -- never refused; the table is closed from its first policy on.
        IF cmd.command_tag IN ('CREATE POLICY', 'ALTER POLICY')
           AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND NOT (c.relrowsecurity AND c.relforcerowsecurity)) THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', tbl::regclass);
        END IF;
        SELECT string_agg(x, '; ') INTO problems FROM levqor._tenancy_problems(tbl::regclass, false) x;
        IF problems IS NOT NULL THEN
            RAISE EXCEPTION 'levqor: % would weaken tenant isolation on %: %', cmd.command_tag, tbl::regclass, problems
                USING ERRCODE = '42501',
                      HINT = 'A levqor_admin can remove levqor tenancy with levqor.disable_tenancy().';
        END IF;
    END LOOP;
END
$fn$;

-- Drop guard: a levqor policy or guard trigger may go only with its table.
CREATE FUNCTION levqor._guard_drop() RETURNS event_trigger
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
                OR o.address_names[3] IN ('levqor_base', 'levqor_base_shared', 'levqor_no_truncate', 'levqor_write_guard')
                -- on a Citus shard, its triggers carry the shard's id
                OR o.address_names[3] ~ '^levqor_(no_truncate|write_guard)_[0-9]+$'
                OR o.address_names[3] LIKE 'levqor\_audit\_%'
                OR o.address_names[3] LIKE 'levqor\_limit\_%')
    LOOP
        tbl := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
        CONTINUE WHEN tbl IS NULL;  -- the table itself is going away
        CONTINUE WHEN levqor._being_disabled(tbl);
        IF obj.address_names[3] LIKE 'levqor\_audit\_%' THEN
            RAISE EXCEPTION 'levqor: dropping % % on % would switch auditing off',
                obj.object_type, quote_ident(obj.address_names[3]), tbl
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.disable_audit().';
        END IF;
        IF obj.address_names[3] LIKE 'levqor\_limit\_%' THEN
            RAISE EXCEPTION 'levqor: dropping % % on % would switch the row limit off',
                obj.object_type, quote_ident(obj.address_names[3]), tbl
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.unlimit_rows().';
        END IF;
        RAISE EXCEPTION 'levqor: dropping % % on % would remove tenant isolation',
            obj.object_type, quote_ident(obj.address_names[3]), tbl
            USING ERRCODE = '42501',
                  HINT = 'A levqor_admin can remove levqor tenancy with levqor.disable_tenancy().';
    END LOOP;
    DELETE FROM levqor.protected_tables pt
     WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = pt.tbl);
    -- A dropped table's row limit goes with it (its metric is free again).
    DELETE FROM levqor.row_limits rl
     WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = rl.tbl);
END
$fn$;

-- Partitions, whenever and however they come to exist: a partition can be
-- queried directly, so each one is protected like its parent the moment it
-- is created (CREATE TABLE … PARTITION OF, as pg_partman or a cron job
-- does) or attached (ALTER TABLE … ATTACH PARTITION), sub-partitions
-- included. A partition of a scoped table gets its parent's tenant column
-- without the sharing rules: read directly it shows only the context's own
-- rows; read through its parent, the parent's (scoped) policies apply.
-- Detached, a partition keeps its policies: it stays protected.
CREATE FUNCTION levqor._protect_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET citus.override_table_visibility = off AS $fn$
#variable_conflict use_variable
DECLARE
    cmd  record;
    part record;
BEGIN
    FOR cmd IN SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() c
                WHERE c.classid = 'pg_class'::regclass AND c.object_type = 'table' LOOP
        -- The new or altered table if it is a partition, and the partitions
        -- of a table that was altered (ATTACH PARTITION is an ALTER TABLE of
        -- the parent).
        FOR part IN
            SELECT i.inhrelid::regclass AS child, pt.tenant_column, i.inhparent::regclass AS parent
              FROM pg_inherits i
              JOIN pg_class k ON k.oid = i.inhrelid AND k.relispartition
              JOIN levqor.protected_tables pt ON pt.tbl = i.inhparent
             WHERE (i.inhrelid = cmd.objid OR i.inhparent = cmd.objid)
               AND NOT levqor._is_protected(i.inhrelid)
               AND NOT levqor._being_disabled(i.inhrelid)
        LOOP
            -- Marked while levqor protects it, so that the DDL this runs
            -- (itself seen by these triggers) does not start it again.
            INSERT INTO levqor._disabling (tbl) VALUES (part.child);
            PERFORM levqor.enable_tenancy(part.child, part.tenant_column);
            DELETE FROM levqor._disabling d WHERE d.tbl = part.child::oid;
            RAISE NOTICE 'levqor: partition % of % is protected like its parent', part.child, part.parent;
        END LOOP;
    END LOOP;
END
$fn$;

CREATE EVENT TRIGGER levqor_protect_partitions ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION levqor._protect_partitions();

CREATE EVENT TRIGGER levqor_guard_ddl ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'CREATE POLICY', 'ALTER POLICY', 'ALTER TRIGGER')
    EXECUTE FUNCTION levqor._guard_ddl();

CREATE EVENT TRIGGER levqor_guard_drop ON sql_drop
    EXECUTE FUNCTION levqor._guard_drop();
