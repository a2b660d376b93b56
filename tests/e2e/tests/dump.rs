//! pg_dump keeps levqor's catalog, and a restored database is protected and
//! guarded: keys still work, tenants are still isolated, the owner still
//! cannot undo the protection.

use std::process::Command;

use levqor_e2e::*;

fn bin(name: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{name}")
}

#[test]
fn a_dumped_and_restored_database_keeps_tenants_keys_and_protection() {
    let src = unique("dump_src");
    let dst = unique("dump_dst");
    let mut su = connect_to(port(), "postgres", "postgres");
    let _ = db(); // cluster-wide roles
    su.batch_execute(&format!("CREATE DATABASE {src}")).unwrap();
    su.batch_execute(&format!("CREATE DATABASE {dst}")).unwrap();

    let mut s = connect_to(port(), "postgres", &src);
    s.batch_execute(&format!(
        "CREATE EXTENSION levqor;
         INSERT INTO levqor.plans (name, limits) VALUES ('custom', '{{\"users\": 7}}');
         CREATE TABLE docs (id bigserial PRIMARY KEY, body text NOT NULL);
         SELECT levqor.enable_tenancy('docs');
         GRANT SELECT, INSERT ON docs TO {APP}; GRANT USAGE ON SEQUENCE docs_id_seq TO {APP};"
    ))
    .unwrap();
    let a = create_tenant_on(&mut s, "dump-a");
    let b = create_tenant_on(&mut s, "dump-b");
    // A hierarchy whose rows are out of order on disk: o1 moved after o2,
    // its child, was created, so the restore inserts the child first.
    s.batch_execute(
        "SELECT levqor.create_platform('dump-p', 'P');
         SELECT levqor.create_tenant('dump-t1', 'T1', parent => 'dump-p');
         SELECT levqor.create_tenant('dump-t2', 'T2', parent => 'dump-p');
         SELECT levqor.create_tenant('dump-o1', 'O1', parent => 'dump-t1');
         SELECT levqor.create_tenant('dump-o2', 'O2', parent => 'dump-o1');
         SELECT levqor.move_tenant('dump-o1', 'dump-t2');
         SELECT levqor.add_member('dump-o1', gen_random_uuid(), 'owner');",
    )
    .unwrap();
    let mut c = connect_to(port(), APP, &src);
    insert_rows(&mut c, &a, "docs", &["a-doc"]);
    insert_rows(&mut c, &b, "docs", &["b-doc"]);
    drop(c);

    let file = std::env::temp_dir().join(format!("{src}.dump"));
    let port = port().to_string();
    let dump = Command::new(bin("pg_dump"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-Fc", "-f"])
        .arg(&file)
        .arg(&src)
        .output()
        .unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let restore = Command::new(bin("pg_restore"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "--exit-on-error", "-d", &dst])
        .arg(&file)
        .output()
        .unwrap();
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));
    let _ = std::fs::remove_file(&file);

    let mut d = connect_to(port.parse().unwrap(), "postgres", &dst);
    let custom: i64 = d.query_one("SELECT count(*) FROM levqor.plans WHERE name = 'custom'", &[]).unwrap().get(0);
    let builtin: i64 = d.query_one("SELECT count(*) FROM levqor.plans WHERE builtin", &[]).unwrap().get(0);
    assert_eq!((custom, builtin), (1, 4), "custom plans dumped once, built-in ones not duplicated");
    let path: Vec<String> = d
        .query(
            "SELECT slug FROM levqor.ancestors((SELECT id FROM levqor.tenants WHERE slug = 'dump-o2'))",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(path, ["dump-o1", "dump-t2", "dump-p"], "the hierarchy is rebuilt on restore");
    let links: i64 = d.query_one("SELECT count(*) FROM levqor.tenant_tree", &[]).unwrap().get(0);
    let src_links: i64 = s.query_one("SELECT count(*) FROM levqor.tenant_tree", &[]).unwrap().get(0);
    assert_eq!(links, src_links);
    let members: i64 = d.query_one("SELECT count(*) FROM levqor.members", &[]).unwrap().get(0);
    assert_eq!(members, 1);
    let tables: i64 = d.query_one("SELECT count(*) FROM levqor.protected_tables", &[]).unwrap().get(0);
    assert_eq!(tables, 1);

    let mut c = connect_to(port.parse().unwrap(), APP, &dst);
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, "docs")), ["a-doc"]);
    assert_eq!(as_tenant(&mut c, &b, |tx| bodies(tx, "docs")), ["b-doc"]);
    assert_eq!(bodies(&mut c, "docs"), Vec::<String>::new());
    assert_eq!(sqlstate(d.batch_execute("ALTER TABLE docs NO FORCE ROW LEVEL SECURITY")), "42501");
    assert_eq!(sqlstate(d.batch_execute("DROP POLICY levqor_tenant_select ON docs")), "42501");
    // The event log carried over and keeps counting.
    let n: i64 = d.query_one("SELECT count(*) FROM levqor.tenant_events", &[]).unwrap().get(0);
    assert!(n >= 2);
    d.batch_execute("SELECT * FROM levqor.create_tenant('dump-c', 'C')").unwrap();
}

// ---------------------------------------------------------------------------
// Regression (issue 21): pg_restore re-creates a table's policies before it
// re-enables its row level security when the table's name sorts after
// "levqor_"; the DDL guard refused the restrictive policies and let the
// permissive one through, so `notes`, `users`, `orders` came back open to
// every session. Every restore mode, tables on both sides of "levqor_".

/// Tables on both sides of "levqor_" (accounts < levqor_ < projects, users),
/// a scoped one, an audited and row-limited one, a schema tenant whose table
/// (notes) sorts after "levqor_" too; two shared tenants with rows.
struct Source {
    db: String,
    a: Tenant,
    b: Tenant,
    s: Tenant,
}

const TABLES: [&str; 3] = ["accounts", "users", "projects"];

fn source(prefix: &str) -> Source {
    let db = unique(prefix);
    let _ = levqor_e2e::db(); // cluster-wide roles
    connect_to(port(), "postgres", "postgres").batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let mut s = connect_to(port(), "postgres", &db);
    s.batch_execute(&format!(
        "CREATE EXTENSION levqor;
         CREATE TABLE accounts (id bigserial PRIMARY KEY, body text NOT NULL);
         CREATE TABLE users (id bigserial PRIMARY KEY, body text NOT NULL);
         CREATE TABLE projects (id bigserial PRIMARY KEY, body text NOT NULL);
         SELECT levqor.enable_tenancy('accounts');
         SELECT levqor.enable_tenancy('users');
         SELECT levqor.enable_tenancy('projects', 'tenant_id', 'sharing_scope');
         SELECT levqor.enable_audit('users');
         SELECT levqor.limit_rows('users', 'users');
         GRANT SELECT, INSERT, UPDATE, DELETE ON accounts, users, projects TO {APP};
         GRANT USAGE ON SEQUENCE accounts_id_seq, users_id_seq, projects_id_seq TO {APP};
         GRANT USAGE ON SCHEMA levqor_template TO {APP};
         CREATE TABLE levqor_template.notes (id serial PRIMARY KEY, body text NOT NULL);
         GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA levqor_template TO {APP};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA levqor_template TO {APP};"
    ))
    .unwrap();
    let a = create_tenant_on(&mut s, "rst-a");
    let b = create_tenant_on(&mut s, "rst-b");
    let row = s.query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, 'S', isolation => 'schema')", &[&unique("rst-s").replace('_', "-")]).unwrap();
    let slug: String = s.query_one("SELECT slug FROM levqor.tenants WHERE id = $1", &[&row.get::<_, uuid::Uuid>(0)]).unwrap().get(0);
    let st = Tenant { id: row.get(0), slug, key: row.get(1) };
    let mut c = connect_to(port(), APP, &db);
    for t in [&a, &b] {
        for table in TABLES {
            insert_rows(&mut c, t, table, &[&format!("{}-{table}", t.slug)]);
        }
    }
    insert_rows(&mut c, &st, "notes", &["s-note"]);
    s.batch_execute("SELECT levqor.seal_audit()").unwrap();
    Source { db, a, b, s: st }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn pg(name: &str) -> Command {
    let mut c = Command::new(bin(name));
    c.args(["-h", "127.0.0.1", "-p", &port().to_string(), "-U", "postgres"]);
    c
}

/// Dump `src` in `format` (c or p) to a file, with `extra` pg_dump flags.
fn dump(src: &str, format: &str, extra: &[&str]) -> std::path::PathBuf {
    let file = std::env::temp_dir().join(format!("{}.{format}", unique(src)));
    let (ok, err) = run(pg("pg_dump").args(["-F", format, "-f"]).arg(&file).args(extra).arg(src));
    assert!(ok, "pg_dump: {err}");
    file
}

fn psql_file(db: &str, file: &std::path::Path) -> (bool, String) {
    run(pg("psql").args(["-X", "-q", "-d", db, "-f"]).arg(file))
}

fn empty_db(prefix: &str) -> String {
    let name = unique(prefix);
    connect_to(port(), "postgres", "postgres").batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    name
}

/// The restored database, attacked as the application role.
fn assert_protected(src: &Source, dst: &str, how: &str) {
    let mut d = connect_to(port(), "postgres", dst);
    for table in TABLES {
        let problems: Vec<String> = d
            .query("SELECT x FROM levqor._tenancy_problems($1::text::regclass, true) x", &[&table])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(problems.is_empty(), "{how}: {table} restored incomplete: {problems:?}");
    }
    let high: Vec<String> = d
        .query("SELECT kind || ' ' || object FROM levqor.isolation_report() WHERE severity = 'high'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(high.is_empty(), "{how}: high findings after the restore: {high:?}");

    let mut c = connect_to(port(), APP, dst);
    for table in TABLES.iter().chain(&["notes"]) {
        if *table == "notes" {
            let qualified = format!("tenant_{}.notes", src.s.slug.replace('-', "_"));
            assert_eq!(bodies(&mut c, &qualified), Vec::<String>::new(), "{how}: {qualified} without a context");
            continue;
        }
        assert_eq!(bodies(&mut c, table), Vec::<String>::new(), "{how}: {table} without a context");
        for t in [&src.a, &src.b] {
            assert_eq!(
                as_tenant(&mut c, t, |tx| bodies(tx, table)),
                vec![format!("{}-{table}", t.slug)],
                "{how}: {table} as {}",
                t.slug
            );
        }
        // Writing for the other tenant is still refused.
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&src.a.key]).unwrap();
        let r = tx.execute(&format!("INSERT INTO {table} (body, tenant_id) VALUES ('x', $1)"), &[&src.b.id]);
        assert_eq!(sqlstate(r), "42501", "{how}: {table}");
    }
    assert_eq!(as_tenant(&mut c, &src.s, |tx| bodies(tx, "notes")), ["s-note"], "{how}: the schema tenant");
    // The guard is in force; keys, quotas and the audit chain work.
    assert_eq!(sqlstate(d.batch_execute("ALTER TABLE users NO FORCE ROW LEVEL SECURITY")), "42501", "{how}");
    as_tenant(&mut c, &src.a, |tx| tx.execute("SELECT levqor.consume('api_calls_per_15min')", &[]).unwrap());
    let ok: bool = d.query_one("SELECT ok FROM levqor.verify_audit($1)", &[&src.a.slug]).unwrap().get(0);
    assert!(ok, "{how}: the audit chain verifies");
}

#[test]
fn pg_restore_with_default_flags_keeps_every_table_protected() {
    let src = source("rst_default");
    let file = dump(&src.db, "c", &[]);
    let dst = empty_db("rst_default_dst");
    let (ok, err) = run(pg("pg_restore").args(["-d", &dst]).arg(&file));
    assert!(ok && !err.contains("error"), "pg_restore reported errors: {err}");
    assert_protected(&src, &dst, "pg_restore");
}

#[test]
fn pg_restore_exit_on_error_single_transaction_and_parallel_keep_every_table_protected() {
    let src = source("rst_modes");
    let file = dump(&src.db, "c", &[]);
    for flags in [&["--exit-on-error"][..], &["--single-transaction"][..], &["-j", "2"][..]] {
        let dst = empty_db("rst_modes_dst");
        let (ok, err) = run(pg("pg_restore").args(flags).args(["-d", &dst]).arg(&file));
        assert!(ok && !err.contains("error"), "pg_restore {flags:?}: {err}");
        assert_protected(&src, &dst, &format!("pg_restore {flags:?}"));
    }
}

#[test]
fn plain_dump_through_psql_keeps_every_table_protected() {
    let src = source("rst_plain");
    let file = dump(&src.db, "p", &[]);
    let dst = empty_db("rst_plain_dst");
    let (ok, err) = psql_file(&dst, &file);
    assert!(ok && !err.contains("ERROR"), "psql: {err}");
    assert_protected(&src, &dst, "pg_dump | psql");
}

#[test]
fn schema_only_then_data_only_keeps_every_table_protected() {
    let src = source("rst_split");
    let schema = dump(&src.db, "p", &["--schema-only"]);
    let data = dump(&src.db, "p", &["--data-only"]);
    let dst = empty_db("rst_split_dst");
    let (ok, err) = psql_file(&dst, &schema);
    assert!(ok && !err.contains("ERROR"), "schema: {err}");
    // Between the two: protected, and no rows anywhere yet.
    let mut c = connect_to(port(), APP, &dst);
    for table in TABLES {
        assert_eq!(bodies(&mut c, table), Vec::<String>::new());
    }
    let (ok, err) = psql_file(&dst, &data);
    assert!(ok && !err.contains("ERROR"), "data: {err}");
    assert_protected(&src, &dst, "--schema-only, then --data-only");
}
