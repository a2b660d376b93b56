-- Foreign keys between protected tables (docs/isolation.md, "Foreign keys").
--
-- PostgreSQL checks a foreign key without row level security, by design. So
-- `items (note_id) REFERENCES notes (id)`, both protected, lets one tenant
-- point its rows at another tenant's note (and an ON DELETE CASCADE lets
-- that tenant's delete remove them), and its errors tell which ids exist in
-- other tenants. The standard fix is a key that carries the tenant column on
-- both sides, `(tenant_id, note_id) REFERENCES notes (tenant_id, id)`: a
-- reference to another tenant's row is then exactly a reference to a
-- missing one. scope_foreign_keys() rewrites a table's keys that way.

-- Foreign keys from and to protected tables that leave the tenant column
-- out; tbl NULL: every such key.
CREATE FUNCTION levqor._unscoped_foreign_keys(tbl regclass DEFAULT NULL)
RETURNS TABLE (con oid, conname name, child regclass, parent regclass, child_column name, parent_column name)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT k.oid, k.conname, k.conrelid::regclass, k.confrelid::regclass, c.tenant_column, p.tenant_column
      FROM pg_constraint k
      JOIN levqor._protected() c ON c.tbl = k.conrelid
      JOIN levqor._protected() p ON p.tbl = k.confrelid
      JOIN pg_attribute ca ON ca.attrelid = k.conrelid AND ca.attname = c.tenant_column
      JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attname = p.tenant_column
     WHERE k.contype = 'f' AND k.conparentid = 0
       AND ($1 IS NULL OR k.conrelid = $1 OR k.confrelid = $1)
       -- Scoped: the tenant columns are paired with each other.
       AND NOT EXISTS (SELECT 1 FROM unnest(k.conkey, k.confkey) AS x(ck, pk) WHERE x.ck = ca.attnum AND x.pk = pa.attnum)
$fn$;

-- The statements that scope one foreign key, for warnings and the report.
CREATE FUNCTION levqor._scoped_key_sql(con oid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k record;
BEGIN
    SELECT * INTO k FROM levqor._unscoped_foreign_keys() u WHERE u.con = $1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN format('SELECT levqor.scope_foreign_keys(%L);  -- or by hand: CREATE UNIQUE INDEX ON %s (%s); ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I FOREIGN KEY (%s) REFERENCES %s (%s)%s;',
        k.child::text, k.parent, levqor._key_columns(k.parent, k.parent_column, (SELECT c.confkey FROM pg_constraint c WHERE c.oid = $1)),
        k.child, k.conname, k.conname,
        levqor._key_columns(k.child, k.child_column, (SELECT c.conkey FROM pg_constraint c WHERE c.oid = $1)),
        k.parent, levqor._key_columns(k.parent, k.parent_column, (SELECT c.confkey FROM pg_constraint c WHERE c.oid = $1)),
        levqor._key_actions($1));
END
$fn$;

-- "tenant_id, a, b": the tenant column first, then a key's own columns.
CREATE FUNCTION levqor._key_columns(tbl regclass, tenant_column name, attnums int2[]) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT quote_ident(tenant_column) || ', ' || string_agg(quote_ident(a.attname), ', ' ORDER BY x.o)
      FROM unnest(attnums) WITH ORDINALITY AS x(n, o)
      JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = x.n
$fn$;

-- A key's MATCH, ON UPDATE, ON DELETE and deferrability, as they must be
-- written for the scoped key. SET NULL and SET DEFAULT on delete name the
-- key's own columns: the tenant column stays as it is.
CREATE FUNCTION levqor._key_actions(con oid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k    record;
    cols text;
BEGIN
    SELECT * INTO k FROM pg_constraint c WHERE c.oid = con;
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY x.o) INTO cols
      FROM unnest(k.conkey) WITH ORDINALITY AS x(n, o) JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = x.n;
    IF k.confupdtype IN ('n', 'd') THEN
        RAISE EXCEPTION 'foreign key % uses ON UPDATE SET %; a scoped key cannot keep it', k.conname,
            CASE k.confupdtype WHEN 'n' THEN 'NULL' ELSE 'DEFAULT' END
            USING ERRCODE = '0A000',
                  HINT = 'PostgreSQL sets every column of a key on update; rewrite this key by hand, with another ON UPDATE action.';
    END IF;
    RETURN CASE k.confmatchtype WHEN 'f' THEN ' MATCH FULL' ELSE '' END
        || CASE k.confupdtype WHEN 'r' THEN ' ON UPDATE RESTRICT' WHEN 'c' THEN ' ON UPDATE CASCADE' ELSE '' END
        || CASE k.confdeltype WHEN 'r' THEN ' ON DELETE RESTRICT' WHEN 'c' THEN ' ON DELETE CASCADE'
                              WHEN 'n' THEN format(' ON DELETE SET NULL (%s)', cols)
                              WHEN 'd' THEN format(' ON DELETE SET DEFAULT (%s)', cols) ELSE '' END
        || CASE WHEN k.condeferrable THEN ' DEFERRABLE' ELSE '' END
        || CASE WHEN k.condeferred THEN ' INITIALLY DEFERRED' ELSE '' END;
END
$fn$;

-- Rows of a key's table that already reference another tenant's row (at
-- most `max` of them), read past row level security: for the owner of both
-- tables, who is about to rewrite the key.
CREATE FUNCTION levqor._crossing_references(con oid, max int DEFAULT 20)
RETURNS TABLE (child_key text, child_tenant uuid, parent_tenant uuid)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k    record;
    join_on text;
    shown text;
BEGIN
    SELECT * INTO k FROM levqor._unscoped_foreign_keys() u WHERE u.con = $1;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT (pg_has_role(levqor._caller(), (SELECT c.relowner FROM pg_class c WHERE c.oid = k.child), 'USAGE')
            AND pg_has_role(levqor._caller(), (SELECT c.relowner FROM pg_class c WHERE c.oid = k.parent), 'USAGE')) THEN
        RAISE EXCEPTION 'must own % and % to read their cross-tenant references', k.child, k.parent USING ERRCODE = '42501';
    END IF;
    SELECT string_agg(format('p.%I = c.%I', pa.attname, ca.attname), ' AND '),
           string_agg(format('c.%I::text', ca.attname), ' || '', '' || ')
      INTO join_on, shown
      FROM pg_constraint x CROSS JOIN LATERAL unnest(x.conkey, x.confkey) AS u(ck, pk)
      JOIN pg_attribute ca ON ca.attrelid = x.conrelid AND ca.attnum = u.ck
      JOIN pg_attribute pa ON pa.attrelid = x.confrelid AND pa.attnum = u.pk
     WHERE x.oid = $1;
    RETURN QUERY EXECUTE format('SELECT %s, c.%I, p.%I FROM %s c JOIN %s p ON %s WHERE c.%I IS DISTINCT FROM p.%I LIMIT %s',
        shown, k.child_column, k.parent_column, k.child, k.parent, join_on, k.child_column, k.parent_column, max);
END
$fn$;

-- Rewrite every foreign key of tbl that points at a protected table without
-- the tenant column, keeping its name, its actions and deferrability, in one
-- transaction; refused, with the offending rows, when the data already
-- crosses tenants. The table's owner calls it (PostgreSQL checks the ALTER
-- TABLE and CREATE INDEX privileges).
CREATE FUNCTION levqor.scope_foreign_keys(tbl regclass) RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    k       record;
    bad     record;
    listing text;
    n       integer := 0;
    pcols   text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'scope_foreign_keys: table must not be NULL' USING ERRCODE = '22023';
    END IF;
    FOR k IN SELECT u.*, c.conkey, c.confkey FROM levqor._unscoped_foreign_keys(tbl) u JOIN pg_constraint c ON c.oid = u.con
              WHERE u.child = tbl ORDER BY u.conname LOOP
        SELECT string_agg(format('(%s) of tenant %s -> tenant %s', x.child_key, x.child_tenant, x.parent_tenant), '; ')
          INTO listing FROM levqor._crossing_references(k.con) x;
        IF listing IS NOT NULL THEN
            RAISE EXCEPTION 'foreign key % of % already references rows of other tenants', k.conname, tbl
                USING ERRCODE = '23503', DETAIL = 'Rows (key) of tenant -> tenant of the row they reference: ' || listing,
                      HINT = format('Fix or delete those rows first; a superuser lists them all with SELECT * FROM levqor._crossing_references(%s, 1000000);', k.con);
        END IF;
        pcols := levqor._key_columns(k.parent, k.parent_column, k.confkey);
        -- The referenced side needs a unique key on (tenant column, columns).
        IF NOT EXISTS (
            SELECT 1 FROM pg_index i
             WHERE i.indrelid = k.parent AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
               AND (SELECT array_agg(x ORDER BY x) FROM unnest(i.indkey::int2[]) x)
                   = (SELECT array_agg(x ORDER BY x) FROM unnest(k.confkey || (SELECT a.attnum FROM pg_attribute a
                                                                              WHERE a.attrelid = k.parent AND a.attname = k.parent_column)) x)) THEN
            EXECUTE format('CREATE UNIQUE INDEX ON %s (%s)', k.parent, pcols);
        END IF;
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I, ADD CONSTRAINT %I FOREIGN KEY (%s) REFERENCES %s (%s)%s',
                       tbl, k.conname, k.conname, levqor._key_columns(tbl, k.child_column, k.conkey),
                       k.parent, pcols, levqor._key_actions(k.con));
        PERFORM levqor._log_event(NULL, 'foreign_key_scoped',
            jsonb_build_object('table', tbl::text, 'constraint', k.conname, 'references', k.parent::text));
        n := n + 1;
    END LOOP;
    IF n = 0 THEN
        RAISE NOTICE 'levqor: every foreign key of % between protected tables already carries the tenant column', tbl;
    END IF;
    RETURN n;
END
$fn$;

-- Warn, when a table becomes protected, about its keys to and from other
-- protected tables that leave the tenant column out (enable_tenancy).
CREATE FUNCTION levqor._warn_unscoped_foreign_keys(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k record;
BEGIN
    FOR k IN SELECT * FROM levqor._unscoped_foreign_keys(tbl) LOOP
        RAISE WARNING 'levqor: foreign key % of % references % without the tenant column: one tenant can point at another''s rows and learn which ids exist',
            k.conname, k.child, k.parent
            USING HINT = levqor._scoped_key_sql(k.con);
    END LOOP;
END
$fn$;
