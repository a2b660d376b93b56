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

    -- 2b. A protected table whose row level security is off (the DDL guard
    --     was bypassed): no policy applies; levqor refuses it to everyone
    --     row level security would filter, until it is switched back on.
    RETURN QUERY
    SELECT 'high', 'rls_disabled', c.oid::regclass::text,
           'row level security is disabled on a table carrying levqor''s policies: none of them applies, so levqor refuses every query on it',
           format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;', c.oid::regclass::text)
      FROM pg_class c
     WHERE c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND levqor._is_protected(c.oid);

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
