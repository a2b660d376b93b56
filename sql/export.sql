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
                              'levqor.members', (SELECT count(*) FROM levqor.members m WHERE m.tenant_id = tid),
                              'levqor.audit_log', (SELECT count(*) FROM levqor.audit_log a WHERE a.tenant_id = tid));

    table_name := 'manifest';
    row_data := jsonb_build_object('tenant', tid, 'slug', t.slug, 'exported_at', now(), 'format', 'levqor-export/1',
                              'rows', counts);
    RETURN NEXT;
    RETURN QUERY SELECT 'levqor.tenants', to_jsonb(x) FROM levqor.tenants x WHERE x.id = tid;
    -- Key metadata, never the hashes.
    RETURN QUERY SELECT 'levqor.tenant_keys', to_jsonb(k) - 'key_hash'
                   FROM levqor.tenant_keys k WHERE k.tenant_id = tid ORDER BY k.created_at;
    RETURN QUERY SELECT 'levqor.members', to_jsonb(m) FROM levqor.members m WHERE m.tenant_id = tid ORDER BY m.added_at, m.user_id;
    FOR p IN SELECT * FROM levqor._export_sources(tid) LOOP
        IF p.tenant_column IS NULL THEN
            RETURN QUERY EXECUTE format('SELECT %L::text, to_jsonb(x) FROM %s x', p.tbl::text, p.tbl);
        ELSE
            RETURN QUERY EXECUTE format('SELECT %L::text, to_jsonb(x) FROM %s x WHERE x.%I = $1',
                                        p.tbl::text, p.tbl, p.tenant_column) USING tid;
        END IF;
    END LOOP;
    RETURN QUERY SELECT 'levqor.audit_log', to_jsonb(a) FROM levqor.audit_trail a WHERE a.tenant_id = tid ORDER BY a.id;
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
