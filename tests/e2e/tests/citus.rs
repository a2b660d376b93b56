//! levqor on Citus (docs/citus.md): a coordinator and two workers on loopback
//! ports, started here with `scripts/cluster.sh start NAME PORT citus`, and
//! the isolation attacks of this suite against distributed tables, through
//! the coordinator and straight at the workers. When Citus is not installed
//! the Citus tests say so and pass without running; the last test checks
//! what levqor does on the ordinary e2e cluster, which has no Citus.

use std::sync::{Arc, Mutex, OnceLock};

use levqor_e2e::*;
use uuid::Uuid;

const OWNER: &str = "citus_owner";
const APP_ROLE: &str = "citus_app";
const SERVER_ROLE: &str = "citus_server";
const OTHER_ROLE: &str = "citus_other";
const ADMIN_ROLE: &str = "citus_admin";

struct Cluster {
    ports: [u16; 3],
}

fn base_port() -> u16 {
    std::env::var("LEVQOR_CITUS_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(28830)
}

fn citus_installed() -> bool {
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_config").arg("--pkglibdir").output();
    match out {
        Ok(o) => std::path::Path::new(String::from_utf8_lossy(&o.stdout).trim()).join("citus.so").exists(),
        Err(_) => false,
    }
}

static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();

/// The three-node cluster, started once for this test binary (None, and a
/// line saying so, without Citus).
fn cluster() -> Option<&'static Cluster> {
    CLUSTER
        .get_or_init(|| {
            if !citus_installed() {
                eprintln!("skipped: Citus is not installed (no citus.so in pg_config --pkglibdir); docs/citus.md says how to run these tests");
                return None;
            }
            let base = base_port();
            let ports = [base, base + 1, base + 2];
            let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            for (i, port) in ports.iter().enumerate() {
                let status = std::process::Command::new(repo.join("scripts/cluster.sh"))
                    .args(["start", &format!("citus{i}-e2e"), &port.to_string(), "citus"])
                    .env("LEVQOR_EXTRA_PRELOAD", "pg_stat_statements")
                    .status()
                    .expect("run scripts/cluster.sh");
                assert!(status.success(), "starting Citus node {i} failed");
            }
            for port in [ports[1], ports[2], ports[0]] {
                connect_to(port, "postgres", "postgres")
                    .batch_execute("CREATE EXTENSION citus; CREATE EXTENSION pg_stat_statements")
                    .unwrap();
            }
            let mut c = connect_to(ports[0], "postgres", "postgres");
            c.batch_execute(&format!(
                "SELECT citus_set_coordinator_host('127.0.0.1', {});
                 SELECT citus_add_node('127.0.0.1', {});
                 SELECT citus_add_node('127.0.0.1', {});
                 SET client_min_messages = error;
                 CREATE EXTENSION levqor;
                 CREATE ROLE {OWNER} LOGIN;
                 GRANT CREATE ON SCHEMA public TO {OWNER};
                 CREATE ROLE {APP_ROLE} LOGIN IN ROLE levqor_app;
                 CREATE ROLE {OTHER_ROLE} LOGIN IN ROLE levqor_app;
                 CREATE ROLE {SERVER_ROLE} LOGIN IN ROLE levqor_app, levqor_context_admin;
                 CREATE ROLE {ADMIN_ROLE} LOGIN IN ROLE levqor_admin;",
                ports[0], ports[1], ports[2]
            ))
            .unwrap();
            Some(Cluster { ports })
        })
        .as_ref()
}

impl Cluster {
    fn coordinator(&self, user: &str) -> Client {
        connect_to(self.ports[0], user, "postgres")
    }
    fn worker(&self, i: usize, user: &str) -> Client {
        connect_to(self.ports[1 + i], user, "postgres")
    }
    fn tenant(&self, prefix: &str) -> Tenant {
        create_tenant_on(&mut self.coordinator(ADMIN_ROLE), prefix)
    }
    /// `name (id, tenant_id, body)` owned by a non-superuser, distributed.
    fn distributed_table(&self, prefix: &str, colocate_with: Option<&str>) -> String {
        let name = unique(prefix);
        let colocate = colocate_with.map(|t| format!(", colocate_with => '{t}'")).unwrap_or_default();
        self.coordinator(OWNER)
            .batch_execute(&format!(
                "CREATE TABLE {name} (id bigserial, tenant_id uuid NOT NULL, body text NOT NULL, PRIMARY KEY (tenant_id, id));
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {APP_ROLE}, {SERVER_ROLE}, {OTHER_ROLE};
                 GRANT USAGE ON SEQUENCE {name}_id_seq TO {APP_ROLE}, {SERVER_ROLE}, {OTHER_ROLE};
                 SELECT levqor.distribute('{name}'{colocate});"
            ))
            .unwrap();
        name
    }
    /// The shards of a table whose protection is not intact (none: all are).
    fn shard_problems(&self, table: &str) -> Vec<String> {
        self.coordinator("postgres")
            .query(&format!("SELECT shard_id || ': ' || problems FROM levqor.shard_problems('{table}')"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
    fn one_shard(&self, table: &str) -> (usize, String) {
        let mut c = self.coordinator("postgres");
        let row = c
            .query_one(
                "SELECT n.nodeport, shard_name(s.logicalrelid, s.shardid)
                   FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid) JOIN pg_dist_node n ON n.groupid = p.groupid
                  WHERE s.logicalrelid = $1::text::regclass ORDER BY s.shardid LIMIT 1",
                &[&table],
            )
            .unwrap();
        let port: i32 = row.get(0);
        ((port as u16 - self.ports[1]) as usize, row.get(1))
    }
}

fn insert(c: &mut Client, t: &Tenant, table: &str, bodies: &[&str]) {
    as_tenant(c, t, |tx| {
        for b in bodies {
            tx.execute(&format!("INSERT INTO {table} (body) VALUES ($1)"), &[b]).unwrap();
        }
    });
}

fn count(c: &mut impl postgres::GenericClient, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

fn tasks(c: &mut impl postgres::GenericClient, sql: &str) -> i64 {
    let plan: Vec<String> = c.query(&format!("EXPLAIN (COSTS OFF) {sql}"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    plan.iter()
        .find_map(|l| l.trim().strip_prefix("Task Count: ").map(|n| n.parse().unwrap()))
        .unwrap_or_else(|| panic!("no Task Count in {plan:#?}"))
}

#[test]
fn distribute_protects_every_shard_and_each_tenant_sees_and_changes_only_its_rows() {
    let Some(cl) = cluster() else { return };
    let (a, b) = (cl.tenant("ct-acme"), cl.tenant("ct-globex"));
    let users = cl.distributed_table("users", None);
    let orders = cl.distributed_table("orders", Some(&users));
    assert!(cl.shard_problems(&users).is_empty(), "{:?}", cl.shard_problems(&users));
    assert!(cl.shard_problems(&orders).is_empty());
    // Citus copies policies to shards without AS RESTRICTIVE; the guard on
    // each worker made levqor's restrictive again.
    let mut su = cl.coordinator("postgres");
    let permissive: Vec<String> = su
        .query(
            &format!("SELECT result FROM run_command_on_shards('{users}', $$SELECT string_agg(polname, ',' ORDER BY polname) FROM pg_policy WHERE polrelid = '%s'::regclass AND polpermissive$$)"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(permissive.iter().all(|p| p == "levqor_base"), "{permissive:?}");

    let mut app = cl.coordinator(APP_ROLE);
    insert(&mut app, &a, &users, &["ann", "bob"]);
    insert(&mut app, &b, &users, &["gus"]);
    insert(&mut app, &a, &orders, &["order 1"]);
    // Shared lookup data: a reference table without tenancy, joined on the tenant's shard.
    let plans = unique("plans");
    cl.coordinator(OWNER)
        .batch_execute(&format!(
            "CREATE TABLE {plans} (body text PRIMARY KEY, label text); SELECT create_reference_table('{plans}');
             INSERT INTO {plans} VALUES ('ann', 'gold'), ('gus', 'free'); GRANT SELECT ON {plans} TO {APP_ROLE};"
        ))
        .unwrap();
    as_tenant(&mut app, &a, |tx| {
        assert_eq!(bodies(tx, &users), ["ann", "bob"]);
        assert_eq!(count(tx, &format!("SELECT count(*) FROM {users} u JOIN {orders} o USING (tenant_id)")), 2);
        let labels: Vec<String> = tx
            .query(&format!("SELECT p.label FROM {users} u JOIN {plans} p USING (body) ORDER BY 1"), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(labels, ["gold"], "gus is globex's");
        assert_eq!(tasks(tx, &format!("SELECT p.label FROM {users} u JOIN {plans} p USING (body)")), 1);
        assert_eq!(tasks(tx, &format!("SELECT * FROM {users} u JOIN {orders} o USING (tenant_id)")), 1);
        // Another tenant's id, on insert and on update: refused on the shard.
        let e = tx.execute(&format!("INSERT INTO {users} (tenant_id, body) VALUES ($1, 'planted')"), &[&b.id]);
        assert_eq!(sqlstate(e), "42501");
    });
    as_tenant(&mut app, &a, |tx| {
        // (Citus itself refuses to change a distribution column, 0A000.)
        let e = tx.execute(&format!("UPDATE {users} SET tenant_id = $1"), &[&b.id]);
        assert_eq!(sqlstate(e), "0A000");
    });
    as_tenant(&mut app, &b, |tx| {
        assert_eq!(bodies(tx, &users), ["gus"]);
        assert_eq!(tx.execute(&format!("UPDATE {users} SET body = body || '!'"), &[]).unwrap(), 1);
        assert_eq!(tx.execute(&format!("DELETE FROM {orders}"), &[]).unwrap(), 0, "acme's order is not globex's to delete");
    });
    // No context: no rows, on any path.
    assert_eq!(count(&mut app, &format!("SELECT count(*) FROM {users}")), 0);
    // (The tenant column's default is NULL without a context: Citus refuses
    // a row without a distribution value, 22004.)
    assert_eq!(sqlstate(app.execute(&format!("INSERT INTO {users} (body) VALUES ('nobody')"), &[])), "22004");
    // A permissive policy the owner adds cannot widen what a tenant sees,
    // neither on the coordinator nor on the shards.
    cl.coordinator(OWNER).batch_execute(&format!("CREATE POLICY everyone ON {users} USING (true)")).unwrap();
    as_tenant(&mut app, &b, |tx| assert_eq!(bodies(tx, &users), ["gus!"]));
    // TRUNCATE: refused to the owner on the coordinator and on a shard.
    let e = cl.coordinator(OWNER).batch_execute(&format!("TRUNCATE {users}"));
    assert_eq!(sqlstate(e), "42501");
    let (w, shard) = cl.one_shard(&users);
    // (Citus refuses changes to a shard unless asked not to: an attacker asks.)
    let e = cl.worker(w, OWNER).batch_execute(&format!("SET citus.enable_manual_changes_to_shards = on; TRUNCATE {shard}"));
    assert_eq!(sqlstate(e), "42501");
    // ... and the DDL guard on the worker keeps the shard's protection.
    for ddl in [
        format!("DROP POLICY levqor_tenant_select ON {shard}"),
        format!("ALTER TABLE {shard} NO FORCE ROW LEVEL SECURITY"),
        format!("ALTER TABLE {shard} DISABLE TRIGGER ALL"),
        format!("CREATE POLICY levqor_tenant_x ON {shard} USING (true)"),
    ] {
        let e = cl.worker(w, OWNER).batch_execute(&format!("SET citus.enable_manual_changes_to_shards = on; {ddl}"));
        assert_eq!(sqlstate(e), "42501", "{ddl}");
    }
    assert_eq!(count(&mut su, &format!("SELECT count(*) FROM {users}")), 3);
}

#[test]
fn create_distributed_table_first_then_enable_tenancy_protects_the_shards_too() {
    let Some(cl) = cluster() else { return };
    let a = cl.tenant("ct-first");
    let name = unique("invoices");
    cl.coordinator(OWNER)
        .batch_execute(&format!(
            "CREATE TABLE {name} (id bigserial, tenant_id uuid NOT NULL, body text NOT NULL, PRIMARY KEY (tenant_id, id));
             SELECT create_distributed_table('{name}', 'tenant_id');
             SELECT levqor.enable_tenancy('{name}');
             GRANT SELECT, INSERT ON {name} TO {APP_ROLE};
             GRANT USAGE ON SEQUENCE {name}_id_seq TO {APP_ROLE};"
        ))
        .unwrap();
    assert!(cl.shard_problems(&name).is_empty(), "{:?}", cl.shard_problems(&name));
    let mut app = cl.coordinator(APP_ROLE);
    insert(&mut app, &a, &name, &["inv 1"]);
    as_tenant(&mut app, &a, |tx| assert_eq!(bodies(tx, &name), ["inv 1"]));
    assert_eq!(count(&mut app, &format!("SELECT count(*) FROM {name}")), 0);

    // Distributed by another column: refused with what to do.
    let other = unique("events");
    let mut owner = cl.coordinator(OWNER);
    owner
        .batch_execute(&format!(
            "CREATE TABLE {other} (id bigint, tenant_id uuid NOT NULL, body text); SELECT create_distributed_table('{other}', 'id');"
        ))
        .unwrap();
    let (code, msg) = error_of(owner.batch_execute(&format!("SELECT levqor.enable_tenancy('{other}')")));
    assert_eq!(code, "0A000");
    assert!(msg.contains("distributed by id"), "{msg}");
}

#[test]
fn each_tenants_queries_go_to_its_own_shard_and_prepared_plans_follow_the_tenant() {
    let Some(cl) = cluster() else { return };
    let tenants: Vec<Tenant> = (0..4).map(|i| cl.tenant(&format!("ct-route{i}"))).collect();
    let docs = cl.distributed_table("documents", None);
    let mut app = cl.coordinator(APP_ROLE);
    for (i, t) in tenants.iter().enumerate() {
        let rows: Vec<String> = (0..=i).map(|k| format!("{}-{k}", t.slug)).collect();
        insert(&mut app, t, &docs, &rows.iter().map(String::as_str).collect::<Vec<_>>());
    }
    as_tenant(&mut app, &tenants[0], |tx| {
        assert_eq!(tasks(tx, &format!("SELECT * FROM {docs}")), 1);
        assert_eq!(tasks(tx, &format!("SELECT count(*) FROM {docs} WHERE body LIKE 'x%'")), 1);
        assert_eq!(tasks(tx, &format!("UPDATE {docs} SET body = body")), 1);
        assert_eq!(tasks(tx, &format!("DELETE FROM {docs} WHERE body = 'none'")), 1);
        assert_eq!(tasks(tx, &format!("SELECT * FROM (SELECT body FROM {docs}) s")), 1);
    });
    // Prepared statements, custom and generic plans, one connection, the
    // tenant changing between executions and within a transaction.
    for mode in ["force_custom_plan", "force_generic_plan", "auto"] {
        app.batch_execute(&format!("SET plan_cache_mode = {mode}")).unwrap();
        let all = app.prepare(&format!("SELECT count(*), min(body) FROM {docs}")).unwrap();
        let like = app.prepare(&format!("SELECT count(*) FROM {docs} WHERE body LIKE $1")).unwrap();
        for round in 0..2 {
            for (i, t) in tenants.iter().enumerate().rev() {
                as_tenant(&mut app, t, |tx| {
                    let row = tx.query_one(&all, &[]).unwrap();
                    assert_eq!(row.get::<_, i64>(0), i as i64 + 1, "{mode} round {round} tenant {i}");
                    assert_eq!(row.get::<_, String>(1), format!("{}-0", t.slug));
                    let n: i64 = tx.query_one(&like, &[&format!("{}%", t.slug)]).unwrap().get(0);
                    assert_eq!(n, i as i64 + 1);
                });
            }
        }
        let mut tx = app.transaction().unwrap();
        for (i, t) in tenants.iter().enumerate() {
            tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
            assert_eq!(tx.query_one(&all, &[]).unwrap().get::<_, i64>(0), i as i64 + 1, "{mode}, switching in one transaction");
        }
        tx.commit().unwrap();
        assert_eq!(app.query_one(&all, &[]).unwrap().get::<_, i64>(0), 0, "{mode}: no context, no rows");
    }
    // Parallel query on the workers (Citus forwards these settings too): the
    // parallel workers see the leader's forwarded context and no more.
    as_tenant(&mut app, &tenants[3], |tx| {
        tx.batch_execute(
            "SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;
             SET LOCAL min_parallel_table_scan_size = 0; SET LOCAL max_parallel_workers_per_gather = 2;
             SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off;",
        )
        .unwrap();
        let plan: Vec<String> = tx.query(&format!("EXPLAIN (COSTS OFF, VERBOSE) SELECT count(*) FROM {docs}"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert!(plan.iter().any(|l| l.contains("Gather")), "{plan:#?}");
        assert_eq!(count(tx, &format!("SELECT count(*) FROM {docs}")), 4);
    });
}

/// A connection to the coordinator that keeps Citus's remote-command log:
/// what an application could capture of its own forwarded context.
fn captured_context(cl: &Cluster, t: &Tenant, table: &str) -> String {
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = log.clone();
    let mut cfg: postgres::Config = format!("host=127.0.0.1 port={} user={APP_ROLE} dbname=postgres", cl.ports[0]).parse().unwrap();
    cfg.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    let mut c = cfg.connect(NoTls).unwrap();
    c.batch_execute("SET citus.log_remote_commands = on").unwrap();
    as_tenant(&mut c, t, |tx| count(tx, &format!("SELECT count(*) FROM {table}")));
    let log = log.lock().unwrap();
    let line = log.iter().find(|l| l.contains("levqor.node_context")).expect("Citus sent the context");
    let start = line.find("lvqn1.").unwrap();
    line[start..].split('\'').next().unwrap().to_string()
}

#[test]
fn a_direct_connection_to_a_worker_sees_nothing_with_a_forged_or_replayed_context() {
    let Some(cl) = cluster() else { return };
    let a = cl.tenant("ct-direct");
    let secrets = cl.distributed_table("secrets", None);
    insert(&mut cl.coordinator(APP_ROLE), &a, &secrets, &["s1", "s2", "s3"]);
    let value = captured_context(&cl, &a, &secrets);
    assert!(value.contains(&a.id.to_string()));
    let (served, _) = shard_of(cl, &secrets, &a);
    for w in 0..2 {
        let mut worker = cl.worker(w, APP_ROLE);
        // The distributed table through this node, and its shards directly.
        assert_eq!(count(&mut worker, &format!("SELECT count(*) FROM {secrets}")), 0, "no context");
        let shards: Vec<String> = cl
            .coordinator("postgres")
            .query(
                "SELECT shard_name(s.logicalrelid, s.shardid) FROM pg_dist_shard s JOIN pg_dist_placement p USING (shardid)
                  JOIN pg_dist_node n ON n.groupid = p.groupid WHERE s.logicalrelid = $1::text::regclass AND n.nodeport = $2",
                &[&secrets, &(cl.ports[1 + w] as i32)],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let union = shards.iter().map(|s| format!("SELECT count(*) AS n FROM {s}")).collect::<Vec<_>>().join(" UNION ALL ");
        let total = format!("SELECT coalesce(sum(n), 0)::bigint FROM ({union}) x");
        assert_eq!(count(&mut worker, &total), 0);

        // Replayed as it was captured: refused where its transaction ended,
        // and outside its distributed transaction nothing anywhere.
        let mut tx = worker.transaction().unwrap();
        let set = tx.batch_execute(&format!("SET LOCAL levqor.node_context = '{value}'"));
        if w == served {
            assert_eq!(sqlstate(set), "28000");
        } else {
            set.unwrap();
            assert_eq!(count(&mut tx, &total), 0, "replayed outside its distributed transaction");
            assert_eq!(count(&mut tx, "SELECT count(*) FROM (SELECT levqor.current_tenant()) c WHERE current_tenant IS NOT NULL"), 0);
        }
        tx.rollback().unwrap();
        // Forged: another tenant, a later expiry, another role.
        let forged = value.replacen(&a.id.to_string(), &Uuid::new_v4().to_string(), 1);
        let (code, msg) = error_of(worker.batch_execute(&format!("BEGIN; SET LOCAL levqor.node_context = '{forged}'")));
        assert_eq!(code, "28000");
        assert!(msg.contains("bad signature") && !msg.contains(&value[..40]), "{msg}");
        worker.batch_execute("ROLLBACK").unwrap();
        let mut other = cl.worker(w, OTHER_ROLE);
        let (code, msg) = error_of(other.batch_execute(&format!("BEGIN; SET LOCAL levqor.node_context = '{value}'")));
        assert_eq!(code, "28000");
        assert!(msg.contains("another database role"), "{msg}");
        // The context itself and the secrets behind it.
        let e = worker.batch_execute(&format!("SET levqor.context = 'v1 {} - - api_key'", a.id));
        assert_eq!(sqlstate(e), "42501");
        assert_eq!(sqlstate(worker.query_one("SELECT current_setting('levqor.cluster_secret')", &[])), "42501");
        assert_eq!(sqlstate(worker.query_one("SHOW levqor.node_context", &[])), "42501");
        // No tenant catalog on a worker: no context can be made there.
        assert_eq!(sqlstate(worker.execute("SELECT levqor.authenticate($1)", &[&a.key])), "28P01");
    }
    // pg_stat_activity on a worker never shows a forwarded context's signature.
    let mut app = cl.coordinator(APP_ROLE);
    let mut tx = app.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    count(&mut tx, &format!("SELECT count(*) FROM {secrets}"));
    // Again, now that the transaction has worker connections: Citus sends
    // the new context to them as a statement of its own.
    tx.execute("SELECT levqor.authenticate($1)", &[&a.key]).unwrap();
    let shown = redacted_on_workers(cl, "SELECT query FROM pg_stat_activity WHERE query LIKE '%lvqn1.%' AND pid <> pg_backend_pid()");
    assert!(shown > 0, "the workers show the statement that set the context (redacted)");
    tx.rollback().unwrap();
    // Nor does pg_stat_statements, which shows a role its own statements' text.
    let kept = redacted_on_workers(cl, "SELECT query FROM pg_stat_statements WHERE query LIKE '%lvqn1.%'");
    assert!(kept > 0, "pg_stat_statements keeps the statement that set the context (redacted)");
}

/// The statement texts `sql` finds on both workers, as the application role,
/// each checked to show a forwarded context's signature only as `*`; how many.
fn redacted_on_workers(cl: &Cluster, sql: &str) -> usize {
    let hex64 = |q: &str| q.as_bytes().windows(64).any(|w| w.iter().all(u8::is_ascii_hexdigit));
    let mut n = 0;
    for w in 0..2 {
        for q in cl.worker(w, APP_ROLE).query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)) {
            n += 1;
            assert!(!hex64(&q) && q.contains(&"*".repeat(64)), "{q}");
        }
    }
    n
}

/// The cluster's `levqor.node_context_lifetime` (scripts/cluster.sh): short,
/// so that these tests see contexts expire and get re-signed.
const LIFETIME_SECS: u64 = 10;

/// The Citus worker (0 or 1) that holds `tenant`'s shard of `table`, and the shard.
fn shard_of(cl: &Cluster, table: &str, tenant: &Tenant) -> (usize, String) {
    let row = cl
        .coordinator("postgres")
        .query_one(
            &format!(
                "SELECT n.nodeport, shard_name('{table}'::regclass, s.id)
                   FROM (SELECT get_shard_id_for_distribution_column('{table}', '{}') AS id) s
                   JOIN pg_dist_placement p ON p.shardid = s.id JOIN pg_dist_node n ON n.groupid = p.groupid",
                tenant.id
            ),
            &[],
        )
        .unwrap();
    let port: i32 = row.get(0);
    ((port as u16 - cl.ports[1]) as usize, row.get(1))
}

/// A client straight at a worker that claims the distributed transaction a
/// captured context names (Citus's own function does that for anyone), then
/// presents the context.
fn replay(cl: &Cluster, worker: usize, value: &str) -> (Client, Result<(), postgres::Error>) {
    let stamp: i64 = value.split('.').nth(11).unwrap().parse().unwrap();
    // Its start, exactly: a TimestampTz, microseconds since 2000.
    let started = format!(
        "timestamptz '2000-01-01 00:00:00+00' + {} * interval '1 second' + {} * interval '1 microsecond'",
        stamp / 1_000_000,
        stamp % 1_000_000
    );
    replay_started(cl, worker, value, &started)
}

/// The same with the transaction's start time given.
fn replay_started(cl: &Cluster, worker: usize, value: &str, started: &str) -> (Client, Result<(), postgres::Error>) {
    let fields: Vec<&str> = value.strip_prefix("lvqn1.").unwrap().split('.').collect();
    let (initiator, transaction) = (fields[8], fields[9]);
    let mut c = cl.worker(worker, APP_ROLE);
    c.batch_execute(&format!("BEGIN; SELECT assign_distributed_transaction_id({initiator}, {transaction}, {started})")).unwrap();
    let r = c.batch_execute(&format!("SET LOCAL levqor.node_context = '{value}'"));
    (c, r)
}

#[test]
fn a_captured_context_replayed_with_its_distributed_transaction_id_is_refused_once_that_transaction_ended() {
    let Some(cl) = cluster() else { return };
    let a = cl.tenant("ct-replay");
    let orders = cl.distributed_table("orders", None);
    insert(&mut cl.coordinator(APP_ROLE), &a, &orders, &["o1", "o2"]);
    let (served, shard) = shard_of(cl, &orders, &a);
    let value = captured_context(cl, &a, &orders);

    // The worker that served the transaction remembers that it ended.
    let (mut c, r) = replay(cl, served, &value);
    let (code, msg) = error_of(r);
    assert_eq!(code, "28000");
    assert!(msg.contains("has ended on this node") && !msg.contains(&value[..40]), "{msg}");
    c.batch_execute("ROLLBACK").unwrap();
    // Also when the value arrives first and the transaction id after it.
    let mut c = cl.worker(served, APP_ROLE);
    let e = c.batch_execute(&format!("BEGIN; SET LOCAL levqor.node_context = '{value}'"));
    assert_eq!(sqlstate(e), "28000");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(count(&mut c, &format!("SELECT count(*) FROM {shard}")), 0);

    // Its numbers with another start time are another transaction: no context.
    let (mut c, r) = replay_started(cl, 1 - served, &value, "now()");
    r.unwrap();
    assert_eq!(count(&mut c, "SELECT count(*) FROM (SELECT levqor.current_tenant()) t WHERE current_tenant IS NOT NULL"), 0);
    c.batch_execute("ROLLBACK").unwrap();
    // A worker the transaction never reached cannot know it ended: there the
    // value stops working when it expires (levqor.node_context_lifetime).
    // After that, on both, every statement under it is refused.
    std::thread::sleep(std::time::Duration::from_secs(LIFETIME_SECS + 1));
    for w in [1 - served, served] {
        let (mut c, r) = replay(cl, w, &value);
        r.unwrap();
        let (code, msg) = error_of(c.query_one("SELECT count(*) FROM (SELECT levqor.current_tenant()) t WHERE current_tenant IS NOT NULL", &[]));
        assert_eq!((code.as_str(), msg.contains("expired")), ("28000", true), "{msg}");
        c.batch_execute("ROLLBACK").unwrap();
    }
}

#[test]
fn a_transaction_longer_than_the_context_lifetime_keeps_working_on_every_node() {
    let Some(cl) = cluster() else { return };
    let a = cl.tenant("ct-long");
    let invoices = cl.distributed_table("invoices", None);
    // An unprotected distributed table: a query of it opens connections to
    // both workers, which then replay every SET LOCAL of the transaction.
    let plain = unique("exchange_rates");
    cl.coordinator(OWNER)
        .batch_execute(&format!(
            "CREATE TABLE {plain} (id bigint PRIMARY KEY, rate numeric);
             SELECT create_distributed_table('{plain}', 'id');
             INSERT INTO {plain} SELECT g, g / 100.0 FROM generate_series(1, 50) g;
             GRANT SELECT ON {plain} TO {APP_ROLE};"
        ))
        .unwrap();
    insert(&mut cl.coordinator(APP_ROLE), &a, &invoices, &["i1"]);
    let mut app = cl.coordinator(APP_ROLE);
    // Only a superuser gives a role a longer lifetime (a wider replay window).
    assert_eq!(sqlstate(app.batch_execute("SET levqor.node_context_lifetime = '1h'")), "42501");
    as_tenant(&mut app, &a, |tx| {
        assert_eq!(count(tx, &format!("SELECT count(*) FROM {invoices}")), 1);
        for round in 0..3 {
            // Past half the lifetime: the next statement re-signs the context.
            std::thread::sleep(std::time::Duration::from_secs(LIFETIME_SECS / 2 + 1));
            tx.execute(&format!("INSERT INTO {invoices} (body) VALUES ($1)"), &[&format!("late {round}")]).unwrap();
            assert_eq!(count(tx, &format!("SELECT count(*) FROM {invoices}")), 2 + round);
        }
        // Over three lifetimes after authenticate, both workers still take it.
        assert_eq!(count(tx, &format!("SELECT count(*) FROM {plain}")), 50);
        assert_eq!(bodies(tx, &invoices), ["i1", "late 0", "late 1", "late 2"]);
    });
}

#[test]
fn a_suspended_tenant_cannot_write_through_any_node_and_reads_on() {
    let Some(cl) = cluster() else { return };
    let a = cl.tenant("ct-suspended");
    let notes = cl.distributed_table("notes", None);
    let mut app = cl.coordinator(APP_ROLE);
    insert(&mut app, &a, &notes, &["before"]);
    cl.coordinator(ADMIN_ROLE)
        .execute("SELECT levqor.suspend_tenant($1, 'unpaid', mode => 'read_only')", &[&a.slug])
        .unwrap();
    as_tenant(&mut app, &a, |tx| {
        assert_eq!(bodies(tx, &notes), ["before"]);
        let (code, msg) = error_of(tx.execute(&format!("INSERT INTO {notes} (body) VALUES ('after')"), &[]));
        assert_eq!(code, "25006", "{msg}");
    });
    as_tenant(&mut app, &a, |tx| assert_eq!(sqlstate(tx.execute(&format!("UPDATE {notes} SET body = 'x'"), &[])), "25006"));
    cl.coordinator(ADMIN_ROLE).execute("SELECT levqor.resume_tenant($1)", &[&a.slug]).unwrap();
    cl.coordinator(ADMIN_ROLE).execute("SELECT levqor.suspend_tenant($1, 'fraud', 'blocked')", &[&a.slug]).unwrap();
    assert_eq!(sqlstate(app.execute("SELECT levqor.authenticate($1)", &[&a.key])), "28000");
    cl.coordinator(ADMIN_ROLE).execute("SELECT levqor.resume_tenant($1)", &[&a.slug]).unwrap();
    insert(&mut app, &a, &notes, &["after"]);
    as_tenant(&mut app, &a, |tx| assert_eq!(bodies(tx, &notes), ["after", "before"]));
}

#[test]
fn audit_row_limits_scopes_and_removal_are_refused_on_distributed_tables_with_what_to_do() {
    let Some(cl) = cluster() else { return };
    let t = cl.distributed_table("ledger", None);
    let mut owner = cl.coordinator(OWNER);
    let mut su = cl.coordinator("postgres");
    for (sql, code, words) in [
        (format!("SELECT levqor.enable_audit('{t}')"), "0A000", "auditing cannot run on its shards"),
        (format!("SELECT levqor.limit_rows('{t}', 'rows')"), "0A000", "a row limit cannot run on its shards"),
    ] {
        let (c, m) = error_of(owner.batch_execute(&sql));
        assert_eq!((c.as_str(), m.contains(words)), (code, true), "{sql}: {m}");
    }
    let (c, m) = error_of(su.batch_execute(&format!("SELECT levqor.disable_tenancy('{t}')")));
    assert_eq!(c, "0A000", "{m}");
    // An audited table is refused before anything changes.
    let audited = unique("payments");
    owner
        .batch_execute(&format!(
            "CREATE TABLE {audited} (id bigserial, tenant_id uuid NOT NULL, amount int, PRIMARY KEY (tenant_id, id));
             SELECT levqor.enable_tenancy('{audited}');"
        ))
        .unwrap();
    su.batch_execute(&format!("SELECT levqor.enable_audit('{audited}')")).unwrap();
    let (c, m) = error_of(owner.batch_execute(&format!("SELECT levqor.distribute('{audited}')")));
    assert_eq!(c, "0A000", "{m}");
    assert!(m.contains("audited"), "{m}");
    // Rows Citus would copy with COPY, which row level security refuses to an owner.
    let full = unique("accounts");
    owner
        .batch_execute(&format!(
            "CREATE TABLE {full} (id bigserial, tenant_id uuid NOT NULL, PRIMARY KEY (tenant_id, id));
             INSERT INTO {full} (tenant_id) VALUES (gen_random_uuid());"
        ))
        .unwrap();
    let (c, m) = error_of(owner.batch_execute(&format!("SELECT levqor.distribute('{full}')")));
    assert_eq!(c, "55000", "{m}");
    assert!(m.contains("has rows"), "{m}");
    // ... which a superuser may do; the rows keep their tenants.
    su.batch_execute(&format!("SELECT levqor.distribute('{full}')")).unwrap();
    assert_eq!(count(&mut su, &format!("SELECT count(*) FROM {full}")), 1);
    assert!(cl.shard_problems(&full).is_empty());
}

#[test]
fn without_citus_distribute_says_so_and_nothing_else_changes() {
    // The ordinary e2e cluster: levqor loaded, Citus not.
    let mut su = superuser();
    let t = protected_table("plain");
    let (code, msg) = error_of(su.batch_execute(&format!("SELECT levqor.distribute('{t}')")));
    assert_eq!(code, "0A000");
    assert!(msg.contains("Citus is not installed"), "{msg}");
    assert_eq!(su.query_one("SELECT levqor._citus_active()", &[]).unwrap().get::<_, bool>(0), false);
    // A transaction context works as ever; no node context is made.
    let a = tenant("no-citus");
    insert_rows(&mut app(), &a, &t, &["one"]);
    as_tenant(&mut app(), &a, |tx| assert_eq!(bodies(tx, &t), ["one"]));
}
