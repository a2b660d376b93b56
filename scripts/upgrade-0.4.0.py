#!/usr/bin/env python3
"""Assemble sql/levqor--0.3.0--0.4.0.sql from the reviewed sources.

Rerun it whenever 0.4.0's SQL changes before it ships:

  cargo pgrx schema pg15 --pg-config /usr/lib/postgresql/15/bin/pg_config -o /tmp/new.sql
  scripts/upgrade-0.4.0.py sql/archive/levqor--0.3.0.sql /tmp/new.sql

What it writes, in this order (each step may use what the earlier made):
  1. sql/upgrade/0.4.0-before.sql: hand-written catalog changes to tables
     0.3.0 already had, and DROPs of functions whose signature changed;
  2. library functions new in 0.4.0 (from `cargo pgrx schema`);
  3. trigger functions new in the files 0.3.0 had (the new files' tables
     use them), then the SQL files new in 0.4.0, whole (NEW_FILES);
  4. SQL functions new or changed in the files 0.3.0 had (CREATE OR REPLACE),
     and DROPs of those that are gone;
  5. sql/upgrade/0.4.0-after.sql: hand-written changes to existing objects
     that need the new functions (the reshaped policies of protected tables);
  6. the catalog-change triggers new in grants.sql, and the privileges re-run
     as a fresh install sets them.
tests/e2e/tests/upgrade.rs proves the result is the catalog of a fresh install.
"""
import re
import sys

old = open(sys.argv[1]).read()
new = open(sys.argv[2]).read()

# SQL files that 0.3.0 did not have: included whole.
NEW_FILES = [f for f in open('sql/upgrade/0.4.0-new-files').read().split() if f]


def blocks(s):
    # Keyed by name and parameter list: some functions have overloads.
    out = {}
    for m in re.finditer(r'CREATE (?:OR REPLACE )?(?:FUNCTION|PROCEDURE) (levqor\.[a-z_0-9]+)\((.*?)\$fn\$;', s, re.S):
        params = re.sub(r'\s+', ' ', m.group(2).split(')')[0])
        out[f"{m.group(1)}({params})"] = m.group(0)
    return out


def library_functions(s):
    return {m.group(1): m.group(0)
            for m in re.finditer(r'-- src/[a-z_/]+\.rs:\d+\n-- levqor::[a-z_:0-9]+\nCREATE\s+FUNCTION [^\n]*\n'
                                 r"(?:(?!CREATE).)*?AS 'MODULE_PATHNAME', '([a-z_0-9]+)';", s, re.S)}


def signature(key):
    """levqor.f(a text, b int DEFAULT 1) -> levqor.f(text, int), for DROP."""
    name, params = key.split('(', 1)
    types = []
    for p in filter(None, (x.strip() for x in params.rstrip(')').split(','))):
        p = re.sub(r'\s+DEFAULT\s+.*$', '', p, flags=re.I)
        words = p.split()
        types.append(' '.join(words[1:]) if len(words) > 1 and words[0] not in ('IN', 'OUT', 'INOUT') else p)
    return f"{name}({', '.join(types)})"


new_file_text = {f: open(f).read() for f in NEW_FILES}
a, b = blocks(old), blocks(new)
in_new_files = lambda body: any(body in t for t in new_file_text.values())
changed = sorted(k for k in a if k in b and a[k] != b[k])
added = sorted(k for k in b if k not in a and not in_new_files(b[k]))
gone = sorted(k for k in a if k not in b)
old_lib, new_lib = library_functions(old), library_functions(new)
added_lib = [new_lib[k] for k in sorted(new_lib) if k not in old_lib]

out = ["""-- levqor 0.3.0 -> 0.4.0 (assembled by scripts/upgrade-0.4.0.py; edit the
-- sources it names, not this file). Run by ALTER EXTENSION levqor UPDATE;
-- tests/e2e/tests/upgrade.rs checks that the result is the same catalog as a
-- fresh 0.4.0 install, with data kept. Install the 0.4.0 library first and
-- restart PostgreSQL (levqor is preloaded).

-- 1. Catalog changes (sql/upgrade/0.4.0-before.sql).
""" + open('sql/upgrade/0.4.0-before.sql').read()]
out.append("\n-- 2. New functions in the library.\n" + "\n\n".join(added_lib) + "\n")
added_triggers = [k for k in added if re.search(r'RETURNS trigger\b', b[k])]
added = [k for k in added if k not in added_triggers]
out.append("\n-- 3. New trigger functions in the files 0.3.0 had, for the new files' tables.\n"
           + "\n".join(b[k] for k in added_triggers) + "\n")
for f in NEW_FILES:
    out.append(f"\n-- 3. {f} (new in 0.4.0).\n" + new_file_text[f])
out.append("\n-- 4. Functions new or changed in the files 0.3.0 had.\n")
for k in gone:
    out.append(f"DROP FUNCTION IF EXISTS {signature(k)};\n")
for k in added:
    out.append(b[k] + "\n")
for k in changed:
    out.append(re.sub(r'^CREATE (?:OR REPLACE )?FUNCTION', 'CREATE OR REPLACE FUNCTION', b[k], count=1) + "\n")
out.append("\n-- 5. Existing objects reshaped (sql/upgrade/0.4.0-after.sql).\n" + open('sql/upgrade/0.4.0-after.sql').read())
g = open('sql/grants.sql').read()
triggers = [t for t in re.findall(r'CREATE TRIGGER levqor_catalog_changed [^;]*;', g) if t not in old]
out.append("\n-- 6. New catalog tables reach every backend's cache; privileges as in a fresh install.\n"
           + "\n".join(triggers) + "\n"
           + g[g.index("REVOKE ALL ON ALL TABLES IN SCHEMA levqor FROM PUBLIC;"):g.index("DO $preload$")]
           + g[g.index("-- The policy helpers take no arguments"):])
open('sql/levqor--0.3.0--0.4.0.sql', 'w').write("".join(out))
print("changed functions:", ", ".join(changed) or "-")
print("new functions in existing files:", ", ".join(added_triggers + added) or "-")
print("dropped functions:", ", ".join(gone) or "-")
print("new library functions:", ", ".join(k for k in sorted(new_lib) if k not in old_lib) or "-")
