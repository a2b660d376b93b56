//! A table owned by the application role itself: FORCE keeps the owner inside
//! its tenant, and levqor's guards refuse every way the owner could undo that.

use levqor_e2e::*;

fn owned_table(c: &mut Client) -> String {
    let name = unique("owned");
    c.batch_execute(&format!(
        "CREATE TABLE {name} (id bigserial PRIMARY KEY, body text NOT NULL);
         SELECT levqor.enable_tenancy('{name}');"
    ))
    .unwrap();
    name
}

#[test]
fn the_owner_sees_only_its_tenants_rows() {
    let (a, b) = (tenant("own-a"), tenant("own-b"));
    let mut c = app();
    let t = owned_table(&mut c);
    insert_rows(&mut c, &a, &t, &["a"]);
    insert_rows(&mut c, &b, &t, &["b"]);
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["a"]);
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
    // enable_tenancy again is harmless.
    c.batch_execute(&format!("SELECT levqor.enable_tenancy('{t}')")).unwrap();
    assert_eq!(as_tenant(&mut c, &b, |tx| bodies(tx, &t)), ["b"]);
}

#[test]
fn the_owner_cannot_undo_the_protection() {
    let (a, b) = (tenant("undo-a"), tenant("undo-b"));
    let mut c = app();
    let t = owned_table(&mut c);
    insert_rows(&mut c, &a, &t, &["a"]);
    insert_rows(&mut c, &b, &t, &["b-secret"]);
    for sql in [
        format!("ALTER TABLE {t} DISABLE ROW LEVEL SECURITY"),
        format!("ALTER TABLE {t} NO FORCE ROW LEVEL SECURITY"),
        format!("DROP POLICY levqor_tenant_select ON {t}"),
        format!("ALTER POLICY levqor_tenant_select ON {t} USING (true)"),
        format!("ALTER POLICY levqor_tenant_select ON {t} USING (tenant_id = levqor.current_tenant() OR true)"),
        format!("ALTER POLICY levqor_tenant_select ON {t} RENAME TO mine"),
        // Narrowed to one role, a restrictive policy no longer restricts the others.
        format!("ALTER POLICY levqor_tenant_select ON {t} TO {APP}"),
        format!("ALTER POLICY levqor_base ON {t} USING (true)"),
        format!("ALTER POLICY levqor_base ON {t} WITH CHECK (true)"),
        format!("DROP POLICY levqor_base ON {t}"),
        format!("ALTER TABLE {t} DROP COLUMN tenant_id CASCADE"),
        format!("ALTER TABLE {t} DISABLE TRIGGER levqor_no_truncate"),
        format!("ALTER TABLE {t} DISABLE TRIGGER ALL"),
        format!("ALTER TABLE {t} ENABLE REPLICA TRIGGER levqor_no_truncate"),
        format!("ALTER TABLE {t} ENABLE REPLICA TRIGGER levqor_write_guard"),
        format!("DROP TRIGGER levqor_no_truncate ON {t}"),
        format!("TRUNCATE {t}"),
        format!("SELECT levqor.disable_tenancy('{t}')"),
    ] {
        let code = sqlstate(c.batch_execute(&sql));
        assert_eq!(code, "42501", "{sql}");
    }
    // A permissive policy of the owner's own cannot widen a tenant's view:
    // levqor's policies are restrictive.
    c.batch_execute(&format!("CREATE POLICY everything ON {t} USING (true) WITH CHECK (true)")).unwrap();
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["a"]);
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
    // Superuser view: nothing was lost.
    assert_eq!(bodies(&mut superuser(), &t), ["a", "b-secret"]);
}

#[test]
fn enable_tenancy_needs_ownership_and_a_usable_column() {
    let mut c = app();
    let theirs = unique("theirs");
    superuser()
        .batch_execute(&format!("CREATE TABLE {theirs} (id int); GRANT ALL ON {theirs} TO {APP};"))
        .unwrap();
    assert_eq!(sqlstate(c.batch_execute(&format!("SELECT levqor.enable_tenancy('{theirs}')"))), "42501");
    let bad = unique("badcol");
    c.batch_execute(&format!("CREATE TABLE {bad} (id int, tenant_id text)")).unwrap();
    assert_eq!(sqlstate(c.batch_execute(&format!("SELECT levqor.enable_tenancy('{bad}')"))), "42804");
    let full = unique("hasrows");
    c.batch_execute(&format!("CREATE TABLE {full} (id int); INSERT INTO {full} VALUES (1);")).unwrap();
    assert_eq!(sqlstate(c.batch_execute(&format!("SELECT levqor.enable_tenancy('{full}')"))), "23502");
    let view = unique("aview");
    c.batch_execute(&format!("CREATE VIEW {view} AS SELECT 1 AS x")).unwrap();
    assert_eq!(sqlstate(c.batch_execute(&format!("SELECT levqor.enable_tenancy('{view}')"))), "42809");
    assert_eq!(sqlstate(c.batch_execute("SELECT levqor.enable_tenancy('levqor.tenants')")), "42501");
}

#[test]
fn a_levqor_admin_can_disable_tenancy() {
    let a = tenant("disable");
    let mut c = app();
    let t = owned_table(&mut c);
    insert_rows(&mut c, &a, &t, &["a"]);
    admin().batch_execute(&format!("SELECT levqor.disable_tenancy('{t}')")).unwrap();
    assert_eq!(bodies(&mut c, &t), ["a"], "plain table again");
    let n: i64 = superuser()
        .query_one("SELECT count(*) FROM levqor.protected_tables WHERE tbl::text = $1", &[&t])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // And back on.
    c.batch_execute(&format!("SELECT levqor.enable_tenancy('{t}')")).unwrap();
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
}

#[test]
fn partitions_are_protected_too() {
    let (a, b) = (tenant("part-a"), tenant("part-b"));
    let mut c = app();
    let t = unique("parted");
    c.batch_execute(&format!(
        "CREATE TABLE {t} (id bigint, body text, tenant_id uuid NOT NULL) PARTITION BY HASH (tenant_id);
         CREATE TABLE {t}_0 PARTITION OF {t} FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE {t}_1 PARTITION OF {t} FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         SELECT levqor.enable_tenancy('{t}');"
    ))
    .unwrap();
    insert_rows(&mut c, &a, &t, &["a"]);
    insert_rows(&mut c, &b, &t, &["b"]);
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["a"]);
    for p in [format!("{t}_0"), format!("{t}_1")] {
        let seen = as_tenant(&mut c, &a, |tx| bodies(tx, &p));
        assert!(seen.is_empty() || seen == ["a"], "{p}: {seen:?}");
        assert_eq!(bodies(&mut c, &p), Vec::<String>::new());
    }
}
