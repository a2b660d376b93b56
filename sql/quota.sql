-- Plan quotas and usage metering (docs/quotas.md).
--
-- Counting happens in shared memory (src/counters.rs, src/quota.rs); these
-- tables hold what a counter is measured against (metrics, plan limits,
-- overrides, row limits) and what the worker copies out of memory (usage per
-- window, the billing ledger, threshold alerts).

-- How the counters read a metric's window: 0 never resets, -1 a calendar
-- month (UTC), otherwise its length in microseconds. NULL: not a window
-- levqor supports (months mixed with days or time, or under a second).
CREATE FUNCTION levqor._window_micros(w interval) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE
        WHEN w IS NULL THEN 0
        WHEN date_part('year', w) = 0 AND date_part('month', w) = 1 AND date_part('day', w) = 0
             AND date_part('epoch', w - interval '1 month') = 0 THEN -1
        WHEN date_part('year', w) = 0 AND date_part('month', w) = 0 AND w >= interval '1 second'
             THEN (date_part('epoch', w) * 1000000)::bigint
    END
$fn$;

-- A counter's microseconds since 2000-01-01 UTC as a timestamptz
-- (i64::MIN, a window that never resets, is -infinity).
CREATE FUNCTION levqor._ts(micros bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE WHEN micros = -9223372036854775808 THEN '-infinity'::timestamptz
                ELSE timestamptz '2000-01-01 00:00:00+00' + micros * interval '1 microsecond' END
$fn$;

-- Start of the window of `reset_every` that holds `at` (as src/quota.rs computes it).
CREATE FUNCTION levqor._window_start(reset_every interval, at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE levqor._window_micros(reset_every)
        WHEN 0 THEN '-infinity'::timestamptz
        WHEN -1 THEN date_trunc('month', at, 'UTC')
        ELSE date_bin(reset_every, at, timestamptz '2000-01-01 00:00:00+00')
    END
$fn$;

CREATE SEQUENCE levqor.metrics_id_seq AS integer;
CREATE TABLE levqor.metrics (
    name          text PRIMARY KEY CONSTRAINT metrics_name_format CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    id            integer NOT NULL DEFAULT nextval('levqor.metrics_id_seq') CONSTRAINT metrics_id_key UNIQUE,
    kind          text NOT NULL CONSTRAINT metrics_kind_check CHECK (kind IN ('counter', 'rows', 'storage')),
    reset_every   interval CONSTRAINT metrics_reset_every_check
                  CHECK (reset_every IS NULL OR (kind = 'counter' AND levqor._window_micros(reset_every) IS NOT NULL)),
    -- Used when a plan does not name the metric (NULL: unlimited).
    default_limit bigint CONSTRAINT metrics_default_limit_check CHECK (default_limit >= 0),
    description   text NOT NULL DEFAULT '',
    builtin       boolean NOT NULL DEFAULT false
);
ALTER SEQUENCE levqor.metrics_id_seq OWNED BY levqor.metrics.id;

INSERT INTO levqor.metrics (name, kind, reset_every, description, builtin) VALUES
  ('users', 'rows', NULL, 'Users of the tenant: rows of the table levqor.limit_rows() names for it', true),
  ('projects', 'rows', NULL, 'Projects of the tenant: rows of the table levqor.limit_rows() names for it', true),
  ('storage_bytes', 'storage', NULL, 'Bytes of the tenant''s data, measured by levqor.refresh_storage()', true),
  ('api_calls_per_15min', 'counter', '15 minutes', 'API calls, counted by levqor.consume()', true);

-- Limits are numbers of the metric's unit or null (unlimited).
CREATE FUNCTION levqor._limits_valid(limits jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT coalesce(bool_and(jsonb_typeof(v) = 'null'
                             OR (jsonb_typeof(v) = 'number' AND v::text ~ '^[0-9]{1,18}$')), true)
      FROM jsonb_each(limits) AS e(k, v)
$fn$;
ALTER TABLE levqor.plans ADD CONSTRAINT plans_limits_numbers CHECK (levqor._limits_valid(limits));

CREATE TABLE levqor.quota_overrides (
    tenant_id uuid NOT NULL,   -- levqor.tenants (id), deleted with it (sql/catalog.sql, "References")
    metric    text NOT NULL,   -- levqor.metrics (name), renamed and deleted with it
    quota     bigint CONSTRAINT quota_overrides_quota_check CHECK (quota >= 0),  -- NULL: unlimited
    reason    text,
    set_at    timestamptz NOT NULL DEFAULT now(),
    set_by    name NOT NULL DEFAULT session_user,
    PRIMARY KEY (tenant_id, metric)
);

-- Tables whose rows count against a rows metric (one table per metric).
CREATE SEQUENCE levqor.row_limits_id_seq AS integer;
CREATE TABLE levqor.row_limits (
    tbl           regclass PRIMARY KEY,
    -- Keys the counters: a new registration starts counting afresh.
    id            integer NOT NULL DEFAULT nextval('levqor.row_limits_id_seq') CONSTRAINT row_limits_id_key UNIQUE,
    metric        text NOT NULL CONSTRAINT row_limits_metric_key UNIQUE,   -- levqor.metrics (name), renamed with it
    tenant_column name NOT NULL,
    enabled_at    timestamptz NOT NULL DEFAULT now(),
    enabled_by    name NOT NULL DEFAULT session_user
);
ALTER SEQUENCE levqor.row_limits_id_seq OWNED BY levqor.row_limits.id;

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
CREATE TRIGGER levqor_references AFTER UPDATE OF name OR DELETE ON levqor.metrics
    FOR EACH ROW EXECUTE FUNCTION levqor._metric_changed();
CREATE TRIGGER levqor_reference_tenant AFTER INSERT OR UPDATE OF tenant_id ON levqor.quota_overrides
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('tenant_id', 'levqor.tenants', 'id', 'uuid');
CREATE TRIGGER levqor_reference_metric AFTER INSERT OR UPDATE OF metric ON levqor.quota_overrides
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('metric', 'levqor.metrics', 'name', 'text');
CREATE TRIGGER levqor_reference_metric AFTER INSERT OR UPDATE OF metric ON levqor.row_limits
    FOR EACH ROW EXECUTE FUNCTION levqor._check_reference('metric', 'levqor.metrics', 'name', 'text');

-- What the counters held at the last flush, per window ('-infinity' for
-- metrics that never reset). Only the current window is kept; history is
-- the ledger.
CREATE TABLE levqor.usage_counters (
    tenant_id    uuid NOT NULL,
    metric       text NOT NULL,
    window_start timestamptz NOT NULL,
    used         bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric, window_start)
);

-- Billable consumption, append-only: each entry is what a tenant consumed of
-- a metric in (period_start, period_end], committed and counted once.
CREATE TABLE levqor.usage_ledger (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid NOT NULL,
    metric       text NOT NULL,
    quantity     bigint NOT NULL CONSTRAINT usage_ledger_quantity_check CHECK (quantity > 0),
    period_start timestamptz NOT NULL,
    period_end   timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_ledger_tenant_metric_idx ON levqor.usage_ledger (tenant_id, metric, id);

-- How far each consumer (the sidecar's Stripe meter, say) has taken the ledger.
CREATE TABLE levqor.ledger_cursors (
    consumer   text PRIMARY KEY CONSTRAINT ledger_cursors_consumer_format CHECK (consumer ~ '^[a-z0-9_.-]{1,63}$'),
    position   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- 80 % and 100 % crossings, once per tenant, metric, window and threshold.
-- The NOTIFY on levqor_quota carries only an alert's id: any session of any
-- role may LISTEN, and only levqor_admin reads this table.
CREATE TABLE levqor.quota_alerts (
    id           bigint GENERATED ALWAYS AS IDENTITY CONSTRAINT quota_alerts_id_key UNIQUE,
    tenant_id    uuid NOT NULL,
    metric       text NOT NULL,
    window_start timestamptz NOT NULL,
    threshold    integer NOT NULL CONSTRAINT quota_alerts_threshold_check CHECK (threshold IN (80, 100)),
    used         bigint NOT NULL,
    quota        bigint NOT NULL,
    raised_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric, window_start, threshold)
);

SELECT pg_catalog.pg_extension_config_dump('levqor.metrics', 'WHERE NOT builtin');
SELECT pg_catalog.pg_extension_config_dump('levqor.metrics_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.quota_overrides', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.row_limits', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.row_limits_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.usage_counters', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.usage_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.ledger_cursors', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.quota_alerts', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.quota_alerts_id_seq', '');

CREATE FUNCTION levqor._ledger_immutable() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'the levqor usage ledger is append-only: % refused', TG_OP
        USING ERRCODE = '42501', HINT = 'Consumers keep their place with levqor.ledger_advance().';
END
$fn$;
CREATE TRIGGER levqor_ledger_immutable BEFORE UPDATE OR DELETE ON levqor.usage_ledger
    FOR EACH ROW EXECUTE FUNCTION levqor._ledger_immutable();
CREATE TRIGGER levqor_ledger_no_truncate BEFORE TRUNCATE ON levqor.usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._ledger_immutable();

-- A tenant's limit for a metric: its override, else its plan's, else the
-- metric's default. NULL: unlimited (also for an unknown tenant or metric;
-- callers check those first).
CREATE FUNCTION levqor._limit(tenant uuid, metric text) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT CASE
               WHEN o.tenant_id IS NOT NULL THEN o.quota
               WHEN p.limits ? m.name THEN (p.limits ->> m.name)::bigint
               ELSE m.default_limit
           END
      FROM levqor.tenants t
      JOIN levqor.plans p ON p.name = t.plan
      JOIN levqor.metrics m ON m.name = $2
      LEFT JOIN levqor.quota_overrides o ON o.tenant_id = t.id AND o.metric = m.name
     WHERE t.id = $1
$fn$;

CREATE FUNCTION levqor.define_metric(name text, kind text DEFAULT 'counter', reset_every interval DEFAULT NULL,
                                     default_limit bigint DEFAULT NULL, description text DEFAULT '')
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF reset_every IS NOT NULL AND levqor._window_micros(reset_every) IS NULL THEN
        RAISE EXCEPTION 'a metric resets every fixed length of at least a second, or every month; not every %', reset_every
            USING ERRCODE = '22023', HINT = 'For example interval ''15 minutes'', ''1 day'' or ''1 month''.';
    END IF;
    INSERT INTO levqor.metrics (name, kind, reset_every, default_limit, description)
    VALUES (define_metric.name, define_metric.kind, define_metric.reset_every, define_metric.default_limit,
            coalesce(define_metric.description, ''));
    PERFORM levqor._log_event(NULL, 'metric_defined', jsonb_build_object('metric', name, 'kind', kind,
        'reset_every', reset_every::text, 'default_limit', default_limit));
END
$fn$;

-- A per-tenant limit that replaces the plan's (NULL: unlimited).
CREATE FUNCTION levqor.set_quota(tenant text, metric text, quota bigint, reason text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    tid uuid := levqor._tenant_id(tenant);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor.metrics m WHERE m.name = metric) THEN
        RAISE EXCEPTION 'unknown metric %', coalesce(quote_literal(metric), 'NULL')
            USING ERRCODE = '42704', HINT = 'Metrics are listed in levqor.metrics.';
    END IF;
    IF quota < 0 THEN
        RAISE EXCEPTION 'a quota is zero or more (NULL for unlimited), not %', quota USING ERRCODE = '22023';
    END IF;
    INSERT INTO levqor.quota_overrides AS o (tenant_id, metric, quota, reason) VALUES (tid, metric, quota, reason)
    ON CONFLICT ON CONSTRAINT quota_overrides_pkey DO UPDATE
       SET quota = EXCLUDED.quota, reason = EXCLUDED.reason, set_at = now(), set_by = session_user;
    PERFORM levqor._log_event(tid, 'quota_override_set', jsonb_build_object('metric', metric, 'quota', quota, 'reason', reason));
END
$fn$;

CREATE FUNCTION levqor.clear_quota(tenant text, metric text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    tid uuid := levqor._tenant_id(tenant);
BEGIN
    DELETE FROM levqor.quota_overrides o WHERE o.tenant_id = tid AND o.metric = metric;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM levqor._log_event(tid, 'quota_override_cleared', jsonb_build_object('metric', metric));
    RETURN true;
END
$fn$;

-- Count the rows of `tbl` per tenant against a rows metric. The table's
-- owner calls it (an invoker function: PostgreSQL itself checks that the
-- caller may create triggers on the table); the tenant column defaults to
-- the one enable_tenancy set.
CREATE FUNCTION levqor.limit_rows(tbl regclass, metric text, tenant_column name DEFAULT NULL) RETURNS void
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

-- limit_rows' checks: the tenant column to count by, or NULL when the table
-- already counts against this metric. Changes nothing.
CREATE FUNCTION levqor._row_limit_column(tbl regclass, metric text, tenant_column name) RETURNS name
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    m     levqor.metrics;
    col   name;
    other regclass;
BEGIN
    SELECT * INTO m FROM levqor.metrics x WHERE x.name = metric;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown metric %', coalesce(quote_literal(metric), 'NULL')
            USING ERRCODE = '42704', HINT = 'A levqor_admin adds one with levqor.define_metric(name, ''rows'').';
    END IF;
    IF m.kind <> 'rows' THEN
        RAISE EXCEPTION 'metric % is a % metric; limit_rows needs a rows metric', metric, m.kind USING ERRCODE = '22023';
    END IF;
    col := coalesce(tenant_column, (SELECT p.tenant_column FROM levqor._protected() p WHERE p.tbl = tbl LIMIT 1));
    IF col IS NULL THEN
        RAISE EXCEPTION '% is not protected by levqor, so its tenant column is unknown', tbl USING ERRCODE = '22023',
            HINT = 'Call levqor.enable_tenancy() first, or pass tenant_column.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = col
                                                   AND a.atttypid = 'uuid'::regtype AND NOT a.attisdropped) THEN
        RAISE EXCEPTION '% has no uuid column %', tbl, quote_ident(col) USING ERRCODE = '42703';
    END IF;
    SELECT r.tbl INTO other FROM levqor.row_limits r WHERE r.metric = metric;
    IF other = tbl THEN
        RAISE NOTICE 'levqor: rows of % already count against %', tbl, metric;
        RETURN NULL;
    ELSIF other IS NOT NULL THEN
        RAISE EXCEPTION 'metric % already counts the rows of %', metric, other USING ERRCODE = '42710',
            HINT = 'Define another rows metric with levqor.define_metric().';
    ELSIF EXISTS (SELECT 1 FROM levqor.row_limits r WHERE r.tbl = tbl) THEN
        RAISE EXCEPTION 'the rows of % already count against another metric', tbl USING ERRCODE = '42710';
    END IF;
    RETURN col;
END
$fn$;

-- limit_rows' registration, once the counting triggers are on the table:
-- only a role that may create triggers on it gets this far, so this needs no
-- other proof of ownership.
CREATE FUNCTION levqor._register_row_limit(tbl regclass, metric text, col name) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    c     record;
    quota bigint;
BEGIN
    IF levqor._row_limit_column(tbl, metric, col) IS NULL THEN
        RETURN;
    END IF;
    IF (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgfoid = 'levqor._limit_rows()'::regprocedure
                                           AND t.tgname IN ('levqor_limit_rows_before', 'levqor_limit_rows',
                                                            'levqor_limit_rows_truncate')) <> 3 THEN
        RAISE EXCEPTION '% does not have levqor''s row limit triggers', tbl USING ERRCODE = '42501',
            HINT = 'Call levqor.limit_rows().';
    END IF;
    INSERT INTO levqor.row_limits (tbl, metric, tenant_column) VALUES (tbl, metric, col);
    -- Today's counts, for levqor.usage; tenants already over keep their rows
    -- but may add none until they are below.
    FOR c IN EXECUTE format('SELECT x.%1$I AS tenant_id, count(*) AS n FROM %2$s x
                              WHERE x.%1$I IN (SELECT t.id FROM levqor.tenants t) GROUP BY 1', col, tbl) LOOP
        INSERT INTO levqor.usage_counters AS u (tenant_id, metric, window_start, used)
        VALUES (c.tenant_id, metric, '-infinity', c.n)
        ON CONFLICT ON CONSTRAINT usage_counters_pkey DO UPDATE SET used = EXCLUDED.used, updated_at = now();
        quota := levqor._limit(c.tenant_id, metric);
        IF quota < c.n THEN
            RAISE WARNING 'levqor: tenant % already has % % (rows of %), over its limit of %',
                (SELECT t.slug FROM levqor.tenants t WHERE t.id = c.tenant_id), c.n, metric, tbl, quota
                USING HINT = 'Its existing rows stay; new ones are refused until it is below the limit.';
        END IF;
    END LOOP;
    PERFORM levqor._log_event(NULL, 'rows_limited', jsonb_build_object('table', tbl::text, 'metric', metric));
END
$fn$;

CREATE FUNCTION levqor.unlimit_rows(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    r levqor.row_limits;
BEGIN
    DELETE FROM levqor.row_limits x WHERE x.tbl = tbl RETURNING * INTO r;
    IF NOT FOUND THEN
        RAISE NOTICE 'levqor: the rows of % are not limited', tbl;
        RETURN;
    END IF;
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_limit_rows_before ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_limit_rows ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_limit_rows_truncate ON %s', tbl);
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
    DELETE FROM levqor.usage_counters u WHERE u.metric = r.metric;
    PERFORM levqor._log_event(NULL, 'rows_unlimited', jsonb_build_object('table', tbl::text, 'metric', r.metric));
END
$fn$;

-- The 80 % and 100 % events: each crossing once per window (for metrics that
-- never reset, again only after usage fell back below the threshold). Each is
-- a NOTIFY on levqor_quota (payload: the levqor.quota_alerts id) and an entry
-- in the tenant's audit log. Percentages are
-- computed in numeric: a counter near 2^63 must not stop the flush.
CREATE FUNCTION levqor._check_thresholds(tenants uuid[], metrics text[], windows timestamptz[], used bigint[])
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

-- Called by levqor.flush_usage() with a snapshot of the changed counters:
-- keep each one's current window, append committed consumption to the
-- ledger, raise threshold events.
CREATE FUNCTION levqor._record_usage(tenants uuid[], counters integer[], is_rows boolean[], windows bigint[],
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

-- Measure every tenant's storage (levqor.tenant_storage_bytes), keep it for
-- levqor.usage, and mark the tenants at or over their storage limit: their
-- INSERTs and UPDATEs are refused until they are below it. The worker runs
-- it every levqor.storage_refresh_interval.
CREATE FUNCTION levqor.refresh_storage() RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t      record;
    bytes  bigint;
    quota  bigint;
    full_  boolean;
    ids    uuid[] := '{}';
    sizes  bigint[] := '{}';
BEGIN
    FOR t IN SELECT x.id, x.storage_exceeded FROM levqor.tenants x WHERE x.status <> 'offboarded' ORDER BY x.id LOOP
        bytes := levqor.tenant_storage_bytes(t.id::text);
        quota := levqor._limit(t.id, 'storage_bytes');
        full_ := quota IS NOT NULL AND bytes >= quota;
        INSERT INTO levqor.usage_counters AS u (tenant_id, metric, window_start, used)
        VALUES (t.id, 'storage_bytes', '-infinity', bytes)
        ON CONFLICT (tenant_id, metric, window_start) DO UPDATE SET used = EXCLUDED.used, updated_at = now();
        IF full_ IS DISTINCT FROM t.storage_exceeded THEN
            UPDATE levqor.tenants x SET storage_exceeded = full_ WHERE x.id = t.id;
        END IF;
        ids := ids || t.id;
        sizes := sizes || bytes;
    END LOOP;
    PERFORM levqor._check_thresholds(ids, array_fill('storage_bytes'::text, ARRAY[cardinality(ids)]),
                                     array_fill('-infinity'::timestamptz, ARRAY[cardinality(ids)]), sizes);
    RETURN cardinality(ids);
END
$fn$;

-- Usage against limits: the current tenant's for an application, every
-- tenant's for a levqor_admin. Counters come live from shared memory, falling
-- back to the last flush; storage is as of the last refresh_storage().
CREATE VIEW levqor.usage AS
WITH live AS (
    SELECT l.tenant_id, coalesce(r.metric, k.name) AS metric, levqor._ts(l.window_start) AS window_start, l.used
      FROM levqor._usage_live() l
      LEFT JOIN levqor.row_limits r ON l.rows AND r.id = l.counter
      LEFT JOIN levqor.metrics k ON NOT l.rows AND k.id = l.counter
), subject AS (
    SELECT t.id, t.slug, t.plan FROM levqor.tenants t
     WHERE t.id = levqor.current_tenant() OR pg_has_role(current_user, 'levqor_admin', 'USAGE')
), cur AS (
    SELECT s.id AS tenant_id, s.slug, s.plan, m.name AS metric, m.kind, m.reset_every,
           levqor._window_start(m.reset_every, now()) AS window_start,
           CASE WHEN o.tenant_id IS NOT NULL THEN o.quota
                WHEN p.limits ? m.name THEN (p.limits ->> m.name)::bigint
                ELSE m.default_limit END AS quota
      FROM subject s
      JOIN levqor.plans p ON p.name = s.plan
      CROSS JOIN levqor.metrics m
      LEFT JOIN levqor.quota_overrides o ON o.tenant_id = s.id AND o.metric = m.name
)
SELECT c.tenant_id, c.slug AS tenant, c.metric, c.kind,
       coalesce(l.used, u.used, CASE WHEN c.kind = 'counter' THEN 0 END) AS used,
       c.quota AS "limit",
       CASE WHEN coalesce(l.used, u.used) IS NULL AND c.kind <> 'counter' THEN NULL  -- not measured yet
            WHEN c.quota > 0 THEN round(100.0 * coalesce(l.used, u.used, 0) / c.quota, 1)
            WHEN c.quota = 0 THEN 100.0 END AS percent,
       CASE WHEN c.window_start = '-infinity' THEN NULL ELSE c.window_start END AS window_start,
       CASE WHEN c.window_start = '-infinity' THEN NULL
            WHEN c.reset_every = interval '1 month' THEN c.window_start + interval '1 month'
            ELSE c.window_start + c.reset_every END AS window_end
  FROM cur c
  LEFT JOIN live l ON l.tenant_id = c.tenant_id AND l.metric = c.metric AND l.window_start = c.window_start
  LEFT JOIN levqor.usage_counters u ON u.tenant_id = c.tenant_id AND u.metric = c.metric AND u.window_start = c.window_start;

-- The billing ledger, for a consumer that keeps its place: entries after its
-- cursor, in order. Reading does not move the cursor; ledger_advance does,
-- once the entries are safely delivered, so nothing is lost or sent twice
-- across restarts (a consumer sends each entry's id as its idempotency key).
CREATE FUNCTION levqor.ledger_read(consumer text, max_entries integer DEFAULT 1000)
RETURNS SETOF levqor.usage_ledger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    pos bigint;
BEGIN
    IF max_entries IS NULL OR max_entries < 1 THEN
        RAISE EXCEPTION 'max_entries must be at least 1' USING ERRCODE = '22023';
    END IF;
    INSERT INTO levqor.ledger_cursors AS c (consumer) VALUES (consumer) ON CONFLICT DO NOTHING;
    SELECT c.position INTO pos FROM levqor.ledger_cursors c WHERE c.consumer = consumer;
    RETURN QUERY SELECT l.* FROM levqor.usage_ledger l WHERE l.id > pos ORDER BY l.id LIMIT max_entries;
END
$fn$;

CREATE FUNCTION levqor.ledger_advance(consumer text, through bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    pos bigint;
BEGIN
    SELECT c.position INTO pos FROM levqor.ledger_cursors c WHERE c.consumer = consumer FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown ledger consumer %', coalesce(quote_literal(consumer), 'NULL')
            USING ERRCODE = '42704', HINT = 'levqor.ledger_read(consumer) creates it.';
    END IF;
    IF through IS NULL OR through < pos THEN
        RAISE EXCEPTION 'the cursor of % is at %; it does not move back to %', consumer, pos, through
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM levqor.usage_ledger l WHERE l.id = through) AND through <> pos THEN
        RAISE EXCEPTION 'no ledger entry %', through USING ERRCODE = '22023',
            HINT = 'Advance to the id of the last entry delivered.';
    END IF;
    UPDATE levqor.ledger_cursors c SET position = through, updated_at = now() WHERE c.consumer = consumer;
    RETURN through;
END
$fn$;
