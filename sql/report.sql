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

-- Tables made with CREATE TABLE AS / SELECT INTO from protected tables
-- (recorded by levqor's ProcessUtility hook, src/exposure.rs): copies of
-- tenant rows outside any policy. `bypassed`: the role that made it was not
-- filtered by row level security, so the copy holds every tenant's rows.
CREATE TABLE levqor.derived_tables (
    tbl        regclass PRIMARY KEY,
    sources    regclass[] NOT NULL,
    bypassed   boolean NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.derived_tables', '');

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

    -- 8. Partitions of protected tables without protection of their own: a
    --    partition can be queried directly (levqor protects new ones; one
    --    made with the guards bypassed is not).
    RETURN QUERY
    SELECT 'high', 'unprotected_partition', c.oid::regclass::text,
           format('partition of protected table %s without policies of its own: read directly, it shows every tenant''s rows (levqor refuses it until it is protected)',
                  (SELECT a.relid::regclass::text FROM pg_partition_ancestors(c.oid) a WHERE a.relid <> c.oid AND levqor._is_protected(a.relid) LIMIT 1)),
           format('SELECT levqor.enable_tenancy(%L);', c.oid::regclass::text)
      FROM pg_class c
     WHERE c.relispartition AND c.relkind IN ('r', 'p') AND NOT levqor._is_protected(c.oid)
       AND EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a WHERE a.relid <> c.oid AND levqor._is_protected(a.relid));

    -- 9. Tables inheriting (not as partitions) from a protected table.
    RETURN QUERY
    SELECT 'high', 'inherits_protected', c.oid::regclass::text,
           format('inherits from protected table %s but has no policies of its own: its rows are read directly without any filter', i.inhparent::regclass::text),
           format('SELECT levqor.enable_tenancy(%L);', c.oid::regclass::text)
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE NOT c.relispartition AND levqor._is_protected(i.inhparent) AND NOT levqor._is_protected(c.oid);

    -- 10. Foreign keys between protected tables without the tenant column.
    RETURN QUERY
    SELECT 'high', 'foreign_key_without_tenant', format('%s (%I)', k.child::text, k.conname),
           format('references protected table %s without the tenant column: a tenant can point its rows at another tenant''s, and the key''s errors tell it which ids exist elsewhere', k.parent::text),
           levqor._scoped_key_sql(k.con)
      FROM levqor._unscoped_foreign_keys() k;

    -- 11. Materialized views over protected tables (they cannot be
    --     security_invoker: they hold what their owner saw when refreshed).
    RETURN QUERY
    SELECT DISTINCT ON (v.oid)
           CASE WHEN (o.rolsuper OR o.rolbypassrls)
                     AND (has_table_privilege('levqor_app', v.oid, 'SELECT') OR has_table_privilege('public', v.oid, 'SELECT'))
                THEN 'high' ELSE 'medium' END,
           'materialized_view_over_protected', v.oid::regclass::text,
           format('materialized view over protected table %s, refreshed with the rights of %I%s', t.tbl::regclass::text, o.rolname,
                  CASE WHEN o.rolsuper OR o.rolbypassrls THEN ', who bypasses row level security: it holds every tenant''s rows' ELSE '' END),
           format('Drop it, or protect what reads it: a view WITH (security_invoker = true) instead, or REVOKE SELECT ON %s FROM levqor_app, PUBLIC;', v.oid::regclass::text)
      FROM pg_class v
      JOIN pg_roles o ON o.oid = v.relowner
      JOIN pg_rewrite rw ON rw.ev_class = v.oid
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid AND d.refclassid = 'pg_class'::regclass
      JOIN levqor._protected() t ON t.tbl = d.refobjid
     WHERE v.relkind = 'm';

    -- 12. Tables copied from protected tables with CREATE TABLE AS / SELECT INTO.
    RETURN QUERY
    SELECT CASE WHEN d.bypassed THEN 'high' ELSE 'medium' END, 'copy_of_protected', d.tbl::text,
           format('made by %I from protected %s with CREATE TABLE AS: %s, outside any policy', d.created_by,
                  array_to_string(d.sources::text[], ', '),
                  CASE WHEN d.bypassed THEN 'every tenant''s rows' ELSE 'one tenant''s rows' END),
           format('DROP TABLE %s; or protect it: SELECT levqor.enable_tenancy(%L);', d.tbl::text, d.tbl::text)
      FROM levqor.derived_tables d
     WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = d.tbl) AND NOT levqor._is_protected(d.tbl);

    -- 13. SECURITY DEFINER functions in tenant-facing schemas without a
    --     pinned search_path: a caller's objects can stand in for the ones
    --     they mean, with the owner's rights.
    RETURN QUERY
    SELECT CASE WHEN o.rolsuper OR o.rolbypassrls THEN 'high' ELSE 'medium' END,
           'security_definer_search_path', f.oid::regprocedure::text,
           format('SECURITY DEFINER function owned by %I without SET search_path', o.rolname),
           format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp;', f.oid::regprocedure::text)
      FROM pg_proc f
      JOIN pg_roles o ON o.oid = f.proowner
     WHERE f.prosecdef
       AND f.pronamespace IN (SELECT k.relnamespace FROM pg_class k JOIN levqor._protected() p ON p.tbl = k.oid)
       AND NOT EXISTS (SELECT 1 FROM unnest(f.proconfig) x WHERE x LIKE 'search\_path=%');

    -- 14. Protected tables, and their sequences, granted to PUBLIC.
    RETURN QUERY
    SELECT 'medium', 'granted_to_public', t.tbl::regclass::text,
           'protected table granted to PUBLIC: every role, not just the application''s, may query it (rows are still filtered)',
           format('REVOKE ALL ON %s FROM PUBLIC;', t.tbl::regclass::text)
      FROM levqor._protected() t JOIN pg_class c ON c.oid = t.tbl
     WHERE EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0);
    RETURN QUERY
    SELECT 'low', 'granted_to_public', s.oid::regclass::text,
           format('sequence of protected table %s granted to PUBLIC: any role can learn how many rows all tenants together created', t.tbl::regclass::text),
           format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC;', s.oid::regclass::text)
      FROM levqor._protected() t
      JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.tbl AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
      JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
     WHERE EXISTS (SELECT 1 FROM aclexplode(s.relacl) a WHERE a.grantee = 0);

    -- 15. A protected table owned by a role the application logs in as.
    RETURN QUERY
    SELECT 'medium', 'owned_by_application', t.tbl::regclass::text,
           format('owned by %I, a login role with levqor_app: the application can change the table''s schema, indexes and triggers (levqor''s guards keep its protection)', o.rolname),
           format('ALTER TABLE %s OWNER TO <a migration role>;', t.tbl::regclass::text)
      FROM levqor._protected() t JOIN pg_class c ON c.oid = t.tbl JOIN pg_roles o ON o.oid = c.relowner
     WHERE o.rolcanlogin AND NOT o.rolsuper AND pg_has_role(o.oid, 'levqor_app', 'MEMBER');

    -- 16. Application roles that own levqor's own objects.
    RETURN QUERY
    SELECT DISTINCT 'high', 'application_owns_levqor', o.rolname::text,
           'a member of levqor_app owns objects of the levqor schema: it could change levqor''s catalog or functions',
           format('Give them back to the superuser that installed levqor: REASSIGN OWNED BY %I TO postgres; (then re-grant what %I needs)', o.rolname, o.rolname)
      FROM (SELECT c.relowner AS owner FROM pg_class c WHERE c.relnamespace = 'levqor'::regnamespace
            UNION SELECT f.proowner FROM pg_proc f WHERE f.pronamespace = 'levqor'::regnamespace) x
      JOIN pg_roles o ON o.oid = x.owner
     WHERE pg_has_role(o.oid, 'levqor_app', 'MEMBER') AND NOT o.rolsuper;

    -- 17. Permissive policies others added to protected tables: levqor's
    --     restrictive ones still bound what they admit, but they say something
    --     other than what the table does.
    RETURN QUERY
    SELECT 'low', 'extra_permissive_policy', format('%s (%I)', pol.polrelid::regclass::text, pol.polname),
           'a permissive policy beside levqor''s: it cannot widen what a tenant sees (levqor''s restrictive policies bound it), but it reads as if it did',
           format('Write it AS RESTRICTIVE if it is meant to narrow, or DROP POLICY %I ON %s;', pol.polname, pol.polrelid::regclass::text)
      FROM pg_policy pol JOIN levqor._protected() t ON t.tbl = pol.polrelid
     WHERE pol.polpermissive AND pol.polname NOT IN ('levqor_base', 'levqor_base_shared');

    -- 18. Audit entries nobody seals: without a worker for this database
    --     (levqor.audit_database) or a scheduled seal_audit(), verify_audit
    --     has nothing to verify and reports ok.
    RETURN QUERY
    SELECT 'high', 'audit_not_sealed', current_database()::text,
           'audit entries older than ten minutes are not sealed into their chains: verify_audit cannot vouch for them',
           format('Add %L to levqor.audit_database (shared_preload_libraries = ''levqor'', then restart), or run SELECT levqor.seal_audit(); on a schedule.', current_database())
     WHERE EXISTS (SELECT 1 FROM levqor.audit_log a
                    WHERE a.id > (SELECT st.through FROM levqor.audit_seal_state st) AND a.at < now() - interval '10 minutes'
                      AND NOT EXISTS (SELECT 1 FROM levqor.audit_chain ch
                                       WHERE ch.chain = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                                         AND ch.last_id >= a.id AND ch.ids[width_bucket(a.id, ch.ids)] = a.id)
                    ORDER BY a.id LIMIT 1);

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

-- The report as one JSON array, for CI pipelines: fail on
-- `jsonb_path_exists(levqor.isolation_report(format => 'json'), '$[*] ? (@.severity == "high")')`.
CREATE FUNCTION levqor.isolation_report(format text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF format IS DISTINCT FROM 'json' THEN
        RAISE EXCEPTION 'unknown report format %', coalesce(quote_literal(format), 'NULL') USING ERRCODE = '22023',
            HINT = 'format => ''json'', or call levqor.isolation_report() for rows.';
    END IF;
    RETURN coalesce((SELECT jsonb_agg(to_jsonb(r) ORDER BY CASE r.severity WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END, r.kind, r.object)
                       FROM levqor.isolation_report() r), '[]'::jsonb);
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
