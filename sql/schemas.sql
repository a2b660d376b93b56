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
    -- The permissive policy admits only the owning tenant too: losing the
    -- restrictive one loses nothing.
    IF NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = tbl AND p.polname = 'levqor_base') THEN
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING %s WITH CHECK %s',
                       tbl, qual, qual);
    END IF;
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON %s TO levqor_backup', tbl);
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
    -- Backups read and restore the tenant's tables (docs/backups.md).
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO levqor_backup', target);
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
