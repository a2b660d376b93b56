-- levqor on Citus (docs/citus.md): protected tables distributed by their
-- tenant column. Citus is detected at run time (levqor._citus_active()); its
-- catalog is read with dynamic SQL, so nothing here needs Citus installed.

-- How Citus distributes tbl: NULL (a local table, or no Citus), 'hash' with
-- its distribution column, or 'reference' / 'local' / 'single shard'.
CREATE FUNCTION levqor._distribution(tbl regclass, OUT method text, OUT column_name name)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT levqor._citus_active() THEN
        RETURN;
    END IF;
    EXECUTE $q$SELECT CASE p.partmethod WHEN 'h' THEN 'hash' WHEN 'n' THEN
                         CASE p.repmodel WHEN 't' THEN 'reference' ELSE
                              CASE WHEN p.colocationid = 0 THEN 'local' ELSE 'single shard' END END
                         ELSE p.partmethod::text END,
                      CASE WHEN p.partkey IS NOT NULL THEN pg_catalog.column_to_column_name(p.logicalrelid, p.partkey) END
                 FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = $1$q$
       INTO method, column_name USING tbl;
END
$fn$;

-- The tenant column a protected table was registered with (NULL: not protected).
CREATE FUNCTION levqor._tenant_column_of(tbl regclass) RETURNS name
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pt.tenant_column FROM levqor.protected_tables pt WHERE pt.tbl = $1
$fn$;

-- Whether a table its caller owns has any rows, whatever their tenant.
CREATE FUNCTION levqor._owner_has_rows(tbl regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    found boolean;
BEGIN
    IF NOT pg_has_role(levqor._caller(), (SELECT c.relowner FROM pg_class c WHERE c.oid = tbl), 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table %', tbl USING ERRCODE = '42501';
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', tbl) INTO found;
    RETURN found;
END
$fn$;

-- What levqor features a distributed table cannot have, as a refusal.
CREATE FUNCTION levqor._refuse_on_citus(tbl regclass, feature text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF (levqor._distribution(tbl)).method IS NULL THEN
        RETURN;
    END IF;
    RAISE EXCEPTION '% is a Citus distributed table: % cannot run on its shards', tbl, feature
        USING ERRCODE = '0A000',
              HINT = CASE feature
                  WHEN 'auditing' THEN 'Keep audited tables on the coordinator (not distributed): their entries join the tenant''s sealed chain there.'
                  WHEN 'a row limit' THEN 'Keep row-limited tables on the coordinator; API-call quotas work whatever the tables.'
                  WHEN 'a scope column' THEN 'Scoped tables read levqor''s organisation tree, which lives on the coordinator: keep them local.'
                  ELSE 'See docs/citus.md for what levqor supports on distributed tables.' END;
END
$fn$;

-- Protect tbl (if it is not yet) and distribute it by its tenant column,
-- co-located with colocate_with (NULL: Citus's default, which groups the
-- tables of one distribution column type and shard count, so that joins on
-- the tenant column stay on one node). Safe to call on a table already
-- distributed by its tenant column.
CREATE FUNCTION levqor.distribute(tbl regclass, tenant_column name DEFAULT 'tenant_id', colocate_with regclass DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    dist     record;
    col      name;
    problems text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'distribute: table must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF NOT levqor._citus_active() THEN
        RAISE EXCEPTION 'Citus is not installed in this database' USING ERRCODE = '0A000',
            HINT = 'Load citus before levqor (shared_preload_libraries = ''citus,levqor''), CREATE EXTENSION citus, add the worker nodes, then call levqor.distribute again.';
    END IF;
    IF levqor._scope_of(tbl) IS NOT NULL THEN
        RAISE EXCEPTION '% has a scope column: scoped tables cannot be distributed', tbl USING ERRCODE = '0A000',
            HINT = 'Scoped tables read levqor''s organisation tree, which lives on the coordinator: keep them local.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname LIKE 'levqor\_audit\_%') THEN
        RAISE EXCEPTION '% is audited: levqor''s audit trigger cannot run on Citus shards', tbl USING ERRCODE = '0A000',
            HINT = 'Keep audited tables on the coordinator, or call levqor.disable_audit() first.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname LIKE 'levqor\_limit\_%') THEN
        RAISE EXCEPTION '% has a row limit: row counters cannot run on Citus shards', tbl USING ERRCODE = '0A000',
            HINT = 'Keep row-limited tables on the coordinator, or call levqor.unlimit_rows() first.';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = tbl AND p.polname = 'levqor_schema_tenant') THEN
        RAISE EXCEPTION '% belongs to a schema tenant: only shared tables are distributed', tbl USING ERRCODE = '0A000';
    END IF;

    col := levqor._tenant_column_of(tbl);
    IF col IS NULL THEN
        PERFORM levqor.enable_tenancy(tbl, tenant_column);
        col := tenant_column;
    END IF;
    dist := levqor._distribution(tbl);
    IF dist.method IS NULL AND NOT (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.oid = levqor._caller())
       AND levqor._owner_has_rows(tbl) THEN
        RAISE EXCEPTION '% has rows: Citus copies them into the shards with COPY, which row level security refuses', tbl
            USING ERRCODE = '55000',
                  HINT = 'Distribute it empty and load its rows through tenant contexts, or have a superuser (or a role with BYPASSRLS) call levqor.distribute().';
    END IF;
    IF dist.method IS NULL THEN
        -- levqor's statement triggers (write guard, TRUNCATE guard) go to the
        -- shards with the table; Citus asks for this to allow that.
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
        EXECUTE 'SELECT pg_catalog.create_distributed_table($1, $2, colocate_with => $3)'
          USING tbl, col::text, coalesce(colocate_with::text, 'default');
    ELSIF dist.method <> 'hash' OR dist.column_name IS DISTINCT FROM col THEN
        RAISE EXCEPTION '% is already a Citus % table%', tbl, dist.method,
            coalesce(' distributed by ' || quote_ident(dist.column_name), '') USING ERRCODE = '55000',
            HINT = format('levqor distributes protected tables by their tenant column %I: undistribute_table(%L) first.', col, tbl::text);
    END IF;

    -- The DDL guard on each worker checked every shard as Citus made it (and
    -- made the policies Citus copied permissive restrictive again);
    -- levqor.shard_problems(tbl) shows it again once this commits.
END
$fn$;

-- A shard's protection problems ('' when intact), run on its worker. A shard
-- made after its table was distributed has no TRUNCATE trigger (Citus keeps
-- none on shards): levqor's utility hook refuses TRUNCATE of it instead.
CREATE FUNCTION levqor._shard_problems(shard regclass) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(string_agg(x, ', '), '') FROM levqor._tenancy_problems(shard, true) x
     WHERE x <> 'the TRUNCATE guard trigger is missing'
$fn$;

-- Every shard of a distributed protected table whose protection is not
-- intact, with what is wrong (no rows: all intact). For DBAs and the tests.
CREATE FUNCTION levqor.shard_problems(tbl regclass) RETURNS TABLE (shard_id bigint, problems text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF (levqor._distribution(tbl)).method IS NULL THEN
        RAISE EXCEPTION '% is not a Citus distributed table', tbl USING ERRCODE = '55000';
    END IF;
    RETURN QUERY EXECUTE $q$SELECT r.shardid, r.result FROM pg_catalog.run_command_on_shards($1,
                 'SELECT levqor._shard_problems(''%s''::regclass)') r
               WHERE NOT r.success OR coalesce(r.result, '') <> '' ORDER BY 1$q$ USING tbl;
END
$fn$;
