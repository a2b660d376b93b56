//! The policy engine: decisions from plan features and member roles, default
//! deny, the rule that decided, denies recorded once per transaction,
//! validated documents, and use inside a row level security policy.

use levqor_e2e::*;

fn decide(s: &mut Client, t: &Tenant, role: &str, action: &str) -> (bool, String) {
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, member_role => $2)", &[&t.slug, &role]).unwrap();
    let e: serde_like::Json = tx.query_one("SELECT levqor.explain($1)::text", &[&action]).unwrap().get::<_, String>(0).into();
    let allowed: bool = tx.query_one("SELECT levqor.authorize($1)", &[&action]).unwrap().get(0);
    tx.commit().unwrap();
    assert_eq!(allowed, e.allowed, "authorize and explain agree on {action}");
    (allowed, e.rule)
}

/// Just enough JSON reading for explain()'s two fields, without a dependency.
mod serde_like {
    pub struct Json {
        pub allowed: bool,
        pub rule: String,
    }
    impl From<String> for Json {
        fn from(s: String) -> Json {
            let allowed = s.contains("\"allowed\": true");
            let rule = s.split("\"rule\": \"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default().to_string();
            Json { allowed, rule }
        }
    }
}

fn tenant_on(plan: &str, prefix: &str) -> Tenant {
    let t = tenant(prefix);
    if plan != "free" {
        admin().execute("SELECT levqor.change_plan($1, $2)", &[&t.slug, &plan]).unwrap();
    }
    t
}

#[test]
fn decisions_follow_plan_features_and_member_roles() {
    let free = tenant_on("free", "pol-free");
    let starter = tenant_on("starter", "pol-starter");
    let enterprise = tenant_on("enterprise", "pol-ent");
    let mut s = server();
    assert_eq!(decide(&mut s, &free, "operator", "templates:use"), (false, "default-deny".into()));
    assert_eq!(decide(&mut s, &starter, "operator", "templates:use"), (true, "feature-templates".into()));
    assert_eq!(decide(&mut s, &starter, "operator", "marketplace:buy"), (false, "default-deny".into()));
    assert_eq!(decide(&mut s, &enterprise, "owner", "sso:configure"), (true, "feature-sso".into()));
    assert_eq!(decide(&mut s, &enterprise, "operator", "sso:configure"), (false, "default-deny".into()));
    assert_eq!(decide(&mut s, &free, "operator", "admin:users"), (false, "default-deny-admin".into()));
    assert_eq!(decide(&mut s, &free, "owner", "admin:users"), (true, "owners-administer".into()));
    // A deny wins over an allow: viewers change nothing, even with the feature.
    assert_eq!(decide(&mut s, &starter, "viewer", "templates:create"), (false, "read-only-roles".into()));
    assert_eq!(decide(&mut s, &starter, "viewer", "templates:list"), (true, "feature-templates".into()));
    assert_eq!(decide(&mut s, &free, "auditor", "audit:read"), (true, "auditors-read-audit".into()));
    assert_eq!(decide(&mut s, &free, "viewer", "audit:read"), (false, "default-deny".into()));
    // No context: denied, and explain says why.
    let e: String = app().query_one("SELECT levqor.explain('templates:use')::text", &[]).unwrap().get(0);
    assert!(e.contains("\"allowed\": false") && e.contains("no tenant context"), "{e}");
    // Changing the plan changes the answer at once.
    admin().execute("SELECT levqor.change_plan($1, 'starter')", &[&free.slug]).unwrap();
    assert_eq!(decide(&mut s, &free, "operator", "templates:use"), (true, "feature-templates".into()));
}

#[test]
fn every_deny_is_recorded_once_per_transaction_with_its_reason() {
    let t = tenant_on("free", "pol-rec");
    let user = uuid::Uuid::new_v4();
    admin().execute("SELECT levqor.add_member($1, $2, 'operator')", &[&t.slug, &user]).unwrap();
    let mut s = server();
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2, member_role => 'operator')", &[&t.slug, &user]).unwrap();
    for _ in 0..5 {
        assert!(!tx.query_one("SELECT levqor.authorize('packs:install', 'pack:crm')", &[]).unwrap().get::<_, bool>(0));
    }
    assert!(!tx.query_one("SELECT levqor.authorize('packs:install', 'pack:hr')", &[]).unwrap().get::<_, bool>(0));
    assert!(tx.query_one("SELECT levqor.authorize('read:docs')", &[]).unwrap().get::<_, bool>(0));
    tx.commit().unwrap();
    let rows = admin()
        .query(
            "SELECT detail->>'action', detail->>'resource', detail->>'rule', detail->>'rationale', detail->>'user_id', detail->>'member_role'
               FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'policy_denied' ORDER BY id",
            &[&t.id],
        )
        .unwrap();
    assert_eq!(rows.len(), 2, "one entry per distinct (action, resource) in the transaction");
    let first: (String, String, String, String, String, String) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2), rows[0].get(3), rows[0].get(4), rows[0].get(5));
    assert_eq!((first.0.as_str(), first.1.as_str(), first.2.as_str()), ("packs:install", "pack:crm", "default-deny"));
    assert!(first.3.contains("no policy allows packs:install") && first.3.contains("plan free"), "{}", first.3);
    assert_eq!((first.4, first.5.as_str()), (user.to_string(), "operator"));
    // A read-only transaction is denied too (recorded in the server log).
    let mut tx = s.transaction().unwrap();
    tx.batch_execute("SET TRANSACTION READ ONLY").unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&t.slug]).unwrap();
    assert!(!tx.query_one("SELECT levqor.authorize('packs:install')", &[]).unwrap().get::<_, bool>(0));
}

#[test]
fn authorize_works_inside_a_row_level_security_policy() {
    let table = protected_table("pol_rls");
    superuser()
        .batch_execute(&format!(
            "CREATE POLICY templates_feature ON {table} AS RESTRICTIVE FOR SELECT USING (levqor.authorize('templates:read', '{table}'))"
        ))
        .unwrap();
    let (free, starter) = (tenant_on("free", "pol-rls-free"), tenant_on("starter", "pol-rls-starter"));
    let mut c = app();
    insert_rows(&mut c, &free, &table, &["f1", "f2", "f3"]);
    insert_rows(&mut c, &starter, &table, &["s1", "s2"]);
    assert_eq!(as_tenant(&mut c, &free, |tx| bodies(tx, &table)).len(), 0, "the free plan has no templates");
    assert_eq!(as_tenant(&mut c, &starter, |tx| bodies(tx, &table)), ["s1", "s2"]);
    let denies: i64 = admin()
        .query_one("SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'policy_denied'", &[&free.id])
        .unwrap()
        .get(0);
    assert_eq!(denies, 1, "one entry for the scan, not one per row");
}

#[test]
fn policies_are_validated_when_written() {
    let mut a = admin();
    let name = unique("pol").replace('_', "-");
    let refuse = |a: &mut Client, doc: &str| error_of(a.execute("SELECT levqor.put_policy($1, $2)", &[&name, &doc]));
    let (code, msg) = refuse(&mut a, "{\"effect\": \"allow\", \"actions\": [\"x:*\"");
    assert_eq!((code.as_str(), msg.contains("not JSON")), ("22023", true), "{msg}");
    let (code, msg) = refuse(&mut a, r#"{"effect": "allow", "actions": ["x:*"], "colour": "blue"}"#);
    assert_eq!(code, "22023");
    assert!(msg.contains("$.colour: unknown key"), "{msg}");
    let (_, msg) = refuse(&mut a, r#"{"effect": "allow", "actions": ["x:*", 7]}"#);
    assert!(msg.contains("$.actions[1]"), "{msg}");
    let (_, msg) = refuse(&mut a, r#"{"effect": "maybe", "actions": ["x:*"]}"#);
    assert!(msg.contains("$.effect"), "{msg}");
    let (_, msg) = refuse(&mut a, r#"{"effect": "allow", "actions": ["x:*"], "roles": ["root"]}"#);
    assert!(msg.contains("$.roles[0]: unknown member role"), "{msg}");
    let (_, msg) = refuse(&mut a, r#"{"actions": ["x:*"]}"#);
    assert!(msg.contains("$.effect: missing"), "{msg}");
    // Nor through the table directly.
    assert_eq!(
        sqlstate(superuser().execute("UPDATE levqor.policies SET document = '{\"effect\": 1}' WHERE name = 'feature-sso'", &[])),
        "22023"
    );
    // A good one takes effect; only levqor_admin writes policies.
    a.execute(
        "SELECT levqor.put_policy($1, '{\"effect\": \"allow\", \"actions\": [\"reports:export\"], \"plans\": [\"free\"]}')",
        &[&name],
    )
    .unwrap();
    let t = tenant_on("free", "pol-new");
    assert_eq!(decide(&mut server(), &t, "operator", "reports:export"), (true, name.clone()));
    assert_eq!(sqlstate(app().execute("SELECT levqor.put_policy('x', '{}')", &[])), "42501");
    assert!(a.query_one("SELECT levqor.drop_policy($1)", &[&name]).unwrap().get::<_, bool>(0));
    assert_eq!(decide(&mut server(), &t, "operator", "reports:export"), (false, "default-deny".into()));
}
