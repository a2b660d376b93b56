-- levqor 0.3.0 -> 0.4.0 (assembled by scripts/upgrade-0.4.0.py; edit the
-- sources it names, not this file). Run by ALTER EXTENSION levqor UPDATE;
-- tests/e2e/tests/upgrade.rs checks that the result is the same catalog as a
-- fresh 0.4.0 install, with data kept. Install the 0.4.0 library first and
-- restart PostgreSQL (levqor is preloaded).

-- 1. Catalog changes (sql/upgrade/0.4.0-before.sql).
-- Hand-written part of the 0.3.0 -> 0.4.0 update: changes to tables 0.3.0
-- already had, run before any new function is created.

-- Quota alerts get an id: the NOTIFY on levqor_quota carries only that.
ALTER TABLE levqor.quota_alerts ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT quota_alerts_id_key UNIQUE;
SELECT pg_catalog.pg_extension_config_dump('levqor.quota_alerts_id_seq', '');

-- Tables copied from protected tables with CREATE TABLE AS (sql/report.sql).
CREATE TABLE levqor.derived_tables (
    tbl        regclass PRIMARY KEY,
    sources    regclass[] NOT NULL,
    bypassed   boolean NOT NULL,
    created_by name NOT NULL DEFAULT current_user,
    created_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.derived_tables', '');

-- The sidecar's roles (sql/catalog.sql).
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_sidecar') THEN
        CREATE ROLE levqor_sidecar NOLOGIN NOBYPASSRLS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'levqor_backup') THEN
        CREATE ROLE levqor_backup NOLOGIN NOBYPASSRLS;
    END IF;
END
$roles$;

-- 2. New functions in the library.
-- src/privilege.rs:111
-- levqor::privilege::_caller
CREATE  FUNCTION "_caller"() RETURNS oid /* pg_sys :: Oid */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_caller_wrapper';

-- src/citus.rs:146
-- levqor::citus::_citus_active
CREATE  FUNCTION "_citus_active"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_citus_active_wrapper';

-- src/auth.rs:245
-- levqor::auth::backup_context
CREATE  FUNCTION "backup_context"(
	"tenant" TEXT, /* & str */
	"restore" bool DEFAULT false /* bool */
) RETURNS uuid /* pgrx :: Uuid */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'backup_context_wrapper';

-- 3. New trigger functions in the files 0.3.0 had, for the new files' tables.
CREATE FUNCTION levqor._check_reference() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    val text := to_jsonb(NEW) ->> TG_ARGV[0];
    hit int;
BEGIN
    IF val IS NULL OR levqor._restoring() THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND (to_jsonb(OLD) ->> TG_ARGV[0]) IS NOT DISTINCT FROM val THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT 1 FROM %s WHERE %I = $1::%s FOR KEY SHARE', TG_ARGV[1], TG_ARGV[2], TG_ARGV[3]) INTO hit USING val;
    IF hit IS NULL THEN
        RAISE EXCEPTION 'insert or update on table "%" violates the reference of %.% to %', TG_TABLE_NAME,
            TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1]
            USING ERRCODE = '23503', DETAIL = format('Key (%s)=(%s) is not present in table %s.', TG_ARGV[0], val, TG_ARGV[1]);
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION levqor._metric_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name IS DISTINCT FROM OLD.name THEN
            UPDATE levqor.quota_overrides o SET metric = NEW.name WHERE o.metric = OLD.name;
            UPDATE levqor.row_limits r SET metric = NEW.name WHERE r.metric = OLD.name;
        END IF;
    ELSE
        IF EXISTS (SELECT 1 FROM levqor.row_limits r WHERE r.metric = OLD.name) THEN
            RAISE EXCEPTION 'metric % counts the rows of a table', OLD.name USING ERRCODE = '23503',
                HINT = 'levqor.unlimit_rows() that table first.';
        END IF;
        DELETE FROM levqor.quota_overrides o WHERE o.metric = OLD.name;
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION levqor._plan_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.name IS DISTINCT FROM OLD.name THEN
            UPDATE levqor.tenants t SET plan = NEW.name WHERE t.plan = OLD.name;
        END IF;
    ELSIF EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.plan = OLD.name) THEN
        RAISE EXCEPTION 'plan % is in use by tenants', OLD.name USING ERRCODE = '23503',
            HINT = 'Move them to another plan first (levqor.change_plan).';
    END IF;
    RETURN NULL;
END
$fn$;
CREATE FUNCTION levqor._tenant_deleted() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.parent = OLD.id) THEN
        RAISE EXCEPTION 'tenant % still has tenants under it', OLD.slug USING ERRCODE = '23503';
    END IF;
    DELETE FROM levqor.tenant_keys k WHERE k.tenant_id = OLD.id;
    DELETE FROM levqor.members m WHERE m.tenant_id = OLD.id;
    DELETE FROM levqor.tenant_sso s WHERE s.tenant_id = OLD.id;
    DELETE FROM levqor.quota_overrides o WHERE o.tenant_id = OLD.id;
    RETURN NULL;
END
$fn$;

-- 3. sql/foreign_keys.sql (new in 0.4.0).
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

-- 3. sql/billing.sql (new in 0.4.0).
-- Per-tenant billing through Stripe (docs/billing.md). The sidecar does the
-- talking to Stripe; the database keeps what it needs to do so exactly once:
-- which customer and subscription belong to which tenant, how far the usage
-- ledger has been metered, which entries Stripe refused, and which webhook
-- events were already applied. The sidecar works through the functions below
-- (granted to levqor_sidecar, sql/grants.sql), never on tenants' rows.

-- One row per billed tenant (kind 'tenant'), kept after the tenant is purged
-- as its billing tombstone (so no reference to levqor.tenants).
CREATE TABLE levqor.tenant_billing (
    tenant_id           uuid PRIMARY KEY,
    slug                text NOT NULL,
    customer_id         text CONSTRAINT tenant_billing_customer_key UNIQUE,
    subscription_id     text CONSTRAINT tenant_billing_subscription_key UNIQUE,
    subscription_status text,
    -- The plan the subscription's items were last set for, and its items
    -- (price id -> subscription item id).
    plan                text,
    items               jsonb NOT NULL DEFAULT '{}' CONSTRAINT tenant_billing_items_object CHECK (jsonb_typeof(items) = 'object'),
    failed_payments     integer NOT NULL DEFAULT 0,
    -- The `created` time of the last subscription event applied: older ones
    -- arriving late are not applied over it.
    last_event_at       timestamptz,
    -- Bumped with every change asked of Stripe: part of its idempotency keys.
    version             integer NOT NULL DEFAULT 0,
    cancelled_at        timestamptz,
    last_sync           timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_billing', '');

-- Ledger entries Stripe would not take (a 400 for that entry, or older than
-- its 35-day window): set aside with Stripe's message, so that one bad entry
-- never holds the ledger up. `retry`: a levqor_admin asked to send it again.
CREATE TABLE levqor.billing_parked (
    ledger_id  bigint PRIMARY KEY,
    tenant_id  uuid NOT NULL,
    metric     text NOT NULL,
    quantity   bigint NOT NULL,
    reason     text NOT NULL,
    message    text,
    retry      boolean NOT NULL DEFAULT false,
    parked_at  timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.billing_parked', '');

-- Stripe webhook events already applied (or deliberately not): each event id
-- is processed once, however often Stripe delivers it.
CREATE TABLE levqor.stripe_events (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    created     timestamptz NOT NULL,
    tenant_id   uuid,
    outcome     text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('levqor.stripe_events', '');

-- Wakes the sidecar's provisioning when a tenant is created, changes plan or
-- status. No payload: any session may LISTEN (docs/quotas.md, notifications).
CREATE FUNCTION levqor._billing_wake() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM pg_notify('levqor_billing', '');
    RETURN NULL;
END
$fn$;
CREATE TRIGGER levqor_billing_wake AFTER INSERT OR DELETE OR UPDATE OF plan, status ON levqor.tenants
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._billing_wake();

-- What the sidecar must do in Stripe, oldest tenant first: create a
-- customer, create a subscription, move one to the tenant's current plan, or
-- cancel one (an offboarded or purged tenant).
CREATE FUNCTION levqor.billing_pending(max_tenants integer DEFAULT 100)
RETURNS TABLE (tenant_id uuid, slug text, plan text, action text, customer_id text, subscription_id text,
               billed_plan text, items jsonb, version integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT x.tenant_id, x.slug, x.plan, x.action, x.customer_id, x.subscription_id, x.billed_plan, x.items, x.version
      FROM (
        SELECT t.id AS tenant_id, t.slug, t.plan, b.customer_id, b.subscription_id, b.plan AS billed_plan,
               coalesce(b.items, '{}') AS items, coalesce(b.version, 0) AS version, t.created_at AS since,
               CASE WHEN t.status = 'offboarded' THEN
                         CASE WHEN b.subscription_id IS NOT NULL AND b.cancelled_at IS NULL THEN 'cancel' END
                    WHEN b.customer_id IS NULL THEN 'create_customer'
                    WHEN b.subscription_id IS NULL THEN 'create_subscription'
                    WHEN b.cancelled_at IS NULL AND b.plan IS DISTINCT FROM t.plan THEN 'change_plan'
               END AS action
          FROM levqor.tenants t LEFT JOIN levqor.tenant_billing b ON b.tenant_id = t.id
         WHERE t.kind = 'tenant'
        UNION ALL
        -- Purged: the tenant is gone, its subscription must go too.
        SELECT b.tenant_id, b.slug, NULL, b.customer_id, b.subscription_id, b.plan, b.items, b.version, b.created_at, 'cancel'
          FROM levqor.tenant_billing b
         WHERE b.subscription_id IS NOT NULL AND b.cancelled_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.id = b.tenant_id)
      ) x
     WHERE x.action IS NOT NULL
     ORDER BY x.since, x.tenant_id
     LIMIT max_tenants
$fn$;

-- The sidecar records what Stripe answered. Each call is in the tenant's
-- audit trail; ids that do not look like Stripe's are refused.
CREATE FUNCTION levqor._billing_row(tenant uuid) RETURNS levqor.tenant_billing
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    b levqor.tenant_billing;
BEGIN
    INSERT INTO levqor.tenant_billing AS x (tenant_id, slug)
    SELECT t.id, t.slug FROM levqor.tenants t WHERE t.id = tenant
    ON CONFLICT (tenant_id) DO NOTHING;
    SELECT * INTO b FROM levqor.tenant_billing x WHERE x.tenant_id = tenant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % is not billed', tenant USING ERRCODE = '42704';
    END IF;
    RETURN b;
END
$fn$;

CREATE FUNCTION levqor.billing_customer(tenant uuid, customer_id text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    b levqor.tenant_billing := levqor._billing_row(tenant);
BEGIN
    IF customer_id IS NULL OR customer_id !~ '^cus_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'not a Stripe customer id: %', coalesce(quote_literal(left(customer_id, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF b.customer_id IS NOT DISTINCT FROM customer_id THEN
        RETURN;
    END IF;
    UPDATE levqor.tenant_billing x SET customer_id = customer_id, last_sync = now(), updated_at = now()
     WHERE x.tenant_id = tenant;
    PERFORM levqor._log_event(tenant, 'billing_customer_created', jsonb_build_object('customer_id', customer_id));
END
$fn$;

-- A subscription created, or moved to a plan (items: price id -> item id).
CREATE FUNCTION levqor.billing_subscription(tenant uuid, subscription_id text, status text, plan text, items jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    b levqor.tenant_billing := levqor._billing_row(tenant);
BEGIN
    IF subscription_id IS NULL OR subscription_id !~ '^sub_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'not a Stripe subscription id: %', coalesce(quote_literal(left(subscription_id, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(items) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'items must be a JSON object of price id -> subscription item id' USING ERRCODE = '22023';
    END IF;
    UPDATE levqor.tenant_billing x
       SET subscription_id = subscription_id, subscription_status = status, plan = plan, items = items,
           version = x.version + 1, last_sync = now(), updated_at = now()
     WHERE x.tenant_id = tenant;
    PERFORM levqor._log_event(tenant, CASE WHEN b.subscription_id IS NULL THEN 'billing_subscription_created'
                                           ELSE 'billing_subscription_changed' END,
        jsonb_build_object('subscription_id', subscription_id, 'plan', plan, 'from_plan', b.plan, 'status', status));
END
$fn$;

CREATE FUNCTION levqor.billing_cancelled(tenant uuid, status text DEFAULT 'canceled') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    UPDATE levqor.tenant_billing x SET cancelled_at = coalesce(x.cancelled_at, now()), subscription_status = status,
           version = x.version + 1, last_sync = now(), updated_at = now()
     WHERE x.tenant_id = tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % is not billed', tenant USING ERRCODE = '42704';
    END IF;
    PERFORM levqor._log_event(tenant, 'billing_subscription_cancelled', jsonb_build_object('status', status));
END
$fn$;

-- Ledger entries the meter has not taken yet, oldest first: after the
-- consumer's cursor (but not parked), and parked ones an admin asked to retry.
-- An organization's usage is billed to the tenant above it. customer_id
-- NULL: that tenant has no Stripe customer yet (the meter waits for it);
-- billable false: nobody will ever be billed for it (a platform's usage, or
-- a purged tenant's that never had a customer).
CREATE FUNCTION levqor.billing_ledger(consumer text, max_entries integer DEFAULT 1000)
RETURNS TABLE (id bigint, tenant_id uuid, slug text, metric text, quantity bigint, period_end timestamptz,
               customer_id text, billable boolean, retry boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
#variable_conflict use_variable
DECLARE
    pos bigint;
BEGIN
    IF max_entries IS NULL OR max_entries < 1 THEN
        RAISE EXCEPTION 'max_entries must be at least 1' USING ERRCODE = '22023';
    END IF;
    INSERT INTO levqor.ledger_cursors AS c (consumer) VALUES (consumer) ON CONFLICT DO NOTHING;
    SELECT c.position INTO pos FROM levqor.ledger_cursors c WHERE c.consumer = consumer;
    RETURN QUERY
    WITH todo AS (
        SELECT l.*, false AS retry FROM levqor.usage_ledger l
         WHERE l.id > pos AND NOT EXISTS (SELECT 1 FROM levqor.billing_parked p WHERE p.ledger_id = l.id)
         ORDER BY l.id LIMIT max_entries
    ), again AS (
        SELECT l.*, true AS retry FROM levqor.billing_parked p JOIN levqor.usage_ledger l ON l.id = p.ledger_id
         WHERE p.retry ORDER BY l.id LIMIT max_entries
    )
    SELECT l.id, l.tenant_id, coalesce(t.slug, b.slug), l.metric, l.quantity, l.period_end,
           coalesce(b.customer_id, ab.customer_id), (b.tenant_id IS NOT NULL OR a.id IS NOT NULL), l.retry
      FROM (SELECT * FROM todo UNION ALL SELECT * FROM again) l
      LEFT JOIN levqor.tenants t ON t.id = l.tenant_id
      LEFT JOIN levqor.tenant_billing b ON b.tenant_id = l.tenant_id
      -- The tenant above an organization, looked up only for entries whose
      -- own tenant is not billed (index lookups whatever the statistics).
      LEFT JOIN LATERAL (SELECT c.ancestor AS id FROM levqor.tenant_tree c
                          WHERE b.tenant_id IS NULL AND c.descendant = l.tenant_id
                            AND (SELECT x.kind FROM levqor.tenants x WHERE x.id = c.ancestor) = 'tenant'
                          ORDER BY c.depth LIMIT 1) a ON true
      LEFT JOIN levqor.tenant_billing ab ON ab.tenant_id = a.id
     ORDER BY l.retry, l.id;
END
$fn$;

-- Set an entry aside (Stripe refused it); the cursor may then move past it.
CREATE FUNCTION levqor.billing_park(ledger_id bigint, reason text, message text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    l levqor.usage_ledger;
BEGIN
    SELECT * INTO l FROM levqor.usage_ledger x WHERE x.id = ledger_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no ledger entry %', ledger_id USING ERRCODE = '42704';
    END IF;
    INSERT INTO levqor.billing_parked AS p (ledger_id, tenant_id, metric, quantity, reason, message)
    VALUES (l.id, l.tenant_id, l.metric, l.quantity, reason, left(message, 2000))
    ON CONFLICT ON CONSTRAINT billing_parked_pkey DO UPDATE
       SET reason = EXCLUDED.reason, message = EXCLUDED.message, retry = false, parked_at = now();
    PERFORM levqor._log_event(l.tenant_id, 'billing_entry_parked',
        jsonb_build_object('ledger_id', l.id, 'metric', l.metric, 'quantity', l.quantity, 'reason', reason, 'message', left(message, 500)));
END
$fn$;

-- A parked entry Stripe finally took (after a retry).
CREATE FUNCTION levqor.billing_unparked(ledger_id bigint) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    DELETE FROM levqor.billing_parked p WHERE p.ledger_id = $1;
$fn$;

-- A levqor_admin asks for a parked entry to be sent again (after fixing what
-- Stripe refused, say a meter that did not exist yet).
CREATE FUNCTION levqor.billing_retry(ledger_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    UPDATE levqor.billing_parked p SET retry = true WHERE p.ledger_id = ledger_id;
    RETURN FOUND;
END
$fn$;

-- A Stripe webhook event, already verified and parsed by the sidecar, applied
-- in one transaction: once per event id; subscription events older than the
-- last one applied are not applied over it; changes go through the lifecycle
-- functions, so each is in the tenant's audit trail. `plan`: the levqor plan
-- the subscription's prices map to (NULL: none does). Returns the outcome.
CREATE FUNCTION levqor.billing_webhook(event_id text, event_type text, created timestamptz, customer_id text,
                                       plan text DEFAULT NULL, subscription_status text DEFAULT NULL,
                                       force_plan_change boolean DEFAULT false, suspend_after integer DEFAULT 1)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    b       levqor.tenant_billing;
    t       levqor.tenants;
    outcome text;
BEGIN
    IF event_id IS NULL OR event_id !~ '^evt_[A-Za-z0-9_]{1,250}$' THEN
        RAISE EXCEPTION 'not a Stripe event id: %', coalesce(quote_literal(left(event_id, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM levqor.stripe_events e WHERE e.id = event_id) THEN
        RETURN 'duplicate';
    END IF;
    SELECT * INTO b FROM levqor.tenant_billing x WHERE x.customer_id = billing_webhook.customer_id FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'unknown customer';
    ELSE
        SELECT * INTO t FROM levqor.tenants x WHERE x.id = b.tenant_id FOR UPDATE;
        IF NOT FOUND THEN
            outcome := 'tenant purged';
        ELSIF event_type IN ('customer.subscription.updated', 'customer.subscription.deleted')
              AND b.last_event_at IS NOT NULL AND created < b.last_event_at THEN
            outcome := 'stale';
        ELSIF event_type = 'customer.subscription.updated' THEN
            UPDATE levqor.tenant_billing x SET last_event_at = created, subscription_status = coalesce(billing_webhook.subscription_status, x.subscription_status),
                   updated_at = now() WHERE x.tenant_id = b.tenant_id;
            IF plan IS NULL THEN
                outcome := 'no plan for these prices';
            ELSIF plan = t.plan OR t.status = 'offboarded' THEN
                outcome := 'unchanged';
            ELSE
                BEGIN
                    PERFORM levqor.change_plan(t.id::text, plan, force_plan_change);
                    -- The subscription already has this plan's prices.
                    UPDATE levqor.tenant_billing x SET plan = billing_webhook.plan WHERE x.tenant_id = b.tenant_id;
                    outcome := 'plan changed';
                EXCEPTION WHEN check_violation THEN
                    outcome := 'plan change refused: ' || SQLERRM;
                END;
            END IF;
        ELSIF event_type = 'customer.subscription.deleted' THEN
            UPDATE levqor.tenant_billing x SET last_event_at = created, subscription_status = 'canceled',
                   cancelled_at = coalesce(x.cancelled_at, now()), updated_at = now() WHERE x.tenant_id = b.tenant_id;
            IF t.status IN ('active', 'trial') THEN
                PERFORM levqor.suspend_tenant(t.id::text, 'subscription_deleted', 'read_only');
                outcome := 'suspended';
            ELSE
                outcome := 'unchanged';
            END IF;
        ELSIF event_type = 'invoice.payment_failed' THEN
            UPDATE levqor.tenant_billing x SET failed_payments = x.failed_payments + 1, updated_at = now()
             WHERE x.tenant_id = b.tenant_id RETURNING * INTO b;
            IF b.failed_payments >= greatest(suspend_after, 1) AND t.status IN ('active', 'trial') THEN
                PERFORM levqor.suspend_tenant(t.id::text, 'payment_failed', 'read_only');
                outcome := 'suspended';
            ELSE
                outcome := format('payment failure %s of %s', b.failed_payments, greatest(suspend_after, 1));
            END IF;
        ELSIF event_type = 'invoice.paid' THEN
            UPDATE levqor.tenant_billing x SET failed_payments = 0, updated_at = now() WHERE x.tenant_id = b.tenant_id;
            -- Only a tenant suspended for a failed payment: not one an
            -- operator suspended for another reason.
            IF t.status = 'suspended' AND t.suspension_reason = 'payment_failed' THEN
                PERFORM levqor.resume_tenant(t.id::text);
                outcome := 'resumed';
            ELSE
                outcome := 'unchanged';
            END IF;
        ELSE
            outcome := 'ignored';
        END IF;
    END IF;
    INSERT INTO levqor.stripe_events (id, type, created, tenant_id, outcome) VALUES (event_id, event_type, created, b.tenant_id, outcome);
    IF b.tenant_id IS NOT NULL AND outcome NOT IN ('ignored', 'duplicate') THEN
        PERFORM levqor._log_event(b.tenant_id, 'billing_webhook',
            jsonb_build_object('event_id', event_id, 'type', event_type, 'outcome', outcome));
    END IF;
    RETURN outcome;
END
$fn$;

-- Ledger totals per billed tenant and metric for [since, until) by the time
-- each entry is metered at (its period_end, to the second), split by where
-- each entry is: sent (at or behind the cursor), pending (after it) or
-- parked. An organization's usage counts for the tenant above it, whose
-- customer Stripe bills (as billing_ledger sends it); usage nobody is billed
-- for (a platform's) is left out.
CREATE FUNCTION levqor.billing_totals(consumer text, since timestamptz, until timestamptz)
RETURNS TABLE (tenant_id uuid, slug text, customer_id text, metric text, sent numeric, pending numeric, parked numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
    WITH entries AS (
        SELECT l.id, l.metric, l.quantity, p.ledger_id IS NOT NULL AS is_parked, coalesce(b.tenant_id, a.id) AS billed
          FROM levqor.usage_ledger l
          LEFT JOIN levqor.billing_parked p ON p.ledger_id = l.id
          LEFT JOIN levqor.tenant_billing b ON b.tenant_id = l.tenant_id
          LEFT JOIN LATERAL (SELECT c.ancestor AS id FROM levqor.tenant_tree c
                              WHERE b.tenant_id IS NULL AND c.descendant = l.tenant_id
                                AND (SELECT x.kind FROM levqor.tenants x WHERE x.id = c.ancestor) = 'tenant'
                              ORDER BY c.depth LIMIT 1) a ON true
         WHERE date_trunc('second', l.period_end) >= $2 AND date_trunc('second', l.period_end) < $3
    )
    SELECT e.billed, coalesce(b.slug, t.slug), b.customer_id, e.metric,
           coalesce(sum(e.quantity) FILTER (WHERE NOT e.is_parked AND e.id <= coalesce(c.position, 0)), 0),
           coalesce(sum(e.quantity) FILTER (WHERE NOT e.is_parked AND e.id > coalesce(c.position, 0)), 0),
           coalesce(sum(e.quantity) FILTER (WHERE e.is_parked), 0)
      FROM entries e
      LEFT JOIN levqor.ledger_cursors c ON c.consumer = $1
      LEFT JOIN levqor.tenant_billing b ON b.tenant_id = e.billed
      LEFT JOIN levqor.tenants t ON t.id = e.billed
     WHERE e.billed IS NOT NULL
     GROUP BY 1, 2, 3, 4
     ORDER BY 2, 4
$fn$;

-- How far a consumer is behind the ledger: entries after its cursor and the
-- age of the oldest of them, in seconds (the sidecar's lag metrics).
CREATE FUNCTION levqor.ledger_lag(consumer text)
RETURNS TABLE (entries bigint, seconds double precision)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT count(*), coalesce(extract(epoch FROM now() - min(l.recorded_at)), 0)::double precision
      FROM levqor.usage_ledger l
     WHERE l.id > coalesce((SELECT c.position FROM levqor.ledger_cursors c WHERE c.consumer = $1), 0)
$fn$;

-- Numbers for the sidecar's /metrics: every tenant's status and plan, and
-- its usage against its limits (what levqor.usage shows a levqor_admin).
CREATE FUNCTION levqor.sidecar_tenant_metrics()
RETURNS TABLE (slug text, status text, plan text, metric text, used bigint, quota bigint, percent numeric)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT t.slug, t.status, t.plan, u.metric, u.used, u."limit", u.percent
      FROM levqor.tenants t LEFT JOIN levqor.usage u ON u.tenant_id = t.id
     ORDER BY t.slug, u.metric
$fn$;

-- 3. sql/streams.sql (new in 0.4.0).
-- Audit streams: each tenant's sealed audit chain shipped to its SIEM by the
-- sidecar (docs/streams.md). levqor keeps the destinations, one cursor per
-- destination and chain (the last seq delivered), and the events a receiver
-- refused, so that a restarted or replaced sidecar resumes exactly where the
-- last one stopped; what is streamed is what is sealed, in seq order.

-- A tenant's own destinations (levqor_admin adds them). The secret is in
-- levqor.audit_stream_secrets, which only levqor_sidecar reads.
CREATE TABLE levqor.audit_stream_destinations (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL,   -- levqor.tenants (id), removed with it
    kind        text NOT NULL CONSTRAINT audit_stream_kind_check CHECK (kind IN ('splunk_hec', 'datadog', 'webhook')),
    url         text NOT NULL,
    options     jsonb NOT NULL DEFAULT '{}' CONSTRAINT audit_stream_options_object CHECK (jsonb_typeof(options) = 'object'),
    paused      boolean NOT NULL DEFAULT false,
    -- What the sidecar last found: active, failing (retrying) or auth_failed
    -- (the receiver refused the secret: nothing is sent until it changes).
    state       text NOT NULL DEFAULT 'active' CONSTRAINT audit_stream_state_check CHECK (state IN ('active', 'failing', 'auth_failed')),
    last_error  text,
    last_attempt_at timestamptz,
    secret_version integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name NOT NULL DEFAULT session_user
);
CREATE INDEX audit_stream_destinations_tenant_idx ON levqor.audit_stream_destinations (tenant_id);

CREATE TABLE levqor.audit_stream_secrets (
    stream_id bigint PRIMARY KEY,   -- levqor.audit_stream_destinations (id)
    secret    text NOT NULL
);

-- Where each destination is in each chain: a tenant stream ('stream:<id>')
-- in its tenant's chain, an operator-wide one (its name in the sidecar's
-- file, 'siem:<name>') in every chain.
CREATE TABLE levqor.audit_stream_cursors (
    destination text NOT NULL,
    chain       uuid NOT NULL,
    seq         bigint NOT NULL DEFAULT 0,
    delivered_at timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, chain)
);

-- Events a receiver refused (a 400 for that event alone), or a batch given
-- up after [audit] max_attempts: set aside with the receiver's reply, never
-- lost; the stream goes on past them.
CREATE TABLE levqor.audit_stream_parked (
    destination text NOT NULL,
    chain       uuid NOT NULL,
    seq         bigint NOT NULL,
    entry_id    bigint NOT NULL,
    reply       text,
    parked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, chain, seq)
);

SELECT pg_catalog.pg_extension_config_dump('levqor.audit_stream_destinations', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_stream_destinations_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_stream_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_stream_cursors', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_stream_parked', '');

CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.audit_stream_destinations
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');

-- The streams, without their secrets: every one for a levqor_admin; a
-- tenant's own for its admin or owner context. `delivered_seq` is the
-- cursor, `lag` the sealed entries after it, `parked` the events set aside.
CREATE VIEW levqor.audit_streams WITH (security_barrier = true) AS
SELECT d.id, d.tenant_id, t.slug AS tenant, d.kind, d.url,
       CASE WHEN d.paused THEN 'paused' ELSE d.state END AS state,
       coalesce(c.seq, 0) AS delivered_seq,
       greatest(coalesce(h.seq, 0) - coalesce(c.seq, 0), 0) AS lag,
       d.last_error,
       (SELECT count(*) FROM levqor.audit_stream_parked p
         WHERE p.destination = 'stream:' || d.id AND p.chain = d.tenant_id) AS parked,
       c.delivered_at, d.options, d.created_at
  FROM levqor.audit_stream_destinations d
  JOIN levqor.tenants t ON t.id = d.tenant_id
  LEFT JOIN levqor.audit_stream_cursors c ON c.destination = 'stream:' || d.id AND c.chain = d.tenant_id
  LEFT JOIN levqor.audit_heads h ON h.chain = d.tenant_id
 WHERE pg_has_role(current_user, 'levqor_admin', 'USAGE')
    OR (d.tenant_id = levqor.current_tenant() AND levqor.current_member_role() IN ('admin', 'owner'));

-- https, or plain http to a loopback address (tests) or with
-- options.allow_http = true.
CREATE FUNCTION levqor._check_stream_url(url text, options jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF url IS NULL OR length(url) > 2000 OR url ~ '[[:space:][:cntrl:]]'
       OR NOT (url ~ '^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/.*)?$'
               OR url ~ '^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?(/.*)?$'
               OR (coalesce((options ->> 'allow_http')::boolean, false) AND url ~ '^http://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/.*)?$')) THEN
        RAISE EXCEPTION 'an audit stream URL must be https (plain http only to a loopback address, or with options allow_http), not %',
            coalesce(quote_literal(left(url, 100)), 'NULL') USING ERRCODE = '22023';
    END IF;
END
$fn$;

CREATE FUNCTION levqor._check_stream_secret(secret text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF secret IS NULL OR length(secret) NOT BETWEEN 8 AND 1000 OR secret ~ '[[:cntrl:][:space:]]' THEN
        RAISE EXCEPTION 'an audit stream secret is 8 to 1000 characters without spaces' USING ERRCODE = '22023';
    END IF;
END
$fn$;

CREATE FUNCTION levqor.add_audit_stream(tenant text, kind text, url text, secret text, options jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t  levqor.tenants := levqor._tenant_for_update(tenant);
    id bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor.plans p WHERE p.name = t.plan AND 'audit_stream' = ANY (p.features)) THEN
        RAISE EXCEPTION 'plan % of tenant % does not include audit streams', t.plan, t.slug USING ERRCODE = '55000',
            HINT = 'Audit streams come with plans whose features include audit_stream (enterprise).';
    END IF;
    IF kind IS NULL OR kind NOT IN ('splunk_hec', 'datadog', 'webhook') THEN
        RAISE EXCEPTION 'unknown audit stream kind %', coalesce(quote_literal(kind), 'NULL') USING ERRCODE = '22023',
            HINT = 'kind is splunk_hec, datadog or webhook.';
    END IF;
    IF options IS NULL OR jsonb_typeof(options) <> 'object'
       OR EXISTS (SELECT 1 FROM jsonb_object_keys(options) k WHERE k NOT IN ('allow_http', 'gzip', 'batch_max_events', 'host', 'index')) THEN
        RAISE EXCEPTION 'audit stream options are a JSON object of allow_http, gzip, batch_max_events, host, index'
            USING ERRCODE = '22023';
    END IF;
    PERFORM levqor._check_stream_url(url, options);
    PERFORM levqor._check_stream_secret(secret);
    INSERT INTO levqor.audit_stream_destinations AS d (tenant_id, kind, url, options)
    VALUES (t.id, kind, url, options) RETURNING d.id INTO id;
    INSERT INTO levqor.audit_stream_secrets (stream_id, secret) VALUES (id, secret);
    -- Audited without the secret.
    PERFORM levqor._log_event(t.id, 'audit_stream_added', jsonb_build_object('stream', id, 'kind', kind, 'url', url, 'options', options));
    PERFORM pg_notify('levqor_streams', '');
    RETURN id;
END
$fn$;

-- The stream's row, locked; 42704 when there is none.
CREATE FUNCTION levqor._audit_stream(id bigint) RETURNS levqor.audit_stream_destinations
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d levqor.audit_stream_destinations;
BEGIN
    SELECT * INTO d FROM levqor.audit_stream_destinations x WHERE x.id = $1 FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit stream % does not exist', $1 USING ERRCODE = '42704';
    END IF;
    RETURN d;
END
$fn$;

CREATE FUNCTION levqor.remove_audit_stream(id bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d levqor.audit_stream_destinations := levqor._audit_stream($1);
BEGIN
    DELETE FROM levqor.audit_stream_secrets s WHERE s.stream_id = d.id;
    DELETE FROM levqor.audit_stream_cursors c WHERE c.destination = 'stream:' || d.id;
    DELETE FROM levqor.audit_stream_parked p WHERE p.destination = 'stream:' || d.id;
    DELETE FROM levqor.audit_stream_destinations x WHERE x.id = d.id;
    PERFORM levqor._log_event(d.tenant_id, 'audit_stream_removed', jsonb_build_object('stream', d.id, 'kind', d.kind, 'url', d.url));
    PERFORM pg_notify('levqor_streams', '');
END
$fn$;

CREATE FUNCTION levqor.pause_audit_stream(id bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d levqor.audit_stream_destinations := levqor._audit_stream($1);
BEGIN
    UPDATE levqor.audit_stream_destinations x SET paused = true WHERE x.id = d.id;
    PERFORM levqor._log_event(d.tenant_id, 'audit_stream_paused', jsonb_build_object('stream', d.id));
    PERFORM pg_notify('levqor_streams', '');
END
$fn$;

CREATE FUNCTION levqor.resume_audit_stream(id bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d levqor.audit_stream_destinations := levqor._audit_stream($1);
BEGIN
    UPDATE levqor.audit_stream_destinations x SET paused = false WHERE x.id = d.id;
    PERFORM levqor._log_event(d.tenant_id, 'audit_stream_resumed', jsonb_build_object('stream', d.id));
    PERFORM pg_notify('levqor_streams', '');
END
$fn$;

-- A new secret (the receiver's token was rotated, or was wrong): a stream in
-- auth_failed tries again with it.
CREATE FUNCTION levqor.set_audit_stream_secret(id bigint, secret text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    d levqor.audit_stream_destinations := levqor._audit_stream($1);
BEGIN
    PERFORM levqor._check_stream_secret(secret);
    UPDATE levqor.audit_stream_secrets s SET secret = set_audit_stream_secret.secret WHERE s.stream_id = d.id;
    UPDATE levqor.audit_stream_destinations x
       SET secret_version = x.secret_version + 1, state = 'active', last_error = NULL WHERE x.id = d.id;
    PERFORM levqor._log_event(d.tenant_id, 'audit_stream_secret_changed', jsonb_build_object('stream', d.id));
    PERFORM pg_notify('levqor_streams', '');
END
$fn$;

-- For the sidecar: every tenant stream, with its secret.
CREATE FUNCTION levqor.stream_destinations()
RETURNS TABLE (id bigint, tenant_id uuid, tenant text, kind text, url text, secret text, options jsonb,
               paused boolean, state text, secret_version integer, seq bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT d.id, d.tenant_id, t.slug, d.kind, d.url, s.secret, d.options, d.paused, d.state, d.secret_version, coalesce(c.seq, 0)
      FROM levqor.audit_stream_destinations d
      JOIN levqor.tenants t ON t.id = d.tenant_id
      JOIN levqor.audit_stream_secrets s ON s.stream_id = d.id
      LEFT JOIN levqor.audit_stream_cursors c ON c.destination = 'stream:' || d.id AND c.chain = d.tenant_id
     ORDER BY d.id
$fn$;

-- Every chain with its head and the cursor of `destination` in it, for an
-- operator-wide stream (the platform's chain is the nil uuid).
CREATE FUNCTION levqor.stream_chains(destination text)
RETURNS TABLE (chain uuid, tenant text, head bigint, seq bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT h.chain, t.slug, h.seq, coalesce(c.seq, 0)
      FROM levqor.audit_heads h
      LEFT JOIN levqor.tenants t ON t.id = h.chain
      LEFT JOIN levqor.audit_stream_cursors c ON c.destination = $1 AND c.chain = h.chain
     ORDER BY h.chain
$fn$;

-- The sealed entries of one chain after `after_seq`, in seq order, as the
-- events a receiver gets (DESIGN.md, "The sidecar"). Only entries whose
-- sealing is durable: the worker commits its sealing asynchronously, so the
-- WAL is flushed after the entries are read and before they are returned; a
-- sealing that a crash could still undo is never handed out, and no receiver
-- ever sees two different entries at one seq.
CREATE FUNCTION levqor.audit_events(chain uuid, after_seq bigint, max_events integer DEFAULT 500)
RETURNS TABLE (seq bigint, id bigint, at timestamptz, event jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
#variable_conflict use_variable
DECLARE
    prev   bytea;
    floor  record;
BEGIN
    IF max_events IS NULL OR max_events < 1 OR max_events > 10000 THEN
        RAISE EXCEPTION 'max_events must be 1 to 10000' USING ERRCODE = '22023';
    END IF;
    -- The hash before the first entry returned.
    SELECT hd.floor_seq, hd.floor_hash INTO floor FROM levqor.audit_heads hd WHERE hd.chain = $1;
    IF after_seq <= coalesce(floor.floor_seq, 0) THEN
        prev := coalesce(CASE WHEN after_seq = coalesce(floor.floor_seq, 0) THEN floor.floor_hash END,
                         '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
        after_seq := greatest(after_seq, coalesce(floor.floor_seq, 0));
    ELSE
        SELECT substr(c.hashes, ((after_seq - c.first_seq) * 32 + 1)::int, 32) INTO prev
          FROM levqor.audit_chain c
         WHERE c.chain = $1 AND c.first_seq <= after_seq AND c.first_seq > after_seq - 96
           AND c.first_seq + cardinality(c.ids) > after_seq
         ORDER BY c.first_seq DESC LIMIT 1;
    END IF;
    -- Collected into the function's result first; handed out only when the
    -- function returns, after the flush below.
    RETURN QUERY
    SELECT p.seq, a.id, a.at,
           jsonb_build_object(
               'id', a.id, 'tenant_id', a.tenant_id, 'tenant', t.slug, 'seq', p.seq,
               'hash', encode(p.hash, 'hex'),
               'prev_hash', encode(coalesce(lag(p.hash) OVER (ORDER BY p.seq), prev), 'hex'),
               'at', to_char(a.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'kind', a.kind, 'table', a.table_name, 'operation', a.operation, 'pk', a.pk,
               'old', a.old_row, 'new', a.new_row, 'changed', to_jsonb(a.changed),
               'event', a.event, 'detail', a.detail, 'db_role', a.db_role, 'user_id', a.user_id,
               'member_role', a.member_role)
      FROM (SELECT c.first_seq + k.o - 1 AS seq, k.id, substr(c.hashes, (k.o::int - 1) * 32 + 1, 32) AS hash
              FROM levqor.audit_chain c, unnest(c.ids) WITH ORDINALITY AS k(id, o)
             WHERE c.chain = $1 AND c.first_seq > after_seq - 96 AND c.first_seq + cardinality(c.ids) - 1 > after_seq
             ORDER BY c.first_seq, k.o LIMIT max_events + 96) p
      JOIN levqor.audit_log a ON a.id = p.id
      LEFT JOIN levqor.tenants t ON t.id = a.tenant_id
     WHERE p.seq > after_seq
     ORDER BY p.seq
     LIMIT max_events;
    -- Everything read above was committed before this flush returns.
    PERFORM levqor._flush_wal();
END
$fn$;

-- Sealed entries of a chain after `after_seq` (a stream's lag, for metrics).
CREATE FUNCTION levqor.stream_lag(chain uuid, after_seq bigint) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT greatest(coalesce((SELECT h.seq FROM levqor.audit_heads h WHERE h.chain = $1), 0) - $2, 0)
$fn$;

-- The sidecar moves a destination's cursor in a chain, only forward.
CREATE FUNCTION levqor.stream_advance(destination text, chain uuid, seq bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    IF destination IS NULL OR destination !~ '^(stream:[0-9]+|siem:[A-Za-z0-9_.:-]{1,100})$' THEN
        RAISE EXCEPTION 'not a stream destination: %', coalesce(quote_literal(left(destination, 60)), 'NULL') USING ERRCODE = '22023';
    END IF;
    INSERT INTO levqor.audit_stream_cursors AS c (destination, chain, seq, delivered_at)
    VALUES (destination, chain, seq, now())
    ON CONFLICT ON CONSTRAINT audit_stream_cursors_pkey DO UPDATE
       SET seq = greatest(c.seq, EXCLUDED.seq), delivered_at = now(), updated_at = now();
END
$fn$;

CREATE FUNCTION levqor.stream_park(destination text, chain uuid, seq bigint, entry_id bigint, reply text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    INSERT INTO levqor.audit_stream_parked AS p (destination, chain, seq, entry_id, reply)
    VALUES (destination, chain, seq, entry_id, left(reply, 2000))
    ON CONFLICT ON CONSTRAINT audit_stream_parked_pkey DO UPDATE SET reply = EXCLUDED.reply, parked_at = now();
END
$fn$;

-- What the sidecar found: active, failing or auth_failed, and why.
CREATE FUNCTION levqor.stream_report(id bigint, state text, last_error text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    was text;
BEGIN
    SELECT d.state INTO was FROM levqor.audit_stream_destinations d WHERE d.id = $1;
    UPDATE levqor.audit_stream_destinations d
       SET state = stream_report.state, last_error = left(stream_report.last_error, 2000), last_attempt_at = now()
     WHERE d.id = $1;
    IF was IS DISTINCT FROM state AND state = 'auth_failed' THEN
        PERFORM levqor._log_event((SELECT d.tenant_id FROM levqor.audit_stream_destinations d WHERE d.id = $1),
            'audit_stream_auth_failed', jsonb_build_object('stream', $1, 'reply', left(last_error, 500)));
    END IF;
END
$fn$;

-- 3. sql/backup.sql (new in 0.4.0).
-- Per-tenant backups, verified restores and DR drills (docs/backups.md).
-- The sidecar does the work as a login role granted levqor_backup: it reads a
-- tenant's rows through that tenant's own context (row level security
-- decides, so an archive cannot hold another tenant's row), and restores
-- them the same way. The functions below are what that role may do beyond
-- the table privileges enable_tenancy grants it; the catalog of backups and
-- the coverage view are here too.

-- Every backup, restore and drill, good or failed.
CREATE TABLE levqor.backups (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    slug        text NOT NULL,
    kind        text NOT NULL DEFAULT 'backup' CONSTRAINT backups_kind_check CHECK (kind IN ('backup', 'restore', 'drill')),
    taken_at    timestamptz NOT NULL DEFAULT now(),
    file        text,
    bytes       bigint,
    sha256      text,
    rows        bigint,
    duration_ms bigint,
    encrypted   boolean,
    status      text NOT NULL CONSTRAINT backups_status_check CHECK (status IN ('ok', 'failed')),
    error       text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX backups_tenant_idx ON levqor.backups (tenant_id, taken_at);
SELECT pg_catalog.pg_extension_config_dump('levqor.backups', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.backups_id_seq', '');

-- Per tenant: its last good backup and how old it is (the RPO achieved),
-- and how its drills went (the seeds' "DR coverage and backup restore
-- success %").
CREATE VIEW levqor.backup_coverage AS
SELECT t.id AS tenant_id, t.slug, t.status,
       g.taken_at AS last_good_backup, g.file AS last_good_file,
       now() - g.taken_at AS age,
       (SELECT max(b.taken_at) FROM levqor.backups b WHERE b.tenant_id = t.id AND b.kind = 'backup' AND b.status = 'failed'
         AND b.taken_at > coalesce(g.taken_at, '-infinity')) AS failed_since,
       d.drills, d.drills_ok,
       CASE WHEN d.drills > 0 THEN round(100.0 * d.drills_ok / d.drills, 1) END AS drill_success_percent,
       d.last_drill
  FROM levqor.tenants t
  LEFT JOIN LATERAL (SELECT b.taken_at, b.file FROM levqor.backups b
                      WHERE b.tenant_id = t.id AND b.kind = 'backup' AND b.status = 'ok'
                      ORDER BY b.taken_at DESC LIMIT 1) g ON true
  LEFT JOIN LATERAL (SELECT count(*) AS drills, count(*) FILTER (WHERE b.status = 'ok') AS drills_ok, max(b.taken_at) AS last_drill
                       FROM levqor.backups b WHERE b.tenant_id = t.id AND b.kind = 'drill') d ON true
 WHERE t.kind <> 'platform';

CREATE FUNCTION levqor.backup_record(tenant uuid, kind text, file text, bytes bigint, sha256 text, rows bigint,
                                     duration_ms bigint, encrypted boolean, status text, error text DEFAULT NULL,
                                     detail jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    id bigint;
    s  text := coalesce((SELECT t.slug FROM levqor.tenants t WHERE t.id = tenant), detail ->> 'slug', tenant::text);
BEGIN
    INSERT INTO levqor.backups AS b (tenant_id, slug, kind, file, bytes, sha256, rows, duration_ms, encrypted, status, error, detail)
    VALUES (tenant, s, kind, file, bytes, sha256, rows, duration_ms, encrypted, status, left(error, 2000), coalesce(detail, '{}'))
    RETURNING b.id INTO id;
    IF EXISTS (SELECT 1 FROM levqor.tenants t WHERE t.id = tenant) THEN
        PERFORM levqor._log_event(tenant, 'tenant_' || kind || CASE status WHEN 'ok' THEN '' ELSE '_failed' END,
            jsonb_build_object('file', file, 'rows', rows, 'sha256', sha256, 'error', left(error, 500)));
    END IF;
    RETURN id;
END
$fn$;

-- The tenants a scheduled run backs up, and what a backup starts from.
CREATE FUNCTION levqor.backup_tenants() RETURNS TABLE (tenant_id uuid, slug text, isolation text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT t.id, t.slug, t.isolation FROM levqor.tenants t
     WHERE t.kind <> 'platform' AND t.status <> 'offboarded' ORDER BY t.slug
$fn$;

-- What a backup needs besides rows, read in the caller's REPEATABLE READ
-- transaction (the caller has set the tenant's context with
-- levqor.backup_context(), so its rows are all it can read): the tenant's
-- catalog rows and the tables to copy, with their columns.
CREATE FUNCTION levqor.backup_begin(tenant text, include_secrets boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t      levqor.tenants;
    tables jsonb;
BEGIN
    IF current_setting('transaction_isolation') NOT IN ('repeatable read', 'serializable') THEN
        RAISE EXCEPTION 'a backup runs in one REPEATABLE READ transaction' USING ERRCODE = '25000',
            HINT = 'BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; then levqor.backup_begin().';
    END IF;
    SELECT * INTO t FROM levqor.tenants x WHERE x.id = levqor._tenant_id(tenant);
    IF levqor.current_tenant() IS DISTINCT FROM t.id THEN
        RAISE EXCEPTION 'a backup reads the tenant''s rows through its context' USING ERRCODE = '55000',
            HINT = 'SELECT levqor.backup_context(tenant) first, in the same transaction.';
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'table', s.tbl::text, 'schema', n.nspname, 'name', c.relname, 'tenant_column', s.tenant_column,
               'scope_column', (SELECT pt.scope_column FROM levqor.protected_tables pt WHERE pt.tbl = s.tbl),
               'columns', (SELECT jsonb_agg(a.attname ORDER BY a.attnum) FROM pg_attribute a
                            WHERE a.attrelid = s.tbl AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''))
               ORDER BY s.tbl::text), '[]')
      INTO tables
      FROM levqor._export_sources(t.id) s
      JOIN pg_class c ON c.oid = s.tbl JOIN pg_namespace n ON n.oid = c.relnamespace;
    RETURN jsonb_build_object(
        'tenant', to_jsonb(t),
        'members', (SELECT coalesce(jsonb_agg(to_jsonb(m) ORDER BY m.user_id), '[]') FROM levqor.members m WHERE m.tenant_id = t.id),
        'keys', (SELECT coalesce(jsonb_agg(to_jsonb(k) - 'key_hash' || jsonb_build_object('key_hash', encode(k.key_hash, 'hex'))
                                  ORDER BY k.key_id), '[]') FROM levqor.tenant_keys k WHERE k.tenant_id = t.id),
        'quota_overrides', (SELECT coalesce(jsonb_agg(to_jsonb(o) ORDER BY o.metric), '[]') FROM levqor.quota_overrides o WHERE o.tenant_id = t.id),
        'sso', (SELECT CASE WHEN include_secrets THEN to_jsonb(s) ELSE to_jsonb(s) - 'client_secret' END
                  FROM levqor.tenant_sso s WHERE s.tenant_id = t.id),
        'billing', (SELECT to_jsonb(b) FROM levqor.tenant_billing b WHERE b.tenant_id = t.id),
        'plan', (SELECT to_jsonb(p) FROM levqor.plans p WHERE p.name = t.plan),
        'audit_head', (SELECT to_jsonb(h) - 'hash' - 'floor_hash' || jsonb_build_object('hash', encode(h.hash, 'hex'), 'floor_hash', encode(h.floor_hash, 'hex'))
                         FROM levqor.audit_heads h WHERE h.chain = t.id),
        'tables', tables,
        'snapshot_at', now(),
        'levqor_version', (SELECT e.extversion FROM pg_extension e WHERE e.extname = 'levqor'),
        'server_version_num', current_setting('server_version_num')::int,
        'secrets_included', include_secrets);
END
$fn$;

-- The tenant's audit entries and chain runs, for the archive (the backup
-- context has no member role, so it could not read them itself).
CREATE FUNCTION levqor.backup_audit_log(tenant uuid) RETURNS SETOF levqor.audit_log
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT * FROM levqor.audit_log a WHERE a.tenant_id = $1 ORDER BY a.id
$fn$;

CREATE FUNCTION levqor.backup_audit_chain(tenant uuid) RETURNS SETOF levqor.audit_chain
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT * FROM levqor.audit_chain c WHERE c.chain = $1 ORDER BY c.first_seq
$fn$;

-- Restore a tenant's catalog rows from an archive, in the caller's
-- transaction (which then acts for the tenant, levqor.backup_context(), for
-- the rows that follow). A tenant that exists is refused unless `replace`;
-- replaced, only its own catalog rows change.
CREATE FUNCTION levqor.restore_begin(catalog jsonb, replace boolean DEFAULT false) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t       levqor.tenants := jsonb_populate_record(NULL::levqor.tenants, catalog -> 'tenant');
    had     levqor.tenants;
BEGIN
    IF t.id IS NULL OR t.slug IS NULL THEN
        RAISE EXCEPTION 'the archive holds no tenant' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO had FROM levqor.tenants x WHERE x.id = t.id FOR UPDATE;
    IF FOUND AND NOT replace THEN
        RAISE EXCEPTION 'tenant % exists here (status %)', had.slug, had.status USING ERRCODE = '55000',
            HINT = 'Pass --replace to replace its rows (only its own), or restore into another database.';
    END IF;
    IF NOT FOUND AND EXISTS (SELECT 1 FROM levqor.tenants x WHERE x.slug = t.slug) THEN
        RAISE EXCEPTION 'another tenant is called % here', t.slug USING ERRCODE = '23505';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM levqor.plans p WHERE p.name = t.plan) THEN
        IF catalog -> 'plan' IS NULL OR jsonb_typeof(catalog -> 'plan') <> 'object' THEN
            RAISE EXCEPTION 'plan % does not exist here', t.plan USING ERRCODE = '22023';
        END IF;
        INSERT INTO levqor.plans SELECT * FROM jsonb_populate_record(NULL::levqor.plans, catalog -> 'plan');
    END IF;
    IF t.parent IS NOT NULL AND NOT EXISTS (SELECT 1 FROM levqor.tenants x WHERE x.id = t.parent) THEN
        RAISE EXCEPTION 'the parent of % is not here', t.slug USING ERRCODE = '55000',
            HINT = 'Restore the tenant above it first.';
    END IF;
    -- Active while its rows come back (a suspended tenant's writes would be
    -- refused); restore_finish sets the archived status.
    IF had.id IS NULL THEN
        INSERT INTO levqor.tenants SELECT (jsonb_populate_record(t, '{"status": "active", "suspension_mode": null}')).*;
    ELSE
        UPDATE levqor.tenants x SET slug = t.slug, name = t.name, plan = t.plan, region = t.region, settings = t.settings,
               status = 'active', suspension_mode = NULL, suspension_reason = NULL, storage_exceeded = false,
               updated_at = now()
         WHERE x.id = t.id;
    END IF;
    DELETE FROM levqor.members m WHERE m.tenant_id = t.id;
    INSERT INTO levqor.members SELECT * FROM jsonb_populate_recordset(NULL::levqor.members, coalesce(catalog -> 'members', '[]'));
    DELETE FROM levqor.tenant_keys k WHERE k.tenant_id = t.id;
    INSERT INTO levqor.tenant_keys (key_id, tenant_id, key_hash, role, user_id, label, created_at, created_by, expires_at, revoked_at)
    SELECT k.key_id, t.id, decode(k.key_hash, 'hex'), k.role, k.user_id, k.label, k.created_at, k.created_by, k.expires_at, k.revoked_at
      FROM jsonb_to_recordset(coalesce(catalog -> 'keys', '[]'))
           AS k(key_id text, key_hash text, role text, user_id uuid, label text, created_at timestamptz, created_by name,
                expires_at timestamptz, revoked_at timestamptz)
     WHERE NOT EXISTS (SELECT 1 FROM levqor.tenant_keys x WHERE x.key_id = k.key_id);
    DELETE FROM levqor.quota_overrides o WHERE o.tenant_id = t.id;
    INSERT INTO levqor.quota_overrides SELECT * FROM jsonb_populate_recordset(NULL::levqor.quota_overrides, coalesce(catalog -> 'quota_overrides', '[]'));
    IF jsonb_typeof(catalog -> 'sso') = 'object' THEN
        DELETE FROM levqor.tenant_sso s WHERE s.tenant_id = t.id;
        INSERT INTO levqor.tenant_sso SELECT * FROM jsonb_populate_record(NULL::levqor.tenant_sso, catalog -> 'sso');
    END IF;
    IF jsonb_typeof(catalog -> 'billing') = 'object' AND NOT EXISTS (SELECT 1 FROM levqor.tenant_billing b WHERE b.tenant_id = t.id) THEN
        INSERT INTO levqor.tenant_billing SELECT * FROM jsonb_populate_record(NULL::levqor.tenant_billing, catalog -> 'billing');
    END IF;
    RETURN t.id;
END
$fn$;

-- A schema tenant's schema, when it is missing here: cloned from
-- levqor_template (as create_tenant does). False when the template lacks a
-- table the archive has: the archive's DDL must create them.
CREATE FUNCTION levqor.restore_schema(tenant uuid, tables text[]) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t levqor.tenants;
BEGIN
    SELECT * INTO t FROM levqor.tenants x WHERE x.id = tenant;
    IF t.schema_name IS NULL OR to_regnamespace(quote_ident(t.schema_name)) IS NOT NULL THEN
        RETURN true;
    END IF;
    -- Only the tables of its schema (its rows in shared tables are in tables too).
    IF EXISTS (SELECT 1 FROM unnest(tables) x
                WHERE split_part(x, '.', 1) = t.schema_name
                  AND to_regclass(format('levqor_template.%I', split_part(x, '.', 2))) IS NULL) THEN
        RETURN false;
    END IF;
    PERFORM levqor._clone_template(t.schema_name, t.id);
    RETURN true;
END
$fn$;

-- Sequences of a restored table past every id it holds (all tenants').
CREATE FUNCTION levqor.restore_sequences(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    c   record;
    top bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor._protected() p WHERE p.tbl = $1)
       AND NOT EXISTS (SELECT 1 FROM levqor.tenants t JOIN pg_class k ON k.oid = $1
                        WHERE k.relnamespace = to_regnamespace(quote_ident(t.schema_name))) THEN
        RAISE EXCEPTION '% holds no tenant data', $1 USING ERRCODE = '42501';
    END IF;
    FOR c IN SELECT a.attname, pg_get_serial_sequence($1::text, a.attname) AS seq
               FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped LOOP
        CONTINUE WHEN c.seq IS NULL;
        EXECUTE format('SELECT max(%I)::bigint FROM %s', c.attname, $1) INTO top;
        IF top IS NOT NULL AND top > coalesce(pg_sequence_last_value(c.seq::regclass), 0) THEN
            PERFORM setval(c.seq, top);
        END IF;
    END LOOP;
END
$fn$;

-- The tenant's audit trail from an archive, from the caller's temporary
-- tables levqor_restore_audit (entries, as audit_log rows) and
-- levqor_restore_chain (runs). Where this database already has the
-- tenant's chain (a restore after purge_tenant, which keeps the trail), it
-- stays as it is. Where it has none: the entries come back with their ids,
-- positions and hashes if those ids are free here (the chain verifies as it
-- did), else they are entered again, as new entries that the sealer chains
-- anew (the archive keeps the original hashes). Returns what it did.
CREATE FUNCTION levqor.restore_audit(tenant uuid, head jsonb) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    n    bigint;
    top  bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM levqor.audit_heads h WHERE h.chain = tenant) THEN
        RETURN 'kept: the chain here';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_temp.levqor_restore_audit r WHERE r.tenant_id IS DISTINCT FROM tenant)
       OR EXISTS (SELECT 1 FROM pg_temp.levqor_restore_chain r WHERE r.chain IS DISTINCT FROM tenant) THEN
        RAISE EXCEPTION 'the archive''s audit trail holds entries of another tenant' USING ERRCODE = '42501';
    END IF;
    SELECT count(*), max(r.id) INTO n, top FROM pg_temp.levqor_restore_audit r;
    IF n = 0 THEN
        RETURN 'none';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM levqor.audit_log a JOIN pg_temp.levqor_restore_audit r ON r.id = a.id) THEN
        INSERT INTO levqor.audit_log SELECT * FROM pg_temp.levqor_restore_audit;
        -- Entries not sealed when the backup was taken are sealed here later,
        -- continuing the chain from the archived head.
        IF jsonb_typeof(head) = 'object' AND head ->> 'seq' IS NOT NULL THEN
            INSERT INTO levqor.audit_chain SELECT * FROM pg_temp.levqor_restore_chain;
            INSERT INTO levqor.audit_heads (chain, seq, hash, floor_seq, floor_hash)
            VALUES (tenant, (head ->> 'seq')::bigint, decode(head ->> 'hash', 'hex'),
                    coalesce((head ->> 'floor_seq')::bigint, 0), decode(coalesce(head ->> 'floor_hash', repeat('00', 32)), 'hex'));
        END IF;
        PERFORM setval('levqor.audit_log_id_seq', greatest(top, coalesce(pg_sequence_last_value('levqor.audit_log_id_seq'), 1)));
        RETURN format('restored: %s entries with their chain', n);
    END IF;
    INSERT INTO levqor.audit_log (tenant_id, at, xid, db_role, user_id, member_role, application_name, client_addr, kind,
                                  table_name, operation, pk, old_row, new_row, changed, event, detail)
    SELECT r.tenant_id, r.at, r.xid, r.db_role, r.user_id, r.member_role, r.application_name, r.client_addr, r.kind,
           r.table_name, r.operation, r.pk, r.old_row, r.new_row, r.changed, r.event, r.detail
      FROM pg_temp.levqor_restore_audit r ORDER BY r.id;
    RETURN format('entered again: %s entries, to be sealed as a new chain', n);
END
$fn$;

-- The end of a restore: the archived status comes back, the restore is in
-- the tenant's audit trail.
CREATE FUNCTION levqor.restore_finish(catalog jsonb, detail jsonb DEFAULT '{}') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t levqor.tenants := jsonb_populate_record(NULL::levqor.tenants, catalog -> 'tenant');
BEGIN
    UPDATE levqor.tenants x SET status = t.status, suspension_mode = t.suspension_mode, suspension_reason = t.suspension_reason,
           trial_ends_at = t.trial_ends_at, offboarded_at = t.offboarded_at, purge_after = t.purge_after, updated_at = now()
     WHERE x.id = t.id;
    PERFORM levqor._log_event(t.id, 'tenant_restored', coalesce(detail, '{}'));
END
$fn$;

-- 4. Functions new or changed in the files 0.3.0 had.
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
CREATE FUNCTION levqor._make_restrictive(tbl oid, policy oid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    p record;
BEGIN
    SELECT pol.polname, pol.polcmd, pg_get_expr(pol.polqual, pol.polrelid) AS qual,
           pg_get_expr(pol.polwithcheck, pol.polrelid) AS chk INTO p
      FROM pg_policy pol
     WHERE pol.oid = policy AND pol.polrelid = tbl AND pol.polpermissive AND pol.polname LIKE 'levqor\_tenant\_%';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    EXECUTE format('DROP POLICY %I ON %s', p.polname, tbl::regclass);
    EXECUTE format('CREATE POLICY %I ON %s AS RESTRICTIVE FOR %s TO PUBLIC %s %s', p.polname, tbl::regclass,
                   CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                 WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                   CASE WHEN p.qual IS NOT NULL THEN 'USING (' || p.qual || ')' ELSE '' END,
                   CASE WHEN p.chk IS NOT NULL THEN 'WITH CHECK (' || p.chk || ')' ELSE '' END);
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
END
$fn$;
CREATE FUNCTION levqor._notice_unsealed(as_warning boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    msg    text := format('levqor: no worker seals the audit log of database %s', current_database());
    detail text := 'Entries stay unsealed, and verify_audit() has nothing to verify, until levqor.seal_audit() runs.';
    hint   text := format('Add %L to levqor.audit_database (with shared_preload_libraries = ''levqor'') and restart, or schedule SELECT levqor.seal_audit();',
                          current_database());
BEGIN
    IF levqor._sealing_worker_here() THEN
        RETURN;
    ELSIF as_warning THEN
        RAISE WARNING '%', msg USING DETAIL = detail, HINT = hint;
    ELSE
        RAISE NOTICE '%', msg USING DETAIL = detail, HINT = hint;
    END IF;
END
$fn$;
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
CREATE FUNCTION levqor._protect_partitions() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET citus.override_table_visibility = off AS $fn$
#variable_conflict use_variable
DECLARE
    cmd  record;
    part record;
BEGIN
    FOR cmd IN SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() c
                WHERE c.classid = 'pg_class'::regclass AND c.object_type = 'table' LOOP
        -- The new or altered table if it is a partition, and the partitions
        -- of a table that was altered (ATTACH PARTITION is an ALTER TABLE of
        -- the parent).
        FOR part IN
            SELECT i.inhrelid::regclass AS child, pt.tenant_column, i.inhparent::regclass AS parent
              FROM pg_inherits i
              JOIN pg_class k ON k.oid = i.inhrelid AND k.relispartition
              JOIN levqor.protected_tables pt ON pt.tbl = i.inhparent
             WHERE (i.inhrelid = cmd.objid OR i.inhparent = cmd.objid)
               AND NOT levqor._is_protected(i.inhrelid)
               AND NOT levqor._being_disabled(i.inhrelid)
        LOOP
            -- Marked while levqor protects it, so that the DDL this runs
            -- (itself seen by these triggers) does not start it again.
            INSERT INTO levqor._disabling (tbl) VALUES (part.child);
            PERFORM levqor.enable_tenancy(part.child, part.tenant_column);
            DELETE FROM levqor._disabling d WHERE d.tbl = part.child::oid;
            RAISE NOTICE 'levqor: partition % of % is protected like its parent', part.child, part.parent;
        END LOOP;
    END LOOP;
END
$fn$;
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
CREATE FUNCTION levqor._restoring() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT current_setting('row_security') = 'off'
           AND coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user), false)
$fn$;
CREATE FUNCTION levqor._sealing_worker_here() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT levqor.preloaded()
           AND current_database() = ANY (regexp_split_to_array(btrim(coalesce(current_setting('levqor.audit_database', true), '')), '\s*,\s*'))
$fn$;
CREATE FUNCTION levqor._shard_problems(shard regclass) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(string_agg(x, ', '), '') FROM levqor._tenancy_problems(shard, true) x
     WHERE x <> 'the TRUNCATE guard trigger is missing'
$fn$;
CREATE FUNCTION levqor._tenant_column_of(tbl regclass) RETURNS name
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pt.tenant_column FROM levqor.protected_tables pt WHERE pt.tbl = $1
$fn$;
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
CREATE FUNCTION levqor.isolation_report(format text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF format IS DISTINCT FROM 'json' THEN
        RAISE EXCEPTION 'unknown report format %', coalesce(quote_literal(format), 'NULL') USING ERRCODE = '22023',
            HINT = 'format => ''json'', or call levqor.isolation_report() for rows.';
    END IF;
    RETURN coalesce((SELECT jsonb_agg(to_jsonb(r) ORDER BY CASE r.severity WHEN 'high' THEN 0 WHEN 'medium' THEN 1 ELSE 2 END, r.kind, r.object)
                       FROM levqor.isolation_report() r), '[]'::jsonb);
END
$fn$;
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
        -- Only the alert's id: PostgreSQL has no permissions on channels.
        PERFORM pg_notify('levqor_quota', a.id::text);
        PERFORM levqor._log_event(a.tenant_id, 'quota_threshold', jsonb_build_object(
            'metric', a.metric, 'threshold', a.threshold, 'used', a.used, 'limit', a.quota,
            'window_start', CASE WHEN a.window_start = '-infinity' THEN NULL ELSE a.window_start END));
    END LOOP;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._clone_template(target name, tenant uuid) RETURNS int
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
CREATE OR REPLACE FUNCTION levqor._export(tid uuid) RETURNS TABLE (table_name text, row_data jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    t      levqor.tenants;
    p      record;
    counts jsonb := '{}';
    n      bigint;
BEGIN
    SELECT * INTO t FROM levqor.tenants WHERE id = tid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', tid USING ERRCODE = '42704';
    END IF;
    FOR p IN SELECT * FROM levqor._export_sources(tid) LOOP
        IF p.tenant_column IS NULL THEN
            EXECUTE format('SELECT count(*) FROM %s', p.tbl) INTO n;
        ELSE
            EXECUTE format('SELECT count(*) FROM %s WHERE %I = $1', p.tbl, p.tenant_column) INTO n USING tid;
        END IF;
        counts := counts || jsonb_build_object(p.tbl::text, n);
    END LOOP;
    counts := counts
        || jsonb_build_object('levqor.tenants', 1,
                              'levqor.tenant_keys', (SELECT count(*) FROM levqor.tenant_keys k WHERE k.tenant_id = tid),
                              'levqor.members', (SELECT count(*) FROM levqor.members m WHERE m.tenant_id = tid),
                              'levqor.audit_log', (SELECT count(*) FROM levqor.audit_log a WHERE a.tenant_id = tid));

    table_name := 'manifest';
    row_data := jsonb_build_object('tenant', tid, 'slug', t.slug, 'exported_at', now(), 'format', 'levqor-export/1',
                              'rows', counts);
    RETURN NEXT;
    RETURN QUERY SELECT 'levqor.tenants', to_jsonb(x) FROM levqor.tenants x WHERE x.id = tid;
    -- Key metadata, never the hashes.
    RETURN QUERY SELECT 'levqor.tenant_keys', to_jsonb(k) - 'key_hash'
                   FROM levqor.tenant_keys k WHERE k.tenant_id = tid ORDER BY k.created_at;
    RETURN QUERY SELECT 'levqor.members', to_jsonb(m) FROM levqor.members m WHERE m.tenant_id = tid ORDER BY m.added_at, m.user_id;
    FOR p IN SELECT * FROM levqor._export_sources(tid) LOOP
        IF p.tenant_column IS NULL THEN
            RETURN QUERY EXECUTE format('SELECT %L::text, to_jsonb(x) FROM %s x', p.tbl::text, p.tbl);
        ELSE
            RETURN QUERY EXECUTE format('SELECT %L::text, to_jsonb(x) FROM %s x WHERE x.%I = $1',
                                        p.tbl::text, p.tbl, p.tenant_column) USING tid;
        END IF;
    END LOOP;
    RETURN QUERY SELECT 'levqor.audit_log', to_jsonb(a) FROM levqor.audit_trail a WHERE a.tenant_id = tid ORDER BY a.id;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._guard_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET citus.override_table_visibility = off AS $fn$
#variable_conflict use_variable
DECLARE
    cmd      record;
    tbl      oid;
    problems text;
BEGIN
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        tbl := CASE cmd.classid
                   WHEN 'pg_class'::regclass THEN cmd.objid
                   WHEN 'pg_policy'::regclass THEN (SELECT p.polrelid FROM pg_policy p WHERE p.oid = cmd.objid)
                   WHEN 'pg_trigger'::regclass THEN (SELECT t.tgrelid FROM pg_trigger t WHERE t.oid = cmd.objid)
               END;
        CONTINUE WHEN tbl IS NULL OR levqor._being_disabled(tbl);
        IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname LIKE 'levqor\_audit\_%'
                                               AND t.tgenabled NOT IN ('O', 'A')) THEN
            RAISE EXCEPTION 'levqor: % would switch auditing off on %', cmd.command_tag, tbl::regclass
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.disable_audit().';
        END IF;
        IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname LIKE 'levqor\_limit\_%'
                                               AND t.tgenabled NOT IN ('O', 'A')) THEN
            RAISE EXCEPTION 'levqor: % would switch the row limit off on %', cmd.command_tag, tbl::regclass
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.unlimit_rows().';
        END IF;
        CONTINUE WHEN NOT levqor._is_protected(tbl);
        -- Citus copies a table's policies to its shards (and to the other
        -- nodes' copies of the table) without AS RESTRICTIVE. A levqor policy
        -- arriving permissive is made restrictive again: strengthening is
        -- never refused, and a permissive copy would let any other policy
        -- widen what a tenant sees.
        IF cmd.command_tag = 'CREATE POLICY' AND cmd.classid = 'pg_policy'::regclass THEN
            PERFORM levqor._make_restrictive(tbl, cmd.objid);
        END IF;
        -- A policy of levqor's arriving on a table whose row level security
        -- is off (pg_restore re-creates policies before it re-enables row
        -- level security when the table's name sorts after "levqor_"):
        -- switch it on now, rather than refuse the policy. Strengthening is
        -- never refused; the table is closed from its first policy on.
        IF cmd.command_tag IN ('CREATE POLICY', 'ALTER POLICY')
           AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND NOT (c.relrowsecurity AND c.relforcerowsecurity)) THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', tbl::regclass);
        END IF;
        SELECT string_agg(x, '; ') INTO problems FROM levqor._tenancy_problems(tbl::regclass, false) x;
        IF problems IS NOT NULL THEN
            RAISE EXCEPTION 'levqor: % would weaken tenant isolation on %: %', cmd.command_tag, tbl::regclass, problems
                USING ERRCODE = '42501',
                      HINT = 'A levqor_admin can remove levqor tenancy with levqor.disable_tenancy().';
        END IF;
    END LOOP;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._guard_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    obj record;
    tbl regclass;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() o
                WHERE o.object_type = 'extension' AND o.object_name = 'levqor') THEN
        RETURN;
    END IF;
    FOR obj IN
        SELECT o.object_type, o.address_names
          FROM pg_event_trigger_dropped_objects() o
         WHERE o.object_type IN ('policy', 'trigger')
           AND (o.address_names[3] LIKE 'levqor\_tenant\_%'
                OR o.address_names[3] IN ('levqor_base', 'levqor_base_shared', 'levqor_no_truncate', 'levqor_write_guard')
                -- on a Citus shard, its triggers carry the shard's id
                OR o.address_names[3] ~ '^levqor_(no_truncate|write_guard)_[0-9]+$'
                OR o.address_names[3] LIKE 'levqor\_audit\_%'
                OR o.address_names[3] LIKE 'levqor\_limit\_%')
    LOOP
        tbl := to_regclass(format('%I.%I', obj.address_names[1], obj.address_names[2]));
        CONTINUE WHEN tbl IS NULL;  -- the table itself is going away
        CONTINUE WHEN levqor._being_disabled(tbl);
        IF obj.address_names[3] LIKE 'levqor\_audit\_%' THEN
            RAISE EXCEPTION 'levqor: dropping % % on % would switch auditing off',
                obj.object_type, quote_ident(obj.address_names[3]), tbl
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.disable_audit().';
        END IF;
        IF obj.address_names[3] LIKE 'levqor\_limit\_%' THEN
            RAISE EXCEPTION 'levqor: dropping % % on % would switch the row limit off',
                obj.object_type, quote_ident(obj.address_names[3]), tbl
                USING ERRCODE = '42501', HINT = 'A levqor_admin can call levqor.unlimit_rows().';
        END IF;
        RAISE EXCEPTION 'levqor: dropping % % on % would remove tenant isolation',
            obj.object_type, quote_ident(obj.address_names[3]), tbl
            USING ERRCODE = '42501',
                  HINT = 'A levqor_admin can remove levqor tenancy with levqor.disable_tenancy().';
    END LOOP;
    DELETE FROM levqor.protected_tables pt
     WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = pt.tbl);
    -- A dropped table's row limit goes with it (its metric is free again).
    DELETE FROM levqor.row_limits rl
     WHERE NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = rl.tbl);
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._is_protected(tbl oid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = $1
                      AND (pol.polname LIKE 'levqor\_tenant\_%' OR pol.polname IN ('levqor_base', 'levqor_base_shared')))
$fn$;
CREATE OR REPLACE FUNCTION levqor._protect_schema_table(tbl regclass, tenant uuid) RETURNS void
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
CREATE OR REPLACE FUNCTION levqor._record_usage(tenants uuid[], counters integer[], is_rows boolean[], windows bigint[],
                                     used bigint[], billable bigint[])
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t uuid[];
    m text[];
    w timestamptz[];
    u bigint[];
    b bigint[];
BEGIN
    SELECT array_agg(x.tenant_id), array_agg(coalesce(r.metric, k.name)), array_agg(levqor._ts(x.w)),
           array_agg(x.used), array_agg(x.billable)
      INTO t, m, w, u, b
      FROM unnest(tenants, counters, is_rows, windows, used, billable) AS x(tenant_id, counter, is_rows, w, used, billable)
      LEFT JOIN levqor.row_limits r ON x.is_rows AND r.id = x.counter
      LEFT JOIN levqor.metrics k ON NOT x.is_rows AND k.id = x.counter
     WHERE coalesce(r.metric, k.name) IS NOT NULL
       AND EXISTS (SELECT 1 FROM levqor.tenants tt WHERE tt.id = x.tenant_id);
    IF t IS NULL THEN
        RETURN;
    END IF;

    INSERT INTO levqor.usage_counters AS c (tenant_id, metric, window_start, used)
    SELECT * FROM unnest(t, m, w, u)
    ON CONFLICT (tenant_id, metric, window_start) DO UPDATE SET used = EXCLUDED.used, updated_at = now();
    DELETE FROM levqor.usage_counters c USING unnest(t, m, w) AS x(tenant_id, metric, window_start)
     WHERE c.tenant_id = x.tenant_id AND c.metric = x.metric AND c.window_start < x.window_start;

    -- Wakes the sidecar's meter (no payload: any session may LISTEN).
    IF EXISTS (SELECT 1 FROM unnest(b) AS x(q) WHERE x.q > 0) THEN
        PERFORM pg_notify('levqor_ledger', '');
    END IF;
    INSERT INTO levqor.usage_ledger (tenant_id, metric, quantity, period_start, period_end)
    SELECT x.tenant_id, x.metric, x.billable,
           coalesce((SELECT max(l.period_end) FROM levqor.usage_ledger l
                      WHERE l.tenant_id = x.tenant_id AND l.metric = x.metric),
                    (SELECT tt.created_at FROM levqor.tenants tt WHERE tt.id = x.tenant_id)),
           now()
      FROM unnest(t, m, b) AS x(tenant_id, metric, billable)
     WHERE x.billable > 0;

    PERFORM levqor._check_thresholds(t, m, w, u);
END
$fn$;
CREATE OR REPLACE FUNCTION levqor._register_scope(tbl regclass, scope_column name) RETURNS void
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
CREATE OR REPLACE FUNCTION levqor._tenancy_problems(tbl regclass, complete boolean)
RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET citus.override_table_visibility = off AS $fn$
#variable_conflict use_variable
DECLARE
    c        record;
    p        record;
    col      name;
    scope    name;
    fits     boolean;
    want_cmd text;
BEGIN
    SELECT rel.relrowsecurity, rel.relforcerowsecurity INTO c FROM pg_class rel WHERE rel.oid = tbl;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF NOT c.relrowsecurity THEN
        RETURN NEXT 'row level security is disabled';
    END IF;
    IF NOT c.relforcerowsecurity THEN
        RETURN NEXT 'row level security is not forced (the owner would bypass it)';
    END IF;
    SELECT pt.tenant_column, pt.scope_column INTO col, scope FROM levqor.protected_tables pt WHERE pt.tbl = $1;
    IF NOT FOUND THEN
        -- Not registered (a schema-only restore, or one still under way):
        -- the table itself says which column its policies compare and which
        -- column its levqor scope check constrains.
        SELECT a.attname INTO col FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
           AND EXISTS (SELECT 1 FROM pg_policy pol
                        WHERE pol.polrelid = tbl AND pol.polname LIKE 'levqor\_%'
                          AND strpos(coalesce(pg_get_expr(pol.polqual, pol.polrelid), '')
                                     || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), ''),
                                     levqor._tenant_qual(a.attname)) > 0)
         ORDER BY a.attnum LIMIT 1;
        SELECT a.attname INTO scope
          FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
         WHERE k.conrelid = tbl AND k.conname = 'levqor_scope_check' AND cardinality(k.conkey) = 1
           AND pg_get_constraintdef(k.oid) = format('CHECK ((%I = ANY (ARRAY[''organization''::text, ''tenant''::text, ''platform''::text])))', a.attname);
        IF col IS NULL THEN
            scope := NULL;
        END IF;
    END IF;

    FOR p IN
        SELECT pol.polname, pol.polcmd, pol.polpermissive, pol.polroles,
               pg_get_expr(pol.polqual, pol.polrelid) AS qual,
               pg_get_expr(pol.polwithcheck, pol.polrelid) AS chk
          FROM pg_policy pol
         WHERE pol.polrelid = tbl
    LOOP
        -- Every levqor policy applies to every role: a restrictive one
        -- narrowed to some roles would no longer restrict the others.
        IF p.polname LIKE 'levqor\_%' AND p.polroles <> '{0}'::oid[] THEN
            RETURN NEXT format('policy %I must apply to PUBLIC', p.polname);
        END IF;
        IF p.polname = 'levqor_base' THEN
            -- Permissive, and itself admitting only the context's tenant (a
            -- schema tenant's table: only the tenant that owns the schema).
            IF NOT p.polpermissive OR p.polcmd <> '*' OR NOT (
                (p.qual ~ '^\(levqor\.current_tenant\(\) = ''[0-9a-f-]{36}''::uuid\)$' AND p.chk = p.qual)
                OR EXISTS (
                SELECT 1 FROM pg_attribute a
                 WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                   AND (col IS NULL OR a.attname = col)
                   AND p.qual = levqor._tenant_qual(a.attname)
                   AND p.chk = CASE WHEN scope IS NULL THEN levqor._tenant_qual(a.attname)
                                    ELSE levqor._scoped_write_qual(a.attname, scope) END))
            THEN
                RETURN NEXT 'policy levqor_base no longer admits only the context''s own tenant';
            END IF;
            CONTINUE;
        END IF;
        IF p.polname = 'levqor_base_shared' THEN
            -- Scoped tables: what reads may reach beyond the tenant's own rows.
            IF scope IS NULL OR NOT p.polpermissive OR p.polcmd <> 'r' OR p.chk IS NOT NULL
               OR p.qual IS DISTINCT FROM levqor._scoped_select_qual(col, scope) THEN
                RETURN NEXT format('policy levqor_base_shared no longer matches the scoped protection%s',
                                   CASE WHEN scope IS NULL THEN ' (the table has no scope column)' ELSE '' END);
            END IF;
            CONTINUE;
        END IF;
        IF p.polname LIKE 'levqor\_tenant\_%' THEN
            IF p.polpermissive THEN
                RETURN NEXT format('policy %I must be restrictive', p.polname);
            END IF;
            want_cmd := (CASE p.polname WHEN 'levqor_tenant_select' THEN 'r'
                                        WHEN 'levqor_tenant_insert' THEN 'a'
                                        WHEN 'levqor_tenant_update' THEN 'w'
                                        WHEN 'levqor_tenant_delete' THEN 'd' END);
            IF want_cmd IS NULL OR p.polcmd::text <> want_cmd THEN
                RETURN NEXT format('policy %I applies to the wrong command', p.polname);
            END IF;
            -- A scoped table (sql/hierarchy.sql): reads may also reach rows
            -- shared at tenant or platform scope (or only the tenant's own,
            -- which is narrower); writes stay in the writer's organization
            -- and only a platform writes platform-scope rows.
            IF scope IS NOT NULL THEN
                fits := CASE p.polname
                       WHEN 'levqor_tenant_select' THEN p.chk IS NULL AND p.qual IN (levqor._tenant_qual(col),
                                                                  levqor._scoped_select_qual(col, scope))
                       WHEN 'levqor_tenant_insert' THEN p.qual IS NULL AND p.chk = levqor._scoped_write_qual(col, scope)
                       WHEN 'levqor_tenant_update' THEN p.qual = levqor._tenant_qual(col)
                                                        AND p.chk = levqor._scoped_write_qual(col, scope)
                       WHEN 'levqor_tenant_delete' THEN p.chk IS NULL AND p.qual = levqor._tenant_qual(col)
                       ELSE false END;
                IF NOT coalesce(fits, false) THEN
                    RETURN NEXT format('policy %I no longer matches the scoped protection of column %I', p.polname, scope);
                END IF;
                CONTINUE;
            END IF;
            -- The expression must be the canonical one for a real column
            -- (the registered one, when the table is registered).
            IF NOT EXISTS (
                SELECT 1 FROM pg_attribute a
                 WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                   AND (col IS NULL OR a.attname = col)
                   AND (p.qual IS NULL OR p.qual = levqor._tenant_qual(a.attname))
                   AND (p.chk IS NULL OR p.chk = levqor._tenant_qual(a.attname))
                   AND (p.polcmd <> 'w' OR (p.qual IS NOT NULL AND p.chk IS NOT NULL))
                   AND coalesce(p.qual, p.chk) IS NOT NULL)
            THEN
                RETURN NEXT format('policy %I no longer compares the tenant column with levqor.current_tenant()', p.polname);
            END IF;
        ELSIF NOT p.polpermissive
              AND (p.qual LIKE '%levqor.current_tenant()%' OR p.chk LIKE '%levqor.current_tenant()%')
              AND (p.qual IS NULL OR p.qual ~ '^\(.* = levqor\.current_tenant\(\)\)$') THEN
            -- A renamed levqor policy could later be dropped unnoticed.
            RETURN NEXT format('policy %I looks like a renamed levqor policy', p.polname);
        END IF;
    END LOOP;

    IF complete THEN
        FOR p IN SELECT unnest(ARRAY['levqor_tenant_select', 'levqor_tenant_insert',
                                     'levqor_tenant_update', 'levqor_tenant_delete', 'levqor_base']
                               || CASE WHEN scope IS NULL THEN '{}'::text[] ELSE ARRAY['levqor_base_shared'] END) AS polname
        LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = p.polname) THEN
                RETURN NEXT format('policy %I is missing', p.polname);
            END IF;
        END LOOP;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_no_truncate(_[0-9]+)?$') THEN
            RETURN NEXT 'the TRUNCATE guard trigger is missing';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_write_guard(_[0-9]+)?$') THEN
            RETURN NEXT 'the write guard trigger is missing';
        END IF;
    END IF;
    -- (On a Citus shard the triggers' names end in the shard's id.)
    -- A trigger fires in ordinary sessions only when enabled 'O' (origin) or
    -- 'A' (always): 'D' (disabled) and 'R' (ENABLE REPLICA) both switch it off.
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_no_truncate(_[0-9]+)?$'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the TRUNCATE guard trigger is disabled';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname ~ '^levqor_write_guard(_[0-9]+)?$'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the write guard trigger is disabled';
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.disable_tenancy(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    pol   name;
    child regclass;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'disable_tenancy: table must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF NOT levqor._is_protected(tbl) THEN
        RAISE NOTICE 'levqor: % is not under tenancy; nothing to do', tbl;
        RETURN;
    END IF;
    -- A partition is protected while its parent is: it can be read directly.
    IF EXISTS (SELECT 1 FROM pg_inherits inh JOIN pg_class k ON k.oid = inh.inhrelid AND k.relispartition
                WHERE inh.inhrelid = tbl AND levqor._is_protected(inh.inhparent) AND NOT levqor._being_disabled(inh.inhparent)) THEN
        RAISE EXCEPTION '% is a partition of a protected table', tbl USING ERRCODE = '55000',
            HINT = 'Disable tenancy on the partitioned table (it takes its partitions along), or detach the partition first.';
    END IF;
    IF (levqor._distribution(tbl)).method IS NOT NULL THEN
        RAISE EXCEPTION '% is a Citus distributed table: levqor does not remove tenancy from one', tbl
            USING ERRCODE = '0A000',
                  HINT = 'Its shards keep their policies on every worker; copy the rows into a new table without tenancy instead.';
    END IF;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    FOR child IN SELECT inh.inhrelid::regclass FROM pg_inherits inh WHERE inh.inhparent = tbl LOOP
        PERFORM levqor.disable_tenancy(child);
    END LOOP;
    FOR pol IN SELECT p.polname FROM pg_policy p
                WHERE p.polrelid = tbl AND (p.polname LIKE 'levqor\_tenant\_%' OR p.polname IN ('levqor_base', 'levqor_base_shared')) LOOP
        EXECUTE format('DROP POLICY %I ON %s', pol, tbl);
    END LOOP;
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_no_truncate ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_write_guard ON %s', tbl);
    EXECUTE format('ALTER TABLE %s NO FORCE ROW LEVEL SECURITY', tbl);
    IF NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = tbl) THEN
        EXECUTE format('ALTER TABLE %s DISABLE ROW LEVEL SECURITY', tbl);
    END IF;
    DELETE FROM levqor.protected_tables pt WHERE pt.tbl = $1;
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
    PERFORM levqor._log_event(NULL, 'tenancy_disabled', jsonb_build_object('table', tbl::text));
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.enable_audit(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND c.relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '42809';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_audit_insert') THEN
        RETURN;
    END IF;
    PERFORM levqor._refuse_on_citus(tbl, 'auditing');
    EXECUTE format('CREATE TRIGGER levqor_audit_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS levqor_new
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    EXECUTE format('CREATE TRIGGER levqor_audit_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS levqor_old
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    IF EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = tbl AND i.indisprimary) THEN
        EXECUTE format('CREATE TRIGGER levqor_audit_update AFTER UPDATE ON %s
                        REFERENCING OLD TABLE AS levqor_old NEW TABLE AS levqor_new
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    ELSE
        EXECUTE format('CREATE TRIGGER levqor_audit_update AFTER UPDATE ON %s
                        FOR EACH ROW EXECUTE FUNCTION levqor._audit_row()', tbl);
    END IF;
    EXECUTE format('CREATE TRIGGER levqor_audit_truncate AFTER TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_row()', tbl);
    PERFORM levqor._log_event(levqor.current_tenant(), 'audit_enabled', jsonb_build_object('table', tbl::text));
    PERFORM levqor._notice_unsealed();
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.enable_tenancy(tbl regclass, tenant_column name DEFAULT 'tenant_id')
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    rel      record;
    col      record;
    qual     text;
    spec     record;
    existing record;
    have     boolean;
    child    regclass;
    dist     record;
BEGIN
    IF tbl IS NULL OR tenant_column IS NULL THEN
        RAISE EXCEPTION 'enable_tenancy: table and tenant column must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF levqor._scope_of(tbl) IS NOT NULL THEN
        RAISE EXCEPTION '% is protected with a scope column', tbl USING ERRCODE = '55000',
            HINT = 'Call levqor.enable_tenancy(table, tenant_column, scope_column) for it.';
    END IF;
    SELECT c.relkind, c.relowner, n.nspname INTO rel
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF rel.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '42809',
            HINT = 'Protect the tables a view reads; create views WITH (security_invoker = true).';
    END IF;
    IF rel.nspname IN ('levqor', 'pg_catalog', 'information_schema') OR rel.nspname LIKE 'pg\_%' THEN
        RAISE EXCEPTION 'cannot enable tenancy on % (system or levqor table)', tbl USING ERRCODE = '42501';
    END IF;
    IF NOT pg_has_role(current_user, rel.relowner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table % to enable tenancy', tbl USING ERRCODE = '42501';
    END IF;
    -- On Citus: a distributed table is distributed by its tenant column (so
    -- each tenant's rows live on one shard), and levqor's statement triggers
    -- go to its shards (which Citus allows only when asked to).
    dist := levqor._distribution(tbl);
    IF dist.method IS NOT NULL AND (dist.method <> 'hash' OR dist.column_name IS DISTINCT FROM tenant_column) THEN
        RAISE EXCEPTION '% is a Citus % table%: levqor protects distributed tables distributed by their tenant column',
            tbl, dist.method, coalesce(' distributed by ' || quote_ident(dist.column_name), '') USING ERRCODE = '0A000',
            HINT = format('undistribute_table(%L), then levqor.distribute(%L, %L).', tbl::text, tbl::text, tenant_column);
    END IF;
    IF levqor._citus_active() THEN
        PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    END IF;

    SELECT a.attnum, a.atttypid, a.attnotnull, a.atthasdef INTO col
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        BEGIN
            EXECUTE format('ALTER TABLE %s ADD COLUMN %I uuid NOT NULL DEFAULT levqor.current_tenant()',
                           tbl, tenant_column);
        EXCEPTION WHEN not_null_violation THEN
            RAISE EXCEPTION '% already has rows, which belong to no tenant', tbl
                USING ERRCODE = '23502',
                      HINT = format('Add the column yourself and fill it (ALTER TABLE %s ADD COLUMN %I uuid; UPDATE …), then call enable_tenancy again.',
                                    tbl, tenant_column);
        END;
        SELECT a.attnum, a.atttypid, a.attnotnull, a.atthasdef INTO col
          FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = tenant_column AND NOT a.attisdropped;
    ELSE
        IF col.atttypid <> 'uuid'::regtype THEN
            RAISE EXCEPTION 'column %.% has type %, not uuid', tbl, quote_ident(tenant_column),
                format_type(col.atttypid, NULL) USING ERRCODE = '42804';
        END IF;
        IF NOT col.atthasdef AND dist.method = 'hash' THEN
            -- Citus refuses DDL on a distribution column. The coordinator
            -- fills defaults in before it routes a row, so the default is
            -- needed here only: set without propagation to the shards.
            PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT levqor.current_tenant()', tbl, tenant_column);
            PERFORM set_config('citus.enable_ddl_propagation', 'on', true);
        ELSIF NOT col.atthasdef THEN
            EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT levqor.current_tenant()', tbl, tenant_column);
        END IF;
        IF NOT col.attnotnull THEN
            BEGIN
                EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET NOT NULL', tbl, tenant_column);
            EXCEPTION WHEN not_null_violation THEN
                RAISE EXCEPTION 'column %.% has NULLs: rows that belong to no tenant', tbl, quote_ident(tenant_column)
                    USING ERRCODE = '23502', HINT = 'Assign those rows to a tenant first.';
            END;
        END IF;
    END IF;

    -- An index led by the tenant column, so the policy is an index condition.
    IF NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = tbl AND i.indkey[0] = col.attnum) THEN
        EXECUTE format('CREATE INDEX ON %s (%I)', tbl, tenant_column);
    END IF;

    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', tbl);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', tbl);

    qual := levqor._tenant_qual(tenant_column);
    FOR spec IN
        SELECT * FROM (VALUES ('levqor_tenant_select', 'SELECT', 'r', true,  false),
                              ('levqor_tenant_insert', 'INSERT', 'a', false, true),
                              ('levqor_tenant_update', 'UPDATE', 'w', true,  true),
                              ('levqor_tenant_delete', 'DELETE', 'd', true,  false))
               AS s(polname, cmd, polcmd, has_using, has_check)
    LOOP
        SELECT pol.polcmd, pol.polpermissive INTO existing
          FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = spec.polname;
        have := FOUND;
        IF have AND (existing.polcmd <> spec.polcmd OR existing.polpermissive) THEN
            EXECUTE format('DROP POLICY %I ON %s', spec.polname, tbl);
            have := false;
        END IF;
        IF NOT have THEN
            EXECUTE format('CREATE POLICY %I ON %s AS RESTRICTIVE FOR %s TO PUBLIC %s %s',
                           spec.polname, tbl, spec.cmd,
                           CASE WHEN spec.has_using THEN 'USING ' || qual ELSE '' END,
                           CASE WHEN spec.has_check THEN 'WITH CHECK ' || qual ELSE '' END);
        ELSE
            EXECUTE format('ALTER POLICY %I ON %s TO PUBLIC %s %s',
                           spec.polname, tbl,
                           CASE WHEN spec.has_using THEN 'USING ' || qual ELSE '' END,
                           CASE WHEN spec.has_check THEN 'WITH CHECK ' || qual ELSE '' END);
        END IF;
    END LOOP;
    -- The permissive policy admits the context's tenant too, so that no
    -- subset of levqor's policies ever admits more (a scoped table's base
    -- keeps its write rule: _register_scope sets it).
    SELECT pol.polpermissive, pol.polcmd, pg_get_expr(pol.polqual, pol.polrelid) AS qual INTO existing
      FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = 'levqor_base';
    IF NOT FOUND THEN
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING %s WITH CHECK %s', tbl, qual, qual);
    ELSIF NOT existing.polpermissive OR existing.polcmd <> '*' THEN
        EXECUTE format('DROP POLICY levqor_base ON %s', tbl);
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING %s WITH CHECK %s', tbl, qual, qual);
    ELSIF existing.qual IS DISTINCT FROM qual AND levqor._scope_of(tbl) IS NULL THEN
        EXECUTE format('ALTER POLICY levqor_base ON %s TO PUBLIC USING %s WITH CHECK %s', tbl, qual, qual);
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_no_truncate') THEN
        EXECUTE format('CREATE TRIGGER levqor_no_truncate BEFORE TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._refuse_truncate()', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_write_guard') THEN
        EXECUTE format('CREATE TRIGGER levqor_write_guard BEFORE INSERT OR UPDATE OR DELETE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION levqor._write_guard()', tbl);
    END IF;

    -- A unique constraint without the tenant column answers, through its
    -- errors, whether another tenant already has a value. Warn; rewriting a
    -- constraint others may reference is the owner's decision.
    DECLARE
        u record;
    BEGIN
        FOR u IN SELECT i.indexrelid::regclass AS idx FROM pg_index i
                  WHERE i.indrelid = tbl AND i.indisunique AND NOT i.indisprimary
                    AND NOT (col.attnum = ANY (i.indkey::int2[])) LOOP
            RAISE WARNING 'levqor: unique index % on % does not include %: its errors tell one tenant what another has',
                u.idx, tbl, quote_ident(tenant_column)
                USING HINT = format('Make it UNIQUE (%I, …) unless the values must be unique across tenants.', tenant_column);
        END LOOP;
    END;

    -- Partitions can be queried directly, so each one is protected too.
    FOR child IN SELECT inh.inhrelid::regclass FROM pg_inherits inh WHERE inh.inhparent = tbl LOOP
        PERFORM levqor.enable_tenancy(child, tenant_column);
    END LOOP;

    -- Backups read a tenant's rows, and restores write them back, through the
    -- tenant's context (docs/backups.md): row level security still decides.
    EXECUTE format('GRANT SELECT, INSERT, DELETE ON %s TO levqor_backup', tbl);
    PERFORM levqor._register_protected(tbl, tenant_column);
    PERFORM levqor._warn_unscoped_foreign_keys(tbl);
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.isolation_report()
RETURNS TABLE (severity text, kind text, object text, detail text, fix text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- 1. Tables in tenant-facing schemas (those holding a protected table)
    --    without tenancy.
    RETURN QUERY
    SELECT 'high', 'unprotected_table', c.oid::regclass::text,
           'table in a schema with protected tables, but not protected itself',
           format('SELECT levqor.enable_tenancy(%L); or, if it holds no tenant data, SELECT levqor.exempt_from_report(%L, ''why'');',
                  c.oid::regclass::text, c.oid::regclass::text)
      FROM pg_class c
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
       AND c.relnamespace IN (SELECT k.relnamespace FROM pg_class k JOIN levqor._protected() p ON p.tbl = k.oid)
       AND c.oid NOT IN (SELECT p.tbl FROM levqor._protected() p)
       AND c.oid NOT IN (SELECT e.tbl FROM levqor.report_exemptions e);

    -- 2. Row level security enabled but not forced: the owner bypasses it.
    RETURN QUERY
    SELECT 'high', 'rls_not_forced', c.oid::regclass::text,
           'row level security is enabled but not forced, so the table owner sees every row',
           format('ALTER TABLE %s FORCE ROW LEVEL SECURITY;', c.oid::regclass::text)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity AND NOT c.relforcerowsecurity
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%';

    -- 2b. A protected table whose row level security is off (the DDL guard
    --     was bypassed): no policy applies; levqor refuses it to everyone
    --     row level security would filter, until it is switched back on.
    RETURN QUERY
    SELECT 'high', 'rls_disabled', c.oid::regclass::text,
           'row level security is disabled on a table carrying levqor''s policies: none of them applies, so levqor refuses every query on it',
           format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;', c.oid::regclass::text)
      FROM pg_class c
     WHERE c.relkind IN ('r', 'p') AND NOT c.relrowsecurity AND levqor._is_protected(c.oid);

    -- 3. Views over protected tables that run with their owner's rights.
    RETURN QUERY
    SELECT DISTINCT ON (v.oid)
           CASE WHEN o.rolsuper OR o.rolbypassrls THEN 'high' ELSE 'medium' END,
           'view_not_security_invoker', v.oid::regclass::text,
           format('view reads protected table %s with the rights of its owner %I%s', t.tbl::regclass::text, o.rolname,
                  CASE WHEN o.rolsuper OR o.rolbypassrls THEN ', who bypasses row level security: every tenant''s rows' ELSE '' END),
           format('ALTER VIEW %s SET (security_invoker = true);', v.oid::regclass::text)
      FROM pg_class v
      JOIN pg_roles o ON o.oid = v.relowner
      JOIN pg_rewrite rw ON rw.ev_class = v.oid
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid AND d.refclassid = 'pg_class'::regclass
      JOIN levqor._protected() t ON t.tbl = d.refobjid
     WHERE v.relkind = 'v'
       AND NOT coalesce('security_invoker=true' = ANY (v.reloptions) OR 'security_invoker=on' = ANY (v.reloptions), false);

    -- 4. SECURITY DEFINER functions that read protected tables.
    RETURN QUERY
    SELECT CASE WHEN o.rolsuper OR o.rolbypassrls THEN 'high' ELSE 'medium' END,
           'security_definer_reads_protected', f.oid::regprocedure::text,
           format('SECURITY DEFINER function owned by %I mentions protected table %s%s', o.rolname, t.tbl::regclass::text,
                  CASE WHEN o.rolsuper OR o.rolbypassrls THEN '; its owner bypasses row level security' ELSE '' END),
           'Make it SECURITY INVOKER, or have it owned by a role without BYPASSRLS that is subject to the policies.'
      FROM pg_proc f
      JOIN pg_roles o ON o.oid = f.proowner
      JOIN pg_namespace n ON n.oid = f.pronamespace
      JOIN levqor._protected() t ON f.prosrc ~* ('\m' || regexp_replace((SELECT relname FROM pg_class WHERE oid = t.tbl), '([.^$*+?()\[\]{}|\\])', '\\\1', 'g') || '\M')
     WHERE f.prosecdef AND n.nspname NOT IN ('levqor', 'pg_catalog', 'information_schema');

    -- 5. Tenant columns no index leads with.
    RETURN QUERY
    SELECT 'medium', 'tenant_column_unindexed', t.tbl::regclass::text,
           format('no index starts with tenant column %I: every tenant''s query scans the table', t.tenant_column),
           format('CREATE INDEX ON %s (%I);', t.tbl::regclass::text, t.tenant_column)
      FROM levqor._protected() t
      JOIN pg_attribute a ON a.attrelid = t.tbl AND a.attname = t.tenant_column
     WHERE NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = t.tbl AND i.indkey[0] = a.attnum);

    -- 6. Unique constraints without the tenant column: a unique-violation
    -- error tells one tenant that another tenant has that value.
    RETURN QUERY
    SELECT 'medium', 'unique_without_tenant', i.indexrelid::regclass::text,
           format('unique index on %s does not include tenant column %I: its errors reveal other tenants'' values',
                  t.tbl::regclass::text, t.tenant_column),
           format('Include the tenant column, e.g. UNIQUE (%I, …), unless the values are meant to be unique across tenants (like surrogate keys).', t.tenant_column)
      FROM levqor._protected() t
      JOIN pg_attribute a ON a.attrelid = t.tbl AND a.attname = t.tenant_column
      JOIN pg_index i ON i.indrelid = t.tbl AND i.indisunique AND NOT i.indisprimary
     WHERE NOT (a.attnum = ANY (i.indkey::int2[]));

    -- 8. Partitions of protected tables without protection of their own: a
    --    partition can be queried directly (levqor protects new ones; one
    --    made with the guards bypassed is not).
    RETURN QUERY
    SELECT 'high', 'unprotected_partition', c.oid::regclass::text,
           format('partition of protected table %s without policies of its own: read directly, it shows every tenant''s rows (levqor refuses it until it is protected)',
                  (SELECT a.relid::regclass::text FROM pg_partition_ancestors(c.oid) a WHERE a.relid <> c.oid AND levqor._is_protected(a.relid) LIMIT 1)),
           format('SELECT levqor.enable_tenancy(%L);', c.oid::regclass::text)
      FROM pg_class c
     WHERE c.relispartition AND c.relkind IN ('r', 'p') AND NOT levqor._is_protected(c.oid)
       AND EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a WHERE a.relid <> c.oid AND levqor._is_protected(a.relid));

    -- 9. Tables inheriting (not as partitions) from a protected table.
    RETURN QUERY
    SELECT 'high', 'inherits_protected', c.oid::regclass::text,
           format('inherits from protected table %s but has no policies of its own: its rows are read directly without any filter', i.inhparent::regclass::text),
           format('SELECT levqor.enable_tenancy(%L);', c.oid::regclass::text)
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE NOT c.relispartition AND levqor._is_protected(i.inhparent) AND NOT levqor._is_protected(c.oid);

    -- 10. Foreign keys between protected tables without the tenant column.
    RETURN QUERY
    SELECT 'high', 'foreign_key_without_tenant', format('%s (%I)', k.child::text, k.conname),
           format('references protected table %s without the tenant column: a tenant can point its rows at another tenant''s, and the key''s errors tell it which ids exist elsewhere', k.parent::text),
           levqor._scoped_key_sql(k.con)
      FROM levqor._unscoped_foreign_keys() k;

    -- 11. Materialized views over protected tables (they cannot be
    --     security_invoker: they hold what their owner saw when refreshed).
    RETURN QUERY
    SELECT DISTINCT ON (v.oid)
           CASE WHEN (o.rolsuper OR o.rolbypassrls)
                     AND (has_table_privilege('levqor_app', v.oid, 'SELECT') OR has_table_privilege('public', v.oid, 'SELECT'))
                THEN 'high' ELSE 'medium' END,
           'materialized_view_over_protected', v.oid::regclass::text,
           format('materialized view over protected table %s, refreshed with the rights of %I%s', t.tbl::regclass::text, o.rolname,
                  CASE WHEN o.rolsuper OR o.rolbypassrls THEN ', who bypasses row level security: it holds every tenant''s rows' ELSE '' END),
           format('Drop it, or protect what reads it: a view WITH (security_invoker = true) instead, or REVOKE SELECT ON %s FROM levqor_app, PUBLIC;', v.oid::regclass::text)
      FROM pg_class v
      JOIN pg_roles o ON o.oid = v.relowner
      JOIN pg_rewrite rw ON rw.ev_class = v.oid
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid AND d.refclassid = 'pg_class'::regclass
      JOIN levqor._protected() t ON t.tbl = d.refobjid
     WHERE v.relkind = 'm';

    -- 12. Tables copied from protected tables with CREATE TABLE AS / SELECT INTO.
    RETURN QUERY
    SELECT CASE WHEN d.bypassed THEN 'high' ELSE 'medium' END, 'copy_of_protected', d.tbl::text,
           format('made by %I from protected %s with CREATE TABLE AS: %s, outside any policy', d.created_by,
                  array_to_string(d.sources::text[], ', '),
                  CASE WHEN d.bypassed THEN 'every tenant''s rows' ELSE 'one tenant''s rows' END),
           format('DROP TABLE %s; or protect it: SELECT levqor.enable_tenancy(%L);', d.tbl::text, d.tbl::text)
      FROM levqor.derived_tables d
     WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = d.tbl) AND NOT levqor._is_protected(d.tbl);

    -- 13. SECURITY DEFINER functions in tenant-facing schemas without a
    --     pinned search_path: a caller's objects can stand in for the ones
    --     they mean, with the owner's rights.
    RETURN QUERY
    SELECT CASE WHEN o.rolsuper OR o.rolbypassrls THEN 'high' ELSE 'medium' END,
           'security_definer_search_path', f.oid::regprocedure::text,
           format('SECURITY DEFINER function owned by %I without SET search_path', o.rolname),
           format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp;', f.oid::regprocedure::text)
      FROM pg_proc f
      JOIN pg_roles o ON o.oid = f.proowner
     WHERE f.prosecdef
       AND f.pronamespace IN (SELECT k.relnamespace FROM pg_class k JOIN levqor._protected() p ON p.tbl = k.oid)
       AND NOT EXISTS (SELECT 1 FROM unnest(f.proconfig) x WHERE x LIKE 'search\_path=%');

    -- 14. Protected tables, and their sequences, granted to PUBLIC.
    RETURN QUERY
    SELECT 'medium', 'granted_to_public', t.tbl::regclass::text,
           'protected table granted to PUBLIC: every role, not just the application''s, may query it (rows are still filtered)',
           format('REVOKE ALL ON %s FROM PUBLIC;', t.tbl::regclass::text)
      FROM levqor._protected() t JOIN pg_class c ON c.oid = t.tbl
     WHERE EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0);
    RETURN QUERY
    SELECT 'low', 'granted_to_public', s.oid::regclass::text,
           format('sequence of protected table %s granted to PUBLIC: any role can learn how many rows all tenants together created', t.tbl::regclass::text),
           format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC;', s.oid::regclass::text)
      FROM levqor._protected() t
      JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.tbl AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
      JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
     WHERE EXISTS (SELECT 1 FROM aclexplode(s.relacl) a WHERE a.grantee = 0);

    -- 15. A protected table owned by a role the application logs in as.
    RETURN QUERY
    SELECT 'medium', 'owned_by_application', t.tbl::regclass::text,
           format('owned by %I, a login role with levqor_app: the application can change the table''s schema, indexes and triggers (levqor''s guards keep its protection)', o.rolname),
           format('ALTER TABLE %s OWNER TO <a migration role>;', t.tbl::regclass::text)
      FROM levqor._protected() t JOIN pg_class c ON c.oid = t.tbl JOIN pg_roles o ON o.oid = c.relowner
     WHERE o.rolcanlogin AND NOT o.rolsuper AND pg_has_role(o.oid, 'levqor_app', 'MEMBER');

    -- 16. Application roles that own levqor's own objects.
    RETURN QUERY
    SELECT DISTINCT 'high', 'application_owns_levqor', o.rolname::text,
           'a member of levqor_app owns objects of the levqor schema: it could change levqor''s catalog or functions',
           format('Give them back to the superuser that installed levqor: REASSIGN OWNED BY %I TO postgres; (then re-grant what %I needs)', o.rolname, o.rolname)
      FROM (SELECT c.relowner AS owner FROM pg_class c WHERE c.relnamespace = 'levqor'::regnamespace
            UNION SELECT f.proowner FROM pg_proc f WHERE f.pronamespace = 'levqor'::regnamespace) x
      JOIN pg_roles o ON o.oid = x.owner
     WHERE pg_has_role(o.oid, 'levqor_app', 'MEMBER') AND NOT o.rolsuper;

    -- 17. Permissive policies others added to protected tables: levqor's
    --     restrictive ones still bound what they admit, but they say something
    --     other than what the table does.
    RETURN QUERY
    SELECT 'low', 'extra_permissive_policy', format('%s (%I)', pol.polrelid::regclass::text, pol.polname),
           'a permissive policy beside levqor''s: it cannot widen what a tenant sees (levqor''s restrictive policies bound it), but it reads as if it did',
           format('Write it AS RESTRICTIVE if it is meant to narrow, or DROP POLICY %I ON %s;', pol.polname, pol.polrelid::regclass::text)
      FROM pg_policy pol JOIN levqor._protected() t ON t.tbl = pol.polrelid
     WHERE pol.polpermissive AND pol.polname NOT IN ('levqor_base', 'levqor_base_shared');

    -- 18. Audit entries nobody seals: without a worker for this database
    --     (levqor.audit_database) or a scheduled seal_audit(), verify_audit
    --     has nothing to verify and reports ok.
    RETURN QUERY
    SELECT 'high', 'audit_not_sealed', current_database()::text,
           'audit entries older than ten minutes are not sealed into their chains: verify_audit cannot vouch for them',
           format('Add %L to levqor.audit_database (shared_preload_libraries = ''levqor'', then restart), or run SELECT levqor.seal_audit(); on a schedule.', current_database())
     WHERE EXISTS (SELECT 1 FROM levqor.audit_log a
                    WHERE a.id > (SELECT st.through FROM levqor.audit_seal_state st) AND a.at < now() - interval '10 minutes'
                      AND NOT EXISTS (SELECT 1 FROM levqor.audit_chain ch
                                       WHERE ch.chain = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                                         AND ch.last_id >= a.id AND ch.ids[width_bucket(a.id, ch.ids)] = a.id)
                    ORDER BY a.id LIMIT 1);

    -- 7. Roles that bypass row level security and that an application uses.
    RETURN QUERY
    SELECT 'high', 'bypassrls_role', r.rolname::text,
           format('%s can log in, bypasses row level security%s',
                  CASE WHEN r.rolsuper THEN 'superuser' ELSE 'BYPASSRLS role' END,
                  CASE WHEN pg_has_role(r.oid, 'levqor_app', 'MEMBER') THEN ' and is a member of levqor_app (an application role)' ELSE '' END),
           format('ALTER ROLE %I NOBYPASSRLS%s;', r.rolname, CASE WHEN r.rolsuper THEN ' NOSUPERUSER' ELSE '' END)
      FROM pg_roles r
     WHERE r.rolcanlogin AND (r.rolsuper OR r.rolbypassrls) AND r.oid <> 10
       AND (pg_has_role(r.oid, 'levqor_app', 'MEMBER') OR pg_has_role(r.oid, 'levqor_context_admin', 'MEMBER')
            OR (r.rolbypassrls AND NOT r.rolsuper));
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.limit_rows(tbl regclass, metric text, tenant_column name DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    owner oid;
    col   name;
BEGIN
    IF NOT levqor.preloaded() THEN
        RAISE EXCEPTION 'levqor.limit_rows() needs levqor in shared_preload_libraries' USING ERRCODE = '55000',
            HINT = 'Row counters live in shared memory: ALTER SYSTEM SET shared_preload_libraries = ''levqor''; then restart PostgreSQL.';
    END IF;
    SELECT cl.relowner INTO owner FROM pg_class cl WHERE cl.oid = tbl AND cl.relkind IN ('r', 'p');
    IF NOT FOUND THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '42809';
    END IF;
    IF NOT pg_has_role(current_user, owner, 'USAGE') THEN
        RAISE EXCEPTION 'must be owner of table % to limit its rows', tbl USING ERRCODE = '42501';
    END IF;
    PERFORM levqor._refuse_on_citus(tbl, 'a row limit');
    col := levqor._row_limit_column(tbl, metric, tenant_column);
    IF col IS NULL THEN
        RETURN;  -- already in place
    END IF;
    -- No write slips between the count (in _register_row_limit) and the triggers.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
    EXECUTE format('CREATE TRIGGER levqor_limit_rows_before BEFORE INSERT OR DELETE OR UPDATE OF %I ON %s
                    FOR EACH ROW EXECUTE FUNCTION levqor._limit_rows()', col, tbl);
    EXECUTE format('CREATE TRIGGER levqor_limit_rows AFTER INSERT OR DELETE OR UPDATE OF %I ON %s
                    FOR EACH ROW EXECUTE FUNCTION levqor._limit_rows()', col, tbl);
    EXECUTE format('CREATE TRIGGER levqor_limit_rows_truncate BEFORE TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION levqor._limit_rows()', tbl);
    PERFORM levqor._register_row_limit(tbl, metric, col);
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.remove_member(tenant text, user_id uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    was text;
    k   record;
BEGIN
    was := levqor._leaving_role(t, user_id);
    DELETE FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_removed', jsonb_build_object('user_id', user_id, 'role', was));
    FOR k IN UPDATE levqor.tenant_keys x SET revoked_at = now()
              WHERE x.tenant_id = t.id AND x.user_id = user_id AND x.revoked_at IS NULL
             RETURNING x.key_id LOOP
        PERFORM levqor._log_event(t.id, 'key_revoked',
            jsonb_build_object('key_id', k.key_id, 'user_id', user_id, 'reason', 'member_removed'));
    END LOOP;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.seal_audit(max_entries int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    st       record;
    now_id   bigint;
    now_xid  bigint;
    settled  boolean;
    upto     bigint;
    n        int;
    last_id  bigint;
BEGIN
    -- One sealer at a time; a second one has nothing to do.
    IF max_entries < 1 OR NOT pg_try_advisory_xact_lock(hashtext('levqor.seal_audit')) THEN
        RETURN 0;
    END IF;
    SELECT s.through, s.horizon_id, s.horizon_xid INTO st FROM levqor.audit_seal_state s;
    settled := st.horizon_xid IS NOT NULL
               AND st.horizon_xid <= pg_snapshot_xmin(pg_current_snapshot())::text::bigint;
    -- A later statement, a later snapshot: it sees every entry of the
    -- transactions found ended above. The batch (read, hashed, appended to
    -- levqor.audit_chain, heads moved) is src/seal.rs.
    SELECT b.sealed, b.last_id INTO n, last_id FROM levqor._seal_batch(st.through, max_entries) b;
    -- Wakes the sidecar's audit streams (no payload: any session may LISTEN).
    IF n > 0 THEN
        PERFORM pg_notify('levqor_sealed', '');
    END IF;
    -- The next horizon, read after the batch so that the next pass can move
    -- the watermark past what this one sealed. In this order: an id taken up
    -- to now_id was taken by a transaction whose id is below now_xid.
    now_id := coalesce(pg_sequence_last_value('levqor.audit_log_id_seq'), 0);
    now_xid := levqor._next_xid();
    -- Move the watermark: up to the horizon once it is settled, but not past
    -- what this pass sealed if it stopped at max_entries.
    upto := st.through;
    IF settled THEN
        upto := greatest(upto, CASE WHEN n < max_entries THEN st.horizon_id
                                          ELSE least(st.horizon_id, last_id) END);
    END IF;
    IF st.horizon_xid IS NULL OR (settled AND upto >= st.horizon_id) THEN
        UPDATE levqor.audit_seal_state SET through = upto, horizon_id = now_id, horizon_xid = now_xid;
    ELSIF upto <> st.through THEN
        UPDATE levqor.audit_seal_state SET through = upto;
    END IF;
    RETURN n;
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

-- 6. New catalog tables reach every backend's cache; privileges as in a fresh install.
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
