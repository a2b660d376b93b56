//! Schema-per-tenant isolation and fleet migrations. Each test has a database
//! of its own, because the template schema is per database.

use levqor_e2e::*;

fn fresh_db(prefix: &str) -> (String, Client) {
    let (name, mut su) = new_database(prefix);
    su.batch_execute(
        "CREATE EXTENSION levqor;
         GRANT USAGE ON SCHEMA levqor_template TO levqor_app;
         CREATE TABLE levqor_template.projects (
             id serial PRIMARY KEY, name text NOT NULL, parent_id int REFERENCES levqor_template.projects (id));
         CREATE TABLE levqor_template.tasks (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             project_id int NOT NULL REFERENCES levqor_template.projects (id) ON DELETE CASCADE,
             title text);
         GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA levqor_template TO levqor_app;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA levqor_template TO levqor_app;
         CREATE TABLE shared_notes (id bigserial PRIMARY KEY, body text NOT NULL);
         SELECT levqor.enable_tenancy('shared_notes');
         GRANT SELECT, INSERT ON shared_notes TO levqor_app; GRANT USAGE ON SEQUENCE shared_notes_id_seq TO levqor_app;",
    )
    .unwrap();
    (name, su)
}

fn schema_tenant(su: &mut Client, slug: &str) -> Tenant {
    let row = su
        .query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, $1, isolation => 'schema')", &[&slug])
        .unwrap();
    Tenant { id: row.get(0), slug: slug.into(), key: row.get(1) }
}

#[test]
fn schema_tenants_get_their_own_tables_and_cannot_touch_each_other() {
    let (db, mut su) = fresh_db("schemas");
    let (a, b) = (schema_tenant(&mut su, "sch-a"), schema_tenant(&mut su, "sch-b"));
    let shared = create_tenant_on(&mut su, "sch-shared");
    let mut c = connect_to(port(), APP, &db);

    // The same application SQL for both: search_path points at the tenant's schema.
    for (t, name) in [(&a, "alpha"), (&b, "beta")] {
        as_tenant(&mut c, t, |tx| {
            let path: String = tx.query_one("SHOW search_path", &[]).unwrap().get(0);
            assert_eq!(path, format!("tenant_{}, public", t.slug.replace('-', "_")));
            tx.execute("INSERT INTO projects (name) VALUES ($1)", &[&name]).unwrap();
            tx.execute("INSERT INTO tasks (project_id, title) SELECT id, 'first' FROM projects", &[]).unwrap();
            tx.execute("INSERT INTO shared_notes (body) VALUES ($1)", &[&name]).unwrap();
        });
    }
    insert_rows(&mut c, &shared, "shared_notes", &["shared-row"]);
    as_tenant(&mut c, &a, |tx| {
        let rows: Vec<(i32, String)> =
            tx.query("SELECT id, name FROM projects", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(rows, [(1, "alpha".to_string())], "its own sequence starts at 1");
        assert_eq!(bodies(tx, "shared_notes"), ["alpha"], "shared tables work beside schema tables");
        // Naming the other tenant's schema does not help.
        let n: i64 = tx.query_one("SELECT count(*) FROM tenant_sch_b.projects", &[]).unwrap().get(0);
        assert_eq!(n, 0);
    });
    for sql in [
        "INSERT INTO tenant_sch_b.projects (name) VALUES ('planted')",
        "UPDATE tenant_sch_b.projects SET name = 'x'",
        "DELETE FROM tenant_sch_b.tasks",
        "TRUNCATE tenant_sch_b.projects CASCADE",
    ] {
        let mut tx = c.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
        let (code, msg) = error_of(tx.batch_execute(sql));
        assert_eq!(code, "42501", "{sql}: {msg}");
    }
    // No context, no rows and no writes, even with the schema named.
    let n: i64 = c.query_one("SELECT count(*) FROM tenant_sch_a.projects", &[]).unwrap().get(0);
    assert_eq!(n, 0);
    assert_eq!(sqlstate(c.batch_execute("TRUNCATE tenant_sch_a.tasks")), "42501");
    // The superuser sees that everything is where it belongs.
    let names: Vec<String> = su
        .query("SELECT name FROM tenant_sch_a.projects UNION ALL SELECT name FROM tenant_sch_b.projects ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["alpha", "beta"]);
    // Foreign keys point inside the tenant's own schema.
    let fk: String = su
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'tenant_sch_a.tasks'::regclass AND contype = 'f'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(fk.contains("REFERENCES tenant_sch_a.projects(id)"), "{fk}");
    // A session context's search_path goes with clear_tenant().
    c.execute("SELECT levqor.authenticate($1, session => true)", &[&a.key]).unwrap();
    c.execute("SELECT levqor.clear_tenant()", &[]).unwrap();
    let path: String = c.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(path, "\"$user\", public");

    // Purging drops the schema.
    su.batch_execute("SELECT levqor.offboard_tenant('sch-b', '0'); SELECT * FROM levqor.purge_tenant('sch-b')").unwrap();
    let gone: Option<String> = su.query_one("SELECT to_regnamespace('tenant_sch_b')::text", &[]).unwrap().get(0);
    assert!(gone.is_none());
    // Slugs that would not fit a schema name are refused.
    let long = "x".repeat(57);
    assert_eq!(sqlstate(su.query("SELECT * FROM levqor.create_tenant($1, 'L', isolation => 'schema')", &[&long])), "22023");
}

#[test]
fn migrate_runs_once_per_schema_isolates_failures_and_retries_only_them() {
    let (db, mut su) = fresh_db("migrate");
    let tenants: Vec<Tenant> = (0..4).map(|i| schema_tenant(&mut su, &format!("mig-{i}"))).collect();
    // Sabotage one tenant so the migration fails there.
    su.batch_execute("ALTER TABLE tenant_mig_2.projects ADD COLUMN priority text").unwrap();

    let ddl = "ALTER TABLE projects ADD COLUMN priority int NOT NULL DEFAULT 0";
    let run = |su: &mut Client| -> Vec<(String, String)> {
        su.query("SELECT schema_name::text, status FROM levqor.migrate('add-priority', $1, progress_every => 2)", &[&ddl])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let first = run(&mut su);
    assert_eq!(first.len(), 5, "template + 4 tenants: {first:?}");
    assert_eq!(first[0], ("levqor_template".into(), "done".into()));
    let failed: Vec<_> = first.iter().filter(|(_, s)| s == "failed").map(|(n, _)| n.as_str()).collect();
    assert_eq!(failed, ["tenant_mig_2"]);
    let err: String = su
        .query_one("SELECT error FROM levqor.migrations WHERE name = 'add-priority' AND schema_name = 'tenant_mig_2'", &[])
        .unwrap()
        .get(0);
    assert!(err.contains("already exists"), "{err}");

    // Fix the broken schema; a second run retries it alone.
    su.batch_execute("ALTER TABLE tenant_mig_2.projects DROP COLUMN priority").unwrap();
    assert_eq!(run(&mut su), [("tenant_mig_2".to_string(), "done".to_string())]);
    assert_eq!(run(&mut su), Vec::<(String, String)>::new(), "nothing left to do");

    // Every schema has the column; new tenants get it from the template.
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'priority' AND table_name = 'projects'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
    let late = schema_tenant(&mut su, "mig-late");
    let mut c = connect_to(port(), APP, &db);
    as_tenant(&mut c, &late, |tx| {
        tx.execute("INSERT INTO projects (name, priority) VALUES ('p', 3)", &[]).unwrap();
    });

    // A migration that creates a table protects it in every tenant schema.
    su.query("SELECT * FROM levqor.migrate('labels', 'CREATE TABLE labels (id int PRIMARY KEY, tag text)')", &[]).unwrap();
    su.batch_execute("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA tenant_mig_0, tenant_mig_1 TO levqor_app").unwrap();
    as_tenant(&mut c, &tenants[0], |tx| {
        tx.execute("INSERT INTO labels VALUES (1, 'mine')", &[]).unwrap();
    });
    as_tenant(&mut c, &tenants[1], |tx| {
        let n: i64 = tx.query_one("SELECT count(*) FROM tenant_mig_0.labels", &[]).unwrap().get(0);
        assert_eq!(n, 0);
    });

    // Only superusers migrate.
    let mut adm = connect_to(port(), ADMIN, &db);
    assert_eq!(sqlstate(adm.query("SELECT * FROM levqor.migrate('x', 'SELECT 1')", &[])), "42501");
    let mut app = connect_to(port(), APP, &db);
    assert_eq!(sqlstate(app.batch_execute("CALL levqor.migrate_in_batches('x', 'SELECT 1')")), "42501");
}

#[test]
fn migrate_in_batches_commits_as_it_goes() {
    let (_db, mut su) = fresh_db("batches");
    for i in 0..5 {
        schema_tenant(&mut su, &format!("bat-{i}"));
    }
    su.batch_execute("CALL levqor.migrate_in_batches('add-done', 'ALTER TABLE tasks ADD COLUMN done boolean', batch => 2)")
        .unwrap();
    let done: i64 = su
        .query_one("SELECT count(*) FROM levqor.migrations WHERE name = 'add-done' AND status = 'done'", &[])
        .unwrap()
        .get(0);
    assert_eq!(done, 6);
}
