-- Hand-written part of the 0.3.0 -> 0.4.0 update, run after every function
-- is in place: existing objects reshaped as 0.4.0 makes them.

-- Protected tables: the permissive levqor_base admitted every row (true);
-- it now admits only the context's tenant (writes: by the table's write
-- rule), and scoped tables read shared rows through levqor_base_shared.
-- So no subset of levqor's policies admits more than all of them together.
DO $reshape$
DECLARE
    r     record;
    scope name;
    qual  text;
BEGIN
    FOR r IN SELECT p.tbl::regclass AS tbl, p.tenant_column FROM levqor._protected() p LOOP
        scope := levqor._scope_of(r.tbl);
        qual := levqor._tenant_qual(r.tenant_column);
        INSERT INTO levqor._disabling (tbl) VALUES (r.tbl);
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_policy pol WHERE pol.polrelid = r.tbl AND pol.polname = 'levqor_base') THEN
            EXECUTE pg_catalog.format('ALTER POLICY levqor_base ON %s TO PUBLIC USING %s WITH CHECK (%s)', r.tbl, qual,
                CASE WHEN scope IS NULL THEN qual ELSE levqor._scoped_write_qual(r.tenant_column, scope) END);
        ELSE
            EXECUTE pg_catalog.format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING %s WITH CHECK (%s)', r.tbl, qual,
                CASE WHEN scope IS NULL THEN qual ELSE levqor._scoped_write_qual(r.tenant_column, scope) END);
        END IF;
        IF scope IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy pol
                                              WHERE pol.polrelid = r.tbl AND pol.polname = 'levqor_base_shared') THEN
            EXECUTE pg_catalog.format('CREATE POLICY levqor_base_shared ON %s AS PERMISSIVE FOR SELECT TO PUBLIC USING (%s)', r.tbl,
                levqor._scoped_select_qual(r.tenant_column, scope));
        END IF;
        DELETE FROM levqor._disabling d WHERE d.tbl = r.tbl::oid;
    END LOOP;
    -- Schema tenants' tables: the base says what the restrictive policy says.
    FOR r IN SELECT pol.polrelid::regclass AS tbl, pg_catalog.pg_get_expr(pol.polqual, pol.polrelid) AS qual
               FROM pg_catalog.pg_policy pol WHERE pol.polname = 'levqor_schema_tenant' LOOP
        EXECUTE pg_catalog.format('ALTER POLICY levqor_base ON %s TO PUBLIC USING %s WITH CHECK %s', r.tbl, r.qual, r.qual);
    END LOOP;
END
$reshape$;

-- References between catalog tables: triggers instead of foreign keys, so
-- that pg_restore -j can load the tables in any order (sql/catalog.sql,
-- "References").
ALTER TABLE levqor.tenants DROP CONSTRAINT tenants_plan_fkey, DROP CONSTRAINT tenants_parent_fkey;
ALTER TABLE levqor.tenant_keys DROP CONSTRAINT tenant_keys_tenant_id_fkey;
ALTER TABLE levqor.members DROP CONSTRAINT members_tenant_id_fkey;
ALTER TABLE levqor.tenant_sso DROP CONSTRAINT tenant_sso_tenant_id_fkey;
ALTER TABLE levqor.quota_overrides DROP CONSTRAINT quota_overrides_tenant_id_fkey, DROP CONSTRAINT quota_overrides_metric_fkey;
ALTER TABLE levqor.row_limits DROP CONSTRAINT row_limits_metric_fkey;
CREATE TRIGGER levqor_reference_plan AFTER INSERT OR UPDATE OF plan ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('plan', 'levqor.plans', 'name', 'text');
CREATE TRIGGER levqor_reference_parent AFTER INSERT OR UPDATE OF parent ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('parent', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_references AFTER DELETE ON levqor.tenants
    FOR EACH ROW EXECUTE FUNCTION levqor._tenant_deleted();
CREATE TRIGGER levqor_references AFTER UPDATE OF name OR DELETE ON levqor.plans
    FOR EACH ROW EXECUTE FUNCTION levqor._plan_changed();
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.tenant_keys
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.members
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.tenant_sso
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_references AFTER UPDATE OF name OR DELETE ON levqor.metrics
    FOR EACH ROW EXECUTE FUNCTION levqor._metric_changed();
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.quota_overrides
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_reference_metric AFTER INSERT OR UPDATE OF metric ON levqor.quota_overrides
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('metric', 'levqor.metrics', 'name', 'text');
CREATE TRIGGER levqor_reference_metric AFTER INSERT OR UPDATE OF metric ON levqor.row_limits
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('metric', 'levqor.metrics', 'name', 'text');

-- Partitions are protected the moment they exist (sql/tenancy.sql).
CREATE EVENT TRIGGER levqor_protect_partitions ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION levqor._protect_partitions();

-- Backups read and restore protected tables' rows through the tenant's context.
DO $backup_grants$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT p.tbl::regclass AS tbl FROM levqor._protected() p
             UNION SELECT pol.polrelid::regclass FROM pg_catalog.pg_policy pol WHERE pol.polname = 'levqor_schema_tenant' LOOP
        EXECUTE pg_catalog.format('GRANT SELECT, INSERT, DELETE ON %s TO levqor_backup', r.tbl);
    END LOOP;
    FOR r IN SELECT t.schema_name FROM levqor.tenants t
              WHERE t.schema_name IS NOT NULL AND pg_catalog.to_regnamespace(pg_catalog.quote_ident(t.schema_name)) IS NOT NULL LOOP
        EXECUTE pg_catalog.format('GRANT USAGE ON SCHEMA %I TO levqor_backup', r.schema_name);
    END LOOP;
END
$backup_grants$;
