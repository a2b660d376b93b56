-- Identical tables: no audit, the classic PL/pgSQL audit trigger
-- (to_jsonb(OLD), to_jsonb(NEW) into a log table, as supa_audit and the
-- audit-trigger recipes do), the same trigger with its log indexed by tenant
-- as levqor's is (plpgsql_ix: one more column and index, nothing else), the
-- same trigger with its log indexed as the classic audit-trigger's
-- logged_actions is (classic: by table, statement time and action), and
-- levqor's audit. (pgaudit runs against a copy in a second database, see
-- run.sh.)
\set QUIET on
\set ON_ERROR_STOP on
CREATE EXTENSION IF NOT EXISTS levqor;
CREATE TABLE t_none (id bigserial PRIMARY KEY, body text NOT NULL, n int NOT NULL DEFAULT 0);
CREATE TABLE t_plpgsql (LIKE t_none INCLUDING ALL);
CREATE TABLE t_plpgsql_ix (LIKE t_none INCLUDING ALL);
CREATE TABLE t_classic (LIKE t_none INCLUDING ALL);
CREATE TABLE t_levqor (LIKE t_none INCLUDING ALL);
ALTER TABLE t_plpgsql ALTER COLUMN id SET DEFAULT nextval('t_none_id_seq');
ALTER TABLE t_plpgsql_ix ALTER COLUMN id SET DEFAULT nextval('t_none_id_seq');
ALTER TABLE t_classic ALTER COLUMN id SET DEFAULT nextval('t_none_id_seq');
ALTER TABLE t_levqor ALTER COLUMN id SET DEFAULT nextval('t_none_id_seq');

-- The classic trigger's log: a primary key and nothing else.
CREATE TABLE plpgsql_audit_log (
    id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), db_role name NOT NULL DEFAULT current_user,
    table_name text NOT NULL, operation text NOT NULL, old_row jsonb, new_row jsonb, xid bigint DEFAULT txid_current());

-- levqor keeps its log indexed by (tenant_id, id), so that each tenant reads
-- its own trail by index. The same, for the PL/pgSQL trigger: the tenant
-- column (NULL here: these tables have no tenant, like t_levqor) and index.
CREATE TABLE plpgsql_ix_audit_log (LIKE plpgsql_audit_log INCLUDING ALL);
ALTER TABLE plpgsql_ix_audit_log ADD COLUMN tenant_id uuid;
CREATE INDEX ON plpgsql_ix_audit_log (tenant_id, id);

-- The classic audit-trigger (audit.logged_actions) keeps its log indexed by
-- table, statement time and action, so that a DBA can ask who changed this
-- table, or what changed then; supa_audit's has as many (record id, table,
-- time). The same log, with those three indexes.
CREATE TABLE classic_audit_log (LIKE plpgsql_audit_log INCLUDING ALL);
CREATE INDEX ON classic_audit_log (table_name);
CREATE INDEX ON classic_audit_log (at);
CREATE INDEX ON classic_audit_log (operation);

-- One trigger, written once: each variant gets its own copy, with static SQL
-- into its own log (as the recipes write it), so that the variants differ in
-- their logs' indexes and nothing else.
DO $do$
DECLARE
    v text;
BEGIN
    FOREACH v IN ARRAY ARRAY['plpgsql', 'plpgsql_ix', 'classic'] LOOP
        EXECUTE format($f$
            CREATE FUNCTION %I() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO %I (table_name, operation, old_row, new_row)
                VALUES (TG_TABLE_NAME, TG_OP,
                        CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
                        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END);
                RETURN NULL;
            END $$$f$, v || '_audit', v || '_audit_log');
        EXECUTE format('CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON %I
                        FOR EACH ROW EXECUTE FUNCTION %I()', 't_' || v, v || '_audit');
    END LOOP;
END
$do$;

SELECT levqor.enable_audit('t_levqor');
