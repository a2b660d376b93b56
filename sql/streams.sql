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
