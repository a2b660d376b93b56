-- Tenant creation and keys. SECURITY DEFINER with a pinned search_path; the
-- EXECUTE grants in grants.sql decide who may call them (levqor_admin).

-- Resolve a tenant given as uuid or slug; raises 42704 when there is none.
CREATE FUNCTION levqor._tenant_id(tenant text) RETURNS uuid
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    found uuid;
BEGIN
    IF tenant ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        SELECT t.id INTO found FROM levqor.tenants t WHERE t.id = tenant::uuid;
    ELSE
        SELECT t.id INTO found FROM levqor.tenants t WHERE t.slug = tenant;
    END IF;
    IF found IS NULL THEN
        RAISE EXCEPTION 'tenant "%" does not exist', tenant USING ERRCODE = '42704';
    END IF;
    RETURN found;
END
$fn$;

CREATE FUNCTION levqor._log_event(tenant uuid, event text, detail jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    INSERT INTO levqor.tenant_events (tenant_id, event, detail) VALUES (tenant, event, detail);
$fn$;

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
    kind       text;
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
    -- Under a platform (or nothing): a tenant; under a tenant or an
    -- organization: an organization (sql/hierarchy.sql checks the rest).
    kind := CASE WHEN parent_id IS NULL THEN 'tenant'
                 WHEN (SELECT t.kind FROM levqor.tenants t WHERE t.id = parent_id) = 'platform' THEN 'tenant'
                 ELSE 'organization' END;

    BEGIN
        INSERT INTO levqor.tenants (slug, name, plan, region, isolation, parent, kind, status, trial_ends_at, schema_name)
        VALUES (slug, btrim(name), plan, region, isolation, parent_id, kind,
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
                           'isolation', isolation, 'schema', schema, 'parent', parent_id, 'kind', kind, 'key_id', k.key_id,
                           'trial_ends_at', trial_ends_at));

    tenant_id := new_id;
    api_key := k.api_key;
    RETURN NEXT;
END
$fn$;

CREATE FUNCTION levqor.issue_key(
    tenant     text,
    role       text DEFAULT 'admin',
    expires_in interval DEFAULT NULL,
    user_id    uuid DEFAULT NULL,
    label      text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    tid uuid := levqor._tenant_id(tenant);
    k   record;
BEGIN
    IF role IS NULL OR role NOT IN ('owner', 'admin', 'operator', 'auditor', 'viewer') THEN
        RAISE EXCEPTION 'unknown member role %', coalesce(quote_literal(role), 'NULL')
            USING ERRCODE = '22023', HINT = 'Member roles are owner, admin, operator, auditor and viewer.';
    END IF;
    IF expires_in IS NOT NULL AND expires_in <= interval '0' THEN
        RAISE EXCEPTION 'expires_in must be positive' USING ERRCODE = '22023';
    END IF;
    IF (SELECT t.status FROM levqor.tenants t WHERE t.id = tid) = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded', quote_literal(tenant) USING ERRCODE = '55000';
    END IF;
    SELECT * INTO k FROM levqor._new_api_key();
    INSERT INTO levqor.tenant_keys (key_id, tenant_id, key_hash, role, user_id, label, expires_at)
    VALUES (k.key_id, tid, k.key_hash, role, user_id, label, now() + expires_in);
    PERFORM levqor._log_event(tid, 'key_issued',
        jsonb_build_object('key_id', k.key_id, 'role', role, 'expires_in', expires_in::text, 'user_id', user_id));
    RETURN k.api_key;
END
$fn$;

CREATE FUNCTION levqor.revoke_key(key_id text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    tid uuid;
BEGIN
    UPDATE levqor.tenant_keys k SET revoked_at = coalesce(k.revoked_at, now())
     WHERE k.key_id = key_id RETURNING k.tenant_id INTO tid;
    IF tid IS NULL THEN
        RAISE EXCEPTION 'API key % does not exist', coalesce(quote_literal(key_id), 'NULL') USING ERRCODE = '42704';
    END IF;
    PERFORM levqor._log_event(tid, 'key_revoked', jsonb_build_object('key_id', key_id));
END
$fn$;
