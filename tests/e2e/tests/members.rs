//! The database, not the credential, decides who a member is (issue 18):
//! demotion and removal take effect in open sessions at their next
//! statement, for keys, tokens and set_tenant; a credential narrows a
//! membership and never widens it.

use levqor_e2e::*;
use uuid::Uuid;

fn role(c: &mut impl postgres::GenericClient) -> Option<String> {
    c.query_one("SELECT levqor.current_member_role()", &[]).unwrap().get(0)
}

fn insert(c: &mut impl postgres::GenericClient, table: &str, body: &str) -> Result<u64, Error> {
    c.execute(&format!("INSERT INTO {table} (body) VALUES ($1)"), &[&body])
}

/// Seed 004's example: Novartis, and alice, an admin of it.
#[test]
fn demotion_and_removal_reach_an_open_session_at_its_next_statement() {
    let mut a = admin();
    let novartis = tenant("novartis");
    let alice = Uuid::new_v4();
    a.execute("SELECT levqor.add_member($1, $2, 'admin')", &[&novartis.slug, &alice]).unwrap();
    let key: String = a.query_one("SELECT levqor.issue_key($1, 'admin', user_id => $2)", &[&novartis.slug, &alice]).unwrap().get(0);
    let token: String = server()
        .query_one("SELECT levqor.sign_token($1, user_id => $2, member_role => 'admin')", &[&novartis.slug, &alice])
        .unwrap()
        .get(0);
    let t = protected_table("trials");
    insert_rows(&mut app(), &novartis, &t, &["trial-1"]);

    // An open session, as alice, by her key.
    let mut s = app();
    s.execute("SELECT levqor.authenticate($1, session => true)", &[&key]).unwrap();
    assert_eq!(role(&mut s).as_deref(), Some("admin"));
    assert_eq!(insert(&mut s, &t, "by admin alice").unwrap(), 1);
    assert!(s.query_one("SELECT levqor.authorize('admin:members')", &[]).unwrap().get::<_, bool>(0));

    // Demoted: from the next statement she is a viewer, though her key says admin.
    a.execute("SELECT levqor.set_member_role($1, $2, 'viewer')", &[&novartis.slug, &alice]).unwrap();
    assert_eq!(role(&mut s).as_deref(), Some("viewer"));
    assert_eq!(sqlstate(insert(&mut s, &t, "by viewer alice")), "42501");
    assert!(!s.query_one("SELECT levqor.authorize('admin:members')", &[]).unwrap().get::<_, bool>(0));
    let denied: i64 = a
        .query_one(
            "SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'policy_denied'
                AND detail->>'action' = 'admin:members' AND detail->>'member_role' = 'viewer' AND detail->>'user_id' = ($2::uuid)::text",
            &[&novartis.id, &alice],
        )
        .unwrap()
        .get(0);
    assert_eq!(denied, 1, "the deny is in the tenant's audit trail");
    // Reads still work for a viewer.
    assert_eq!(bodies(&mut s, &t), ["by admin alice", "trial-1"]);

    // Removed: the open session loses its context at its next statement ...
    a.execute("SELECT levqor.remove_member($1, $2)", &[&novartis.slug, &alice]).unwrap();
    assert_eq!(current_tenant(&mut s), None);
    assert_eq!(bodies(&mut s, &t), Vec::<String>::new());
    // ... her key was revoked (and says so in the audit trail) ...
    let (code, msg) = error_of(s.execute("SELECT levqor.authenticate($1)", &[&key]));
    assert_eq!(code, "28000");
    assert!(msg.contains("revoked"), "{msg}");
    let revoked: i64 = a
        .query_one(
            "SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'key_revoked' AND detail->>'reason' = 'member_removed'",
            &[&novartis.id],
        )
        .unwrap()
        .get(0);
    assert_eq!(revoked, 1);
    // ... a token minted before the removal is refused, and so is set_tenant.
    let (code, msg) = error_of(s.execute("SELECT levqor.set_tenant_token($1)", &[&token]));
    assert_eq!(code, "28000");
    assert!(msg.contains("not a member"), "{msg}");
    assert_eq!(sqlstate(server().execute("SELECT levqor.set_tenant($1, user_id => $2)", &[&novartis.slug, &alice])), "28000");
    // Added back, she needs a new key: the old one stays revoked.
    a.execute("SELECT levqor.add_member($1, $2, 'operator')", &[&novartis.slug, &alice]).unwrap();
    assert_eq!(sqlstate(s.execute("SELECT levqor.authenticate($1)", &[&key])), "28000");
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant_token($1)", &[&token]).unwrap();
    assert_eq!(role(&mut tx).as_deref(), Some("operator"), "the token says admin; the membership says operator");
}

#[test]
fn a_credential_narrows_a_membership_and_never_widens_it() {
    let mut a = admin();
    let t = tenant("narrow");
    let bob = Uuid::new_v4();
    a.execute("SELECT levqor.add_member($1, $2, 'admin')", &[&t.slug, &bob]).unwrap();
    let viewer_key: String = a.query_one("SELECT levqor.issue_key($1, 'viewer', user_id => $2)", &[&t.slug, &bob]).unwrap().get(0);
    let mut s = app();
    s.execute("SELECT levqor.authenticate($1, session => true)", &[&viewer_key]).unwrap();
    assert_eq!(role(&mut s).as_deref(), Some("viewer"));
    a.execute("SELECT levqor.set_member_role($1, $2, 'owner')", &[&t.slug, &bob]).unwrap();
    assert_eq!(role(&mut s).as_deref(), Some("viewer"), "a promotion does not widen a narrowed key");
    // Operator and auditor do different things: a key for one held by the
    // other may do only what both may (read).
    let carol = Uuid::new_v4();
    a.execute("SELECT levqor.add_member($1, $2, 'auditor')", &[&t.slug, &carol]).unwrap();
    let mut c = server();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2, member_role => 'operator')", &[&t.slug, &carol]).unwrap();
    assert_eq!(role(&mut tx).as_deref(), Some("viewer"));
    drop(tx);
    // Without a role of its own, a credential for a user acts with the membership.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2)", &[&t.slug, &carol]).unwrap();
    assert_eq!(role(&mut tx).as_deref(), Some("auditor"));
    drop(tx);
    // A user who was never a member gets no context.
    let stranger = Uuid::new_v4();
    let (code, msg) = error_of(c.execute("SELECT levqor.set_tenant($1, user_id => $2)", &[&t.slug, &stranger]));
    assert_eq!(code, "28000");
    assert!(msg.contains("not a member"), "{msg}");
    let stranger_key: String = a.query_one("SELECT levqor.issue_key($1, 'admin', user_id => $2)", &[&t.slug, &stranger]).unwrap().get(0);
    assert_eq!(sqlstate(app().execute("SELECT levqor.authenticate($1)", &[&stranger_key])), "28000");
    // A machine key (no user) keeps the role it was issued with.
    let mut tx = app();
    let mut tx = tx.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    assert_eq!(role(&mut tx).as_deref(), Some("admin"));
}

#[test]
fn a_member_of_a_tenant_acts_in_the_organizations_below_it() {
    let mut a = admin();
    let platform = unique("mp").replace('_', "-");
    a.query_one("SELECT levqor.create_platform($1, 'P')", &[&platform]).unwrap();
    let mk = |a: &mut Client, prefix: &str, parent: &str| -> Tenant {
        let slug = unique(prefix).replace('_', "-");
        let row = a.query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, $1, parent => $2)", &[&slug, &parent]).unwrap();
        Tenant { id: row.get(0), slug, key: row.get(1) }
    };
    let pharma = mk(&mut a, "m-pharma", &platform);
    let novartis = mk(&mut a, "m-novartis", &pharma.slug);
    let ra = mk(&mut a, "m-ra", &novartis.slug);
    let dana = Uuid::new_v4();
    a.execute("SELECT levqor.add_member($1, $2, 'operator')", &[&pharma.slug, &dana]).unwrap();
    a.execute("SELECT levqor.add_member($1, $2, 'viewer')", &[&novartis.slug, &dana]).unwrap();
    let mut c = server();
    for (node, want) in [(&pharma, "operator"), (&novartis, "viewer"), (&ra, "viewer")] {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1, user_id => $2)", &[&node.slug, &dana]).unwrap();
        assert_eq!(role(&mut tx).as_deref(), Some(want), "{}: the nearest membership decides", node.slug);
    }
    // Her membership in novartis gone, pharma's reaches down again.
    a.execute("SELECT levqor.remove_member($1, $2)", &[&novartis.slug, &dana]).unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2)", &[&ra.slug, &dana]).unwrap();
    assert_eq!(role(&mut tx).as_deref(), Some("operator"));
}

#[test]
fn parallel_workers_see_the_members_role() {
    let t = tenant("m-par");
    let erin = Uuid::new_v4();
    admin().execute("SELECT levqor.add_member($1, $2, 'auditor')", &[&t.slug, &erin]).unwrap();
    let table = unique("par_members");
    superuser()
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, body text NOT NULL, tenant_id uuid NOT NULL);
             INSERT INTO {table} (body, tenant_id) SELECT 'row' || g, '{}' FROM generate_series(1, 30000) g;
             SELECT levqor.enable_tenancy('{table}');
             ANALYZE {table};
             GRANT SELECT ON {table} TO {SERVER};",
            t.id
        ))
        .unwrap();
    let mut c = server();
    c.batch_execute(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
         SET min_parallel_table_scan_size = 0; SET enable_indexscan = off; SET enable_bitmapscan = off;",
    )
    .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2)", &[&t.slug, &erin]).unwrap();
    let sql = format!("SELECT count(*) FROM {table} WHERE levqor.current_member_role() = 'auditor'");
    let plan: Vec<String> =
        tx.query(&format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {sql}"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.join("\n").contains("Workers Launched: 2"), "{plan:?}");
    let n: i64 = tx.query_one(&sql, &[]).unwrap().get(0);
    assert_eq!(n, 30000);
}

#[test]
fn every_function_that_takes_a_tenant_takes_its_uuid_too() {
    let mut su = superuser();
    let missing: Vec<String> = su
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
              WHERE p.pronamespace = 'levqor'::regnamespace AND p.prokind = 'f' AND p.proname !~ '^_'
                AND EXISTS (SELECT 1 FROM unnest(p.proargnames, p.proargtypes::oid[]) a(n, t) WHERE a.n = 'tenant' AND a.t = 'text'::regtype)
                -- (input arguments come first: RETURNS TABLE columns follow them in proargnames)
                AND NOT EXISTS (
                    SELECT 1 FROM pg_proc q
                     WHERE q.pronamespace = p.pronamespace AND q.proname = p.proname AND q.oid <> p.oid
                       AND q.pronargs = p.pronargs
                       AND (SELECT array_agg(CASE WHEN a.n = 'tenant' THEN 'uuid'::regtype::oid ELSE a.t END ORDER BY a.o)
                              FROM unnest(p.proargnames, p.proargtypes::oid[]) WITH ORDINALITY a(n, t, o) WHERE a.t IS NOT NULL)
                           = (SELECT array_agg(x ORDER BY o) FROM unnest(q.proargtypes::oid[]) WITH ORDINALITY u(x, o)))",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(missing.is_empty(), "no uuid overload: {missing:?}");
    let count: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_proc p WHERE p.pronamespace = 'levqor'::regnamespace AND p.proname !~ '^_'
                AND 'uuid'::regtype::oid = ANY (p.proargtypes::oid[]) AND p.proargnames[1] = 'tenant'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(count >= 25, "the overloads exist: {count}");
    // Used as the issue did, and without ambiguity where a slug or nothing is passed.
    let t = tenant("m-uuid");
    let ok: bool = su
        .query_one("SELECT bool_and(v.ok) FROM levqor.tenants t, levqor.verify_audit(t.id) v WHERE t.id = $1", &[&t.id])
        .unwrap()
        .get(0);
    assert!(ok);
    su.query("SELECT * FROM levqor.verify_audit()", &[]).unwrap();
    su.query("SELECT * FROM levqor.verify_audit(NULL)", &[]).unwrap();
    // (A parameter of unknown type means the text version: bind a uuid as $1::uuid.)
    su.execute("SELECT levqor.suspend_tenant($1::uuid, 'by uuid')", &[&t.id]).unwrap();
    su.batch_execute(&format!("SELECT levqor.resume_tenant('{}')", t.slug)).unwrap();
    let mut tx = su.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1::uuid)", &[&t.id]).unwrap();
    assert_eq!(current_tenant(&mut tx), Some(t.id));
    // The overloads keep the privileges of the functions they call.
    assert_eq!(sqlstate(app().execute("SELECT levqor.suspend_tenant($1::uuid, 'x')", &[&t.id])), "42501");
    assert_eq!(sqlstate(app().execute("SELECT levqor.set_tenant($1::uuid)", &[&t.id])), "42501");
}
