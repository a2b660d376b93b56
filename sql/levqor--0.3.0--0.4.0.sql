-- levqor 0.3.0 -> 0.4.0 (assembled by scripts/upgrade-0.4.0.py; edit the
-- sources it names, not this file). Run by ALTER EXTENSION levqor UPDATE;
-- tests/e2e/tests/upgrade.rs checks that the result is the same catalog as a
-- fresh 0.4.0 install, with data kept. Install the 0.4.0 library first and
-- restart PostgreSQL (levqor is preloaded).

-- 1. Catalog changes (sql/upgrade/0.4.0-before.sql).
-- Hand-written part of the 0.3.0 -> 0.4.0 update: changes to tables 0.3.0
-- already had, run before any new function is created.

-- 2. New functions in the library.


-- 4. Functions new or changed in the files 0.3.0 had.
CREATE OR REPLACE FUNCTION levqor._check_thresholds(tenants uuid[], metrics text[], windows timestamptz[], used bigint[])
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    a record;
BEGIN
    FOR a IN
        WITH cur AS (
            SELECT x.tenant_id, x.metric, x.window_start, x.used, levqor._limit(x.tenant_id, x.metric) AS quota
              FROM unnest(tenants, metrics, windows, used) AS x(tenant_id, metric, window_start, used)
        ), rearm AS (
            DELETE FROM levqor.quota_alerts q USING cur
             WHERE q.tenant_id = cur.tenant_id AND q.metric = cur.metric AND q.window_start = cur.window_start
               AND cur.window_start = '-infinity' AND (cur.quota IS NULL OR cur.used::numeric * 100 < cur.quota::numeric * q.threshold)
        )
        INSERT INTO levqor.quota_alerts (tenant_id, metric, window_start, threshold, used, quota)
        SELECT cur.tenant_id, cur.metric, cur.window_start, th.threshold, cur.used, cur.quota
          FROM cur CROSS JOIN (VALUES (80), (100)) AS th(threshold)
         WHERE cur.quota > 0 AND cur.used::numeric * 100 >= cur.quota::numeric * th.threshold
        ON CONFLICT DO NOTHING
        RETURNING quota_alerts.*
    LOOP
        PERFORM pg_notify('levqor_quota', json_build_object(
            'tenant_id', a.tenant_id, 'tenant', (SELECT t.slug FROM levqor.tenants t WHERE t.id = a.tenant_id),
            'metric', a.metric, 'threshold', a.threshold, 'used', a.used, 'limit', a.quota,
            'window_start', CASE WHEN a.window_start = '-infinity' THEN NULL ELSE a.window_start END)::text);
        PERFORM levqor._log_event(a.tenant_id, 'quota_threshold', jsonb_build_object(
            'metric', a.metric, 'threshold', a.threshold, 'used', a.used, 'limit', a.quota,
            'window_start', CASE WHEN a.window_start = '-infinity' THEN NULL ELSE a.window_start END));
    END LOOP;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.tenant_storage_bytes(tenant text) RETURNS bigint
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

-- 5. Existing objects reshaped (sql/upgrade/0.4.0-after.sql).
-- Hand-written part of the 0.3.0 -> 0.4.0 update, run after every function
-- is in place: existing objects reshaped as 0.4.0 makes them.

-- 6. New catalog tables reach every backend's cache; privileges as in a fresh install.

REVOKE ALL ON ALL TABLES IN SCHEMA levqor FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA levqor FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA levqor FROM PUBLIC;
-- Procedures are not "functions" to GRANT: closed separately (superusers only).
REVOKE ALL ON ALL PROCEDURES IN SCHEMA levqor FROM PUBLIC;
GRANT USAGE ON SCHEMA levqor TO PUBLIC;

-- Anyone may ask about their own context; every role that reads a protected
-- table runs current_tenant() through the policies.
GRANT EXECUTE ON FUNCTION
    levqor.current_tenant(), levqor.current_user_id(), levqor.current_member_role(),
    levqor.context_info(), levqor.clear_tenant(), levqor.preloaded()
TO PUBLIC;

-- Protecting a table is for its owner, whoever that is; registering only
-- adds a guard, and the TRUNCATE trigger function only refuses.
GRANT EXECUTE ON FUNCTION
    levqor.enable_tenancy(regclass, name), levqor._register_protected(regclass, name),
    levqor._tenant_qual(name), levqor._refuse_truncate(), levqor._write_guard(),
    levqor.enable_audit(regclass), levqor._audit_row(),
    levqor.limit_rows(regclass, text, name), levqor._limit_rows(),
    levqor.enable_tenancy(regclass, name, name), levqor._register_scope(regclass, name), levqor._scope_of(regclass),
    levqor._scoped_select_qual(name, name), levqor._scoped_write_qual(name, name),
    levqor._row_limit_column(regclass, text, name), levqor._register_row_limit(regclass, text, name)
TO PUBLIC;

-- Usage: the view and its live source show a tenant only its own numbers
-- (everything to a levqor_admin); the window helpers are pure.
GRANT EXECUTE ON FUNCTION
    levqor._usage_live(), levqor._ts(bigint), levqor._window_micros(interval),
    levqor._window_start(interval, timestamptz)
TO PUBLIC;
GRANT SELECT ON levqor.usage TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    levqor.authenticate(text, boolean), levqor.set_tenant_token(text, boolean),
    levqor.export_my_tenant(),
    levqor.consume(text, bigint)
TO levqor_app;

GRANT EXECUTE ON FUNCTION
    levqor.set_tenant(text, boolean, uuid, text),
    levqor.sign_token(text, uuid, text, interval)
TO levqor_context_admin;

GRANT EXECUTE ON FUNCTION
    levqor.create_tenant(text, text, text, text, text, text, timestamptz),
    levqor.issue_key(text, text, interval, uuid, text),
    levqor.revoke_key(text),
    levqor.disable_tenancy(regclass),
    levqor.suspend_tenant(text, text, text),
    levqor.resume_tenant(text),
    levqor.change_plan(text, text, boolean),
    levqor.tenant_storage_bytes(text),
    levqor.offboard_tenant(text, interval),
    levqor.purge_tenant(text, boolean),
    levqor.rotate_keys(text, interval),
    levqor.isolation_report(),
    levqor.exempt_from_report(regclass, text),
    levqor.disable_audit(regclass),
    levqor.seal_audit(integer),
    levqor.verify_audit(text),
    levqor.audit_head(text),
    levqor.export_tenant(text),
    levqor.define_metric(text, text, interval, bigint, text),
    levqor.set_quota(text, text, bigint, text),
    levqor.clear_quota(text, text),
    levqor.unlimit_rows(regclass),
    levqor.flush_usage(),
    levqor.refresh_storage(),
    levqor.ledger_read(text, integer),
    levqor.ledger_advance(text, bigint),
    levqor.create_platform(text, text),
    levqor.move_tenant(text, text),
    levqor.add_member(text, uuid, text, text),
    levqor.set_member_role(text, uuid, text),
    levqor.remove_member(text, uuid),
    levqor.put_policy(text, text),
    levqor.drop_policy(text),
    levqor.set_sso_oidc(text, text, text, text, text[]),
    levqor.set_sso_saml(text, text, text, text, text[]),
    levqor.clear_sso(text)
TO levqor_admin;

-- SSO: a login page reads its tenant's settings (never the secret); the
-- trusted server that exchanges codes reads the secret.
GRANT EXECUTE ON FUNCTION levqor.sso_settings(text), levqor._caller_has(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION levqor.sso_client_secret(text) TO levqor_context_admin;

-- The policy engine answers for the caller's own context.
GRANT EXECUTE ON FUNCTION levqor.authorize(text, text), levqor.explain(text, text) TO PUBLIC;

-- The hierarchy helpers answer a levqor_admin about any node and anyone else
-- about their own context's tree only (the views filter).
GRANT EXECUTE ON FUNCTION
    levqor.ancestors(uuid), levqor.descendants(uuid), levqor.tenant_of(uuid), levqor.accessible_orgs(uuid),
    levqor._context_root(), levqor._tenant_orgs(), levqor._context_is_platform(), levqor._caller_is_admin(),
    levqor._visible_node(uuid)
TO PUBLIC;
GRANT SELECT ON levqor.tree, levqor.member_reach TO PUBLIC;

GRANT SELECT ON levqor.plans, levqor.metrics, levqor.policies TO levqor_app, levqor_admin;
GRANT SELECT ON levqor.quota_overrides, levqor.row_limits, levqor.usage_counters, levqor.usage_ledger,
    levqor.ledger_cursors, levqor.quota_alerts, levqor.tenant_tree, levqor.members TO levqor_admin;
-- The audit log: row level security shows tenants their own trail (auditor,
-- admin, owner) and levqor_admin all of it; nobody is granted any write.
GRANT SELECT ON levqor.audit_log, levqor.audit_chain, levqor.audit_trail TO PUBLIC;
GRANT SELECT ON levqor.audit_heads, levqor.audit_seal_state TO levqor_admin;
GRANT SELECT ON levqor.tenants, levqor.tenant_events, levqor.protected_tables, levqor.report_exemptions, levqor.migrations, levqor.adoptions TO levqor_admin;
-- Key metadata, never the hashes.
GRANT SELECT (key_id, tenant_id, role, user_id, label, created_at, created_by, expires_at, revoked_at)
    ON levqor.tenant_keys TO levqor_admin;

-- The policy helpers take no arguments and never raise, so they cannot leak
-- a row's values: mark them LEAKPROOF, as the planner may then push them
-- below security barriers.
ALTER FUNCTION levqor.current_tenant() LEAKPROOF;
ALTER FUNCTION levqor.current_user_id() LEAKPROOF;
ALTER FUNCTION levqor.current_member_role() LEAKPROOF;
ALTER FUNCTION levqor._tenant_orgs() LEAKPROOF;
ALTER FUNCTION levqor._context_is_platform() LEAKPROOF;
