//! Row isolation between tenants, seen from an ordinary application role.

use levqor_e2e::*;

#[test]
fn each_tenant_sees_only_its_rows() {
    let (a, b) = (tenant("iso-a"), tenant("iso-b"));
    let t = protected_table("items");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a1", "a2"]);
    insert_rows(&mut c, &b, &t, &["b1"]);
    assert_eq!(as_tenant(&mut c, &a, |tx| bodies(tx, &t)), ["a1", "a2"]);
    assert_eq!(as_tenant(&mut c, &b, |tx| bodies(tx, &t)), ["b1"]);
    // The rows really are there: the superuser sees all three.
    assert_eq!(bodies(&mut superuser(), &t).len(), 3);
}

#[test]
fn no_context_reads_nothing_and_writes_nothing() {
    let a = tenant("noctx");
    let t = protected_table("noctx");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["secret"]);
    assert!(current_tenant(&mut c).is_none());
    assert_eq!(bodies(&mut c, &t), Vec::<String>::new());
    let n: i64 = c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).unwrap().get(0);
    assert_eq!(n, 0);
    // The column default is the (absent) tenant: the insert policy refuses it.
    let (code, msg) = error_of(c.execute(&format!("INSERT INTO {t} (body) VALUES ('x')"), &[]));
    assert_eq!(code, "42501");
    assert!(msg.contains("row-level security"), "{msg}");
    // Naming a tenant explicitly does not help either.
    assert_eq!(
        sqlstate(c.execute(&format!("INSERT INTO {t} (body, tenant_id) VALUES ('x', $1)"), &[&a.id])),
        "42501"
    );
    assert_eq!(c.execute(&format!("UPDATE {t} SET body = 'y'"), &[]).unwrap(), 0);
    assert_eq!(c.execute(&format!("DELETE FROM {t}"), &[]).unwrap(), 0);
    assert_eq!(bodies(&mut superuser(), &t), ["secret"]);
}

#[test]
fn another_tenants_id_is_refused_on_insert_and_update() {
    let (a, b) = (tenant("wr-a"), tenant("wr-b"));
    let t = protected_table("writes");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a"]);
    insert_rows(&mut c, &b, &t, &["b"]);

    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    let (code, msg) = error_of(tx.execute(&format!("INSERT INTO {t} (body, tenant_id) VALUES ('evil', $1)"), &[&b.id]));
    assert_eq!(code, "42501");
    assert!(msg.contains("violates row-level security policy"), "{msg}");
    tx.rollback().unwrap();

    // Moving one's own row to another tenant.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    assert_eq!(sqlstate(tx.execute(&format!("UPDATE {t} SET tenant_id = $1"), &[&b.id])), "42501");
    tx.rollback().unwrap();

    // Touching the other tenant's rows finds nothing to touch.
    as_tenant(&mut c, &a, |tx| {
        assert_eq!(tx.execute(&format!("UPDATE {t} SET body = 'pwned' WHERE body = 'b'"), &[]).unwrap(), 0);
        assert_eq!(tx.execute(&format!("DELETE FROM {t} WHERE body = 'b'"), &[]).unwrap(), 0);
        assert_eq!(tx.execute(&format!("DELETE FROM {t} WHERE tenant_id = $1"), &[&b.id]).unwrap(), 0);
    });
    assert_eq!(as_tenant(&mut c, &b, |tx| bodies(tx, &t)), ["b"]);
}

#[test]
fn views_owned_by_the_app_and_security_invoker_views_filter() {
    let (a, b) = (tenant("view-a"), tenant("view-b"));
    let t = protected_table("viewed");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a"]);
    insert_rows(&mut c, &b, &t, &["b"]);
    let (v1, v2) = (unique("v_owner"), unique("v_invoker"));
    c.batch_execute(&format!(
        "CREATE VIEW {v1} AS SELECT * FROM {t};
         CREATE VIEW {v2} WITH (security_invoker = true) AS SELECT * FROM {t};"
    ))
    .unwrap();
    as_tenant(&mut c, &a, |tx| {
        assert_eq!(bodies(tx, &v1), ["a"]);
        assert_eq!(bodies(tx, &v2), ["a"]);
    });
    assert_eq!(bodies(&mut c, &v1), Vec::<String>::new());
}

#[test]
fn copy_to_exports_only_own_rows_and_copy_from_is_refused() {
    use std::io::Read;
    let (a, b) = (tenant("copy-a"), tenant("copy-b"));
    let t = protected_table("copied");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a-row"]);
    insert_rows(&mut c, &b, &t, &["b-row"]);
    let out = as_tenant(&mut c, &a, |tx| {
        let mut s = String::new();
        tx.copy_out(&format!("COPY {t} (body) TO STDOUT")).unwrap().read_to_string(&mut s).unwrap();
        s
    });
    assert_eq!(out, "a-row\n");

    // PostgreSQL refuses COPY FROM into a table with row level security:
    // levqor fails closed rather than loading unchecked rows.
    let mut tx = c.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    // (The server refuses before it asks for data, so a simple query shows the error.)
    let res = tx.simple_query(&format!("COPY {t} (body, tenant_id) FROM STDIN"));
    let (code, msg) = error_of(res);
    assert_eq!(code, "0A000");
    assert!(msg.contains("row-level security"), "{msg}");
    tx.rollback().unwrap();
    assert_eq!(as_tenant(&mut c, &b, |tx| bodies(tx, &t)), ["b-row"]);
}

#[test]
fn prepared_statements_follow_the_current_tenant_with_generic_plans() {
    let (a, b) = (tenant("prep-a"), tenant("prep-b"));
    let t = protected_table("prepared");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a1", "a2"]);
    insert_rows(&mut c, &b, &t, &["b1"]);
    c.batch_execute(&format!(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE q AS SELECT string_agg(body, ',' ORDER BY body) FROM {t} WHERE id > $1"
    ))
    .unwrap();
    // A protocol-level prepared statement too (tokio-postgres prepares every query).
    let stmt = c.prepare(&format!("SELECT count(*) FROM {t}")).unwrap();
    for _ in 0..3 {
        for (tenant, want, n) in [(&a, "a1,a2", 2i64), (&b, "b1", 1)] {
            as_tenant(&mut c, tenant, |tx| {
                let got: String = tx.query_one("EXECUTE q(0)", &[]).unwrap().get(0);
                assert_eq!(got, want);
                assert_eq!(tx.query_one(&stmt, &[]).unwrap().get::<_, i64>(0), n);
            });
        }
    }
    let plan: String = c.query_one("SELECT generic_plans::text FROM pg_prepared_statements WHERE name = 'q'", &[]).unwrap().get(0);
    assert_ne!(plan, "0", "the generic plan was used");
}

#[test]
fn parallel_workers_see_the_leaders_context() {
    let (a, b) = (tenant("par-a"), tenant("par-b"));
    let t = unique("parallel");
    let mut su = superuser();
    su.batch_execute(&format!(
        "CREATE TABLE {t} (id bigserial PRIMARY KEY, body text NOT NULL, tenant_id uuid NOT NULL);
         INSERT INTO {t} (body, tenant_id)
              SELECT 'row' || g, CASE WHEN g % 3 = 0 THEN '{}'::uuid ELSE '{}'::uuid END
                FROM generate_series(1, 60000) g;
         SELECT levqor.enable_tenancy('{t}');
         ANALYZE {t};
         GRANT SELECT ON {t} TO {APP};",
        b.id, a.id
    ))
    .unwrap();
    let mut c = app();
    c.batch_execute(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0;
         SET min_parallel_table_scan_size = 0; SET enable_indexscan = off; SET enable_bitmapscan = off;",
    )
    .unwrap();
    for (tenant, want) in [(&a, 40000i64), (&b, 20000)] {
        as_tenant(&mut c, tenant, |tx| {
            let plan: Vec<String> = tx
                .query(&format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) SELECT count(*) FROM {t}"), &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            let plan = plan.join("\n");
            assert!(plan.contains("Parallel Seq Scan"), "{plan}");
            assert!(!plan.contains("Workers Launched: 0"), "{plan}");
            assert!(plan.contains("Workers Launched"), "{plan}");
            let n: i64 = tx.query_one(&format!("SELECT count(*) FROM {t}"), &[]).unwrap().get(0);
            assert_eq!(n, want);
        });
    }
    // A worker with no context finds nothing, as the leader does.
    let n: i64 = c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).unwrap().get(0);
    assert_eq!(n, 0);
}

#[test]
fn leaky_functions_in_where_never_see_other_tenants_rows() {
    let (a, b) = (tenant("leak-a"), tenant("leak-b"));
    let t = protected_table("leaky");
    let mut c = app();
    insert_rows(&mut c, &a, &t, &["a-visible"]);
    insert_rows(&mut c, &b, &t, &["b-SECRET-1", "b-SECRET-2"]);
    let f = unique("leak");
    c.batch_execute(&format!(
        "CREATE FUNCTION {f}(x text) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS
         $$ BEGIN RAISE NOTICE 'leaked: %', x; RETURN true; END $$;"
    ))
    .unwrap();
    let (mut spy, notices) = connect_collecting_notices(APP);
    as_tenant(&mut spy, &a, |tx| {
        tx.query(&format!("SELECT * FROM {t} WHERE {f}(body)"), &[]).unwrap();
        tx.query(&format!("SELECT * FROM {t} WHERE {f}(body) OR tenant_id = $1"), &[&b.id]).unwrap();
    });
    let seen = notices.lock().unwrap().join("|");
    assert!(seen.contains("a-visible"), "the function did run: {seen}");
    assert!(!seen.contains("SECRET"), "another tenant's row reached a user function: {seen}");
}

#[test]
fn the_policy_is_an_index_condition() {
    let a = tenant("explain");
    let t = protected_table("explained");
    superuser()
        .batch_execute(&format!(
            "INSERT INTO {t} (body, tenant_id) SELECT 'r' || g, gen_random_uuid() FROM generate_series(1, 20000) g;
             ANALYZE {t};"
        ))
        .unwrap();
    let mut c = app();
    let plan = as_tenant(&mut c, &a, |tx| {
        tx.query(&format!("EXPLAIN (COSTS OFF) SELECT * FROM {t}"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    });
    assert!(plan.contains("Index Cond: (tenant_id = levqor.current_tenant())"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}
