//! Tenant lifecycle, enforced on new and existing contexts.

use levqor_e2e::*;

fn setup(prefix: &str) -> (Tenant, String) {
    let a = tenant(prefix);
    let t = protected_table(&format!("{prefix}_rows").replace('-', "_"));
    insert_rows(&mut app(), &a, &t, &["before"]);
    (a, t)
}

fn admin_call(sql: &str, t: &Tenant) -> Result<u64, Error> {
    admin().execute(sql, &[&t.slug])
}

#[test]
fn read_only_suspension_keeps_reads_and_refuses_writes() {
    let (a, t) = setup("ro");
    admin_call("SELECT levqor.suspend_tenant($1, 'invoice 42 unpaid')", &a).unwrap();
    let mut c = app();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert_eq!(bodies(&mut tx, &t), ["before"]);
    let (code, msg) = error_of(tx.execute(&format!("INSERT INTO {t} (body) VALUES ('x')"), &[]));
    assert_eq!(code, "25006");
    assert!(msg.contains("suspended (read only)") && msg.contains("invoice 42 unpaid"), "{msg}");
    tx.rollback().unwrap();
    for sql in [format!("UPDATE {t} SET body = 'y'"), format!("DELETE FROM {t}")] {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
        assert_eq!(sqlstate(tx.execute(&sql, &[])), "25006", "{sql}");
    }
    admin_call("SELECT levqor.resume_tenant($1)", &a).unwrap();
    insert_rows(&mut c, &a, &t, &["after"]);
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["after", "before"]);
}

#[test]
fn a_session_context_made_before_a_suspension_cannot_write_after_it() {
    let (a, t) = setup("ro-sess");
    let mut c = app();
    c.execute("SELECT levqor.authenticate($1, session => true)", &[&a.key]).unwrap();
    c.execute(&format!("INSERT INTO {t} (body) VALUES ('ok')"), &[]).unwrap();
    admin_call("SELECT levqor.suspend_tenant($1, 'fraud review')", &a).unwrap();
    assert_eq!(sqlstate(c.execute(&format!("INSERT INTO {t} (body) VALUES ('no')"), &[])), "25006");
    assert_eq!(bodies(&mut c, &t), ["before", "ok"], "reads still work when read-only");
}

#[test]
fn blocking_or_offboarding_ends_existing_session_contexts() {
    for (prefix, call) in [
        ("blk", "SELECT levqor.suspend_tenant($1, 'abuse', 'blocked')"),
        ("off", "SELECT levqor.offboard_tenant($1)"),
    ] {
        let (a, t) = setup(prefix);
        let mut c = app();
        c.execute("SELECT levqor.authenticate($1, session => true)", &[&a.key]).unwrap();
        assert_eq!(bodies(&mut c, &t), ["before"]);
        admin_call(call, &a).unwrap();
        assert_eq!(bodies(&mut c, &t), Vec::<String>::new(), "{call}: the context is gone");
        assert!(current_tenant(&mut c).is_none(), "{call}");
        assert_eq!(sqlstate(c.query_one("SELECT levqor.authenticate($1)", &[&a.key])), "28000", "{call}");
    }
}

#[test]
fn impossible_transitions_are_refused() {
    let (a, _) = setup("trans");
    assert_eq!(sqlstate(admin_call("SELECT * FROM levqor.purge_tenant($1)", &a)), "55000", "purge an active tenant");
    assert_eq!(sqlstate(admin_call("SELECT levqor.suspend_tenant($1, '')", &a)), "22023", "no reason");
    assert_eq!(sqlstate(admin_call("SELECT levqor.suspend_tenant($1, 'x', 'frozen')", &a)), "22023");
    admin_call("SELECT levqor.offboard_tenant($1)", &a).unwrap();
    admin_call("SELECT levqor.offboard_tenant($1)", &a).unwrap(); // idempotent
    assert_eq!(sqlstate(admin_call("SELECT levqor.resume_tenant($1)", &a)), "55000", "resume offboarded");
    assert_eq!(sqlstate(admin_call("SELECT levqor.suspend_tenant($1, 'x')", &a)), "55000");
    assert_eq!(sqlstate(admin_call("SELECT * FROM levqor.purge_tenant($1)", &a)), "55000", "grace not over");
    assert_eq!(sqlstate(admin().execute("SELECT levqor.resume_tenant('no-such-tenant')", &[])), "42704");
}

#[test]
fn purge_deletes_every_row_and_key_and_leaves_a_tombstone() {
    let (a, t) = setup("purge");
    let b = tenant("purge-keep");
    insert_rows(&mut app(), &b, &t, &["b-stays"]);
    admin_call("SELECT levqor.offboard_tenant($1, grace => '0')", &a).unwrap();
    let deleted: Vec<(String, i64)> = admin()
        .query("SELECT table_name, rows_deleted FROM levqor.purge_tenant($1)", &[&a.slug])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(deleted, [(format!("public.{t}"), 1)]);
    let mut su = superuser();
    assert_eq!(bodies(&mut su, &t), ["b-stays"]);
    let left: i64 = su
        .query_one(
            "SELECT (SELECT count(*) FROM levqor.tenants WHERE id = $1) + (SELECT count(*) FROM levqor.tenant_keys WHERE tenant_id = $1)",
            &[&a.id],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    let tomb: String = su
        .query_one("SELECT detail->>'slug' FROM levqor.tenant_events WHERE tenant_id = $1 AND event = 'tenant_purged'", &[&a.id])
        .unwrap()
        .get(0);
    assert_eq!(tomb, a.slug);
    let events: i64 = su.query_one("SELECT count(*) FROM levqor.tenant_events WHERE tenant_id = $1", &[&a.id]).unwrap().get(0);
    assert!(events >= 3, "created, offboarded, purged");
}

#[test]
fn rotate_keys_with_and_without_overlap() {
    let a = tenant("rotate");
    let mut c = app();
    let new_key: String = admin().query_one("SELECT levqor.rotate_keys($1, overlap => '2 seconds')", &[&a.slug]).unwrap().get(0);
    c.query_one("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    c.query_one("SELECT levqor.authenticate($1)", &[&new_key]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&a.key]));
    assert_eq!((code.as_str(), msg.contains("expired")), ("28000", true), "{msg}");
    let newest: String = admin().query_one("SELECT levqor.rotate_keys($1)", &[&a.slug]).unwrap().get(0);
    assert_eq!(sqlstate(c.query_one("SELECT levqor.authenticate($1)", &[&new_key])), "28000", "no overlap: revoked at once");
    c.query_one("SELECT levqor.authenticate($1)", &[&newest]).unwrap();
}

#[test]
fn change_plan_applies_and_refuses_a_downgrade_below_usage() {
    let (a, t) = setup("plan");
    let mut adm = admin();
    adm.execute("SELECT levqor.change_plan($1, 'professional')", &[&a.slug]).unwrap();
    let plan: String = superuser().query_one("SELECT plan FROM levqor.tenants WHERE id = $1", &[&a.id]).unwrap().get(0);
    assert_eq!(plan, "professional");
    // A plan whose storage limit is below what the tenant already stores.
    superuser()
        .execute("INSERT INTO levqor.plans (name, limits) VALUES ('tiny', '{\"storage_bytes\": 10}') ON CONFLICT DO NOTHING", &[])
        .unwrap();
    let (code, msg) = error_of(adm.execute("SELECT levqor.change_plan($1, 'tiny')", &[&a.slug]));
    assert_eq!(code, "23514");
    assert!(msg.contains("storage"), "{msg}");
    adm.execute("SELECT levqor.change_plan($1, 'tiny', force => true)", &[&a.slug]).unwrap();
    assert_eq!(sqlstate(adm.execute("SELECT levqor.change_plan($1, 'platinum')", &[&a.slug])), "22023");
    let _ = t;
}

#[test]
fn a_trial_works_until_it_ends() {
    let mut adm = admin();
    let slug = unique("trial").replace('_', "-");
    let key: String = adm
        .query_one(
            "SELECT api_key FROM levqor.create_tenant($1, 'Trial', trial_ends_at => clock_timestamp() + interval '1 second')",
            &[&slug],
        )
        .unwrap()
        .get(0);
    let mut c = app();
    c.query_one("SELECT levqor.authenticate($1)", &[&key]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&key]));
    assert_eq!((code.as_str(), msg.contains("trial")), ("28000", true), "{msg}");
}

#[test]
fn only_levqor_admin_runs_the_lifecycle() {
    let a = tenant("onlyadmin");
    let mut c = app();
    for sql in [
        "SELECT levqor.suspend_tenant($1, 'x')",
        "SELECT levqor.resume_tenant($1)",
        "SELECT levqor.change_plan($1, 'enterprise')",
        "SELECT levqor.offboard_tenant($1)",
        "SELECT * FROM levqor.purge_tenant($1, true)",
        "SELECT levqor.rotate_keys($1)",
        "SELECT levqor.tenant_storage_bytes($1)",
    ] {
        assert_eq!(sqlstate(c.execute(sql, &[&a.slug])), "42501", "{sql}");
    }
    // And the guard trigger cannot be switched off by a table owner.
    let own = unique("own_guard");
    c.batch_execute(&format!("CREATE TABLE {own} (id int); SELECT levqor.enable_tenancy('{own}')")).unwrap();
    assert_eq!(sqlstate(c.batch_execute(&format!("ALTER TABLE {own} DISABLE TRIGGER levqor_write_guard"))), "42501");
    assert_eq!(sqlstate(c.batch_execute(&format!("DROP TRIGGER levqor_write_guard ON {own}"))), "42501");
}
