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
