#!/usr/bin/env python3
"""Assemble sql/levqor--0.2.0--0.3.0.sql from the reviewed sources.

Like scripts/upgrade-script.py for 0.1.0 -> 0.2.0: changed SQL functions
become CREATE OR REPLACE, new library functions come from `cargo pgrx schema`,
sql/quota.sql (new in 0.3.0) is included whole, and the grants are re-run.
tests/e2e/tests/upgrade.rs proves the result is the catalog of a fresh install.
Rerun it whenever 0.3.0's SQL changes before it ships:

  cargo pgrx schema pg15 --pg-config /usr/lib/postgresql/15/bin/pg_config -o /tmp/new.sql
  scripts/upgrade-0.3.0.py sql/archive/levqor--0.2.0.sql /tmp/new.sql
"""
import re
import sys

old = open(sys.argv[1]).read()
new = open(sys.argv[2]).read()


def blocks(s):
    # Keyed by name and parameter list: enable_tenancy has two overloads.
    out = {}
    for m in re.finditer(r'CREATE (?:FUNCTION|PROCEDURE) (levqor\.[a-z_]+)\((.*?)\$fn\$;', s, re.S):
        params = re.sub(r'\s+', ' ', m.group(2).split(')')[0])
        out[f"{m.group(1)}({params})"] = m.group(0)
    return out


def library_functions(s):
    return {m.group(1): m.group(0)
            for m in re.finditer(r'-- src/[a-z_]+\.rs:\d+\n-- levqor::[a-z_:]+\nCREATE\s+FUNCTION [^\n]*\n'
                                 r"(?:(?!CREATE).)*?AS 'MODULE_PATHNAME', '([a-z_]+)';", s, re.S)}


quota = open('sql/quota.sql').read()
hierarchy = open('sql/hierarchy.sql').read()
members = open('sql/members.sql').read()
policy = open('sql/policy.sql').read()
a, b = blocks(old), blocks(new)
changed = sorted(k for k in a if k in b and a[k] != b[k])
# New functions in files that 0.2.0 already had (the new files come whole).
new_sql = sorted(k for k in b if k not in a and not any(b[k] in f for f in (quota, hierarchy, members, policy)))
old_lib, new_lib = library_functions(old), library_functions(new)
added_lib = [new_lib[k] for k in sorted(new_lib) if k not in old_lib]

out = ["""-- levqor 0.2.0 -> 0.3.0 (assembled by scripts/upgrade-0.3.0.py)
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
"""]
out.append("\n-- 1b. New functions beside existing ones.\n")
for f in new_sql:
    out.append(b[f] + "\n")
out.append("\n-- 3. New functions in the library.\n")
out.append("\n\n".join(added_lib) + "\n")
audit = open('sql/audit.sql').read()


def between(text, start, end):
    return text[text.index(start):text.index(end)]


out.append("""
-- 3b. The audit chain moves beside the entries (levqor.audit_chain, runs of
--     positions written once per sealing batch) and entries are never updated again; entry ids
--     come from levqor._audit_id() (the writer's transaction id first), over
--     a sequence that continues where the identity stopped.
""" + between(audit, "-- The chains: position seq", "-- The head of each chain")
    + between(audit, "-- Where the sealer starts looking.", "SELECT pg_catalog.pg_extension_config_dump('levqor.audit_log', '');")
    + """-- Sealed positions, into runs: consecutive positions with ascending ids,
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
""" + between(audit, "ALTER TABLE levqor.audit_chain ENABLE ROW LEVEL SECURITY;", "-- The canonical serialization")
    + between(audit, "CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE ON levqor.audit_log",
              "CREATE TRIGGER levqor_audit_no_truncate BEFORE TRUNCATE ON levqor.audit_log")
    + between(audit, "CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE ON levqor.audit_chain", "-- Retention (superusers)")
    + "CREATE POLICY audit_chain_admin_read ON levqor.audit_chain FOR SELECT TO levqor_admin USING (true);\n")
out.append("\n-- 4. Quotas (sql/quota.sql, new in 0.3.0).\n" + quota)
out.append("\n-- 4b. The hierarchy (sql/hierarchy.sql, new in 0.3.0).\n" + hierarchy)
out.append("\n-- 4c. Members (sql/members.sql, new in 0.3.0).\n" + members)
out.append("\n-- 4d. The policy engine (sql/policy.sql, new in 0.3.0).\n" + policy)
# After the new tables: a replaced event trigger function (the drop guard)
# may already read them while the rest of the update runs.
out.append("\n-- 4e. Changed functions.\n")
for f in changed:
    out.append(b[f].replace('CREATE FUNCTION', 'CREATE OR REPLACE FUNCTION', 1) + "\n")
g = open('sql/grants.sql').read()
triggers = g[g.index("-- ... and so do changes to what quotas are measured against."):g.index("REVOKE ALL ON ALL TABLES")]
out.append("\n-- 5. Quota catalog changes reach every backend's cache.\n" + triggers)
out.append("\n-- 6. Privileges, as in a fresh 0.3.0 install (sql/grants.sql).\n"
           + g[g.index("REVOKE ALL ON ALL TABLES IN SCHEMA levqor FROM PUBLIC;"):g.index("DO $preload$")]
           + g[g.index("-- The policy helpers take no arguments"):])
open('sql/levqor--0.2.0--0.3.0.sql', 'w').write("".join(out))
print("changed functions:", ", ".join(changed))
print("new functions in existing files:", ", ".join(new_sql))
print("new library functions:", ", ".join(k for k in sorted(new_lib) if k not in old_lib))
