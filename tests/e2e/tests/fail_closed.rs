//! Fail closed in every intermediate state (issue 21): whatever subset of
//! levqor's policies a protected table is left with (a restore in an unlucky
//! order, a superuser's DROP POLICY with the guards bypassed), no session
//! sees or writes more than with all of them; and a table whose row level
//! security a superuser switched off is refused rather than read whole.

use levqor_e2e::*;
use uuid::Uuid;

/// A levqor policy as pg_policy holds it, to drop and re-create.
#[derive(Clone, Debug)]
struct Policy {
    name: String,
    cmd: String,
    permissive: bool,
    qual: Option<String>,
    check: Option<String>,
}

fn policies(su: &mut Client, table: &str) -> Vec<Policy> {
    su.query(
        "SELECT polname::text, CASE polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                           WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                polpermissive, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
           FROM pg_policy WHERE polrelid = $1::text::regclass AND polname LIKE 'levqor\\_%' ORDER BY polname",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| Policy { name: r.get(0), cmd: r.get(1), permissive: r.get(2), qual: r.get(3), check: r.get(4) })
    .collect()
}

/// Drop (or re-create) policies behind the guards' back, as a superuser can.
fn behind_the_guard(su: &mut Client, sql: &str) {
    su.batch_execute(&format!("BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;")).unwrap();
}

fn drop_sql(table: &str, p: &Policy) -> String {
    format!("DROP POLICY {} ON {table}", p.name)
}

fn create_sql(table: &str, p: &Policy) -> String {
    format!(
        "CREATE POLICY {} ON {table} AS {} FOR {} TO PUBLIC {} {}",
        p.name,
        if p.permissive { "PERMISSIVE" } else { "RESTRICTIVE" },
        p.cmd,
        p.qual.as_ref().map(|q| format!("USING ({q})")).unwrap_or_default(),
        p.check.as_ref().map(|c| format!("WITH CHECK ({c})")).unwrap_or_default()
    )
}

/// What a context may do to `table`: the ids it reads, and whether each of
/// a set of forbidden writes got through.
#[derive(Debug, PartialEq)]
struct Reach {
    reads: Vec<i64>,
    forbidden_writes: Vec<String>,
}

fn reach(c: &mut Client, table: &str, ctx: Option<&str>, victim: Uuid, extra_writes: &[String]) -> Reach {
    let mut tx = c.transaction().unwrap();
    if let Some(slug) = ctx {
        tx.execute("SELECT levqor.set_tenant($1)", &[&slug]).unwrap();
    }
    let reads = tx.query(&format!("SELECT id FROM {table} ORDER BY id"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let mut forbidden_writes = Vec::new();
    let mut writes = vec![
        format!("INSERT INTO {table} (body, tenant_id) VALUES ('planted', '{victim}')"),
        format!("UPDATE {table} SET body = 'defaced' WHERE tenant_id = '{victim}'"),
        format!("DELETE FROM {table} WHERE tenant_id = '{victim}'"),
        format!("UPDATE {table} SET tenant_id = '{victim}'"),
    ];
    writes.extend(extra_writes.iter().cloned());
    for w in writes {
        tx.batch_execute("SAVEPOINT w").unwrap();
        match tx.execute(w.as_str(), &[]) {
            Ok(n) if n > 0 => forbidden_writes.push(w),
            _ => {}
        }
        tx.batch_execute("ROLLBACK TO SAVEPOINT w").unwrap();
    }
    tx.rollback().unwrap();
    Reach { reads, forbidden_writes }
}

fn subset_of(got: &Reach, all: &Reach) -> bool {
    got.forbidden_writes.is_empty() && got.reads.iter().all(|id| all.reads.contains(id))
}

/// Every subset of the table's levqor policies, dropped behind the guard:
/// each context reads a subset of what it reads with all of them, and none
/// of the forbidden writes goes through.
fn walk_every_subset(table: &str, contexts: &[(Option<String>, Uuid, Vec<String>)]) {
    let mut su = superuser();
    let mut c = server();
    let all = policies(&mut su, table);
    assert!(all.len() >= 5, "{table}: {all:?}");
    let baseline: Vec<Reach> = contexts.iter().map(|(ctx, v, w)| reach(&mut c, table, ctx.as_deref(), *v, w)).collect();
    for (b, (ctx, _, _)) in baseline.iter().zip(contexts) {
        assert!(b.forbidden_writes.is_empty(), "{table} as {ctx:?} with every policy: {:?}", b.forbidden_writes);
    }
    assert!(baseline.iter().any(|b| !b.reads.is_empty()), "the baseline reads something");
    for mask in 1u32..(1 << all.len()) {
        let dropped: Vec<&Policy> = all.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, p)| p).collect();
        behind_the_guard(&mut su, &dropped.iter().map(|p| drop_sql(table, p)).collect::<Vec<_>>().join("; "));
        for (b, (ctx, victim, w)) in baseline.iter().zip(contexts) {
            let got = reach(&mut c, table, ctx.as_deref(), *victim, w);
            let names: Vec<&str> = dropped.iter().map(|p| p.name.as_str()).collect();
            assert!(subset_of(&got, b), "{table} without {names:?}, as {ctx:?}: {got:?}, with every policy {b:?}");
        }
        behind_the_guard(&mut su, &dropped.iter().map(|p| create_sql(table, p)).collect::<Vec<_>>().join("; "));
    }
    let problems: i64 =
        su.query_one("SELECT count(*) FROM levqor._tenancy_problems($1::text::regclass, true)", &[&table]).unwrap().get(0);
    assert_eq!(problems, 0, "{table} is whole again");
}

#[test]
fn no_subset_of_a_tables_policies_admits_more_than_all_of_them() {
    let (a, b) = (tenant("fc-a"), tenant("fc-b"));
    let t = protected_table("orders");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a-1", "a-2"]);
    insert_rows(&mut c, &b, &t, &["b-1"]);
    walk_every_subset(
        &t,
        &[(None, a.id, vec![]), (Some(a.slug.clone()), b.id, vec![]), (Some(b.slug.clone()), a.id, vec![])],
    );
}

#[test]
fn no_subset_of_a_scoped_tables_policies_admits_more_than_all_of_them() {
    // platform -> pharma -> novartis, pfizer; and another tenant beside pharma.
    let mut a = admin();
    let platform = unique("fc-platform").replace('_', "-");
    a.query_one("SELECT levqor.create_platform($1, 'P')", &[&platform]).unwrap();
    let mk = |a: &mut Client, prefix: &str, parent: &str| -> Tenant {
        let slug = unique(prefix).replace('_', "-");
        let row = a
            .query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, $1, parent => $2)", &[&slug, &parent])
            .unwrap();
        Tenant { id: row.get(0), slug, key: row.get(1) }
    };
    let pharma = mk(&mut a, "fc-pharma", &platform);
    let novartis = mk(&mut a, "fc-novartis", &pharma.slug);
    let pfizer = mk(&mut a, "fc-pfizer", &pharma.slug);
    let other = mk(&mut a, "fc-other", &platform);
    let table = unique("projects");
    superuser()
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, body text NOT NULL);
             SELECT levqor.enable_tenancy('{table}', 'tenant_id', 'sharing_scope');
             GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {SERVER};
             GRANT USAGE ON SEQUENCE {table}_id_seq TO {SERVER};"
        ))
        .unwrap();
    let mut s = server();
    for (who, scope) in [(&novartis, "organization"), (&pfizer, "organization"), (&pfizer, "tenant"), (&other, "tenant")] {
        let mut tx = s.transaction().unwrap();
        tx.execute("SELECT levqor.set_tenant($1)", &[&who.slug]).unwrap();
        tx.execute(&format!("INSERT INTO {table} (body, sharing_scope) VALUES ($1, $2)"), &[&who.slug, &scope]).unwrap();
        tx.commit().unwrap();
    }
    let mut tx = s.transaction().unwrap();
    tx.execute("SELECT levqor.set_tenant($1)", &[&platform]).unwrap();
    tx.execute(&format!("INSERT INTO {table} (body, sharing_scope) VALUES ('platform-wide', 'platform')"), &[]).unwrap();
    tx.commit().unwrap();
    // Publishing to the whole platform is the platform's alone.
    let publish = vec![format!("INSERT INTO {table} (body, sharing_scope) VALUES ('to everyone', 'platform')")];
    walk_every_subset(
        &table,
        &[
            (None, novartis.id, vec![]),
            (Some(novartis.slug.clone()), pfizer.id, publish.clone()),
            (Some(pfizer.slug.clone()), novartis.id, publish.clone()),
            (Some(other.slug.clone()), pfizer.id, publish),
        ],
    );
}

#[test]
fn a_protected_table_whose_row_level_security_is_switched_off_is_refused() {
    let (a, b) = (tenant("off-a"), tenant("off-b"));
    let t = protected_table("invoices");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a-1"]);
    insert_rows(&mut c, &b, &t, &["b-1"]);
    let mut su = superuser();
    // Owned by a role the application also logs in as (for the NO FORCE case).
    let owner = unique("off_owner");
    su.batch_execute(&format!("CREATE ROLE {owner} LOGIN IN ROLE levqor_app; ALTER TABLE {t} OWNER TO {owner};")).unwrap();
    // The guard refuses it, even to a superuser ...
    assert_eq!(sqlstate(su.batch_execute(&format!("ALTER TABLE {t} DISABLE ROW LEVEL SECURITY"))), "42501");
    // ... who can still go around it.
    behind_the_guard(&mut su, &format!("ALTER TABLE {t} DISABLE ROW LEVEL SECURITY"));
    let (code, message) = error_of(c.query(&format!("SELECT * FROM {t}"), &[]));
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("row level security is off"), "{message}");
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert_eq!(sqlstate(tx.query(&format!("SELECT * FROM {t}"), &[])), "42501", "with a context too");
    drop(tx);
    assert_eq!(sqlstate(c.query(&format!("SELECT count(*) FROM (SELECT * FROM {t}) x"), &[])), "42501");
    let mut out = Vec::new();
    let copied = c.copy_out(&format!("COPY {t} TO STDOUT")).map(|mut r| std::io::Read::read_to_end(&mut r, &mut out));
    assert_eq!(sqlstate(copied), "42501", "COPY reads without the executor: checked too");
    assert!(out.is_empty());
    let high: i64 = su
        .query_one(
            "SELECT count(*) FROM levqor.isolation_report() WHERE severity = 'high' AND kind = 'rls_disabled' AND object = $1",
            &[&format!("public.{t}")],
        )
        .unwrap()
        .get(0);
    assert_eq!(high, 1, "the report says so");

    // Enabled but not forced: its owner would bypass the policies.
    behind_the_guard(&mut su, &format!("ALTER TABLE {t} ENABLE ROW LEVEL SECURITY, NO FORCE ROW LEVEL SECURITY"));
    let mut o = connect_to(port(), &owner, db());
    assert_eq!(sqlstate(o.query(&format!("SELECT * FROM {t}"), &[])), "42501", "the owner is refused");
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new(), "others are filtered as before");
    // Put right, everything works again, in sessions that saw it broken too.
    behind_the_guard(&mut su, &format!("ALTER TABLE {t} FORCE ROW LEVEL SECURITY"));
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["a-1"]);
    assert_eq!(as_tenant(&mut o, &b, |tx| bodies(tx, &t)), ["b-1"]);
    drop(o);
    su.batch_execute(&format!("ALTER TABLE {t} OWNER TO postgres; DROP ROLE {owner}")).unwrap();
}
