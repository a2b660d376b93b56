//! Helpers for levqor's end-to-end tests.
//!
//! The tests connect over TCP to a throwaway cluster started by
//! `scripts/cluster.sh` (see `scripts/test.sh`), as ordinary login roles:
//! superusers bypass row level security, so a test run as one proves nothing.
//! Each test binary gets its own database; each test its own tenants and
//! tables, so tests run in parallel without seeing each other.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use postgres::{Client, Error, NoTls};
use uuid::Uuid;

pub const APP: &str = "e2e_app";
pub const SERVER: &str = "e2e_server";
pub const ADMIN: &str = "e2e_admin";

pub fn port() -> u16 {
    std::env::var("LEVQOR_E2E_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(28815)
}

pub fn nopreload_port() -> u16 {
    std::env::var("LEVQOR_E2E_NOPRELOAD_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(28816)
}

fn conn_string(port: u16, user: &str, db: &str, options: Option<&str>) -> String {
    let mut s = format!("host=127.0.0.1 port={port} user={user} dbname={db} connect_timeout=10");
    if let Some(o) = options {
        s.push_str(&format!(" options='{o}'"));
    }
    s
}

pub fn connect_to(port: u16, user: &str, db: &str) -> Client {
    Client::connect(&conn_string(port, user, db, None), NoTls)
        .unwrap_or_else(|e| panic!("connect as {user} to {db} on port {port}: {e} (is the e2e cluster running? see scripts/test.sh)"))
}

pub fn try_connect_with_options(port: u16, user: &str, db: &str, options: &str) -> Result<Client, Error> {
    Client::connect(&conn_string(port, user, db, Some(options)), NoTls)
}

/// Set up the cluster-wide roles once, and this binary's database.
fn setup(port: u16) -> String {
    let mut su = connect_to(port, "postgres", "postgres");
    let exe = std::env::current_exe().unwrap();
    let stem = exe.file_stem().unwrap().to_string_lossy().replace('-', "_");
    let db = format!("e2e_{}_{}", stem.chars().take(30).collect::<String>(), std::process::id());
    su.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).unwrap();
    su.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let mut su = connect_to(port, "postgres", &db);
    su.batch_execute(&format!(
        "CREATE EXTENSION levqor;
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP}') THEN
             CREATE ROLE {APP} LOGIN IN ROLE levqor_app;
           END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SERVER}') THEN
             CREATE ROLE {SERVER} LOGIN IN ROLE levqor_app, levqor_context_admin;
           END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ADMIN}') THEN
             CREATE ROLE {ADMIN} LOGIN IN ROLE levqor_admin;
           END IF;
         END $$;
         GRANT CREATE ON SCHEMA public TO {APP};"
    ))
    .unwrap();
    db
}

static DB: OnceLock<String> = OnceLock::new();
static NOPRELOAD_DB: OnceLock<String> = OnceLock::new();
// Roles are cluster-wide: create them from one thread at a time.
static SETUP_LOCK: Mutex<()> = Mutex::new(());

pub fn db() -> &'static str {
    DB.get_or_init(|| {
        let _g = SETUP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        setup(port())
    })
}

pub fn nopreload_db() -> &'static str {
    NOPRELOAD_DB.get_or_init(|| {
        let _g = SETUP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        setup(nopreload_port())
    })
}

pub fn superuser() -> Client {
    connect_to(port(), "postgres", db())
}
pub fn app() -> Client {
    connect_to(port(), APP, db())
}
pub fn server() -> Client {
    connect_to(port(), SERVER, db())
}
pub fn admin() -> Client {
    connect_to(port(), ADMIN, db())
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name no other test in this run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

#[derive(Clone, Debug)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub key: String,
}

pub fn create_tenant_on(client: &mut Client, prefix: &str) -> Tenant {
    let slug = unique(prefix).replace('_', "-");
    let row = client
        .query_one("SELECT tenant_id, api_key FROM levqor.create_tenant($1, $2)", &[&slug, &format!("Tenant {slug}")])
        .unwrap();
    Tenant { id: row.get(0), slug, key: row.get(1) }
}

/// A database of the test's own (once the cluster-wide roles exist), and a
/// superuser connection to it.
pub fn new_database(prefix: &str) -> (String, Client) {
    let _ = db();
    let name = unique(prefix);
    connect_to(port(), "postgres", "postgres").batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let client = connect_to(port(), "postgres", &name);
    (name, client)
}

/// A new tenant, created by the levqor_admin role.
pub fn tenant(prefix: &str) -> Tenant {
    create_tenant_on(&mut admin(), prefix)
}

/// A new protected table owned by the superuser, usable by the app role.
pub fn protected_table(prefix: &str) -> String {
    let name = unique(prefix);
    superuser()
        .batch_execute(&format!(
            "CREATE TABLE {name} (id bigserial PRIMARY KEY, body text NOT NULL);
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {name} TO {APP}, {SERVER};
             GRANT USAGE ON SEQUENCE {name}_id_seq TO {APP}, {SERVER};
             SELECT levqor.enable_tenancy('{name}');"
        ))
        .unwrap();
    name
}

/// Authenticate in a new transaction and run `f` in it; commits.
pub fn as_tenant<R>(client: &mut Client, t: &Tenant, f: impl FnOnce(&mut postgres::Transaction<'_>) -> R) -> R {
    let mut tx = client.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&t.key]).unwrap();
    let r = f(&mut tx);
    tx.commit().unwrap();
    r
}

pub fn insert_rows(client: &mut Client, t: &Tenant, table: &str, bodies: &[&str]) {
    as_tenant(client, t, |tx| {
        for b in bodies {
            tx.execute(&format!("INSERT INTO {table} (body) VALUES ($1)"), &[b]).unwrap();
        }
    });
}

pub fn bodies(tx: &mut impl postgres::GenericClient, table: &str) -> Vec<String> {
    tx.query(&format!("SELECT body FROM {table} ORDER BY body"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

pub fn current_tenant(c: &mut impl postgres::GenericClient) -> Option<Uuid> {
    c.query_one("SELECT levqor.current_tenant()", &[]).unwrap().get(0)
}

/// The SQLSTATE of a failed statement (panics if it did not fail).
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    let e = r.expect_err("statement should have failed");
    e.code().map(|c| c.code().to_string()).unwrap_or_else(|| panic!("no SQLSTATE: {e}"))
}

/// The SQLSTATE and message of a failed statement.
pub fn error_of<T: std::fmt::Debug>(r: Result<T, Error>) -> (String, String) {
    let e = r.expect_err("statement should have failed");
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a database error: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// Collect NOTICE messages of a new connection.
pub fn connect_collecting_notices(user: &str) -> (Client, Arc<Mutex<Vec<String>>>) {
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = notices.clone();
    let mut cfg: postgres::Config = conn_string(port(), user, db(), None).parse().unwrap();
    cfg.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    (cfg.connect(NoTls).unwrap(), notices)
}

/// The cluster the durability tests restart and crash (its own, so the
/// other tests keep running): see scripts/test.sh.
pub fn restart_port() -> u16 {
    std::env::var("LEVQOR_E2E_RESTART_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(28817)
}

/// Run pg_ctl as the postgres OS user on one of scripts/cluster.sh's clusters.
pub fn pg_ctl(cluster: &str, args: &[&str]) {
    let root = std::env::var("LEVQOR_CLUSTER_ROOT").unwrap_or_else(|_| "/tmp/levqor-clusters".into());
    let data = format!("{root}/{cluster}/data");
    let log = format!("{root}/{cluster}/server.log");
    let status = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", &data, "-l", &log, "-w", "-t", "60"])
        .args(args)
        .status()
        .expect("run pg_ctl");
    assert!(status.success(), "pg_ctl {args:?} on {cluster} failed");
}

/// Connect, retrying while the server restarts or recovers from a crash.
pub fn connect_when_up(port: u16, user: &str, db: &str) -> Client {
    for _ in 0..300 {
        if let Ok(c) = Client::connect(&conn_string(port, user, db, None), NoTls) {
            return c;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    connect_to(port, user, db)
}
