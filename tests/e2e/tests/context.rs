//! The tenant context: how it is set, how long it lasts, and every way a
//! hostile client might try to forge or keep it.

use levqor_e2e::*;

fn context_string(t: &Tenant) -> String {
    format!("v1 {} - admin api_key", t.id)
}

#[test]
fn set_set_config_and_reset_cannot_forge_the_context() {
    let a = tenant("forge");
    let t = protected_table("forged");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a-secret"]);
    let forged = context_string(&a);
    for sql in [
        format!("SET levqor.context = '{forged}'"),
        format!("SET SESSION levqor.context = '{forged}'"),
        "RESET levqor.context".to_string(),
        "SET levqor.context TO DEFAULT".to_string(),
        format!("SELECT set_config('levqor.context', '{forged}', false)"),
        format!("SELECT set_config('levqor.context', '{forged}', true)"),
        format!("ALTER ROLE {APP} SET levqor.context = '{forged}'"),
        format!("ALTER DATABASE {} SET levqor.context = '{forged}'", db()),
        format!("CREATE FUNCTION f_forge() RETURNS int LANGUAGE sql SET levqor.context = '{forged}' AS 'SELECT 1'"),
    ] {
        let code = sqlstate(c.batch_execute(&sql));
        assert_eq!(code, "42501", "{sql}");
        assert!(current_tenant(&mut c).is_none(), "{sql}");
    }
    // Inside a transaction: the statement fails and nothing is visible.
    let mut tx = c.transaction().unwrap();
    assert_eq!(sqlstate(tx.batch_execute(&format!("SET LOCAL levqor.context = '{forged}'"))), "42501");
    tx.rollback().unwrap();
    // Near-miss names are not levqor settings at all.
    for name in ["levqor.tenant", "levqor.tenant_id", "levqor.current_tenant"] {
        assert_eq!(sqlstate(c.batch_execute(&format!("SET {name} = '{}'", a.id))), "42602", "{name}");
    }
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
}

#[test]
fn connection_options_cannot_carry_a_context() {
    let a = tenant("opts");
    let forged = context_string(&a);
    let r = try_connect_with_options(port(), APP, db(), &format!("-c levqor.context={}", forged.replace(' ', "\\ ")));
    match r {
        Err(e) => assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}"),
        Ok(mut c) => assert!(current_tenant(&mut c).is_none()),
    }
}

#[test]
fn bad_keys_are_refused_and_leave_no_context() {
    let a = tenant("badkey");
    let mut c = app();
    let mut wrong_secret = a.key.clone();
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == 'A' { 'B' } else { 'A' });
    let unknown_id = format!("lvq_0000000000000000_{}", &a.key[21..]);
    let cases: Vec<Option<String>> = vec![
        Some(wrong_secret),
        Some(unknown_id),
        Some(String::new()),
        None,
        Some("garbage".into()),
        Some(a.key.to_uppercase()),
        Some(format!("{} ", a.key)),
        Some(format!("{}'; SELECT 1; --", a.key)),
        Some("lvq_".repeat(10_000)),
        Some(a.id.to_string()),
        Some(a.slug.clone()),
    ];
    for key in cases {
        let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&key]));
        assert_eq!(code, "28P01", "{key:?}");
        assert_eq!(msg, "invalid levqor API key");
        assert!(current_tenant(&mut c).is_none());
    }
    // A failure after a success in the same transaction aborts it: no
    // half-kept context.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert!(tx.execute("SELECT levqor.authenticate('garbage')", &[]).is_err());
    drop(tx);
    assert!(current_tenant(&mut c).is_none());
}

#[test]
fn revoked_expired_suspended_and_offboarded_are_refused() {
    let a = tenant("refuse");
    let mut adm = admin();
    let expiring: String = adm
        .query_one("SELECT levqor.issue_key($1, 'viewer', interval '1 second')", &[&a.slug])
        .unwrap()
        .get(0);
    let revoked: String = adm.query_one("SELECT levqor.issue_key($1, 'operator')", &[&a.slug]).unwrap().get(0);
    adm.execute("SELECT levqor.revoke_key($1)", &[&revoked[4..20].to_string()]).unwrap();

    let mut c = app();
    let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&revoked]));
    assert_eq!((code.as_str(), msg.contains("revoked")), ("28000", true), "{msg}");

    let viewer: String = c.query_one("SELECT levqor.authenticate($1)::text || levqor.current_member_role()", &[&expiring]).unwrap().get(0);
    assert!(viewer.ends_with("viewer"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&expiring]));
    assert_eq!((code.as_str(), msg.contains("expired")), ("28000", true), "{msg}");

    for status in ["suspended", "offboarded"] {
        superuser().execute("UPDATE levqor.tenants SET status = $1 WHERE id = $2", &[&status, &a.id]).unwrap();
        let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&a.key]));
        assert_eq!(code, "28000");
        assert!(msg.contains(status), "{msg}");
        assert!(current_tenant(&mut c).is_none());
    }
}

#[test]
fn transaction_scope_ends_with_the_transaction() {
    let a = tenant("txscope");
    let mut c = app();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert_eq!(current_tenant(&mut tx), Some(a.id));
    tx.commit().unwrap();
    assert!(current_tenant(&mut c).is_none());
    // Rolled back, too.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    tx.rollback().unwrap();
    assert!(current_tenant(&mut c).is_none());
    // Outside a transaction block it lasts one statement.
    c.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert!(current_tenant(&mut c).is_none());
    // A rolled-back savepoint takes its authentication with it.
    let mut tx = c.transaction().unwrap();
    let mut sp = tx.savepoint("s").unwrap();
    sp.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    sp.rollback().unwrap();
    assert!(current_tenant(&mut tx).is_none());
}

#[test]
fn session_scope_lasts_until_cleared_or_discarded() {
    let (a, b) = (tenant("sess-a"), tenant("sess-b"));
    let mut c = app();
    c.execute("SELECT levqor.authenticate($1, session => true)", &[&a.key]).unwrap();
    assert_eq!(current_tenant(&mut c), Some(a.id));
    c.batch_execute("BEGIN; COMMIT;").unwrap();
    assert_eq!(current_tenant(&mut c), Some(a.id));
    // A transaction-scoped context overrides it, then gives it back.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&b.key]).unwrap();
    assert_eq!(current_tenant(&mut tx), Some(b.id));
    tx.commit().unwrap();
    assert_eq!(current_tenant(&mut c), Some(a.id));
    c.execute("SELECT levqor.clear_tenant()", &[]).unwrap();
    assert!(current_tenant(&mut c).is_none());

    c.execute("SELECT levqor.authenticate($1, true)", &[&a.key]).unwrap();
    c.batch_execute("DISCARD ALL").unwrap();
    assert!(current_tenant(&mut c).is_none(), "DISCARD ALL (PgBouncer's reset) clears it");

    c.execute("SELECT levqor.authenticate($1, true)", &[&a.key]).unwrap();
    c.batch_execute("RESET ALL").unwrap();
    assert!(current_tenant(&mut c).is_none(), "RESET ALL clears it, never sets it");
}

#[test]
fn set_tenant_is_only_for_context_admins() {
    let a = tenant("settenant");
    let mut c = app();
    assert_eq!(sqlstate(c.query_one("SELECT levqor.set_tenant($1)", &[&a.slug])), "42501");
    assert!(current_tenant(&mut c).is_none());

    let mut s = server();
    let user = uuid::Uuid::new_v4();
    admin().execute("SELECT levqor.add_member($1, $2, 'admin')", &[&a.slug, &user]).unwrap();
    let mut tx = s.transaction().unwrap();
    let row = tx
        .query_one(
            "SELECT levqor.set_tenant($1, user_id => $2, member_role => 'operator'),
                    levqor.current_user_id(), levqor.current_member_role()",
            &[&a.slug, &user],
        )
        .unwrap();
    assert_eq!(row.get::<_, uuid::Uuid>(0), a.id);
    assert_eq!(row.get::<_, Option<uuid::Uuid>>(1), Some(user));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("operator"));
    tx.rollback().unwrap();
    // By uuid as well as by slug; unknown tenants and roles are refused.
    s.query_one("SELECT levqor.set_tenant($1)", &[&a.id.to_string()]).unwrap();
    assert_eq!(sqlstate(s.query_one("SELECT levqor.set_tenant('no-such-tenant')", &[])), "42704");
    assert_eq!(sqlstate(s.query_one("SELECT levqor.set_tenant($1, member_role => 'root')", &[&a.slug])), "22023");
}

#[test]
fn the_app_role_cannot_read_or_change_the_catalog() {
    let mut c = app();
    for sql in [
        "SELECT * FROM levqor.tenant_keys",
        "SELECT * FROM levqor.tenants",
        "SELECT * FROM levqor.tenant_events",
        "UPDATE levqor.tenant_keys SET revoked_at = NULL",
        "SELECT * FROM levqor.create_tenant('sneaky', 'Sneaky')",
        "SELECT levqor.issue_key('x')",
        "SELECT levqor.disable_tenancy('pg_class')",
        "SELECT * FROM levqor._new_api_key()",
    ] {
        assert_eq!(sqlstate(c.batch_execute(sql)), "42501", "{sql}");
    }
}

#[test]
fn create_tenant_validates_its_input() {
    let mut adm = admin();
    for (slug, name, plan, isolation, code) in [
        ("x'; DROP TABLE levqor.tenants; --", "n", "free", "shared", "22023"),
        ("UPPER", "n", "free", "shared", "22023"),
        ("", "n", "free", "shared", "22023"),
        ("a b", "n", "free", "shared", "22023"),
        (&"x".repeat(64)[..], "n", "free", "shared", "22023"),
        ("ok-slug-1", "", "free", "shared", "22023"),
        ("ok-slug-2", "bell\u{7}", "free", "shared", "22023"),
        ("ok-slug-3", "n", "platinum", "shared", "22023"),
        ("ok-slug-4", "n", "free'--", "shared", "22023"),
        (&"s".repeat(57)[..], "n", "free", "schema", "22023"),
        ("ok-slug-6", "n", "free", "separate", "22023"),
    ] {
        let r = adm.query_one(
            "SELECT * FROM levqor.create_tenant($1, $2, plan => $3, isolation => $4)",
            &[&slug, &name, &plan, &isolation],
        );
        assert_eq!(sqlstate(r), code, "{slug:?} {name:?} {plan:?} {isolation:?}");
    }
    let t = tenant("dup");
    assert_eq!(sqlstate(adm.query_one("SELECT * FROM levqor.create_tenant($1, 'again')", &[&t.slug])), "23505");
    let n: i64 = superuser().query_one("SELECT count(*) FROM levqor.tenants", &[]).unwrap().get(0);
    assert!(n >= 1);
    let created: i64 = superuser()
        .query_one("SELECT count(*) FROM levqor.tenant_events WHERE tenant_id = $1 AND event = 'tenant_created'", &[&t.id])
        .unwrap()
        .get(0);
    assert_eq!(created, 1, "creation is recorded");
}

#[test]
fn only_the_key_hash_is_stored() {
    let t = tenant("hashonly");
    let stored: Vec<u8> = superuser()
        .query_one("SELECT key_hash FROM levqor.tenant_keys WHERE tenant_id = $1", &[&t.id])
        .unwrap()
        .get(0);
    use sha2::Digest;
    assert_eq!(stored, sha2::Sha256::digest(t.key.as_bytes()).to_vec());
    let dump: String = superuser()
        .query_one("SELECT string_agg(k::text, '') FROM levqor.tenant_keys k", &[])
        .unwrap()
        .get(0);
    assert!(!dump.contains(&t.key[21..]), "the secret is nowhere in the table");
    assert!(t.key.starts_with("lvq_") && t.key.len() == 64);
}

#[test]
fn a_key_cached_by_one_session_is_refused_once_another_revokes_it() {
    let a = tenant("xrevoke");
    let mut c = app();
    let key: String = admin().query_one("SELECT levqor.issue_key($1, 'operator')", &[&a.slug]).unwrap().get(0);
    for _ in 0..3 {
        as_tenant(&mut c, &Tenant { key: key.clone(), ..a.clone() }, |_| ());
    }
    // Another session suspends the tenant: the next transaction here is refused.
    superuser().execute("UPDATE levqor.tenants SET status = 'suspended' WHERE id = $1", &[&a.id]).unwrap();
    assert_eq!(sqlstate(c.query_one("SELECT levqor.authenticate($1)", &[&key])), "28000");
    superuser().execute("UPDATE levqor.tenants SET status = 'active' WHERE id = $1", &[&a.id]).unwrap();
    c.query_one("SELECT levqor.authenticate($1)", &[&key]).unwrap();
    // And revokes the key.
    admin().execute("SELECT levqor.revoke_key($1)", &[&key[4..20].to_string()]).unwrap();
    let (code, msg) = error_of(c.query_one("SELECT levqor.authenticate($1)", &[&key]));
    assert_eq!((code.as_str(), msg.contains("revoked")), ("28000", true), "{msg}");
}
