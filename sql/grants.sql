-- Privileges, last (finalize): close everything, then open exactly what each
-- levqor role needs. docs/roles.md describes the matrix.

-- Changes to tenants and keys reach every backend's authentication cache.
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.tenant_keys
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
-- ... and so do changes to what quotas are measured against.
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.plans
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.metrics
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.quota_overrides
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.row_limits
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.policies
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();
-- ... and so do membership changes: the member role a context acts with
-- comes from levqor.members (src/members.rs).
CREATE TRIGGER levqor_catalog_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON levqor.members
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._catalog_changed();

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
    levqor.enable_audit(regclass), levqor._audit_row(), levqor._notice_unsealed(boolean), levqor._sealing_worker_here(),
    levqor.limit_rows(regclass, text, name), levqor._limit_rows(),
    levqor.enable_tenancy(regclass, name, name), levqor._register_scope(regclass, name), levqor._scope_of(regclass),
    levqor._scoped_select_qual(name, name), levqor._scoped_write_qual(name, name),
    levqor._row_limit_column(regclass, text, name), levqor._register_row_limit(regclass, text, name),
    levqor.scope_foreign_keys(regclass), levqor._unscoped_foreign_keys(regclass), levqor._scoped_key_sql(oid),
    levqor._key_columns(regclass, name, int2[]), levqor._key_actions(oid), levqor._crossing_references(oid, integer),
    levqor._warn_unscoped_foreign_keys(regclass), levqor._caller(),
    levqor.distribute(regclass, name, regclass), levqor._distribution(regclass), levqor._refuse_on_citus(regclass, text),
    levqor._citus_active(), levqor._tenant_column_of(regclass), levqor._owner_has_rows(regclass), levqor._shard_problems(regclass), levqor.shard_problems(regclass)
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
    levqor.isolation_report(text),
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

-- The sidecar (docs/sidecar.md): exactly what billing, audit streams and
-- /metrics use; nothing that sets a tenant's context or reads tenants' rows.
GRANT EXECUTE ON FUNCTION
    levqor.billing_pending(integer), levqor.billing_customer(uuid, text),
    levqor.billing_subscription(uuid, text, text, text, jsonb), levqor.billing_cancelled(uuid, text),
    levqor.billing_ledger(text, integer), levqor.billing_park(bigint, text, text), levqor.billing_unparked(bigint),
    levqor.billing_webhook(text, text, timestamptz, text, text, text, boolean, integer),
    levqor.billing_totals(text, timestamptz, timestamptz), levqor.sidecar_tenant_metrics(),
    levqor.ledger_advance(text, bigint), levqor.ledger_lag(text),
    levqor.stream_destinations(), levqor.stream_lag(uuid, bigint), levqor.stream_chains(text), levqor.audit_events(uuid, bigint, integer),
    levqor.stream_advance(text, uuid, bigint), levqor.stream_park(text, uuid, bigint, bigint, text),
    levqor.stream_report(bigint, text, text)
TO levqor_sidecar;
GRANT SELECT ON levqor.plans, levqor.metrics, levqor.tenant_billing, levqor.billing_parked, levqor.backup_coverage TO levqor_sidecar;
-- Backups (docs/backups.md): one tenant's rows at a time, through its context
-- (the table privileges come with enable_tenancy).
GRANT EXECUTE ON FUNCTION
    levqor.backup_context(text, boolean), levqor.backup_begin(text, boolean), levqor.backup_audit_log(uuid), levqor.backup_audit_chain(uuid),
    levqor.backup_tenants(), levqor.backup_record(uuid, text, text, bigint, text, bigint, bigint, boolean, text, text, jsonb),
    levqor.restore_begin(jsonb, boolean), levqor.restore_schema(uuid, text[]), levqor.restore_sequences(regclass),
    levqor.restore_audit(uuid, jsonb), levqor.restore_finish(jsonb, jsonb), levqor.export_tenant(text)
TO levqor_backup;
GRANT SELECT ON levqor.backups, levqor.backup_coverage TO levqor_backup;
-- A schema tenant restored from its archive's DDL into another database gets
-- its guard trigger back (a trigger function: nothing to call directly).
GRANT EXECUTE ON FUNCTION levqor._schema_guard() TO levqor_backup;
-- Billing, streams and backups for levqor_admin.
GRANT EXECUTE ON FUNCTION
    levqor.billing_retry(bigint),
    levqor.add_audit_stream(text, text, text, text, jsonb), levqor.remove_audit_stream(bigint),
    levqor.pause_audit_stream(bigint), levqor.resume_audit_stream(bigint), levqor.set_audit_stream_secret(bigint, text)
TO levqor_admin;
GRANT SELECT ON levqor.tenant_billing, levqor.billing_parked, levqor.stripe_events, levqor.audit_stream_parked,
    levqor.backups, levqor.backup_coverage TO levqor_admin;
-- A tenant's admin reads its streams' state (the view filters).
GRANT SELECT ON levqor.audit_streams TO PUBLIC;

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
GRANT SELECT ON levqor.tenants, levqor.tenant_events, levqor.protected_tables, levqor.report_exemptions, levqor.migrations, levqor.adoptions,
    levqor.derived_tables TO levqor_admin;
-- Key metadata, never the hashes.
GRANT SELECT (key_id, tenant_id, role, user_id, label, created_at, created_by, expires_at, revoked_at)
    ON levqor.tenant_keys TO levqor_admin;

DO $preload$
BEGIN
    IF NOT levqor.preloaded() THEN
        -- A WARNING: CREATE EXTENSION shows its scripts' messages only from WARNING up.
        RAISE WARNING 'levqor is not in shared_preload_libraries'
            USING DETAIL = 'Tenant context, keys, tokens and table protection work without it. '
                           'Recommended anyway: with it no session can ever hold a levqor.* placeholder. '
                           'Quotas (consume, limit_rows) need it, as does the worker that seals the audit log.',
                  HINT = 'ALTER SYSTEM SET shared_preload_libraries = ''levqor''; then restart PostgreSQL.';
    END IF;
    PERFORM levqor._notice_unsealed(as_warning => true);
END
$preload$;

-- The policy helpers take no arguments and never raise, so they cannot leak
-- a row's values: mark them LEAKPROOF, as the planner may then push them
-- below security barriers.
ALTER FUNCTION levqor.current_tenant() LEAKPROOF;
ALTER FUNCTION levqor.current_user_id() LEAKPROOF;
ALTER FUNCTION levqor.current_member_role() LEAKPROOF;
ALTER FUNCTION levqor._tenant_orgs() LEAKPROOF;
ALTER FUNCTION levqor._context_is_platform() LEAKPROOF;

-- Every public function that takes a tenant (`tenant text`: its uuid or its
-- slug) also takes a uuid value without a cast, so that
-- `SELECT * FROM levqor.tenants t, levqor.verify_audit(t.id)` works. The
-- uuid overloads are written here from the catalog, for every such function
-- there is (tests/e2e/tests/context.rs checks that none is missing): each
-- calls the text version by name, with the privileges of its caller, and is
-- granted to whoever may call that version. Its tenant argument has no
-- default (nor do those before it), so a call that leaves the tenant out, or
-- passes a quoted literal, still means the text version.
DO $uuid_overloads$
DECLARE
    f       record;
    args    text;
    pass    text;
    g       record;
    sig     text;
    ident   text;
    seen    boolean;
BEGIN
    FOR f IN
        SELECT p.oid, p.proname, p.provolatile, p.proparallel, p.proretset, p.proargnames, p.proargmodes,
               coalesce(p.proallargtypes, p.proargtypes::oid[]) AS types, p.pronargs,
               pg_get_function_result(p.oid) AS result, p.prorettype
          FROM pg_proc p
         WHERE p.pronamespace = 'levqor'::regnamespace AND p.prokind = 'f' AND p.proname !~ '^_'
           AND p.proargtypes::oid[] @> ARRAY['text'::regtype::oid]
         ORDER BY p.proname, p.oid
    LOOP
        -- The tenant argument's position among the input arguments.
        CONTINUE WHEN NOT EXISTS (
            SELECT 1 FROM unnest(f.proargnames, f.types, coalesce(f.proargmodes, array_fill('i'::"char", ARRAY[cardinality(f.types)])))
                          AS a(n, t, m)
             WHERE a.n = 'tenant' AND a.t = 'text'::regtype AND a.m IN ('i', 'b'));
        args := ''; pass := ''; seen := false;
        SELECT string_agg(format('%I %s%s', a.n, CASE WHEN a.n = 'tenant' THEN 'uuid' ELSE format_type(a.t, NULL) END,
                                 CASE WHEN a.o > (SELECT x.o FROM unnest(f.proargnames) WITH ORDINALITY AS x(n, o) WHERE x.n = 'tenant')
                                           AND pg_get_function_arg_default(f.oid, a.o::int) IS NOT NULL
                                      THEN ' DEFAULT ' || pg_get_function_arg_default(f.oid, a.o::int) ELSE '' END),
                          ', ' ORDER BY a.o),
               string_agg(format('%I => %s', a.n, CASE WHEN a.n = 'tenant' THEN 'tenant::pg_catalog.text' ELSE quote_ident(a.n) END),
                          ', ' ORDER BY a.o)
          INTO args, pass
          FROM (SELECT x.n, x.t, x.m, x.o, row_number() OVER (ORDER BY x.o) AS i
                  FROM unnest(f.proargnames, f.types, coalesce(f.proargmodes, array_fill('i'::"char", ARRAY[cardinality(f.types)])))
                       WITH ORDINALITY AS x(n, t, m, o)
                 WHERE x.m IN ('i', 'b')) a;
        sig := format('levqor.%I(%s)', f.proname, args);
        ident := format('levqor.%I(%s)', f.proname,
            (SELECT string_agg(CASE WHEN a.n = 'tenant' THEN 'uuid' ELSE format_type(a.t, NULL) END, ', ' ORDER BY a.o)
               FROM unnest(f.proargnames, f.types, coalesce(f.proargmodes, array_fill('i'::"char", ARRAY[cardinality(f.types)])))
                    WITH ORDINALITY AS a(n, t, m, o) WHERE a.m IN ('i', 'b')));
        CONTINUE WHEN to_regprocedure(ident) IS NOT NULL;
        EXECUTE format('CREATE FUNCTION %s RETURNS %s LANGUAGE sql %s PARALLEL %s AS %L', sig, f.result,
                       CASE f.provolatile WHEN 'i' THEN 'IMMUTABLE' WHEN 's' THEN 'STABLE' ELSE 'VOLATILE' END,
                       CASE f.proparallel WHEN 's' THEN 'SAFE' WHEN 'r' THEN 'RESTRICTED' ELSE 'UNSAFE' END,
                       CASE WHEN f.proretset OR f.result LIKE 'TABLE(%' THEN format('SELECT * FROM levqor.%I(%s)', f.proname, pass)
                            ELSE format('SELECT levqor.%I(%s)', f.proname, pass) END);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', ident);
        FOR g IN SELECT a.grantee FROM pg_proc p, aclexplode(p.proacl) a
                  WHERE p.oid = f.oid AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', ident,
                           CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.grantee::regrole::text) END);
        END LOOP;
    END LOOP;
END
$uuid_overloads$;
