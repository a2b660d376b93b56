#!/usr/bin/env python3
"""Assemble sql/levqor--0.1.0--0.2.0.sql from the reviewed sources.

A one-release tool, kept so the script can be rebuilt (and reviewed) when
0.2.0 changes before it ships: the changed 0.1.0 functions become CREATE OR
REPLACE, new SQL files are included whole, new library functions come from
`cargo pgrx schema`. tests/e2e/tests/upgrade.rs proves the result complete.

usage: scripts/upgrade-script.py OLD_INSTALL.sql NEW_INSTALL.sql
(both from `cargo pgrx schema`; OLD is sql/archive/levqor--0.1.0.sql)
"""
import re
import sys

old = open(sys.argv[1]).read()
new = open(sys.argv[2]).read()


def blocks(s):
    return {m.group(1): m.group(0)
            for m in re.finditer(r'CREATE (?:FUNCTION|PROCEDURE) (levqor\.[a-z_]+)\((.*?)\$fn\$;', s, re.S)}


def library_function(symbol):
    m = re.search(r'-- src/[a-z_]+\.rs:\d+\n-- levqor::[a-z_:]+\nCREATE\s+FUNCTION [^\n]*\n(?:(?!CREATE).)*?'
                  r"AS 'MODULE_PATHNAME', '" + symbol + "';", new, re.S)
    assert m, symbol
    return m.group(0)


a, b = blocks(old), blocks(new)
changed = sorted(k for k in a if k in b and a[k] != b[k] and k != 'levqor.create_tenant')
out = ["""-- levqor 0.1.0 -> 0.2.0 (assembled by scripts/upgrade-script.py)
--
-- 0.2.0 adds the tenant lifecycle, the isolation report, schema-per-tenant
-- isolation with fleet migrations, adoption of legacy databases, the
-- tamper-evident audit log and tenant export. Run by ALTER EXTENSION levqor
-- UPDATE; tests/e2e/tests/upgrade.rs checks that the result is the same
-- catalog as a fresh 0.2.0 install, with data kept. Install the 0.2.0
-- library first (and restart, with levqor preloaded).

-- 1. Catalog: lifecycle and schema columns on tenants, the template schema,
--    the migration ledger.
ALTER TABLE levqor.tenants
    ADD COLUMN schema_name       name CONSTRAINT tenants_schema_name_key UNIQUE,
    ADD COLUMN suspension_mode   text CONSTRAINT tenants_suspension_mode_check CHECK (suspension_mode IN ('read_only', 'blocked')),
    ADD COLUMN suspension_reason text,
    ADD COLUMN trial_ends_at     timestamptz,
    ADD COLUMN offboarded_at     timestamptz,
    ADD COLUMN purge_after       timestamptz;
-- A tenant suspended under 0.1.0 had no mode: it stays blocked (fail closed).
"""]
cat = open('sql/catalog.sql').read()
m = re.search(r'CREATE SCHEMA IF NOT EXISTS levqor_template;.*?PRIMARY KEY \(name, schema_name\)\n\);', cat, re.S)
out.append(m.group(0) + "\nSELECT pg_catalog.pg_extension_config_dump('levqor.migrations', '');\n")
out.append("\n-- 2. Changed functions.\n")
for f in changed:
    out.append(b[f].replace('CREATE FUNCTION', 'CREATE OR REPLACE FUNCTION', 1) + "\n")
out.append("-- create_tenant gained trial_ends_at: a new signature.\n"
           "DROP FUNCTION levqor.create_tenant(text, text, text, text, text, text);\n" + b['levqor.create_tenant'] + "\n")
out.append("\n-- 3. New trigger functions in the library.\n")
out.append("\n\n".join(library_function(s) for s in ['_write_guard_wrapper', '_schema_guard_wrapper', '_audit_row_wrapper']) + "\n")
for n, (path, title) in enumerate([('sql/lifecycle.sql', 'Lifecycle'), ('sql/report.sql', 'Isolation report and view prevention'),
                                   ('sql/schemas.sql', 'Schema tenants and migrations'), ('sql/adopt.sql', 'Adopting legacy databases'),
                                   ('sql/audit.sql', 'The audit log'), ('sql/export.sql', 'Tenant export')], start=4):
    out.append(f"\n-- {n}. {title} ({path}, new in 0.2.0).\n" + open(path).read())
out.append("""
-- 10. Existing protected tables get the write guard that 0.2.0 adds to the
--     protection (enable_tenancy creates it for new ones).
DO $upgrade$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT p.tbl::regclass FROM levqor._protected() p LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = t AND g.tgname = 'levqor_write_guard') THEN
            EXECUTE pg_catalog.format('CREATE TRIGGER levqor_write_guard BEFORE INSERT OR UPDATE OR DELETE ON %s
                                       FOR EACH STATEMENT EXECUTE FUNCTION levqor._write_guard()', t);
        END IF;
    END LOOP;
END
$upgrade$;
""")
g = open('sql/grants.sql').read()
out.append("\n-- 11. Privileges, as in a fresh 0.2.0 install (sql/grants.sql).\n"
           + g[g.index("REVOKE ALL ON ALL TABLES IN SCHEMA levqor FROM PUBLIC;"):g.index("DO $preload$")]
           + g[g.index("-- The policy helpers take no arguments"):])
open('sql/levqor--0.1.0--0.2.0.sql', 'w').write("".join(out))
print("changed functions:", ", ".join(changed))
