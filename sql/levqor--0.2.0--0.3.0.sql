-- levqor 0.2.0 -> 0.3.0 (assembled by scripts/upgrade-0.3.0.py)
--
-- 0.3.0 adds plan quotas (consume(), row limits, storage limits, the usage
-- view, threshold events, the billing ledger), the organisation hierarchy,
-- members and the policy engine, and moves the audit chain into a table of
-- its own. Run by ALTER EXTENSION
-- levqor UPDATE; tests/e2e/tests/upgrade.rs checks that the result is the
-- same catalog as a fresh 0.3.0 install, with data kept. Install the 0.3.0
-- library first and restart (quotas need levqor in shared_preload_libraries).

-- 1. Catalog: tenants over their storage limit; the kind of each node of the
--    hierarchy (a tenant with a parent becomes an organization).
ALTER TABLE levqor.tenants ADD COLUMN storage_exceeded boolean NOT NULL DEFAULT false;
ALTER TABLE levqor.protected_tables ADD COLUMN scope_column name;
ALTER TABLE levqor.tenants ADD COLUMN kind text NOT NULL DEFAULT 'tenant'
    CONSTRAINT tenants_kind_check CHECK (kind IN ('platform', 'tenant', 'organization'));
UPDATE levqor.tenants SET kind = 'organization' WHERE parent IS NOT NULL;
ALTER TABLE levqor.tenants
    ADD CONSTRAINT tenants_platform_has_no_parent CHECK (kind <> 'platform' OR parent IS NULL),
    ADD CONSTRAINT tenants_organization_has_parent CHECK (kind <> 'organization' OR parent IS NOT NULL);

-- 1b. New functions beside existing ones.
CREATE FUNCTION levqor._scope_of(tbl regclass) RETURNS name
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pt.scope_column FROM levqor.protected_tables pt WHERE pt.tbl = $1
$fn$;

-- 3. New functions in the library.
-- src/audit.rs:252
-- levqor::audit::_audit_id
CREATE  FUNCTION "_audit_id"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_audit_id_wrapper';

-- src/privilege.rs:83
-- levqor::privilege::_caller_has
CREATE  FUNCTION "_caller_has"(
	"role" TEXT /* & str */
) RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_caller_has_wrapper';

-- src/privilege.rs:89
-- levqor::privilege::_caller_is_admin
CREATE  FUNCTION "_caller_is_admin"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_caller_is_admin_wrapper';

-- src/audit.rs:260
-- levqor::audit::_flush_wal
CREATE  FUNCTION "_flush_wal"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_flush_wal_wrapper';

-- src/quota.rs:337
-- levqor::quota::_limit_rows
CREATE FUNCTION "_limit_rows"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_limit_rows_wrapper';

-- src/audit.rs:272
-- levqor::audit::_next_xid
CREATE  FUNCTION "_next_xid"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_next_xid_wrapper';

-- src/seal.rs:481
-- levqor::seal::_seal_batch
CREATE  FUNCTION "_seal_batch"(
	"after" bigint, /* i64 */
	"max_entries" INT /* i32 */
) RETURNS TABLE (
	"sealed" INT,  /* i32 */
	"last_id" bigint  /* Option < i64 > */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_seal_batch_wrapper';

-- src/quota.rs:398
-- levqor::quota::_usage_live
CREATE  FUNCTION "_usage_live"() RETURNS TABLE (
	"tenant_id" uuid,  /* pgrx :: Uuid */
	"counter" INT,  /* i32 */
	"rows" bool,  /* bool */
	"window_start" bigint,  /* i64 */
	"used" bigint  /* i64 */
)
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_usage_live_wrapper';

-- src/quota.rs:477
-- levqor::quota::_window_start_of
CREATE  FUNCTION "_window_start_of"(
	"reset_every_micros" bigint, /* i64 */
	"at" timestamp with time zone /* pgrx :: datum :: TimestampWithTimeZone */
) RETURNS bigint /* i64 */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_window_start_of_wrapper';

-- src/policy.rs:71
-- levqor::policy::authorize
CREATE  FUNCTION "authorize"(
	"action" TEXT, /* & str */
	"resource" TEXT DEFAULT '*' /* & str */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'authorize_wrapper';

-- src/quota.rs:250
-- levqor::quota::consume
CREATE  FUNCTION "consume"(
	"metric_name" TEXT, /* & str */
	"amount" bigint DEFAULT 1 /* i64 */
) RETURNS bigint /* Option < i64 > */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'consume_wrapper';

-- src/quota.rs:429
-- levqor::quota::flush_usage
CREATE  FUNCTION "flush_usage"() RETURNS bigint /* i64 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'flush_usage_wrapper';

-- 3b. The audit chain moves beside the entries (levqor.audit_chain, runs of
--     positions written once per sealing batch) and entries are never updated again; entry ids
--     come from levqor._audit_id() (the writer's transaction id first), over
--     a sequence that continues where the identity stopped.
-- The chains: position seq of chain `chain` (a tenant, or the nil uuid for
-- the platform) holds an entry, and its hash = sha256(hash at seq - 1 ||
-- canonical(entry, seq)). Stored in runs: a row holds consecutive positions
-- first_seq, first_seq + 1, … of one chain, the ids of their entries
-- (ascending) and their hashes (32 bytes each, in the same order). A sealing
-- pass writes a run per chain per 96 entries, not a row and two index
-- entries per entry. Runs stay in line (PLAIN: at most 96 positions, under
-- 4 kB, two to a page) so that finding one entry's position reads one page.
CREATE TABLE levqor.audit_chain (
    chain     uuid NOT NULL,
    first_seq bigint NOT NULL,
    last_id   bigint NOT NULL,         -- ids[cardinality(ids)], for lookups by id
    ids       bigint[] NOT NULL,
    hashes    bytea NOT NULL,
    sealed_at timestamptz NOT NULL,
    PRIMARY KEY (chain, first_seq)
);
ALTER TABLE levqor.audit_chain ALTER COLUMN ids SET STORAGE PLAIN, ALTER COLUMN hashes SET STORAGE PLAIN;
-- An entry's run: the first of its chain with last_id >= its id that holds it.
CREATE INDEX audit_chain_id_idx ON levqor.audit_chain (chain, last_id);
-- The runs a sealing pass must not seal again: those above the watermark.
CREATE INDEX audit_chain_recent_idx ON levqor.audit_chain (last_id);

-- Where the sealer starts looking. Every entry with an id up to `through` is
-- sealed or was rolled back. (horizon_id, horizon_xid) was read at an
-- earlier pass: the id sequence's value, then the next transaction id. Once
-- every transaction older than horizon_xid has ended, no entry with an id up
-- to horizon_id can still appear, and `through` may move up to it.
-- Not dumped: a restored database starts again from 0, which is only slower.
CREATE TABLE levqor.audit_seal_state (
    one         boolean PRIMARY KEY DEFAULT true CONSTRAINT audit_seal_state_one CHECK (one),
    through     bigint NOT NULL DEFAULT 0,
    horizon_id  bigint,
    horizon_xid bigint
);
INSERT INTO levqor.audit_seal_state DEFAULT VALUES;
-- Sealed positions, into runs: consecutive positions with ascending ids,
-- at most 96 to a run (as the sealer writes them).
INSERT INTO levqor.audit_chain (chain, first_seq, last_id, ids, hashes, sealed_at)
SELECT q.chain, min(q.seq), max(q.id), array_agg(q.id ORDER BY q.seq), string_agg(q.hash, ''::bytea ORDER BY q.seq), max(q.sealed_at)
  FROM (SELECT r.*, (row_number() OVER (PARTITION BY r.chain, r.run ORDER BY r.seq) - 1) / 96 AS part
          FROM (SELECT p.*, sum(p.brk) OVER (PARTITION BY p.chain ORDER BY p.seq) AS run
                  FROM (SELECT coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) AS chain,
                               a.seq, a.id, a.hash, a.sealed_at,
                               CASE WHEN a.id > lag(a.id) OVER w AND a.seq = lag(a.seq) OVER w + 1 THEN 0 ELSE 1 END AS brk
                          FROM levqor.audit_log a WHERE a.seq IS NOT NULL
                        WINDOW w AS (PARTITION BY coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) ORDER BY a.seq)) p) r) q
 GROUP BY q.chain, q.run, q.part;
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_chain', '');
INSERT INTO levqor._disabling (tbl) VALUES ('levqor.audit_log'::regclass);
DROP TRIGGER levqor_audit_immutable ON levqor.audit_log;
ALTER TABLE levqor.audit_log DROP COLUMN seq, DROP COLUMN prev_hash, DROP COLUMN hash, DROP COLUMN sealed_at,
    ALTER COLUMN db_role TYPE text;
DELETE FROM levqor._disabling WHERE tbl = 'levqor.audit_log'::regclass;
SELECT set_config('levqor_audit.last_id', coalesce(pg_sequence_last_value('levqor.audit_log_id_seq'), 0)::text, true);
-- The identity's sequence goes with it; PostgreSQL leaves it among the
-- extension's configuration tables, so take it out of that list first.
UPDATE pg_catalog.pg_extension e
   SET extconfig = x.cfg, extcondition = x.cond
  FROM (SELECT array_agg(c.oid ORDER BY c.n) AS cfg, array_agg(c.cond ORDER BY c.n) AS cond
          FROM pg_catalog.pg_extension e2, unnest(e2.extconfig, e2.extcondition) WITH ORDINALITY AS c(oid, cond, n)
         WHERE e2.extname = 'levqor' AND c.oid <> 'levqor.audit_log_id_seq'::regclass) x
 WHERE e.extname = 'levqor';
ALTER TABLE levqor.audit_log ALTER COLUMN id DROP IDENTITY;
CREATE SEQUENCE levqor.audit_log_id_seq OWNED BY levqor.audit_log.id;
SELECT setval('levqor.audit_log_id_seq', greatest(current_setting('levqor_audit.last_id')::bigint, 1),
              current_setting('levqor_audit.last_id')::bigint > 0);
ALTER TABLE levqor.audit_log ALTER COLUMN id SET DEFAULT levqor._audit_id();
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log_id_seq', '');
ALTER TABLE levqor.audit_chain ENABLE ROW LEVEL SECURITY;
ALTER TABLE levqor.audit_chain FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_chain_read ON levqor.audit_chain FOR SELECT TO PUBLIC
    USING (chain = levqor.current_tenant() AND levqor.current_member_role() IN ('auditor', 'admin', 'owner'));

-- Entries with their place in the chain (NULL while unsealed), as the
-- reader's own row level security lets them see both. width_bucket is a
-- binary search of the run's ascending ids.
CREATE VIEW levqor.audit_trail WITH (security_invoker = true) AS
    SELECT a.*, p.seq, p.hash, p.sealed_at
      FROM levqor.audit_log a
      LEFT JOIN LATERAL (
          SELECT c.first_seq + k - 1 AS seq, substr(c.hashes, k * 32 - 31, 32) AS hash, c.sealed_at
            FROM levqor.audit_chain c, width_bucket(a.id, c.ids) k
           WHERE c.chain = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
             AND c.last_id >= a.id AND c.ids[k] = a.id
           ORDER BY c.last_id LIMIT 1) p ON true;

CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE ON levqor.audit_log
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_delete BEFORE DELETE ON levqor.audit_log
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE ON levqor.audit_chain
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_delete BEFORE DELETE ON levqor.audit_chain
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_truncate BEFORE TRUNCATE ON levqor.audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_immutable();

CREATE POLICY audit_chain_admin_read ON levqor.audit_chain FOR SELECT TO levqor_admin USING (true);

-- 4. Quotas (sql/quota.sql, new in 0.3.0).
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
    tenant_id uuid NOT NULL REFERENCES levqor.tenants (id) ON DELETE CASCADE,
    metric    text NOT NULL REFERENCES levqor.metrics (name) ON UPDATE CASCADE ON DELETE CASCADE,
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
    metric        text NOT NULL CONSTRAINT row_limits_metric_key UNIQUE REFERENCES levqor.metrics (name) ON UPDATE CASCADE,
    tenant_column name NOT NULL,
    enabled_at    timestamptz NOT NULL DEFAULT now(),
    enabled_by    name NOT NULL DEFAULT session_user
);
ALTER SEQUENCE levqor.row_limits_id_seq OWNED BY levqor.row_limits.id;

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
CREATE TABLE levqor.quota_alerts (
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
-- a NOTIFY on levqor_quota and an entry in the audit log.
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
               AND cur.window_start = '-infinity' AND (cur.quota IS NULL OR cur.used * 100 < cur.quota * q.threshold)
        )
        INSERT INTO levqor.quota_alerts (tenant_id, metric, window_start, threshold, used, quota)
        SELECT cur.tenant_id, cur.metric, cur.window_start, th.threshold, cur.used, cur.quota
          FROM cur CROSS JOIN (VALUES (80), (100)) AS th(threshold)
         WHERE cur.quota > 0 AND cur.used * 100 >= cur.quota * th.threshold
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

-- 4b. The hierarchy (sql/hierarchy.sql, new in 0.3.0).
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

-- 4c. Members (sql/members.sql, new in 0.3.0).
-- Members of a tenant or organization and their roles (docs/hierarchy.md).
-- levqor does not log users in: the application does, and tells levqor who
-- acts (a key issued for a user and role, set_tenant, a signed token). This
-- table is what the application and levqor.accessible_orgs read.

CREATE TABLE levqor.members (
    tenant_id  uuid NOT NULL REFERENCES levqor.tenants (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL,
    role       text NOT NULL
               CONSTRAINT members_role_check CHECK (role IN ('owner', 'admin', 'operator', 'auditor', 'viewer')),
    -- The user's id at the tenant's identity provider, if it has one.
    sso_id     text CONSTRAINT members_sso_id_format CHECK (length(sso_id) BETWEEN 1 AND 255 AND sso_id !~ '[[:cntrl:]]'),
    added_at   timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX members_user_idx ON levqor.members (user_id);
CREATE UNIQUE INDEX members_sso_id_key ON levqor.members (tenant_id, sso_id) WHERE sso_id IS NOT NULL;
SELECT pg_catalog.pg_extension_config_dump('levqor.members', '');

CREATE FUNCTION levqor._check_member_role(role text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF role IS NULL OR role NOT IN ('owner', 'admin', 'operator', 'auditor', 'viewer') THEN
        RAISE EXCEPTION 'unknown member role %', coalesce(quote_literal(role), 'NULL')
            USING ERRCODE = '22023', HINT = 'Member roles are owner, admin, operator, auditor and viewer.';
    END IF;
END
$fn$;

-- The tenant keeps at least one owner once it has one (callers hold the
-- tenant row locked, so two concurrent removals cannot both pass).
CREATE FUNCTION levqor._keep_an_owner(t levqor.tenants, leaving uuid) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor.members m
                    WHERE m.tenant_id = t.id AND m.role = 'owner' AND m.user_id <> leaving) THEN
        RAISE EXCEPTION 'tenant % must keep at least one owner', t.slug USING ERRCODE = '55000',
            HINT = 'Make another member owner first (levqor.set_member_role).';
    END IF;
END
$fn$;

-- A member's role, for a change to it: 42704 if not a member, and the
-- tenant's last owner may not leave the role.
CREATE FUNCTION levqor._leaving_role(t levqor.tenants, user_id uuid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    was text;
BEGIN
    SELECT m.role INTO was FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'user % is not a member of %', user_id, t.slug USING ERRCODE = '42704';
    END IF;
    IF was = 'owner' THEN
        PERFORM levqor._keep_an_owner(t, user_id);
    END IF;
    RETURN was;
END
$fn$;

CREATE FUNCTION levqor.add_member(tenant text, user_id uuid, role text, sso_id text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    PERFORM levqor._check_member_role(role);
    IF user_id IS NULL THEN
        RAISE EXCEPTION 'a member needs a user id' USING ERRCODE = '22023';
    END IF;
    BEGIN
        INSERT INTO levqor.members (tenant_id, user_id, role, sso_id) VALUES (t.id, user_id, role, sso_id);
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'user % is already a member of % (or that sso id is taken)', user_id, t.slug
            USING ERRCODE = '23505', HINT = 'levqor.set_member_role() changes a member''s role.';
    END;
    PERFORM levqor._log_event(t.id, 'member_added', jsonb_build_object('user_id', user_id, 'role', role, 'sso_id', sso_id));
END
$fn$;

CREATE FUNCTION levqor.set_member_role(tenant text, user_id uuid, role text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    was text;
BEGIN
    PERFORM levqor._check_member_role(role);
    IF EXISTS (SELECT 1 FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id AND m.role = role) THEN
        RETURN;
    END IF;
    was := levqor._leaving_role(t, user_id);
    UPDATE levqor.members m SET role = role, updated_at = now() WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_role_changed', jsonb_build_object('user_id', user_id, 'from', was, 'to', role));
END
$fn$;

CREATE FUNCTION levqor.remove_member(tenant text, user_id uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._tenant_for_update(tenant);
    was text;
BEGIN
    was := levqor._leaving_role(t, user_id);
    DELETE FROM levqor.members m WHERE m.tenant_id = t.id AND m.user_id = user_id;
    PERFORM levqor._log_event(t.id, 'member_removed', jsonb_build_object('user_id', user_id, 'role', was));
END
$fn$;

-- The tenants and organizations a user may act in: where they are a member,
-- and everything below those. A levqor_admin sees every user's; anyone else
-- only the user of their own context. (A view, for the same reason as
-- levqor.tree.)
CREATE VIEW levqor.member_reach WITH (security_barrier = true) AS
SELECT m.user_id, c.descendant AS tenant_id, m.tenant_id AS through, m.role
  FROM levqor.members m JOIN levqor.tenant_tree c ON c.ancestor = m.tenant_id
 WHERE pg_has_role(current_user, 'levqor_admin', 'USAGE') OR m.user_id = levqor.current_user_id();

CREATE FUNCTION levqor.accessible_orgs(user_id uuid) RETURNS SETOF uuid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT DISTINCT r.tenant_id FROM levqor.member_reach r WHERE r.user_id = $1
$fn$;

-- Per-tenant single sign-on settings, for the application's login flow:
-- levqor stores and validates them; it does not speak SAML or OIDC itself.
-- The client secret is never readable by levqor_app: only a trusted server
-- (levqor_context_admin), which exchanges codes with the identity provider,
-- reads it.
CREATE TABLE levqor.tenant_sso (
    tenant_id       uuid PRIMARY KEY REFERENCES levqor.tenants (id) ON DELETE CASCADE,
    protocol        text NOT NULL CONSTRAINT tenant_sso_protocol_check CHECK (protocol IN ('oidc', 'saml')),
    issuer          text,      -- OIDC
    client_id       text,      -- OIDC
    client_secret   text,      -- OIDC; never shown to levqor_app
    metadata_url    text,      -- SAML
    metadata_xml    xml,       -- SAML
    entity_id       text,      -- SAML: the identity provider's entityID
    allowed_domains text[] NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    updated_by      name NOT NULL DEFAULT session_user,
    CONSTRAINT tenant_sso_oidc CHECK (protocol <> 'oidc' OR (issuer IS NOT NULL AND client_id IS NOT NULL)),
    CONSTRAINT tenant_sso_saml CHECK (protocol <> 'saml' OR ((metadata_url IS NOT NULL OR metadata_xml IS NOT NULL) AND entity_id IS NOT NULL))
);
SELECT pg_catalog.pg_extension_config_dump('levqor.tenant_sso', '');

CREATE FUNCTION levqor._sso_tenant(tenant text) RETURNS levqor.tenants
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM levqor.plans p WHERE p.name = t.plan AND 'sso' = ANY (p.features)) THEN
        RAISE EXCEPTION 'plan % of tenant % does not include single sign-on', t.plan, t.slug USING ERRCODE = '55000',
            HINT = 'SSO comes with plans whose features include sso (enterprise).';
    END IF;
    RETURN t;
END
$fn$;

CREATE FUNCTION levqor._check_url(what text, url text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF url IS NULL OR url !~ '^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^[:space:][:cntrl:]]*)?$' OR length(url) > 2000 THEN
        RAISE EXCEPTION '% must be an https URL, not %', what, coalesce(quote_literal(left(url, 100)), 'NULL')
            USING ERRCODE = '22023';
    END IF;
END
$fn$;

CREATE FUNCTION levqor._check_domains(domains text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    d text;
BEGIN
    FOREACH d IN ARRAY coalesce(domains, '{}') LOOP
        IF d IS NULL OR d !~ '^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$' THEN
            RAISE EXCEPTION 'invalid email domain %', coalesce(quote_literal(d), 'NULL') USING ERRCODE = '22023';
        END IF;
    END LOOP;
END
$fn$;

CREATE FUNCTION levqor.set_sso_oidc(tenant text, issuer text, client_id text, client_secret text,
                                    allowed_domains text[] DEFAULT '{}') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._sso_tenant(tenant);
BEGIN
    PERFORM levqor._check_url('the OIDC issuer', issuer);
    IF client_id IS NULL OR client_id !~ '^[[:graph:]]{1,255}$' THEN
        RAISE EXCEPTION 'the OIDC client id must be 1 to 255 printable characters' USING ERRCODE = '22023';
    END IF;
    IF client_secret IS NULL OR length(client_secret) NOT BETWEEN 16 AND 1000 OR client_secret ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'the OIDC client secret must be 16 to 1000 characters' USING ERRCODE = '22023';
    END IF;
    PERFORM levqor._check_domains(allowed_domains);
    INSERT INTO levqor.tenant_sso AS s (tenant_id, protocol, issuer, client_id, client_secret, allowed_domains)
    VALUES (t.id, 'oidc', issuer, client_id, client_secret, coalesce(allowed_domains, '{}'))
    ON CONFLICT ON CONSTRAINT tenant_sso_pkey DO UPDATE
       SET protocol = 'oidc', issuer = EXCLUDED.issuer, client_id = EXCLUDED.client_id,
           client_secret = EXCLUDED.client_secret, metadata_url = NULL, metadata_xml = NULL, entity_id = NULL,
           allowed_domains = EXCLUDED.allowed_domains, updated_at = now(), updated_by = session_user;
    PERFORM levqor._log_event(t.id, 'sso_configured', jsonb_build_object('protocol', 'oidc', 'issuer', issuer,
        'client_id', client_id, 'allowed_domains', to_jsonb(allowed_domains)));
END
$fn$;

-- SAML: the identity provider's metadata, as XML or an https URL, and its entityID.
CREATE FUNCTION levqor.set_sso_saml(tenant text, entity_id text, metadata_xml text DEFAULT NULL,
                                    metadata_url text DEFAULT NULL, allowed_domains text[] DEFAULT '{}') RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t   levqor.tenants := levqor._sso_tenant(tenant);
    doc xml;
BEGIN
    IF entity_id IS NULL OR entity_id !~ '^[[:graph:]]+$' OR length(entity_id) > 1024 THEN
        RAISE EXCEPTION 'the SAML entity id must be 1 to 1024 printable characters' USING ERRCODE = '22023';
    END IF;
    IF (metadata_xml IS NULL) = (metadata_url IS NULL) THEN
        RAISE EXCEPTION 'give the SAML metadata either as XML or as a URL' USING ERRCODE = '22023';
    END IF;
    IF metadata_url IS NOT NULL THEN
        PERFORM levqor._check_url('the SAML metadata URL', metadata_url);
    ELSE
        IF length(metadata_xml) > 1000000 OR NOT xml_is_well_formed_document(metadata_xml) THEN
            RAISE EXCEPTION 'the SAML metadata is not a well-formed XML document' USING ERRCODE = '22023';
        END IF;
        doc := xmlparse(DOCUMENT metadata_xml);
        IF NOT xpath_exists('/*[local-name()="EntityDescriptor"]/@entityID', doc) THEN
            RAISE EXCEPTION 'the SAML metadata has no EntityDescriptor with an entityID' USING ERRCODE = '22023';
        END IF;
        IF (xpath('string(/*[local-name()="EntityDescriptor"]/@entityID)', doc))[1]::text <> entity_id THEN
            RAISE EXCEPTION 'the SAML metadata describes entity %, not %',
                (xpath('string(/*[local-name()="EntityDescriptor"]/@entityID)', doc))[1]::text, entity_id
                USING ERRCODE = '22023';
        END IF;
    END IF;
    PERFORM levqor._check_domains(allowed_domains);
    INSERT INTO levqor.tenant_sso AS s (tenant_id, protocol, entity_id, metadata_xml, metadata_url, allowed_domains)
    VALUES (t.id, 'saml', entity_id, doc, metadata_url, coalesce(allowed_domains, '{}'))
    ON CONFLICT ON CONSTRAINT tenant_sso_pkey DO UPDATE
       SET protocol = 'saml', issuer = NULL, client_id = NULL, client_secret = NULL,
           entity_id = EXCLUDED.entity_id, metadata_xml = EXCLUDED.metadata_xml, metadata_url = EXCLUDED.metadata_url,
           allowed_domains = EXCLUDED.allowed_domains, updated_at = now(), updated_by = session_user;
    PERFORM levqor._log_event(t.id, 'sso_configured', jsonb_build_object('protocol', 'saml', 'entity_id', entity_id,
        'metadata_url', metadata_url, 'allowed_domains', to_jsonb(allowed_domains)));
END
$fn$;

CREATE FUNCTION levqor.clear_sso(tenant text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    t levqor.tenants := levqor._tenant_for_update(tenant);
BEGIN
    DELETE FROM levqor.tenant_sso s WHERE s.tenant_id = t.id;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM levqor._log_event(t.id, 'sso_cleared', '{}');
    RETURN true;
END
$fn$;

-- The settings a login page needs, without the secret: for the context's
-- tenant (any role), or any tenant for a trusted server or a levqor_admin.
CREATE FUNCTION levqor.sso_settings(tenant text DEFAULT NULL)
RETURNS TABLE (tenant_id uuid, protocol text, issuer text, client_id text, metadata_url text,
               metadata_xml xml, entity_id text, allowed_domains text[], has_client_secret boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    tid uuid := CASE WHEN tenant IS NULL THEN levqor.current_tenant() ELSE levqor._tenant_id(tenant) END;
BEGIN
    IF tid IS DISTINCT FROM levqor.current_tenant() AND NOT levqor._caller_is_admin()
       AND NOT levqor._caller_has('levqor_context_admin') THEN
        RAISE EXCEPTION 'only a trusted server or a levqor_admin reads another tenant''s SSO settings'
            USING ERRCODE = '42501';
    END IF;
    RETURN QUERY SELECT s.tenant_id, s.protocol, s.issuer, s.client_id, s.metadata_url, s.metadata_xml, s.entity_id,
                        s.allowed_domains, s.client_secret IS NOT NULL
                   FROM levqor.tenant_sso s WHERE s.tenant_id = tid;
END
$fn$;

-- The OIDC client secret, for the trusted server that exchanges codes.
CREATE FUNCTION levqor.sso_client_secret(tenant text) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT s.client_secret FROM levqor.tenant_sso s WHERE s.tenant_id = levqor._tenant_id($1)
$fn$;

-- 4d. The policy engine (sql/policy.sql, new in 0.3.0).
-- The policy engine (docs/policy.md): may the current context do `action`
-- to `resource`? Decided from the tenant's plan (its features), the member
-- role in the context, and JSON policy documents; default deny; every deny
-- recorded.

CREATE TABLE levqor.policies (
    name       text PRIMARY KEY CONSTRAINT policies_name_format CHECK (name ~ '^[a-z0-9][a-z0-9_.-]{0,62}$'),
    document   jsonb NOT NULL,
    builtin    boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by name NOT NULL DEFAULT session_user
);
SELECT pg_catalog.pg_extension_config_dump('levqor.policies', 'WHERE NOT builtin');

-- Where a document is wrong, as "$.path: what", or NULL when it is right.
-- A document: {"effect": "allow"|"deny", "actions": [pattern, …],
-- "resources": [pattern, …], "roles": [role, …], "features": [feature, …],
-- "plans": [plan, …], "description": text}; effect and actions required;
-- a pattern is text where * matches anything.
CREATE FUNCTION levqor._policy_error(doc jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    k   text;
    v   jsonb;
    i   int;
BEGIN
    IF jsonb_typeof(doc) IS DISTINCT FROM 'object' THEN
        RETURN '$: expected an object';
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM jsonb_each(doc) e LOOP
        CASE k
        WHEN 'effect' THEN
            IF v NOT IN ('"allow"', '"deny"') THEN
                RETURN '$.effect: expected "allow" or "deny"';
            END IF;
        WHEN 'description' THEN
            IF jsonb_typeof(v) <> 'string' THEN
                RETURN '$.description: expected a string';
            END IF;
        WHEN 'actions', 'resources', 'roles', 'features', 'plans' THEN
            IF jsonb_typeof(v) <> 'array' OR jsonb_array_length(v) = 0 THEN
                RETURN format('$.%s: expected a non-empty array of strings', k);
            END IF;
            FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
                IF jsonb_typeof(v -> i) <> 'string' OR length(v ->> i) NOT BETWEEN 1 AND 200 THEN
                    RETURN format('$.%s[%s]: expected a string of 1 to 200 characters', k, i);
                END IF;
                IF k = 'roles' AND (v ->> i) NOT IN ('owner', 'admin', 'operator', 'auditor', 'viewer') THEN
                    RETURN format('$.roles[%s]: unknown member role "%s"', i, v ->> i);
                END IF;
            END LOOP;
        ELSE
            RETURN format('$.%s: unknown key', k);
        END CASE;
    END LOOP;
    IF NOT doc ? 'effect' THEN
        RETURN '$.effect: missing';
    END IF;
    IF NOT doc ? 'actions' THEN
        RETURN '$.actions: missing';
    END IF;
    RETURN NULL;
END
$fn$;

CREATE FUNCTION levqor._check_policy() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    problem text := levqor._policy_error(NEW.document);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid policy %: %', NEW.name, problem USING ERRCODE = '22023',
            HINT = 'docs/policy.md describes a policy document.';
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER levqor_check_policy BEFORE INSERT OR UPDATE ON levqor.policies
    FOR EACH ROW EXECUTE FUNCTION levqor._check_policy();

-- The v8 spec's policies.json, as documents: features come with plans,
-- owners and admins administer, viewers and auditors never change anything.
INSERT INTO levqor.policies (name, document, builtin) VALUES
  ('default-read-docs', '{"effect": "allow", "actions": ["read:docs"], "description": "Anyone in a tenant reads the docs."}', true),
  ('default-deny-admin', '{"effect": "deny", "actions": ["admin:*"], "roles": ["operator", "auditor", "viewer"], "description": "Administration is for owners and admins."}', true),
  ('owners-administer', '{"effect": "allow", "actions": ["admin:*"], "roles": ["owner", "admin"], "description": "Owners and admins administer their tenant."}', true),
  ('read-only-roles', '{"effect": "deny", "actions": ["*:create", "*:update", "*:delete", "*:write", "*:install", "*:buy"], "roles": ["auditor", "viewer"], "description": "Viewers and auditors change nothing."}', true),
  ('auditors-read-audit', '{"effect": "allow", "actions": ["audit:read"], "roles": ["owner", "admin", "auditor"], "description": "The audit trail is for owners, admins and auditors."}', true),
  ('feature-templates', '{"effect": "allow", "actions": ["templates:*"], "features": ["templates"], "description": "Plans with templates use them."}', true),
  ('feature-packs', '{"effect": "allow", "actions": ["packs:*"], "features": ["packs"], "description": "Plans with packs use them."}', true),
  ('feature-marketplace', '{"effect": "allow", "actions": ["marketplace:*"], "features": ["marketplace"], "description": "Plans with the marketplace use it."}', true),
  ('feature-sso', '{"effect": "allow", "actions": ["sso:*"], "roles": ["owner", "admin"], "features": ["sso"], "description": "Plans with SSO configure it (owners and admins)."}', true),
  ('feature-rbac', '{"effect": "allow", "actions": ["rbac:*"], "roles": ["owner", "admin"], "features": ["rbac"], "description": "Plans with RBAC manage roles (owners and admins)."}', true),
  ('feature-audit-stream', '{"effect": "allow", "actions": ["audit_stream:*"], "roles": ["owner", "admin"], "features": ["audit_stream"], "description": "Plans with audit streaming configure it."}', true),
  ('feature-db-per-tenant', '{"effect": "allow", "actions": ["db_per_tenant:*"], "roles": ["owner", "admin"], "features": ["db_per_tenant"], "description": "Plans with a database per tenant request one."}', true);

-- Whether `value` matches one of the patterns (* matches anything). No SET
-- clause, so that PostgreSQL inlines it into _decide (whose search_path is
-- pinned); it is not a definer function.
CREATE FUNCTION levqor._matches(patterns jsonb, value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.jsonb_array_elements_text($1) AS p(pattern)
                    WHERE $2 OPERATOR(pg_catalog.~~) pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                              pg_catalog.replace(p.pattern, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'))
$fn$;

-- The decision for a tenant, role, action and resource: a matching deny
-- wins, else a matching allow, else the default deny. The rule that decided
-- and why, in words.
-- (PL/pgSQL rather than SQL: its plan is prepared once per session, where a
-- SQL function's would be planned on every call.)
CREATE FUNCTION levqor._decide(tenant uuid, role text, action text, resource text)
RETURNS TABLE (allowed boolean, rule text, rationale text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY
    WITH ctx AS (
        SELECT t.plan, p.features FROM levqor.tenants t JOIN levqor.plans p ON p.name = t.plan WHERE t.id = $1
    ), matching AS (
        SELECT po.name, po.document ->> 'effect' AS effect, po.document
          FROM levqor.policies po, ctx
         WHERE levqor._matches(po.document -> 'actions', $3)
           AND levqor._matches(coalesce(po.document -> 'resources', '["*"]'), coalesce($4, '*'))
           AND (NOT po.document ? 'roles' OR po.document -> 'roles' ? coalesce($2, ''))
           AND (NOT po.document ? 'features'
                OR ARRAY(SELECT jsonb_array_elements_text(po.document -> 'features')) <@ ctx.features)
           AND (NOT po.document ? 'plans' OR po.document -> 'plans' ? ctx.plan)
    ), decided AS (
        SELECT m.effect = 'allow' AS allowed, m.name AS rule,
               format('policy %s %ss %s on %s%s%s', m.name, m.effect, $3, coalesce($4, '*'),
                      CASE WHEN $2 IS NULL THEN ' (no member role)' ELSE format(' for role %s', $2) END,
                      CASE WHEN m.document ? 'features' THEN format(' (plan %s has %s)', ctx.plan,
                           (SELECT string_agg(f, ', ') FROM jsonb_array_elements_text(m.document -> 'features') f)) ELSE '' END)
               AS rationale
          FROM matching m, ctx
         ORDER BY m.effect = 'deny' DESC, m.name
         LIMIT 1
    )
    SELECT d.allowed, d.rule, d.rationale FROM decided d
    UNION ALL
    SELECT false, 'default-deny',
           CASE WHEN NOT EXISTS (SELECT 1 FROM ctx) THEN 'no tenant context: everything is denied'
                ELSE format('no policy allows %s on %s for %s on plan %s', $3, coalesce($4, '*'),
                            coalesce('role ' || $2, 'a context without a member role'), (SELECT ctx.plan FROM ctx)) END
     WHERE NOT EXISTS (SELECT 1 FROM decided);
END
$fn$;

-- The decision with its reasons, for the current context. Records nothing.
CREATE FUNCTION levqor.explain(action text, resource text DEFAULT '*') RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT jsonb_build_object('allowed', d.allowed, 'rule', d.rule, 'rationale', d.rationale,
                              'action', $1, 'resource', $2, 'tenant_id', levqor.current_tenant(),
                              'user_id', levqor.current_user_id(), 'member_role', levqor.current_member_role())
      FROM levqor._decide(levqor.current_tenant(), levqor.current_member_role(), $1, $2) d
$fn$;

-- Record a deny in the audit log (levqor.authorize, in src/policy.rs, calls
-- it once per transaction and (action, resource)); a read-only transaction
-- cannot write, so there it goes to the server log instead.
CREATE FUNCTION levqor._record_deny(action text, resource text, rule text, rationale text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    detail jsonb := jsonb_build_object('action', action, 'resource', resource, 'rule', rule, 'rationale', rationale,
                                       'user_id', levqor.current_user_id(), 'member_role', levqor.current_member_role());
BEGIN
    IF current_setting('transaction_read_only') = 'on' THEN
        RAISE LOG 'levqor: policy_denied %', detail::text;
    ELSE
        PERFORM levqor._log_event(levqor.current_tenant(), 'policy_denied', detail);
    END IF;
END
$fn$;

-- levqor.authorize(action, resource) is in the library (src/policy.rs): the
-- decision of _decide, cached per backend, plus _record_deny for denies.

-- Write or replace a policy (levqor_admin). The document is text so that a
-- malformed one is refused with a clear message.
CREATE FUNCTION levqor.put_policy(name text, document text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
DECLARE
    doc jsonb;
BEGIN
    BEGIN
        doc := document::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'invalid policy %: not JSON', name USING ERRCODE = '22023',
            DETAIL = SQLERRM, HINT = 'docs/policy.md describes a policy document.';
    END;
    INSERT INTO levqor.policies AS p (name, document) VALUES (name, doc)
    ON CONFLICT ON CONSTRAINT policies_pkey DO UPDATE
       SET document = EXCLUDED.document, builtin = false, updated_at = now(), updated_by = session_user;
    PERFORM levqor._log_event(NULL, 'policy_written', jsonb_build_object('name', name, 'document', doc));
END
$fn$;

CREATE FUNCTION levqor.drop_policy(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_variable
BEGIN
    DELETE FROM levqor.policies p WHERE p.name = name;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM levqor._log_event(NULL, 'policy_dropped', jsonb_build_object('name', name));
    RETURN true;
END
$fn$;

-- 4e. Changed functions.
CREATE OR REPLACE FUNCTION levqor._audit_canonical(e levqor.audit_log, chain_seq bigint) RETURNS bytea
LANGUAGE sql STABLE AS $fn$
    SELECT convert_to(jsonb_build_array(
        e.id, e.tenant_id, to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), e.xid::text,
        e.db_role, e.user_id, e.member_role, e.application_name, host(e.client_addr), e.kind,
        e.table_name, e.operation, e.pk, e.old_row, e.new_row, to_jsonb(e.changed), e.event, e.detail,
        chain_seq)::text, 'UTF8')
$fn$;
CREATE OR REPLACE FUNCTION levqor._audit_immutable() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('levqor_audit.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the levqor audit log is append-only: % refused', TG_OP
        USING ERRCODE = '42501', HINT = 'Retention is levqor.purge_audit_before(), for superusers.';
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
                              'levqor.audit_log', (SELECT count(*) FROM levqor.audit_log a WHERE a.tenant_id = tid));

    table_name := 'manifest';
    row_data := jsonb_build_object('tenant', tid, 'slug', t.slug, 'exported_at', now(), 'format', 'levqor-export/1',
                              'rows', counts);
    RETURN NEXT;
    RETURN QUERY SELECT 'levqor.tenants', to_jsonb(x) FROM levqor.tenants x WHERE x.id = tid;
    -- Key metadata, never the hashes.
    RETURN QUERY SELECT 'levqor.tenant_keys', to_jsonb(k) - 'key_hash'
                   FROM levqor.tenant_keys k WHERE k.tenant_id = tid ORDER BY k.created_at;
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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
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
                OR o.address_names[3] IN ('levqor_no_truncate', 'levqor_write_guard')
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
CREATE OR REPLACE FUNCTION levqor._tenancy_problems(tbl regclass, complete boolean)
RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
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

    FOR p IN
        SELECT pol.polname, pol.polcmd, pol.polpermissive,
               pg_get_expr(pol.polqual, pol.polrelid) AS qual,
               pg_get_expr(pol.polwithcheck, pol.polrelid) AS chk
          FROM pg_policy pol
         WHERE pol.polrelid = tbl
    LOOP
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
                                     'levqor_tenant_update', 'levqor_tenant_delete']) AS polname
        LOOP
            IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = p.polname) THEN
                RETURN NEXT format('policy %I is missing', p.polname);
            END IF;
        END LOOP;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_no_truncate') THEN
            RETURN NEXT 'the TRUNCATE guard trigger is missing';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_write_guard') THEN
            RETURN NEXT 'the write guard trigger is missing';
        END IF;
    END IF;
    -- A trigger fires in ordinary sessions only when enabled 'O' (origin) or
    -- 'A' (always): 'D' (disabled) and 'R' (ENABLE REPLICA) both switch it off.
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_no_truncate'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the TRUNCATE guard trigger is disabled';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'levqor_write_guard'
                                           AND t.tgenabled NOT IN ('O', 'A')) THEN
        RETURN NEXT 'the write guard trigger is disabled';
    END IF;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.audit_head(tenant text DEFAULT NULL)
RETURNS TABLE (seq bigint, hash text, updated_at timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT levqor._flush_wal();
    SELECT hd.seq, encode(hd.hash, 'hex'), hd.updated_at FROM levqor.audit_heads hd
     WHERE hd.chain = CASE WHEN $1 IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE levqor._tenant_id($1) END
$fn$;
CREATE OR REPLACE FUNCTION levqor.change_plan(tenant text, plan text, force boolean DEFAULT false) RETURNS void
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
CREATE OR REPLACE FUNCTION levqor.create_tenant(
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
        IF NOT col.atthasdef THEN
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
    IF NOT EXISTS (SELECT 1 FROM pg_policy pol WHERE pol.polrelid = tbl AND pol.polname = 'levqor_base') THEN
        EXECUTE format('CREATE POLICY levqor_base ON %s AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)', tbl);
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

    PERFORM levqor._register_protected(tbl, tenant_column);
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.purge_audit_before(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    n bigint;
BEGIN
    PERFORM levqor._require_superuser('levqor.purge_audit_before()');
    SET LOCAL levqor_audit.retention = 'on';
    -- Per chain, only a prefix of whole runs can go (runs all of whose
    -- entries are older than the cutoff, up to the first one that is not):
    -- the floor records where the chain now starts.
    WITH kept AS (
        SELECT k.chain, min(k.first_seq) AS first
          FROM levqor.audit_chain k
         WHERE EXISTS (SELECT FROM unnest(k.ids) AS x(id) JOIN levqor.audit_log b ON b.id = x.id WHERE b.at >= cutoff)
         GROUP BY k.chain
    ), doomed AS (
        SELECT c.chain, c.first_seq, c.ids, c.hashes
          FROM levqor.audit_chain c LEFT JOIN kept USING (chain)
         WHERE c.first_seq < coalesce(kept.first, 9223372036854775807)
    ), floors AS (
        SELECT DISTINCT ON (d.chain) d.chain, d.first_seq + cardinality(d.ids) - 1 AS seq,
               substr(d.hashes, octet_length(d.hashes) - 31, 32) AS hash
          FROM doomed d ORDER BY d.chain, d.first_seq DESC
    ), moved AS (
        UPDATE levqor.audit_heads hd SET floor_seq = f.seq, floor_hash = f.hash
          FROM floors f WHERE hd.chain = f.chain
    ), unchained AS (
        DELETE FROM levqor.audit_chain c USING doomed d WHERE c.chain = d.chain AND c.first_seq = d.first_seq
    )
    DELETE FROM levqor.audit_log a USING doomed d, unnest(d.ids) AS x(id) WHERE a.id = x.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM levqor._log_event(NULL, 'audit_retention', jsonb_build_object('before', cutoff, 'deleted', n));
    RETURN n;
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
    n     bigint;
    total bigint := 0;
BEGIN
    SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) INTO total
      FROM levqor.tenants t JOIN pg_namespace s ON s.nspname = t.schema_name
      JOIN pg_class c ON c.relnamespace = s.oid AND c.relkind IN ('r', 'm')
     WHERE t.id = tid;
    FOR p IN SELECT pt.tbl, pt.tenant_column FROM levqor.protected_tables pt
              WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = pt.tbl) LOOP
        EXECUTE format('SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM %s t WHERE %I = $1', p.tbl, p.tenant_column)
           INTO n USING tid;
        total := total + n;
    END LOOP;
    RETURN total;
END
$fn$;
CREATE OR REPLACE FUNCTION levqor.verify_audit(tenant text DEFAULT NULL)
RETURNS TABLE (ok boolean, checked bigint, first_bad_id bigint, reason text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    ch      uuid := CASE WHEN tenant IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid
                         ELSE levqor._tenant_id(tenant) END;
    run     record;
    r       record;
    len     int;
    prev    bytea;
    prev_id bigint;
    n       bigint;
    head    record;
    upto    bigint := (SELECT s.through FROM levqor.audit_seal_state s);
    held    bigint := 0;   -- positions holding entries with ids up to the watermark
    logged  bigint;        -- entries of this chain with ids up to the watermark
    stray   bigint;
BEGIN
    checked := 0;
    SELECT hd.seq, hd.hash, hd.floor_seq, hd.floor_hash INTO head FROM levqor.audit_heads hd WHERE hd.chain = ch;
    n := coalesce(head.floor_seq, 0);
    prev := coalesce(head.floor_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    FOR run IN SELECT c.first_seq, c.last_id, c.ids, c.hashes FROM levqor.audit_chain c
                WHERE c.chain = ch ORDER BY c.first_seq LOOP
        len := coalesce(cardinality(run.ids), 0);
        IF run.first_seq <> n + 1 THEN
            RETURN QUERY SELECT false, checked, run.ids[1], format('entry %s of the chain is missing (found %s next)', n + 1, run.first_seq);
            RETURN;
        END IF;
        IF len = 0 OR octet_length(run.hashes) <> 32 * len OR run.last_id IS DISTINCT FROM run.ids[len] THEN
            RETURN QUERY SELECT false, checked, run.ids[1],
                format('the run of entries %s to %s is damaged: its ids, hashes and last id disagree', n + 1, n + greatest(len, 1));
            RETURN;
        END IF;
        prev_id := NULL;
        FOR r IN SELECT k.id, k.o, a AS e, a.id IS NOT NULL AS present, a.tenant_id
                   FROM unnest(run.ids) WITH ORDINALITY AS k(id, o) LEFT JOIN levqor.audit_log a ON a.id = k.id
                  ORDER BY k.o LOOP
            n := n + 1;
            IF r.id IS NULL OR r.id <= prev_id THEN
                RETURN QUERY SELECT false, checked, r.id, format('entry %s of the chain is out of order in its run', n);
                RETURN;
            END IF;
            IF NOT r.present THEN
                RETURN QUERY SELECT false, checked, r.id, format('entry %s of the chain (id %s) was deleted from the log', n, r.id);
                RETURN;
            END IF;
            IF substr(run.hashes, r.o::int * 32 - 31, 32) IS DISTINCT FROM sha256(prev || levqor._audit_canonical(r.e, n)) THEN
                RETURN QUERY SELECT false, checked, r.id,
                    format('entry %s does not match its sealed hash: it was changed after it was sealed, or entries before it were removed or moved', n);
                RETURN;
            END IF;
            IF coalesce(r.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) <> ch THEN
                RETURN QUERY SELECT false, checked, r.id, format('entry %s of the chain (id %s) belongs to another chain', n, r.id);
                RETURN;
            END IF;
            prev := substr(run.hashes, r.o::int * 32 - 31, 32);
            prev_id := r.id;
            checked := checked + 1;
            IF r.id <= upto THEN
                held := held + 1;
            END IF;
        END LOOP;
    END LOOP;
    IF coalesce(head.seq, 0) <> n OR (n > 0 AND head.hash IS DISTINCT FROM prev) THEN
        RETURN QUERY SELECT false, checked, NULL::bigint,
            format('the chain ends at entry %s but its recorded head is entry %s: entries were removed from its end', n, coalesce(head.seq, 0));
        RETURN;
    END IF;
    -- Below the sealer's watermark every entry of this chain holds one
    -- position. One that holds none was put into the log behind the sealer's
    -- back; counted first, searched for only when the counts differ.
    IF tenant IS NULL THEN
        SELECT count(*) INTO logged FROM levqor.audit_log a WHERE a.tenant_id IS NULL AND a.id <= upto;
    ELSE
        SELECT count(*) INTO logged FROM levqor.audit_log a WHERE a.tenant_id = ch AND a.id <= upto;
    END IF;
    IF logged > held THEN
        SELECT a.id INTO stray FROM levqor.audit_log a
         WHERE coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) = ch AND a.id <= upto
           AND (SELECT true FROM levqor.audit_chain c
                 WHERE c.chain = ch AND c.last_id >= a.id AND c.ids[width_bucket(a.id, c.ids)] = a.id
                 ORDER BY c.last_id LIMIT 1) IS NULL
         ORDER BY a.id LIMIT 1;
        RETURN QUERY SELECT false, checked, stray, format('entry id %s is in the log but in no chain: it was inserted behind the sealer', stray);
        RETURN;
    ELSIF logged < held THEN
        RETURN QUERY SELECT false, checked, NULL::bigint, 'an entry holds more than one position of the chain'::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT true, checked, NULL::bigint, NULL::text;
END
$fn$;

-- 5. Quota catalog changes reach every backend's cache.
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


-- 6. Privileges, as in a fresh 0.3.0 install (sql/grants.sql).
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
