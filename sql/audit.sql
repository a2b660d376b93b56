-- The audit log: every change to an audited table and every levqor event,
-- per tenant, in a SHA-256 hash chain.
--
-- Writers (the Rust trigger levqor._audit_row, and levqor._log_event) only
-- append entries, so no writer waits for another's transaction.
-- levqor.seal_audit() links committed entries into their tenant's chain, one
-- sealer at a time, in the order it finds them committed: position N of a
-- chain stores hash_N = sha256(hash_{N-1} || canonical(entry at N)). The chain
-- lives beside the entries, in levqor.audit_chain, written once per batch, so
-- an entry is written once and never updated.

-- Entry ids come from levqor._audit_id(): it takes the writer's transaction
-- id first, then the next id, which is what lets the sealer tell when every
-- id below some value is settled (see seal_audit).
CREATE TABLE levqor.audit_log (
    id               bigint PRIMARY KEY DEFAULT levqor._audit_id(),
    tenant_id        uuid,                      -- NULL: platform-level entries
    at               timestamptz NOT NULL DEFAULT statement_timestamp(),
    xid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    db_role          text NOT NULL DEFAULT current_user,
    user_id          uuid DEFAULT levqor.current_user_id(),
    member_role      text DEFAULT levqor.current_member_role(),
    application_name text DEFAULT current_setting('application_name'),
    client_addr      inet DEFAULT inet_client_addr(),
    kind             text NOT NULL CONSTRAINT audit_log_kind_check CHECK (kind IN ('row', 'event')),
    table_name       text,
    operation        text,
    pk               jsonb,
    old_row          jsonb,
    new_row          jsonb,
    changed          text[],
    event            text,
    detail           jsonb
);
CREATE SEQUENCE levqor.audit_log_id_seq OWNED BY levqor.audit_log.id;
CREATE INDEX audit_log_tenant_idx ON levqor.audit_log (tenant_id, id);

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

-- The head of each chain: its length and last hash.
CREATE TABLE levqor.audit_heads (
    chain      uuid PRIMARY KEY,   -- the tenant, or the nil uuid for the platform
    seq        bigint NOT NULL,
    hash       bytea NOT NULL,
    -- Retention removed entries 1..floor_seq; verification starts after them,
    -- from floor_hash (the hash of the last removed entry).
    floor_seq  bigint NOT NULL DEFAULT 0,
    floor_hash bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
    updated_at timestamptz NOT NULL DEFAULT now()
);

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
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_chain', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_heads', '');

-- Tenants read their own trail, as auditor, admin or owner. Nobody else
-- reads, and nobody at all writes through SQL (see the guards below).
ALTER TABLE levqor.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE levqor.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_read ON levqor.audit_log FOR SELECT TO PUBLIC
    USING (tenant_id = levqor.current_tenant() AND levqor.current_member_role() IN ('auditor', 'admin', 'owner'));
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

-- The canonical serialization an entry's hash covers: a JSON array in a fixed
-- order (jsonb text output is deterministic), including its chain position.
-- STABLE, not IMMUTABLE (to_char is stable), so that it is inlined.
CREATE FUNCTION levqor._audit_canonical(e levqor.audit_log, chain_seq bigint) RETURNS bytea
LANGUAGE sql STABLE AS $fn$
    SELECT convert_to(jsonb_build_array(
        e.id, e.tenant_id, to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), e.xid::text,
        e.db_role, e.user_id, e.member_role, e.application_name, host(e.client_addr), e.kind,
        e.table_name, e.operation, e.pk, e.old_row, e.new_row, to_jsonb(e.changed), e.event, e.detail,
        chain_seq)::text, 'UTF8')
$fn$;

-- Seal up to max_entries committed entries; returns how many.
--
-- Which entries: every committed entry not yet in a chain, oldest id first.
-- A transaction that stays open does not hold the others back: its entries
-- are sealed when it commits, after those that committed before. To look
-- only at recent ids, the sealer keeps a watermark (audit_seal_state):
-- writers take their transaction id before their entry id, so once every
-- transaction older than a transaction id read after some id value has
-- ended, nothing at or below that value can still commit.
CREATE FUNCTION levqor.seal_audit(max_entries int DEFAULT 10000) RETURNS int
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

CREATE FUNCTION levqor.verify_audit(tenant text DEFAULT NULL)
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

-- The latest chain hash, for an outside party to anchor. The sealing worker
-- commits without waiting for the WAL flush (a crash may undo its last
-- moments, which the next pass seals again); a head given out must never be
-- undone, so the WAL is flushed first.
CREATE FUNCTION levqor.audit_head(tenant text DEFAULT NULL)
RETURNS TABLE (seq bigint, hash text, updated_at timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT levqor._flush_wal();
    SELECT hd.seq, encode(hd.hash, 'hex'), hd.updated_at FROM levqor.audit_heads hd
     WHERE hd.chain = CASE WHEN $1 IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE levqor._tenant_id($1) END
$fn$;

-- Nobody edits an entry or a chain position, ever, and deletes them only
-- through levqor.purge_audit_before() (retention), marked with a local
-- setting that only that function sets.
CREATE FUNCTION levqor._audit_immutable() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('levqor_audit.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'the levqor audit log is append-only: % refused', TG_OP
        USING ERRCODE = '42501', HINT = 'Retention is levqor.purge_audit_before(), for superusers.';
END
$fn$;
CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE ON levqor.audit_log
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_delete BEFORE DELETE ON levqor.audit_log
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_truncate BEFORE TRUNCATE ON levqor.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE ON levqor.audit_chain
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_delete BEFORE DELETE ON levqor.audit_chain
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_truncate BEFORE TRUNCATE ON levqor.audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION levqor._audit_immutable();

-- Retention (superusers): delete sealed entries older than a point, a prefix
-- of each chain. The chain keeps verifying from its recorded floor; the
-- deletion itself is recorded as a platform event.
CREATE FUNCTION levqor.purge_audit_before(cutoff timestamptz) RETURNS bigint
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

-- Whether one of levqor's workers seals this database's audit log (it is
-- listed in levqor.audit_database, and levqor is preloaded). Without one,
-- entries stay unsealed until someone runs seal_audit(), and verify_audit
-- has nothing to check: it answers ok with checked = 0.
CREATE FUNCTION levqor._sealing_worker_here() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT levqor.preloaded()
           AND current_database() = ANY (regexp_split_to_array(btrim(coalesce(current_setting('levqor.audit_database', true), '')), '\s*,\s*'))
$fn$;

-- A NOTICE from enable_audit; a WARNING from CREATE EXTENSION, which shows
-- its scripts' messages only from WARNING up.
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

-- Statement-level triggers over transition tables (one set-based insert per
-- statement); updates are paired by primary key, so a table without one has
-- its updates audited row by row. TRUNCATE is recorded as one entry.
CREATE FUNCTION levqor.enable_audit(tbl regclass) RETURNS void
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

-- Switching auditing off is for levqor_admin, and recorded: a table owner
-- cannot drop or disable the audit triggers (the DDL guards refuse).
CREATE FUNCTION levqor.disable_audit(tbl regclass) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    INSERT INTO levqor._disabling (tbl) VALUES (tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS levqor_audit_truncate ON %s', tbl);
    DELETE FROM levqor._disabling d WHERE d.tbl = $1;
    PERFORM levqor._log_event(NULL, 'audit_disabled', jsonb_build_object('table', tbl::text));
END
$fn$;

CREATE POLICY audit_admin_read ON levqor.audit_log FOR SELECT TO levqor_admin USING (true);
CREATE POLICY audit_chain_admin_read ON levqor.audit_chain FOR SELECT TO levqor_admin USING (true);

-- levqor's own events (lifecycle, keys, plans) go into the chained log too.
CREATE OR REPLACE FUNCTION levqor._log_event(tenant uuid, event text, detail jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    INSERT INTO levqor.tenant_events (tenant_id, event, detail) VALUES (tenant, event, detail);
    INSERT INTO levqor.audit_log (tenant_id, db_role, kind, event, detail)
    VALUES (tenant, session_user, 'event', event, detail);
$fn$;
