//! The organisation hierarchy and members: the seed's platform -> tenant ->
//! organization rules, the closure table under moves, who may ask about
//! which node, members with at least one owner, and read-only member roles.

use levqor_e2e::*;
use uuid::Uuid;

/// platform -> pharma (tenant) -> novartis, pfizer (organizations) -> novartis-ra
struct Tree {
    platform: Uuid,
    pharma: Tenant,
    novartis: Tenant,
    pfizer: Tenant,
    ra: Tenant,
}

fn child(a: &mut Client, prefix: &str, parent: &str) -> Tenant {
    let slug = unique(prefix).replace('_', "-");
    let row = a
        .query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, $2, parent => $3)", &[&slug, &slug, &parent])
        .unwrap();
    Tenant { id: row.get(0), slug, key: row.get(1) }
}

fn tree() -> Tree {
    let mut a = admin();
    let slug = unique("platform").replace('_', "-");
    let platform: Uuid = a.query_one("SELECT levqor.create_platform($1, 'Platform')", &[&slug]).unwrap().get(0);
    let pharma = child(&mut a, "pharma", &slug);
    let novartis = child(&mut a, "novartis", &pharma.slug);
    let pfizer = child(&mut a, "pfizer", &pharma.slug);
    let ra = child(&mut a, "novartis-ra", &novartis.slug);
    Tree { platform, pharma, novartis, pfizer, ra }
}

fn kind(a: &mut Client, id: Uuid) -> String {
    a.query_one("SELECT kind FROM levqor.tenants WHERE id = $1", &[&id]).unwrap().get(0)
}

fn ids(a: &mut Client, sql: &str, node: Uuid) -> Vec<Uuid> {
    a.query(sql, &[&node]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// The closure table equals what the parent links say, for every node.
fn assert_tree_consistent(a: &mut Client) {
    let wrong: i64 = a
        .query_one(
            "WITH RECURSIVE up AS (
                 SELECT id AS descendant, id AS ancestor, 0 AS depth, parent FROM levqor.tenants
                 UNION ALL
                 SELECT up.descendant, p.id, up.depth + 1, p.parent FROM up JOIN levqor.tenants p ON p.id = up.parent)
             SELECT count(*) FROM (
                 (SELECT ancestor, descendant, depth FROM up EXCEPT SELECT ancestor, descendant, depth FROM levqor.tenant_tree)
                 UNION ALL
                 (SELECT ancestor, descendant, depth FROM levqor.tenant_tree EXCEPT SELECT ancestor, descendant, depth FROM up)) d",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "tenant_tree disagrees with the parent links");
    let stale: i64 = a
        .query_one(
            "SELECT count(*) FROM levqor.tenant_tree c JOIN levqor.tenants t ON t.id = c.descendant
              WHERE (c.slug, c.kind) IS DISTINCT FROM (t.slug, t.kind)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "tenant_tree's copies of slug and kind are current");
}

#[test]
fn kinds_follow_the_parent_and_the_helpers_walk_the_tree() {
    let t = tree();
    let mut a = admin();
    assert_eq!(kind(&mut a, t.platform), "platform");
    assert_eq!(kind(&mut a, t.pharma.id), "tenant");
    assert_eq!(kind(&mut a, t.novartis.id), "organization");
    assert_eq!(kind(&mut a, t.ra.id), "organization");
    assert_eq!(ids(&mut a, "SELECT id FROM levqor.ancestors($1)", t.ra.id), vec![t.novartis.id, t.pharma.id, t.platform]);
    let mut below = ids(&mut a, "SELECT id FROM levqor.descendants($1)", t.pharma.id);
    below.sort();
    let mut want = vec![t.novartis.id, t.pfizer.id, t.ra.id];
    want.sort();
    assert_eq!(below, want);
    for node in [t.pharma.id, t.novartis.id, t.pfizer.id, t.ra.id] {
        let top: Option<Uuid> = a.query_one("SELECT levqor.tenant_of($1)", &[&node]).unwrap().get(0);
        assert_eq!(top, Some(t.pharma.id));
    }
    let top: Option<Uuid> = a.query_one("SELECT levqor.tenant_of($1)", &[&t.platform]).unwrap().get(0);
    assert_eq!(top, None, "nothing is the tenant of a platform");
    // The helpers are index lookups on the closure table, not recursion.
    let plan: Vec<String> = superuser()
        .query("EXPLAIN SELECT ancestor FROM levqor.tenant_tree WHERE descendant = $1 AND depth > 0", &[&t.ra.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!plan.iter().any(|l| l.contains("Recursive")), "{plan:#?}");
    assert_tree_consistent(&mut a);
}

#[test]
fn the_seeds_rules_are_enforced() {
    let t = tree();
    let mut a = admin();
    let mut su = superuser();
    // A platform has no parent; an organization has one.
    assert_eq!(
        sqlstate(su.execute("UPDATE levqor.tenants SET parent = $1 WHERE id = $2", &[&t.pharma.id, &t.platform])),
        "23514"
    );
    assert_eq!(sqlstate(su.execute("UPDATE levqor.tenants SET parent = NULL WHERE id = $1", &[&t.ra.id])), "23514");
    // A tenant sits under a platform only.
    assert_eq!(sqlstate(a.execute("SELECT levqor.move_tenant($1, $2)", &[&t.pharma.slug, &t.pfizer.slug])), "23514");
    // No cycles: pharma cannot go under its own grandchild.
    assert_eq!(
        sqlstate(su.execute("UPDATE levqor.tenants SET parent = $1 WHERE id = $2", &[&t.ra.id, &t.novartis.id])),
        "23514"
    );
    assert_eq!(sqlstate(su.execute("UPDATE levqor.tenants SET parent = $1 WHERE id = $1", &[&t.novartis.id])), "23514");
    // A kind does not change under children.
    assert_eq!(
        sqlstate(su.execute("UPDATE levqor.tenants SET kind = 'platform', parent = NULL WHERE id = $1", &[&t.pharma.id])),
        "55000"
    );
    assert_tree_consistent(&mut a);
}

#[test]
fn moving_a_subtree_keeps_the_closure_exact() {
    let t = tree();
    let mut a = admin();
    let deep = child(&mut a, "deep", &t.ra.slug);
    // novartis (with ra and deep below it) moves under pfizer.
    a.execute("SELECT levqor.move_tenant($1, $2)", &[&t.novartis.slug, &t.pfizer.slug]).unwrap();
    assert_eq!(
        ids(&mut a, "SELECT id FROM levqor.ancestors($1)", deep.id),
        vec![t.ra.id, t.novartis.id, t.pfizer.id, t.pharma.id, t.platform]
    );
    assert_tree_consistent(&mut a);
    // ... and back; the move is in the audit trail.
    a.execute("SELECT levqor.move_tenant($1, $2)", &[&t.novartis.slug, &t.pharma.slug]).unwrap();
    assert_eq!(
        ids(&mut a, "SELECT id FROM levqor.ancestors($1)", deep.id),
        vec![t.ra.id, t.novartis.id, t.pharma.id, t.platform]
    );
    assert_tree_consistent(&mut a);
    let moves: i64 = a
        .query_one("SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'tenant_moved'", &[&t.novartis.id])
        .unwrap()
        .get(0);
    assert_eq!(moves, 2);
}

#[test]
fn an_application_sees_only_its_own_tree() {
    let t = tree();
    let other = tree();
    let mut c = app();
    let (mine, theirs, top, foreign_top) = as_tenant(&mut c, &t.novartis, |tx| {
        let mine: Vec<Uuid> = tx.query("SELECT id FROM levqor.ancestors($1)", &[&t.ra.id]).unwrap().iter().map(|r| r.get(0)).collect();
        let theirs = tx.query("SELECT id FROM levqor.descendants($1)", &[&other.pharma.id]).unwrap().len();
        let top: Option<Uuid> = tx.query_one("SELECT levqor.tenant_of($1)", &[&t.pfizer.id]).unwrap().get(0);
        let foreign_top: Option<Uuid> = tx.query_one("SELECT levqor.tenant_of($1)", &[&other.novartis.id]).unwrap().get(0);
        (mine, theirs, top, foreign_top)
    });
    assert_eq!(mine, vec![t.novartis.id, t.pharma.id], "its tenant's line, not the platform above it");
    assert_eq!(theirs, 0, "another tenant's tree is not shown");
    assert_eq!(top, Some(t.pharma.id), "a sibling organization under the same tenant is in the tree");
    assert_eq!(foreign_top, None);
    // Without a context: nothing.
    assert!(c.query("SELECT * FROM levqor.ancestors($1)", &[&t.ra.id]).unwrap().is_empty());
    // Moving is for levqor_admin.
    assert_eq!(sqlstate(c.execute("SELECT levqor.move_tenant($1, $2)", &[&t.ra.slug, &t.pfizer.slug])), "42501");
}

#[test]
fn members_keep_an_owner_and_reach_everything_below_them() {
    let t = tree();
    let mut a = admin();
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    a.execute("SELECT levqor.add_member($1, $2, 'owner', 'alice@novartis.example')", &[&t.novartis.slug, &alice]).unwrap();
    a.execute("SELECT levqor.add_member($1, $2, 'viewer')", &[&t.pfizer.slug, &bob]).unwrap();
    assert_eq!(sqlstate(a.execute("SELECT levqor.add_member($1, $2, 'viewer')", &[&t.novartis.slug, &alice])), "23505");
    assert_eq!(sqlstate(a.execute("SELECT levqor.add_member($1, $2, 'boss')", &[&t.novartis.slug, &bob])), "22023");
    // The only owner can be neither demoted nor removed...
    assert_eq!(sqlstate(a.execute("SELECT levqor.set_member_role($1, $2, 'admin')", &[&t.novartis.slug, &alice])), "55000");
    assert_eq!(sqlstate(a.execute("SELECT levqor.remove_member($1, $2)", &[&t.novartis.slug, &alice])), "55000");
    // ... until there is another.
    a.execute("SELECT levqor.add_member($1, $2, 'owner')", &[&t.novartis.slug, &bob]).unwrap();
    a.execute("SELECT levqor.set_member_role($1, $2, 'admin')", &[&t.novartis.slug, &alice]).unwrap();
    assert_eq!(sqlstate(a.execute("SELECT levqor.remove_member($1, $2)", &[&t.novartis.slug, &bob])), "55000");
    assert_eq!(sqlstate(a.execute("SELECT levqor.remove_member($1, $2)", &[&t.pharma.slug, &bob])), "42704");

    // accessible_orgs: where the user is a member, and everything below.
    let mut orgs: Vec<Uuid> = a
        .query("SELECT levqor.accessible_orgs($1)", &[&alice])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    orgs.sort();
    let mut want = vec![t.novartis.id, t.ra.id];
    want.sort();
    assert_eq!(orgs, want, "novartis and its child, not pfizer");
    // An application asks only about the user of its own context.
    let mut s = server();
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, user_id => $2, member_role => 'admin')", &[&t.novartis.slug, &alice]).unwrap();
    assert_eq!(tx.query("SELECT levqor.accessible_orgs($1)", &[&alice]).unwrap().len(), 2);
    assert_eq!(tx.query("SELECT levqor.accessible_orgs($1)", &[&bob]).unwrap().len(), 0);
    drop(tx);
    // Member changes are in the audit trail.
    let events: i64 = a
        .query_one(
            "SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1 AND event LIKE 'member\\_%'",
            &[&t.novartis.id],
        )
        .unwrap()
        .get(0);
    assert_eq!(events, 3);
}

#[test]
fn viewers_and_auditors_read_but_never_write() {
    let table = protected_table("h_roles");
    let t = tenant("h-roles");
    insert_rows(&mut app(), &t, &table, &["existing"]);
    let mut s = server();
    for role in ["viewer", "auditor"] {
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1, member_role => $2)", &[&t.slug, &role]).unwrap();
        assert_eq!(bodies(&mut tx, &table), vec!["existing"], "{role} reads");
        tx.batch_execute("SAVEPOINT s").unwrap();
        for write in [
            format!("INSERT INTO {table} (body) VALUES ('x')"),
            format!("UPDATE {table} SET body = 'y'"),
            format!("DELETE FROM {table}"),
        ] {
            assert_eq!(sqlstate(tx.batch_execute(&write)), "42501", "{role}: {write}");
            tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
        }
    }
    // A key issued for a viewer is read-only too; an operator writes.
    let viewer_key: String = admin()
        .query_one("SELECT levqor.issue_key($1, role => 'viewer', label => 'viewer key')", &[&t.slug])
        .unwrap()
        .get(0);
    let mut c = app();
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&viewer_key]).unwrap();
    assert_eq!(sqlstate(tx.execute(&format!("INSERT INTO {table} (body) VALUES ('v')"), &[])), "42501");
    drop(tx);
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1, member_role => 'operator')", &[&t.slug]).unwrap();
    tx.execute(&format!("INSERT INTO {table} (body) VALUES ('by operator')"), &[]).unwrap();
    tx.commit().unwrap();
}

fn as_node<R>(s: &mut Client, slug: &str, f: impl FnOnce(&mut postgres::Transaction<'_>) -> R) -> R {
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&slug]).unwrap();
    let r = f(&mut tx);
    tx.commit().unwrap();
    r
}

fn names(tx: &mut postgres::Transaction<'_>, table: &str) -> Vec<String> {
    tx.query(&format!("SELECT name FROM {table} ORDER BY name"), &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// The seed's examples: a Novartis user cannot see Pfizer-only agents, sees
/// pharma-wide ones and platform ones; nobody outside pharma sees pharma's.
#[test]
fn scoped_rows_are_shared_as_the_seed_says() {
    let t = tree();
    let other = tree();
    let table = unique("agents");
    superuser()
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, name text NOT NULL, owner_org uuid NOT NULL,
                                   sharing_scope text NOT NULL DEFAULT 'organization');
             CREATE INDEX ON {table} (owner_org);
             SELECT levqor.enable_tenancy('{table}', 'owner_org', 'sharing_scope');
             GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {SERVER}, {APP};
             GRANT USAGE ON SEQUENCE {table}_id_seq TO {SERVER};"
        ))
        .unwrap();
    let platform_slug: String =
        admin().query_one("SELECT slug FROM levqor.tenants WHERE id = $1", &[&t.platform]).unwrap().get(0);
    let mut s = server();
    let insert = |tx: &mut postgres::Transaction<'_>, name: &str, scope: &str| {
        tx.execute(&format!("INSERT INTO {table} (name, sharing_scope) VALUES ($1, $2)"), &[&name, &scope]).map(|_| ())
    };
    as_node(&mut s, &t.novartis.slug, |tx| insert(tx, "novartis ra agent", "organization").unwrap());
    as_node(&mut s, &t.pfizer.slug, |tx| {
        insert(tx, "pfizer only agent", "organization").unwrap();
        insert(tx, "pharma wide agent", "tenant").unwrap();
    });
    as_node(&mut s, &platform_slug, |tx| insert(tx, "platform agent", "platform").unwrap());
    as_node(&mut s, &other.novartis.slug, |tx| insert(tx, "other tenant agent", "tenant").unwrap());

    assert_eq!(
        as_node(&mut s, &t.novartis.slug, |tx| names(tx, &table)),
        ["novartis ra agent", "pharma wide agent", "platform agent"]
    );
    assert_eq!(
        as_node(&mut s, &t.pfizer.slug, |tx| names(tx, &table)),
        ["pfizer only agent", "pharma wide agent", "platform agent"]
    );
    // novartis-ra sits under novartis: tenant scope reaches it, organization scope does not.
    assert_eq!(as_node(&mut s, &t.ra.slug, |tx| names(tx, &table)), ["pharma wide agent", "platform agent"]);
    assert_eq!(
        as_node(&mut s, &other.pfizer.slug, |tx| names(tx, &table)),
        ["other tenant agent", "platform agent"]
    );
    let mut c = app();
    assert!(names(&mut c.transaction().unwrap(), &table).is_empty(), "no context: nothing");

    // Writes stay in the writer's organization; only a platform publishes to everyone.
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&t.novartis.slug]).unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(insert(&mut tx, "to everyone", "platform")), "42501");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(
        sqlstate(tx.execute(&format!("INSERT INTO {table} (name, owner_org) VALUES ('as pfizer', $1)"), &[&t.pfizer.id])),
        "42501"
    );
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(insert(&mut tx, "bogus scope", "galaxy")), "23514");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    let changed = tx.execute(&format!("UPDATE {table} SET name = 'mine now' WHERE name = 'pharma wide agent'"), &[]).unwrap();
    assert_eq!(changed, 0, "a shared row is read, not written, by other organizations");
    assert_eq!(
        sqlstate(tx.execute(&format!("UPDATE {table} SET sharing_scope = 'platform' WHERE name = 'novartis ra agent'"), &[])),
        "42501"
    );
    drop(tx);

    // The owner cannot quietly drop the scope rules.
    let mut su = superuser();
    assert_eq!(
        sqlstate(su.batch_execute(&format!(
            "ALTER POLICY levqor_tenant_insert ON {table} WITH CHECK (owner_org = levqor.current_tenant())"
        ))),
        "42501"
    );
    assert_eq!(
        sqlstate(su.batch_execute(&format!("ALTER POLICY levqor_tenant_select ON {table} USING (true)"))),
        "42501"
    );
    assert_eq!(sqlstate(su.execute(&format!("SELECT levqor.enable_tenancy('{table}', 'owner_org')"), &[])), "55000");
    assert!(su.query("SELECT * FROM levqor.isolation_report() WHERE object = $1", &[&table]).unwrap().is_empty());
}

const METADATA: &str = r#"<?xml version="1.0"?>
<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" entityID="https://idp.novartis.example/saml">
  <md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol"/>
</md:EntityDescriptor>"#;

#[test]
fn sso_settings_are_validated_and_the_secret_stays_with_the_trusted_server() {
    let t = tree();
    let mut a = admin();
    // SSO comes with the plan.
    assert_eq!(
        sqlstate(a.execute(
            "SELECT levqor.set_sso_oidc($1, 'https://login.example/', 'client-1', 'a-long-enough-secret')",
            &[&t.novartis.slug]
        )),
        "55000"
    );
    a.execute("SELECT levqor.change_plan($1, 'enterprise')", &[&t.novartis.slug]).unwrap();
    a.execute("SELECT levqor.change_plan($1, 'enterprise')", &[&t.pfizer.slug]).unwrap();
    for (issuer, client, secret) in [
        ("http://login.example/", "client-1", "a-long-enough-secret"),
        ("https://login.example/ x", "client-1", "a-long-enough-secret"),
        ("https://login.example/", "", "a-long-enough-secret"),
        ("https://login.example/", "client-1", "short"),
    ] {
        assert_eq!(
            sqlstate(a.execute("SELECT levqor.set_sso_oidc($1, $2, $3, $4)", &[&t.novartis.slug, &issuer, &client, &secret])),
            "22023",
            "{issuer} {client} {secret}"
        );
    }
    a.execute(
        "SELECT levqor.set_sso_oidc($1, 'https://login.novartis.example/', 'novartis-app', 'novartis-client-secret-0123',
                                    ARRAY['novartis.example'])",
        &[&t.novartis.slug],
    )
    .unwrap();
    assert_eq!(
        sqlstate(a.execute("SELECT levqor.set_sso_saml($1, 'https://idp.example/', metadata_xml => '<not xml')", &[&t.pfizer.slug])),
        "22023"
    );
    assert_eq!(
        sqlstate(a.execute("SELECT levqor.set_sso_saml($1, 'https://other.example/', metadata_xml => $2)", &[&t.pfizer.slug, &METADATA])),
        "22023",
        "the metadata names another entity"
    );
    a.execute("SELECT levqor.set_sso_saml($1, 'https://idp.novartis.example/saml', metadata_xml => $2)", &[&t.pfizer.slug, &METADATA])
        .unwrap();

    // The application reads its own tenant's settings, never the secret.
    let mut c = app();
    let (issuer, has_secret) = as_tenant(&mut c, &t.novartis, |tx| {
        let r = tx.query_one("SELECT issuer, has_client_secret FROM levqor.sso_settings()", &[]).unwrap();
        (r.get::<_, String>(0), r.get::<_, bool>(1))
    });
    assert_eq!((issuer.as_str(), has_secret), ("https://login.novartis.example/", true));
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.novartis.key]).unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(tx.query("SELECT * FROM levqor.sso_settings($1)", &[&t.pfizer.slug])), "42501");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(tx.query("SELECT levqor.sso_client_secret($1)", &[&t.novartis.slug])), "42501");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    assert_eq!(sqlstate(tx.query("SELECT client_secret FROM levqor.tenant_sso", &[])), "42501");
    drop(tx);
    // The trusted server reads any tenant's settings before login, and the secret.
    let mut s = server();
    let protocol: String = s.query_one("SELECT protocol FROM levqor.sso_settings($1)", &[&t.pfizer.slug]).unwrap().get(0);
    assert_eq!(protocol, "saml");
    let secret: String = s.query_one("SELECT levqor.sso_client_secret($1)", &[&t.novartis.slug]).unwrap().get(0);
    assert_eq!(secret, "novartis-client-secret-0123");
    // The audit trail has the configuration, not the secret.
    let detail: String = a
        .query_one("SELECT detail::text FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'sso_configured'", &[&t.novartis.id])
        .unwrap()
        .get(0);
    assert!(detail.contains("novartis-app") && !detail.contains("secret-0123"), "{detail}");
}
