-- Tenant lifecycle: suspend, resume, change plan, offboard, purge, rotate keys.
-- SECURITY DEFINER with a pinned search_path; only levqor_admin may call them
-- (grants.sql). Every call is recorded in levqor.tenant_events. Enforcement is
-- in Rust: authenticate & co. refuse new contexts, the write guard refuses
-- writes, and existing contexts are re-checked (src/lifecycle.rs).

-- Lock and return a tenant's row; raises 42704 when there is none.
CREATE FUNCTION levqor._tenant_for_update(tenant text) RETURNS levqor.tenants
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t levqor.tenants;
BEGIN
    SELECT * INTO t FROM levqor.tenants WHERE id = levqor._tenant_id(tenant) FOR UPDATE;
    RETURN t;
END
$fn$;

CREATE FUNCTION levqor.suspend_tenant(tenant text, reason text, mode text DEFAULT 'read_only')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF mode IS NULL OR mode NOT IN ('read_only', 'blocked') THEN
        RAISE EXCEPTION 'unknown suspension mode %', coalesce(quote_literal(mode), 'NULL')
            USING ERRCODE = '22023', HINT = 'mode is ''read_only'' (reads work, writes fail) or ''blocked'' (no access).';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'a suspension needs a reason' USING ERRCODE = '22023';
    END IF;
    IF t.status = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded and cannot be suspended', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    UPDATE levqor.tenants
       SET status = 'suspended', suspension_mode = mode, suspension_reason = btrim(reason), updated_at = now()
     WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_suspended',
        jsonb_build_object('mode', mode, 'reason', btrim(reason), 'previous_status', t.status));
END
$fn$;

CREATE FUNCTION levqor.resume_tenant(tenant text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF t.status = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded and cannot be resumed', quote_literal(t.slug)
            USING ERRCODE = '55000', HINT = 'An offboarded tenant''s data waits for levqor.purge_tenant(); create a new tenant instead.';
    END IF;
    IF t.status <> 'suspended' THEN
        RAISE NOTICE 'levqor: tenant % is not suspended; nothing to do', t.slug;
        RETURN;
    END IF;
    UPDATE levqor.tenants
       SET status = CASE WHEN t.trial_ends_at IS NOT NULL THEN 'trial' ELSE 'active' END,
           suspension_mode = NULL, suspension_reason = NULL, updated_at = now()
     WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_resumed', jsonb_build_object('was', t.suspension_mode));
END
$fn$;

-- Bytes of the tenant's rows in every protected table (row data as stored,
-- without indexes), plus, for a schema tenant, everything in its schema
-- (tables, indexes, TOAST). Measured, not estimated; it reads every row of
-- the tenant in shared tables. Summed in numeric and saturating at the
-- largest bigint: a measurement never fails for its size, and one that large
-- is over every limit (fail closed).
CREATE FUNCTION levqor.tenant_storage_bytes(tenant text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    tid   uuid := levqor._tenant_id(tenant);
    p     record;
    n     numeric;
    total numeric := 0;
BEGIN
    SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) INTO total
      FROM levqor.tenants t JOIN pg_namespace s ON s.nspname = t.schema_name
      JOIN pg_class c ON c.relnamespace = s.oid AND c.relkind IN ('r', 'm')
     WHERE t.id = tid;
    FOR p IN SELECT pt.tbl, pt.tenant_column FROM levqor.protected_tables pt
              WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = pt.tbl) LOOP
        EXECUTE format('SELECT coalesce(sum(pg_column_size(t.*)::numeric), 0) FROM %s t WHERE %I = $1', p.tbl, p.tenant_column)
           INTO n USING tid;
        total := total + n;
    END LOOP;
    RETURN least(total, 9223372036854775807)::bigint;
END
$fn$;

CREATE FUNCTION levqor.change_plan(tenant text, plan text, force boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t       levqor.tenants := levqor._tenant_for_update(tenant);
    lim     jsonb;
    storage bigint;
    r       record;
    n       bigint;
BEGIN
    SELECT p.limits INTO lim FROM levqor.plans p WHERE p.name = plan;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan %', coalesce(quote_literal(plan), 'NULL')
            USING ERRCODE = '22023', HINT = 'Plans are listed in levqor.plans.';
    END IF;
    IF t.status = 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is offboarded', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    IF t.plan = plan THEN
        RAISE NOTICE 'levqor: tenant % is already on plan %', t.slug, plan;
        RETURN;
    END IF;
    -- A downgrade below what the tenant already uses is refused unless forced.
    IF NOT force AND jsonb_typeof(lim->'storage_bytes') = 'number' THEN
        storage := levqor.tenant_storage_bytes(t.id::text);
        IF storage > (lim->>'storage_bytes')::bigint THEN
            RAISE EXCEPTION 'plan % allows % of storage; tenant % uses %', plan,
                pg_size_pretty((lim->>'storage_bytes')::bigint), t.slug, pg_size_pretty(storage)
                USING ERRCODE = '23514', HINT = 'Free space first, or pass force => true.';
        END IF;
    END IF;
    -- Likewise for rows counted by levqor.limit_rows (users, projects), unless
    -- the tenant has its own override for the metric.
    IF NOT force THEN
        FOR r IN SELECT rl.tbl, rl.metric, rl.tenant_column FROM levqor.row_limits rl
                  WHERE jsonb_typeof(lim -> rl.metric) = 'number'
                    AND NOT EXISTS (SELECT 1 FROM levqor.quota_overrides o
                                     WHERE o.tenant_id = t.id AND o.metric = rl.metric) LOOP
            EXECUTE format('SELECT count(*) FROM %s WHERE %I = $1', r.tbl, r.tenant_column) INTO n USING t.id;
            IF n > (lim ->> r.metric)::bigint THEN
                RAISE EXCEPTION 'plan % allows % %; tenant % has %', plan, lim ->> r.metric, r.metric, t.slug, n
                    USING ERRCODE = '23514', HINT = 'Delete some first, or pass force => true.';
            END IF;
        END LOOP;
    END IF;
    UPDATE levqor.tenants SET plan = plan, updated_at = now() WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'plan_changed', jsonb_build_object('from', t.plan, 'to', plan, 'forced', force));
END
$fn$;

CREATE FUNCTION levqor.offboard_tenant(tenant text, grace interval DEFAULT '30 days') RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF grace IS NULL OR grace < interval '0' THEN
        RAISE EXCEPTION 'grace must be zero or positive' USING ERRCODE = '22023';
    END IF;
    IF t.status = 'offboarded' THEN
        RAISE NOTICE 'levqor: tenant % is already offboarded; its data may be purged after %', t.slug, t.purge_after;
        RETURN t.purge_after;
    END IF;
    IF EXISTS (SELECT 1 FROM levqor.tenants c WHERE c.parent = t.id AND c.status <> 'offboarded') THEN
        RAISE EXCEPTION 'tenant % has tenants under it that are not offboarded', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    UPDATE levqor.tenants
       SET status = 'offboarded', offboarded_at = now(), purge_after = now() + grace,
           suspension_mode = NULL, updated_at = now()
     WHERE id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_offboarded',
        jsonb_build_object('previous_status', t.status, 'grace', grace::text, 'purge_after', now() + grace));
    RETURN now() + grace;
END
$fn$;

CREATE FUNCTION levqor.purge_tenant(tenant text, force boolean DEFAULT false)
RETURNS TABLE (table_name text, rows_deleted bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t      levqor.tenants := levqor._tenant_for_update(tenant);
    p      record;
    n      bigint;
    counts jsonb := '{}';
BEGIN
    IF t.status <> 'offboarded' THEN
        RAISE EXCEPTION 'tenant % is %, not offboarded', quote_literal(t.slug), t.status
            USING ERRCODE = '55000', HINT = 'Offboard it first: levqor.offboard_tenant().';
    END IF;
    IF t.purge_after > now() AND NOT force THEN
        RAISE EXCEPTION 'the grace period of tenant % ends at %', quote_literal(t.slug), t.purge_after
            USING ERRCODE = '55000', HINT = 'Wait, or pass force => true.';
    END IF;
    IF EXISTS (SELECT 1 FROM levqor.tenants c WHERE c.parent = t.id) THEN
        RAISE EXCEPTION 'tenant % still has tenants under it', quote_literal(t.slug) USING ERRCODE = '55000';
    END IF;
    FOR p IN SELECT pt.tbl, pt.tenant_column FROM levqor.protected_tables pt ORDER BY pt.tbl::text LOOP
        EXECUTE format('DELETE FROM ONLY %s WHERE %I = $1', p.tbl, p.tenant_column) USING t.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
            table_name := p.tbl::text;
            rows_deleted := n;
            counts := counts || jsonb_build_object(p.tbl::text, n);
            RETURN NEXT;
        END IF;
    END LOOP;
    IF t.schema_name IS NOT NULL AND to_regnamespace(quote_ident(t.schema_name)) IS NOT NULL THEN
        EXECUTE format('DROP SCHEMA %I CASCADE', t.schema_name);
        table_name := t.schema_name || '.*';
        rows_deleted := NULL;
        counts := counts || jsonb_build_object('schema', t.schema_name);
        RETURN NEXT;
    END IF;
    DELETE FROM levqor.tenant_keys k WHERE k.tenant_id = t.id;
    DELETE FROM levqor.tenants WHERE id = t.id;
    -- The tombstone: who was purged, when, by whom, and how much.
    PERFORM levqor._log_event(t.id, 'tenant_purged',
        jsonb_build_object('slug', t.slug, 'name', t.name, 'forced', force, 'rows', counts));
END
$fn$;

CREATE FUNCTION levqor.rotate_keys(tenant text, overlap interval DEFAULT '0') RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t       levqor.tenants := levqor._tenant_for_update(tenant);
    new_key text;
    retired int;
BEGIN
    IF overlap IS NULL OR overlap < interval '0' THEN
        RAISE EXCEPTION 'overlap must be zero or positive' USING ERRCODE = '22023';
    END IF;
    -- The old keys: revoked now, or expiring when the overlap ends.
    IF overlap = interval '0' THEN
        UPDATE levqor.tenant_keys k SET revoked_at = now()
         WHERE k.tenant_id = t.id AND k.revoked_at IS NULL;
    ELSE
        UPDATE levqor.tenant_keys k SET expires_at = least(coalesce(k.expires_at, 'infinity'), now() + overlap)
         WHERE k.tenant_id = t.id AND k.revoked_at IS NULL;
    END IF;
    GET DIAGNOSTICS retired = ROW_COUNT;
    new_key := levqor.issue_key(t.id::text, 'admin', label => 'rotated');
    PERFORM levqor._log_event(t.id, 'keys_rotated',
        jsonb_build_object('overlap', overlap::text, 'old_keys', retired, 'new_key_id', substr(new_key, 5, 16)));
    RETURN new_key;
END
$fn$;
