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
-- view, threshold events, the billing ledger), the organisation hierarchy, members and the policy engine. Run by ALTER EXTENSION
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
audit = open('sql/audit.sql').read()
immutable = audit[audit.index("CREATE TRIGGER levqor_audit_immutable BEFORE UPDATE"):audit.index("CREATE TRIGGER levqor_audit_no_truncate")]
out.append("""
-- 2b. The audit log's immutability check moved into the trigger's WHEN clause
--     (sealing no longer calls a function per entry). The drop guard allows
--     it while the table is marked as being changed by levqor itself.
INSERT INTO levqor._disabling (tbl) VALUES ('levqor.audit_log'::regclass);
DROP TRIGGER levqor_audit_immutable ON levqor.audit_log;
""" + immutable + "DELETE FROM levqor._disabling WHERE tbl = 'levqor.audit_log'::regclass;\n")
out.append("\n-- 3. New functions in the library.\n")
out.append("\n\n".join(added_lib) + "\n")
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
