-- The organisation hierarchy (docs/hierarchy.md): platform -> tenant ->
-- organization -> organization ..., kept in levqor.tenants (kind, parent)
-- with a closure table, so ancestors, descendants and "the tenant above" are
-- index lookups, never recursion at query time.

-- Every (ancestor, descendant) pair, each node with itself at depth 0.
CREATE TABLE levqor.tenant_tree (
    ancestor   uuid NOT NULL REFERENCES levqor.tenants (id) ON DELETE CASCADE,
    descendant uuid NOT NULL REFERENCES levqor.tenants (id) ON DELETE CASCADE,
    depth      integer NOT NULL CONSTRAINT tenant_tree_depth_check CHECK (depth >= 0),
    -- The descendant's slug and kind, copied so that listing a subtree
    -- needs no lookup per node (kept by the triggers below).
    slug       text NOT NULL,
    kind       text NOT NULL,
    PRIMARY KEY (ancestor, descendant)
);
CREATE INDEX tenant_tree_descendant_idx ON levqor.tenant_tree (descendant, depth);
-- Not dumped: it is derived, and restoring levqor.tenants rebuilds it.

-- The seed's rules: a platform has no parent (a check constraint), an
-- organization has one (likewise) that is a tenant or an organization, a
-- tenant's parent is a platform if it has one, and no node is its own
-- ancestor. A node's kind changes only while it has no children.
CREATE FUNCTION levqor._check_hierarchy() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    parent_kind text;
BEGIN
    IF NEW.parent IS NOT NULL THEN
        SELECT t.kind INTO parent_kind FROM levqor.tenants t WHERE t.id = NEW.parent;
        IF NEW.kind = 'tenant' AND parent_kind <> 'platform' THEN
            RAISE EXCEPTION 'a tenant''s parent must be a platform, not a %', parent_kind USING ERRCODE = '23514',
                HINT = 'Under a tenant or an organization, create an organization (create_tenant does so by itself).';
        END IF;
        IF NEW.kind = 'organization' AND parent_kind NOT IN ('tenant', 'organization') THEN
            RAISE EXCEPTION 'an organization''s parent must be a tenant or an organization, not a %', parent_kind
                USING ERRCODE = '23514';
        END IF;
        IF TG_OP = 'UPDATE' AND EXISTS (SELECT 1 FROM levqor.tenant_tree c
                                         WHERE c.ancestor = NEW.id AND c.descendant = NEW.parent) THEN
            RAISE EXCEPTION 'cannot move % under %: it would become its own ancestor', NEW.slug,
                (SELECT t.slug FROM levqor.tenants t WHERE t.id = NEW.parent) USING ERRCODE = '23514';
        END IF;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.kind <> OLD.kind
       AND EXISTS (SELECT 1 FROM levqor.tenants c WHERE c.parent = NEW.id) THEN
        RAISE EXCEPTION 'the kind of % cannot change while it has children', NEW.slug USING ERRCODE = '55000';
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER levqor_check_hierarchy BEFORE INSERT OR UPDATE OF parent, kind ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._check_hierarchy();

-- Keep the closure table: a new node links to itself and its parent's
-- ancestors; a moved node takes its whole subtree along.
CREATE FUNCTION levqor._maintain_tree() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Walk up the parent links rather than read the parent's links: a
        -- restore (COPY) may insert a child before its parent, and these
        -- triggers fire after the whole COPY.
        INSERT INTO levqor.tenant_tree (ancestor, descendant, depth, slug, kind)
        WITH RECURSIVE up AS (
            SELECT NEW.id AS ancestor, 0 AS depth, NEW.parent AS parent
            UNION ALL
            SELECT p.id, up.depth + 1, p.parent FROM up JOIN levqor.tenants p ON p.id = up.parent
        )
        SELECT up.ancestor, NEW.id, up.depth, NEW.slug, NEW.kind FROM up;
    ELSIF NEW.parent IS NOT DISTINCT FROM OLD.parent THEN
        -- Slug or kind changed.
        UPDATE levqor.tenant_tree c SET slug = NEW.slug, kind = NEW.kind WHERE c.descendant = NEW.id;
    ELSE
        -- Links from outside the subtree into it go; new ones come from the new parent's line.
        DELETE FROM levqor.tenant_tree l
         WHERE l.descendant IN (SELECT s.descendant FROM levqor.tenant_tree s WHERE s.ancestor = NEW.id)
           AND l.ancestor NOT IN (SELECT s.descendant FROM levqor.tenant_tree s WHERE s.ancestor = NEW.id);
        INSERT INTO levqor.tenant_tree (ancestor, descendant, depth, slug, kind)
        SELECT a.ancestor, s.descendant, a.depth + s.depth + 1, s.slug, s.kind
          FROM levqor.tenant_tree a, levqor.tenant_tree s
         WHERE a.descendant = NEW.parent AND s.ancestor = NEW.id;
        IF NEW.slug IS DISTINCT FROM OLD.slug OR NEW.kind IS DISTINCT FROM OLD.kind THEN
            UPDATE levqor.tenant_tree c SET slug = NEW.slug, kind = NEW.kind WHERE c.descendant = NEW.id;
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER levqor_maintain_tree AFTER INSERT OR UPDATE OF parent, slug, kind ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._maintain_tree();

-- Tenants that existed before the hierarchy (an upgrade): link them all.
WITH RECURSIVE up AS (
    SELECT t.id AS descendant, t.id AS ancestor, 0 AS depth, t.parent, t.slug, t.kind FROM levqor.tenants t
    UNION ALL
    SELECT up.descendant, p.id, up.depth + 1, p.parent, up.slug, up.kind FROM up JOIN levqor.tenants p ON p.id = up.parent
)
INSERT INTO levqor.tenant_tree (ancestor, descendant, depth, slug, kind)
SELECT up.ancestor, up.descendant, up.depth, up.slug, up.kind FROM up
ON CONFLICT DO NOTHING;

-- The tenant at or above the context's node (NULL without a context, or for
-- a platform's context). No argument: it tells a caller only about itself.
CREATE FUNCTION levqor._context_root() RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (
    SELECT c.ancestor
      FROM levqor.tenant_tree c JOIN levqor.tenants t ON t.id = c.ancestor AND t.kind = 'tenant'
     WHERE c.descendant = levqor.current_tenant());
END
$fn$;

-- The tree as the caller may see it: all of it for a levqor_admin; for
-- anyone else the links inside their context's tenant (its organizations,
-- not the platform above or other tenants). A view, so current_user is the
-- caller while the tables are read with the view owner's rights.
CREATE VIEW levqor.tree WITH (security_barrier = true) AS
SELECT c.ancestor, a.slug AS ancestor_slug, a.kind AS ancestor_kind,
       c.descendant, d.slug AS descendant_slug, d.kind AS descendant_kind, c.depth
  FROM levqor.tenant_tree c
  JOIN levqor.tenants a ON a.id = c.ancestor
  JOIN levqor.tenants d ON d.id = c.descendant
 WHERE pg_has_role(current_user, 'levqor_admin', 'USAGE')
    OR EXISTS (SELECT 1 FROM levqor.tenant_tree r
                WHERE r.ancestor = (SELECT levqor._context_root()) AND r.descendant = c.ancestor);

-- Whether the caller may ask about `node`: a levqor_admin about any, anyone
-- else about the nodes of their context's tenant. (These helpers are
-- PL/pgSQL, whose plans are kept per session; a SQL function that cannot be
-- inlined is planned on every call.)
CREATE FUNCTION levqor._visible_node(node uuid) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (
    SELECT levqor._caller_is_admin()
        OR EXISTS (SELECT 1 FROM levqor.tenant_tree r WHERE r.ancestor = levqor._context_root() AND r.descendant = $1));
END
$fn$;

-- The nodes above `node`, nearest first (itself excluded; for anyone but a
-- levqor_admin, not the platform above their tenant).
CREATE FUNCTION levqor.ancestors(node uuid)
RETURNS TABLE (id uuid, slug text, kind text, depth integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY
    SELECT t.id, t.slug, t.kind, c.depth
      FROM levqor.tenant_tree c JOIN levqor.tenants t ON t.id = c.ancestor
     WHERE c.descendant = $1 AND c.depth > 0 AND (SELECT levqor._visible_node($1))
       AND (t.kind <> 'platform' OR (SELECT levqor._caller_is_admin()))
     ORDER BY c.depth;
END
$fn$;

-- The nodes below `node`, nearest first (itself excluded).
CREATE FUNCTION levqor.descendants(node uuid)
RETURNS TABLE (id uuid, slug text, kind text, depth integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY
    SELECT c.descendant, c.slug, c.kind, c.depth
      FROM levqor.tenant_tree c
     WHERE c.ancestor = $1 AND c.depth > 0 AND (SELECT levqor._visible_node($1))
     ORDER BY c.depth, c.slug COLLATE "C";
END
$fn$;

-- The tenant at or above `node` (NULL for a platform).
CREATE FUNCTION levqor.tenant_of(node uuid) RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (
    SELECT c.ancestor
      FROM levqor.tenant_tree c JOIN levqor.tenants t ON t.id = c.ancestor AND t.kind = 'tenant'
     WHERE c.descendant = $1 AND (SELECT levqor._visible_node($1)));
END
$fn$;

-- Move a node (and everything under it) to a new parent. A levqor_admin.
CREATE FUNCTION levqor.move_tenant(tenant text, new_parent text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    pid uuid := CASE WHEN new_parent IS NULL THEN NULL ELSE levqor._tenant_id(new_parent) END;
BEGIN
    IF pid IS NOT DISTINCT FROM t.parent THEN
        RETURN;
    END IF;
    UPDATE levqor.tenants x SET parent = pid, updated_at = now() WHERE x.id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_moved', jsonb_build_object('from', t.parent, 'to', pid));
END
$fn$;

-- The top of the tree. A levqor_admin; returns the platform's id.
CREATE FUNCTION levqor.create_platform(slug text, name text) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    pid uuid;
BEGIN
    SELECT c.tenant_id INTO pid FROM levqor.create_tenant(slug, name, plan => 'enterprise') c;
    UPDATE levqor.tenants t SET kind = 'platform' WHERE t.id = pid;
    -- Nobody saw the key create_tenant made; issue_key makes one if needed.
    UPDATE levqor.tenant_keys k SET revoked_at = now() WHERE k.tenant_id = pid;
    PERFORM levqor._log_event(pid, 'platform_created', '{}');
    RETURN pid;
END
$fn$;

-- Sharing scopes -----------------------------------------------------------
-- enable_tenancy(tbl, tenant_column, scope_column): a row belongs to the
-- organization in its tenant column and is shared by its scope column:
-- 'organization' (that organization only), 'tenant' (every organization under
-- the same tenant), 'platform' (every context; none without one). Writes stay in the writer's own
-- organization, and only a platform's context writes platform-scope rows.

-- Every node under the context's tenant (NULL without one). The policy
-- calls it in a scalar subquery: evaluated once per statement, and the
-- = ANY comparison an index condition.
CREATE FUNCTION levqor._tenant_orgs() RETURNS uuid[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (
    SELECT array_agg(c.descendant) FROM levqor.tenant_tree c WHERE c.ancestor = levqor._context_root());
END
$fn$;

-- Whether the context's node is a platform.
CREATE FUNCTION levqor._context_is_platform() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce((SELECT t.kind = 'platform' FROM levqor.tenants t WHERE t.id = levqor.current_tenant()), false)
$fn$;

-- The policy expressions, exactly as PostgreSQL prints them back (the DDL
-- guard compares them).
CREATE FUNCTION levqor._scoped_select_qual(c name, scope name) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT format('((%1$I = levqor.current_tenant()) OR ((%2$I = ''platform''::text) AND (levqor.current_tenant() IS NOT NULL)) OR ((%2$I = ''tenant''::text) AND (%1$I = ANY (( SELECT levqor._tenant_orgs() AS _tenant_orgs)::uuid[]))))', c, scope)
$fn$;

CREATE FUNCTION levqor._scoped_write_qual(c name, scope name) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT format('((%1$I = levqor.current_tenant()) AND ((%2$I <> ''platform''::text) OR levqor._context_is_platform()))', c, scope)
$fn$;

-- Switch a protected table to scoped policies, once it carries levqor's
-- scope check (which only its owner can add: that is the proof this needs).
-- The three policies change together, with the DDL guard told to wait, and
-- the result is checked before it stands.
CREATE FUNCTION levqor._register_scope(tbl regclass, scope_column name) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    col      name;
    problems text;
BEGIN
    SELECT pt.tenant_column INTO col FROM levqor.protected_tables pt WHERE pt.tbl = tbl;
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not protected by levqor', tbl USING ERRCODE = '55000';
    END IF;
    PERFORM levqor._refuse_on_citus(tbl, 'a scope column');
    IF NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = tbl AND k.conname = 'levqor_scope_check'
                      AND pg_get_constraintdef(k.oid) = format('CHECK ((%I = ANY (ARRAY[''organization''::text, ''tenant''::text, ''platform''::text])))', scope_column)) THEN
        RAISE EXCEPTION '% has no levqor scope check on %', tbl, quote_ident(scope_column) USING ERRCODE = '55000',
            HINT = 'Call levqor.enable_tenancy(table, tenant_column, scope_column).';
    END IF;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    EXECUTE format('ALTER POLICY levqor_tenant_select ON %s USING (%s)', tbl, levqor._scoped_select_qual(col, scope_column));
    EXECUTE format('ALTER POLICY levqor_tenant_insert ON %s WITH CHECK (%s)', tbl, levqor._scoped_write_qual(col, scope_column));
    EXECUTE format('ALTER POLICY levqor_tenant_update ON %s USING (%s) WITH CHECK (%s)', tbl,
                   levqor._tenant_qual(col), levqor._scoped_write_qual(col, scope_column));
    -- The permissive side says the same (docs/isolation.md, "Fail closed"):
    -- the base writes only by the scoped rule, and reads reach shared rows
    -- through a permissive policy of their own.
    EXECUTE format('ALTER POLICY levqor_base ON %s USING %s WITH CHECK (%s)', tbl,
                   levqor._tenant_qual(col), levqor._scoped_write_qual(col, scope_column));
    IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = 'levqor_base_shared') THEN
        EXECUTE format('CREATE POLICY levqor_base_shared ON %s AS PERMISSIVE FOR SELECT TO PUBLIC USING (%s)', tbl,
                       levqor._scoped_select_qual(col, scope_column));
    END IF;
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
    UPDATE levqor.protected_tables pt SET scope_column = scope_column WHERE pt.tbl = tbl;
    SELECT string_agg(x, '; ') INTO problems FROM levqor._tenancy_problems(tbl, true) x;
    IF problems IS NOT NULL THEN
        RAISE EXCEPTION 'levqor: % is not fully protected: %', tbl, problems USING ERRCODE = '55000';
    END IF;
    PERFORM levqor._log_event(NULL, 'tenancy_scoped', jsonb_build_object('table', tbl::text, 'scope_column', scope_column));
END
$fn$;

CREATE FUNCTION levqor.enable_tenancy(tbl regclass, tenant_column name, scope_column name)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    typ oid;
BEGIN
    IF scope_column IS NULL THEN
        RAISE EXCEPTION 'enable_tenancy: the scope column must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF levqor._scope_of(tbl) IS NOT DISTINCT FROM scope_column THEN
        RAISE NOTICE 'levqor: % is already protected with scope column %', tbl, quote_ident(scope_column);
        RETURN;
    ELSIF levqor._scope_of(tbl) IS NOT NULL THEN
        RAISE EXCEPTION '% is already scoped by another column', tbl USING ERRCODE = '55000';
    END IF;
    SELECT a.atttypid INTO typ FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = scope_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I text NOT NULL DEFAULT ''organization''', tbl, scope_column);
    ELSIF typ <> 'text'::regtype THEN
        RAISE EXCEPTION 'scope column %.% has type %, not text', tbl, quote_ident(scope_column), format_type(typ, NULL)
            USING ERRCODE = '42804';
    ELSE
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT ''organization''', tbl, scope_column);
        BEGIN
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL', tbl, scope_column);
        EXCEPTION WHEN not_null_violation THEN
            RAISE EXCEPTION '% has rows without a scope', tbl USING ERRCODE = '23502',
                HINT = format('Fill %I with organization, tenant or platform first.', scope_column);
        END;
    END IF;
    PERFORM levqor.enable_tenancy(tbl, tenant_column);
    BEGIN
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT levqor_scope_check CHECK (%I IN (''organization'', ''tenant'', ''platform''))',
                       tbl, scope_column);
    EXCEPTION WHEN check_violation THEN
        RAISE EXCEPTION '% has rows with a scope other than organization, tenant or platform', tbl
            USING ERRCODE = '23514';
    END;
    PERFORM levqor._register_scope(tbl, scope_column);
    -- Reads come in by owner (the tenant column's index, which the owner
    -- should have) and by scope.
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %s (%I)', left(format('%s_%s_idx', (SELECT c.relname FROM pg_class c WHERE c.oid = tbl), scope_column), 63), tbl, scope_column);
END
$fn$;
