//! levqor.isolation_report(): every kind of finding is created, seen, fixed
//! and gone; a clean database reports nothing. One test, in its own database,
//! because roles are cluster-wide and findings about them must not leak into
//! other tests.

use levqor_e2e::*;

fn findings(c: &mut Client) -> Vec<(String, String)> {
    c.query("SELECT kind, object FROM levqor.isolation_report() ORDER BY kind, object", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn has(c: &mut Client, kind: &str, object: &str) -> bool {
    findings(c).iter().any(|(k, o)| k == kind && o == object)
}

#[test]
fn each_finding_is_reported_and_fixing_it_clears_it() {
    let (name, mut su) = new_database("report");
    su.batch_execute(&format!("CREATE EXTENSION levqor; GRANT CREATE ON SCHEMA public TO {APP}")).unwrap();
    assert_eq!(findings(&mut su), vec![], "a clean database has no findings");

    su.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, email text);
         SELECT levqor.enable_tenancy('accounts');",
    )
    .unwrap();
    assert_eq!(findings(&mut su), vec![], "a protected table alone is clean");

    // 1. an unprotected table beside a protected one
    su.batch_execute("CREATE TABLE invoices (id int)").unwrap();
    assert!(has(&mut su, "unprotected_table", "public.invoices"));
    su.batch_execute("SELECT levqor.exempt_from_report('invoices', 'currency codes, no tenant data')").unwrap();
    assert!(!has(&mut su, "unprotected_table", "public.invoices"));

    // 2. RLS enabled but not forced
    su.batch_execute("CREATE TABLE loose (id int); ALTER TABLE loose ENABLE ROW LEVEL SECURITY;").unwrap();
    assert!(has(&mut su, "rls_not_forced", "public.loose"));
    su.batch_execute("ALTER TABLE loose FORCE ROW LEVEL SECURITY").unwrap();
    assert!(!has(&mut su, "rls_not_forced", "public.loose"));
    su.batch_execute("DROP TABLE loose").unwrap();

    // 3. a view that runs with a superuser's rights. New views become
    // security_invoker by themselves; an explicit opt-out is respected and reported.
    su.batch_execute("CREATE VIEW all_accounts AS SELECT * FROM accounts").unwrap();
    let opts: Vec<String> = su
        .query_one("SELECT coalesce(reloptions, '{}') FROM pg_class WHERE oid = 'all_accounts'::regclass", &[])
        .unwrap()
        .get(0);
    assert_eq!(opts, ["security_invoker=true"]);
    assert!(!has(&mut su, "view_not_security_invoker", "public.all_accounts"));
    su.batch_execute("CREATE VIEW raw_accounts WITH (security_invoker = false) AS SELECT * FROM accounts").unwrap();
    assert!(has(&mut su, "view_not_security_invoker", "public.raw_accounts"));
    su.batch_execute("ALTER VIEW raw_accounts SET (security_invoker = true)").unwrap();
    assert!(!has(&mut su, "view_not_security_invoker", "public.raw_accounts"));

    // 4. a SECURITY DEFINER function reading a protected table
    su.batch_execute("CREATE FUNCTION count_accounts() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS 'SELECT count(*) FROM accounts'").unwrap();
    assert!(has(&mut su, "security_definer_reads_protected", "public.count_accounts()"));
    su.batch_execute("ALTER FUNCTION count_accounts() SECURITY INVOKER").unwrap();
    assert!(!has(&mut su, "security_definer_reads_protected", "public.count_accounts()"));

    // 5. a tenant column without an index
    su.batch_execute("DROP INDEX accounts_tenant_id_idx").unwrap();
    assert!(has(&mut su, "tenant_column_unindexed", "public.accounts"));
    su.batch_execute("CREATE INDEX ON accounts (tenant_id, id)").unwrap();
    assert!(!has(&mut su, "tenant_column_unindexed", "public.accounts"));

    // 6. a unique constraint without the tenant column (an existence oracle)
    su.batch_execute("ALTER TABLE accounts ADD CONSTRAINT accounts_email_key UNIQUE (email)").unwrap();
    assert!(has(&mut su, "unique_without_tenant", "public.accounts_email_key"));
    su.batch_execute(
        "ALTER TABLE accounts DROP CONSTRAINT accounts_email_key;
         ALTER TABLE accounts ADD CONSTRAINT accounts_email_key UNIQUE (tenant_id, email);",
    )
    .unwrap();
    assert!(!has(&mut su, "unique_without_tenant", "public.accounts_email_key"));

    // 7. an application role that bypasses row level security
    let role = unique("rls_bypasser");
    su.batch_execute(&format!("CREATE ROLE {role} LOGIN BYPASSRLS IN ROLE levqor_app")).unwrap();
    let seen = has(&mut su, "bypassrls_role", &role);
    su.batch_execute(&format!("DROP ROLE {role}")).unwrap();
    assert!(seen);

    assert_eq!(findings(&mut su), vec![], "everything fixed: clean again");

    // Only levqor_admin reads the report.
    let mut c = connect_to(port(), APP, &name);
    assert_eq!(sqlstate(c.query("SELECT * FROM levqor.isolation_report()", &[])), "42501");
}

#[test]
fn enable_tenancy_warns_about_unique_constraints_without_the_tenant_column() {
    let (mut c, notices) = connect_collecting_notices(APP);
    let t = unique("uniq");
    c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY, code text UNIQUE); SELECT levqor.enable_tenancy('{t}')"))
        .unwrap();
    let seen = notices.lock().unwrap().join("\n");
    assert!(seen.contains(&format!("{t}_code_key")) && seen.contains("does not include"), "{seen}");
}
