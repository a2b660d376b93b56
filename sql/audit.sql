-- The audit log: every change to an audited table and every levqor event,
-- per tenant, in a SHA-256 hash chain.
--
-- Writers (the Rust trigger levqor._audit_row, and levqor._log_event) only
-- append *unchained* entries, so no writer waits for another's transaction.
-- levqor.seal_audit() links committed entries into their tenant's chain, one
-- sealer at a time, in id order of what has committed: entry N of a chain
-- stores hash_N = sha256(hash_{N-1} || canonical(entry N)).

CREATE TABLE levqor.audit_log (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        uuid,                      -- NULL: platform-level entries
    at               timestamptz NOT NULL DEFAULT statement_timestamp(),
    xid              xid8 NOT NULL DEFAULT pg_current_xact_id(),
    db_role          name NOT NULL DEFAULT current_user,
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
    detail           jsonb,
    -- the chain, set by seal_audit()
    seq              bigint,
    prev_hash        bytea,
    hash             bytea,
    sealed_at        timestamptz
);
CREATE UNIQUE INDEX audit_log_chain_idx ON levqor.audit_log
    ((coalesce(tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)), seq) WHERE seq IS NOT NULL;
CREATE INDEX audit_log_unsealed_idx ON levqor.audit_log (id) WHERE seq IS NULL;
CREATE INDEX audit_log_tenant_idx ON levqor.audit_log (tenant_id, id);

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
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('levqor.audit_heads', '');

-- Tenants read their own trail, as auditor, admin or owner. Nobody else
-- reads, and nobody at all writes through SQL (see the guards below).
ALTER TABLE levqor.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE levqor.audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_read ON levqor.audit_log FOR SELECT TO PUBLIC
    USING (tenant_id = levqor.current_tenant() AND levqor.current_member_role() IN ('auditor', 'admin', 'owner'));

-- The canonical serialization an entry's hash covers: a JSON array in a fixed
-- order (jsonb text output is deterministic), including its chain position.
CREATE FUNCTION levqor._audit_canonical(e levqor.audit_log, chain_seq bigint) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT convert_to(jsonb_build_array(
        e.id, e.tenant_id, to_char(e.at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), e.xid::text,
        e.db_role, e.user_id, e.member_role, e.application_name, host(e.client_addr), e.kind,
        e.table_name, e.operation, e.pk, e.old_row, e.new_row, to_jsonb(e.changed), e.event, e.detail,
        chain_seq)::text, 'UTF8')
$fn$;

CREATE FUNCTION levqor.seal_audit(max_entries int DEFAULT 10000) RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    ids    bigint[];
    chains uuid[];
    seqs   bigint[];
    heads  bytea[];
    canon  bytea[];
    hashes bytea[];
BEGIN
    -- One sealer at a time; a second one has nothing to do.
    IF NOT pg_try_advisory_xact_lock(hashtext('levqor.seal_audit')) THEN
        RETURN 0;
    END IF;
    SET LOCAL levqor_audit.sealing = 'on';
    -- The oldest unsealed entries, numbered after their chain's head, in
    -- chain order; the chain's hashes come from levqor._chain_hashes.
    WITH batch AS (
        SELECT a.id, coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) AS chain
          FROM levqor.audit_log a WHERE a.seq IS NULL ORDER BY a.id LIMIT max_entries
    ), numbered AS (
        SELECT b.id, b.chain, coalesce(hd.seq, 0) + row_number() OVER (PARTITION BY b.chain ORDER BY b.id) AS nseq,
               coalesce(hd.hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea) AS head
          FROM batch b LEFT JOIN levqor.audit_heads hd ON hd.chain = b.chain
    )
    SELECT array_agg(n.id ORDER BY n.chain, n.nseq), array_agg(n.chain ORDER BY n.chain, n.nseq),
           array_agg(n.nseq ORDER BY n.chain, n.nseq), array_agg(n.head ORDER BY n.chain, n.nseq),
           array_agg(levqor._audit_canonical(a, n.nseq) ORDER BY n.chain, n.nseq)
      INTO ids, chains, seqs, heads, canon
      FROM numbered n JOIN levqor.audit_log a ON a.id = n.id;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    hashes := levqor._chain_hashes(chains, heads, canon);
    UPDATE levqor.audit_log a
       SET seq = u.seq, hash = u.hash, sealed_at = clock_timestamp(),
           prev_hash = coalesce(u.prev, u.head)
      FROM (SELECT x.*, lag(x.hash) OVER (PARTITION BY x.chain ORDER BY x.seq) AS prev
              FROM unnest(ids, chains, seqs, heads, hashes) AS x(id, chain, seq, head, hash)) u
     WHERE a.id = u.id;
    INSERT INTO levqor.audit_heads AS hd (chain, seq, hash)
    SELECT DISTINCT ON (x.chain) x.chain, x.seq, x.hash
      FROM unnest(chains, seqs, hashes) AS x(chain, seq, hash)
     ORDER BY x.chain, x.seq DESC
    ON CONFLICT (chain) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, updated_at = now();
    RETURN cardinality(ids);
END
$fn$;

CREATE FUNCTION levqor.verify_audit(tenant text DEFAULT NULL)
RETURNS TABLE (ok boolean, checked bigint, first_bad_id bigint, reason text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    ch    uuid := CASE WHEN tenant IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid
                       ELSE levqor._tenant_id(tenant) END;
    e     levqor.audit_log;
    prev  bytea;
    n     bigint;
    head  record;
BEGIN
    checked := 0;
    SELECT hd.seq, hd.hash, hd.floor_seq, hd.floor_hash INTO head FROM levqor.audit_heads hd WHERE hd.chain = ch;
    n := coalesce(head.floor_seq, 0);
    prev := coalesce(head.floor_hash, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea);
    FOR e IN SELECT * FROM levqor.audit_log a
              WHERE coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000') = ch AND a.seq IS NOT NULL
              ORDER BY a.seq LOOP
        n := n + 1;
        IF e.seq <> n THEN
            RETURN QUERY SELECT false, checked, e.id, format('entry %s of the chain is missing (found %s next)', n, e.seq);
            RETURN;
        END IF;
        IF e.prev_hash IS DISTINCT FROM prev THEN
            RETURN QUERY SELECT false, checked, e.id, format('entry %s does not link to the entry before it', n);
            RETURN;
        END IF;
        IF e.hash IS DISTINCT FROM sha256(prev || levqor._audit_canonical(e, e.seq)) THEN
            RETURN QUERY SELECT false, checked, e.id, format('entry %s was changed after it was sealed', n);
            RETURN;
        END IF;
        prev := e.hash;
        checked := checked + 1;
    END LOOP;
    IF coalesce(head.seq, 0) <> n OR (n > 0 AND head.hash IS DISTINCT FROM prev) THEN
        RETURN QUERY SELECT false, checked, NULL::bigint,
            format('the chain ends at entry %s but its recorded head is entry %s: entries were removed from its end', n, coalesce(head.seq, 0));
        RETURN;
    END IF;
    RETURN QUERY SELECT true, checked, NULL::bigint, NULL::text;
END
$fn$;

-- The latest chain hash, for an outside party to anchor.
CREATE FUNCTION levqor.audit_head(tenant text DEFAULT NULL)
RETURNS TABLE (seq bigint, hash text, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT hd.seq, encode(hd.hash, 'hex'), hd.updated_at FROM levqor.audit_heads hd
     WHERE hd.chain = CASE WHEN $1 IS NULL THEN '00000000-0000-0000-0000-000000000000'::uuid ELSE levqor._tenant_id($1) END
$fn$;

-- Nobody edits or deletes entries through SQL: the only change allowed is
-- sealing (filling the chain columns once), and deletion only through
-- levqor.purge_audit_before() (retention), both marked with a local setting
-- that only levqor's definer functions set.
-- Nothing changes an entry, except the sealer adding its chain fields once
-- (checked in the trigger's WHEN clause, in C, so sealing fires no function
-- per entry) and retention deleting a sealed prefix.
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
    FOR EACH ROW
    WHEN (NOT (current_setting('levqor_audit.sealing', true) IS NOT DISTINCT FROM 'on'
               AND OLD.seq IS NULL AND NEW.seq IS NOT NULL
               AND (OLD.id, OLD.tenant_id, OLD.at, OLD.kind, OLD.table_name, OLD.operation, OLD.pk, OLD.old_row,
                    OLD.new_row, OLD.event, OLD.detail, OLD.xid::text, OLD.db_role, OLD.user_id, OLD.member_role,
                    OLD.application_name, OLD.client_addr, OLD.changed)
                   IS NOT DISTINCT FROM
                   (NEW.id, NEW.tenant_id, NEW.at, NEW.kind, NEW.table_name, NEW.operation, NEW.pk, NEW.old_row,
                    NEW.new_row, NEW.event, NEW.detail, NEW.xid::text, NEW.db_role, NEW.user_id, NEW.member_role,
                    NEW.application_name, NEW.client_addr, NEW.changed)))
    EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_delete BEFORE DELETE ON levqor.audit_log
    FOR EACH ROW EXECUTE FUNCTION levqor._audit_immutable();
CREATE TRIGGER levqor_audit_no_truncate BEFORE TRUNCATE ON levqor.audit_log
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
    -- Per chain, only a prefix can go (entries sealed before the cutoff, up to
    -- the first one that is not): the floor records where the chain now starts.
    WITH doomed AS (
        SELECT coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid) AS chain, a.seq, a.hash, a.id
          FROM levqor.audit_log a
         WHERE a.seq IS NOT NULL
           AND a.seq < coalesce((SELECT min(b.seq) FROM levqor.audit_log b
                                  WHERE coalesce(b.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                                        = coalesce(a.tenant_id, '00000000-0000-0000-0000-000000000000'::uuid)
                                    AND b.seq IS NOT NULL AND b.at >= cutoff), 9223372036854775807)
    ), floors AS (
        SELECT DISTINCT ON (d.chain) d.chain, d.seq, d.hash FROM doomed d ORDER BY d.chain, d.seq DESC
    ), moved AS (
        UPDATE levqor.audit_heads hd SET floor_seq = f.seq, floor_hash = f.hash
          FROM floors f WHERE hd.chain = f.chain
    )
    DELETE FROM levqor.audit_log a USING doomed d WHERE a.id = d.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM levqor._log_event(NULL, 'audit_retention', jsonb_build_object('before', cutoff, 'deleted', n));
    RETURN n;
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

-- levqor's own events (lifecycle, keys, plans) go into the chained log too.
CREATE OR REPLACE FUNCTION levqor._log_event(tenant uuid, event text, detail jsonb DEFAULT '{}')
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    INSERT INTO levqor.tenant_events (tenant_id, event, detail) VALUES (tenant, event, detail);
    INSERT INTO levqor.audit_log (tenant_id, db_role, kind, event, detail)
    VALUES (tenant, session_user, 'event', event, detail);
$fn$;
