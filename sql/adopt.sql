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
