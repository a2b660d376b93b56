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
