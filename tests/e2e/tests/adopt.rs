//! Adopting a single-tenant database (Genesis cutover) and going back.

use levqor_e2e::*;

#[test]
fn a_legacy_database_is_adopted_in_batches_and_can_go_back() {
    let (name, mut su) = new_database("legacy");
    // A v7-style single-tenant schema, with data.
    su.batch_execute(&format!(
        "CREATE TABLE users (id serial PRIMARY KEY, email text NOT NULL);
         CREATE TABLE jobs (id bigserial PRIMARY KEY, user_id int REFERENCES users (id), payload text);
         INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 250) g;
         INSERT INTO jobs (user_id, payload) SELECT 1 + g % 250, 'job ' || g FROM generate_series(1, 1000) g;
         CREATE EXTENSION levqor;
         GRANT SELECT, INSERT ON users, jobs TO {APP};
         GRANT USAGE ON SEQUENCE users_id_seq, jobs_id_seq TO {APP};"
    ))
    .unwrap();
    let (mut su, notices) = {
        let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = notices.clone();
        let mut cfg: postgres::Config =
            format!("host=127.0.0.1 port={} user=postgres dbname={name}", port()).parse().unwrap();
        cfg.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
        drop(su);
        (cfg.connect(NoTls).unwrap(), notices)
    };
    su.batch_execute("CALL levqor.adopt_legacy(batch => 100)").unwrap();
    let said = notices.lock().unwrap().join("\n");
    assert!(said.contains("rows assigned"), "batches are reported: {said}");
    let key = said
        .split_whitespace()
        .find(|w| w.starts_with("lvq_"))
        .expect("the new tenant's key is shown once")
        .to_string();

    // Everything belongs to tenant-000, and is protected.
    let core: uuid::Uuid = su.query_one("SELECT id FROM levqor.tenants WHERE slug = 'tenant-000'", &[]).unwrap().get(0);
    let unassigned: i64 = su
        .query_one("SELECT (SELECT count(*) FROM users WHERE tenant_id IS DISTINCT FROM $1) + (SELECT count(*) FROM jobs WHERE tenant_id IS DISTINCT FROM $1)", &[&core])
        .unwrap()
        .get(0);
    assert_eq!(unassigned, 0);
    let assigned: Vec<i64> = su
        .query("SELECT rows_assigned FROM levqor.adoptions ORDER BY tbl::text", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(assigned, [1000, 250]);
    let mut c = connect_to(port(), APP, &name);
    assert_eq!(c.query_one("SELECT count(*) FROM users", &[]).unwrap().get::<_, i64>(0), 0, "no context, no rows");
    let core_tenant = Tenant { id: core, slug: "tenant-000".into(), key };
    let n: i64 = as_tenant(&mut c, &core_tenant, |tx| tx.query_one("SELECT count(*) FROM jobs", &[]).unwrap().get(0));
    assert_eq!(n, 1000);
    // A second tenant can move in beside Core.
    let other = create_tenant_on(&mut su, "after-genesis");
    as_tenant(&mut c, &other, |tx| {
        tx.execute("INSERT INTO users (email) VALUES ('new@tenant')", &[]).unwrap();
        let n: i64 = tx.query_one("SELECT count(*) FROM users", &[]).unwrap().get(0);
        assert_eq!(n, 1);
    });

    // The way back refuses to mix tenants silently…
    assert_eq!(sqlstate(su.batch_execute("CALL levqor.unadopt_legacy()")), "55000");
    let still: i64 = su.query_one("SELECT count(*) FROM levqor.adoptions", &[]).unwrap().get(0);
    assert_eq!(still, 2, "a refused way back changed nothing");
    // …and, once the newcomer is gone, restores a plain single-tenant database.
    su.batch_execute("DELETE FROM users WHERE email = 'new@tenant'").unwrap();
    su.batch_execute("CALL levqor.unadopt_legacy(drop_column => true)").unwrap();
    let cols: i64 = su
        .query_one("SELECT count(*) FROM pg_attribute WHERE attrelid IN ('users'::regclass, 'jobs'::regclass) AND attname = 'tenant_id' AND NOT attisdropped", &[])
        .unwrap()
        .get(0);
    assert_eq!(cols, 0);
    assert_eq!(c.query_one("SELECT count(*) FROM users", &[]).unwrap().get::<_, i64>(0), 250, "plain tables again");

    // Only superusers adopt.
    let mut adm = connect_to(port(), ADMIN, &name);
    assert_eq!(sqlstate(adm.batch_execute("CALL levqor.adopt_legacy()")), "42501");
}
