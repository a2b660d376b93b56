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

    // 8. a partition made behind the guard's back
    su.batch_execute(
        "CREATE TABLE visits (id bigint, at date NOT NULL, tenant_id uuid NOT NULL) PARTITION BY RANGE (at);
         SELECT levqor.enable_tenancy('visits');
         BEGIN; SET LOCAL session_replication_role = replica;
         CREATE TABLE visits_2027 PARTITION OF visits FOR VALUES FROM ('2027-01-01') TO ('2028-01-01'); COMMIT;",
    )
    .unwrap();
    assert!(has(&mut su, "unprotected_partition", "public.visits_2027"));
    su.batch_execute("SELECT levqor.enable_tenancy('visits_2027')").unwrap();
    assert!(!has(&mut su, "unprotected_partition", "public.visits_2027"));

    // 9. a table inheriting from a protected one
    su.batch_execute("CREATE TABLE vip_accounts () INHERITS (accounts)").unwrap();
    assert!(has(&mut su, "inherits_protected", "public.vip_accounts"));
    su.batch_execute("SELECT levqor.enable_tenancy('vip_accounts')").unwrap();
    assert!(!has(&mut su, "inherits_protected", "public.vip_accounts"));
    su.batch_execute("DROP TABLE vip_accounts").unwrap();

    // 10. a foreign key between protected tables without the tenant column
    su.batch_execute(
        "CREATE TABLE account_notes (id int PRIMARY KEY, account_id int REFERENCES accounts (id));
         SELECT levqor.enable_tenancy('account_notes');",
    )
    .unwrap();
    assert!(has(&mut su, "foreign_key_without_tenant", "public.account_notes (account_notes_account_id_fkey)"));
    su.batch_execute("SELECT levqor.scope_foreign_keys('account_notes')").unwrap();
    assert!(!has(&mut su, "foreign_key_without_tenant", "public.account_notes (account_notes_account_id_fkey)"));

    // 11. a materialized view over a protected table, readable by the application
    su.batch_execute("CREATE MATERIALIZED VIEW account_totals AS SELECT tenant_id, count(*) FROM accounts GROUP BY 1;
                      GRANT SELECT ON account_totals TO levqor_app;")
        .unwrap();
    let high = |su: &mut Client, kind: &str, object: &str| -> bool {
        su.query_one("SELECT count(*) = 1 FROM levqor.isolation_report() WHERE severity = 'high' AND kind = $1 AND object = $2", &[&kind, &object])
            .unwrap()
            .get(0)
    };
    assert!(high(&mut su, "materialized_view_over_protected", "public.account_totals"));
    su.batch_execute("DROP MATERIALIZED VIEW account_totals").unwrap();

    // 12. a copy made with CREATE TABLE AS by a role that bypasses row level security
    su.batch_execute("CREATE TABLE accounts_backup AS SELECT * FROM accounts").unwrap();
    assert!(high(&mut su, "copy_of_protected", "public.accounts_backup"));
    su.batch_execute("DROP TABLE accounts_backup").unwrap();
    assert!(!has(&mut su, "copy_of_protected", "public.accounts_backup"));

    // 13. a SECURITY DEFINER function without a pinned search_path
    su.batch_execute("CREATE FUNCTION whoami() RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT current_user::text'").unwrap();
    assert!(has(&mut su, "security_definer_search_path", "public.whoami()"));
    su.batch_execute("ALTER FUNCTION whoami() SET search_path = pg_catalog, pg_temp").unwrap();
    assert!(!has(&mut su, "security_definer_search_path", "public.whoami()"));

    // 14. granted to PUBLIC: a protected table, and its sequence
    su.batch_execute("CREATE TABLE tickets (id serial PRIMARY KEY); SELECT levqor.enable_tenancy('tickets');
                      GRANT SELECT ON tickets TO PUBLIC; GRANT USAGE ON SEQUENCE tickets_id_seq TO PUBLIC;")
        .unwrap();
    assert!(has(&mut su, "granted_to_public", "public.tickets"));
    assert!(has(&mut su, "granted_to_public", "public.tickets_id_seq"));
    su.batch_execute("REVOKE ALL ON tickets FROM PUBLIC; REVOKE ALL ON SEQUENCE tickets_id_seq FROM PUBLIC;").unwrap();
    assert!(!has(&mut su, "granted_to_public", "public.tickets") && !has(&mut su, "granted_to_public", "public.tickets_id_seq"));

    // 15, 16. owned by the application; the application owning levqor's objects
    su.batch_execute(&format!("ALTER TABLE tickets OWNER TO {APP}; ALTER FUNCTION levqor.preloaded() OWNER TO {APP};")).unwrap();
    assert!(has(&mut su, "owned_by_application", "public.tickets"));
    assert!(has(&mut su, "application_owns_levqor", APP));
    su.batch_execute(&format!("ALTER TABLE tickets OWNER TO postgres; ALTER FUNCTION levqor.preloaded() OWNER TO postgres;")).unwrap();
    assert!(!has(&mut su, "owned_by_application", "public.tickets") && !has(&mut su, "application_owns_levqor", APP));

    // 17. a permissive policy of someone else's
    su.batch_execute("CREATE POLICY staff_see_all ON tickets USING (true)").unwrap();
    assert!(has(&mut su, "extra_permissive_policy", "public.tickets (staff_see_all)"));
    su.batch_execute("DROP POLICY staff_see_all ON tickets").unwrap();

    // 18. audit entries nobody seals (no worker serves this database)
    su.batch_execute("INSERT INTO levqor.audit_log (kind, event, detail, at) VALUES ('event', 'old', '{}', now() - interval '1 hour')").unwrap();
    assert!(high(&mut su, "audit_not_sealed", &name));
    su.batch_execute("SELECT levqor.seal_audit()").unwrap();
    assert!(!has(&mut su, "audit_not_sealed", &name));

    // For CI: the same as one JSON array.
    su.batch_execute("CREATE TABLE stray (id int)").unwrap();
    let high_in_json: bool = su
        .query_one("SELECT jsonb_path_exists(levqor.isolation_report(format => 'json'), '$[*] ? (@.severity == \"high\")')", &[])
        .unwrap()
        .get(0);
    assert!(high_in_json);
    su.batch_execute("DROP TABLE stray").unwrap();
    let empty: String = su.query_one("SELECT levqor.isolation_report(format => 'json')::text", &[]).unwrap().get(0);
    assert_eq!(empty, "[]");
    assert_eq!(sqlstate(su.query("SELECT levqor.isolation_report(format => 'yaml')", &[])), "22023");

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
