//! What the sidecar's end-to-end tests stand on: a fresh database with levqor
//! on a real cluster (scripts/test.sh starts it), the login roles a DBA
//! would create for the daemon (`IN ROLE levqor_sidecar`, `IN ROLE
//! levqor_backup`), the real `levqor-sidecar` binary run as a child process,
//! and the HTTP peers (a fake Stripe, SIEM receivers) on loopback in a tokio
//! runtime of their own, so the tests themselves stay synchronous.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use levqor_e2e::{self as e2e, Client, NoTls, Tenant};

/// The sidecar's login role: nothing but levqor_sidecar.
pub const SIDECAR: &str = "e2e_sidecar";
/// The backups' login role: nothing but levqor_backup.
pub const BACKUP: &str = "e2e_backup";

pub const STRIPE_KEY: &str = "sk_test_levqor_e2e_4242";

/// `[stripe.plans.*]` for every seeded plan, and the API-call meter.
pub const STRIPE_PLANS: &str = r#"
[stripe.plans.free]
prices = ["price_free_base"]
[stripe.plans.starter]
prices = ["price_starter_base", "price_api_calls"]
[stripe.plans.professional]
prices = ["price_pro_base", "price_api_calls"]
[stripe.plans.enterprise]
prices = ["price_enterprise_base", "price_api_calls"]
"#;
pub const WEBHOOK_SECRET: &str = "whsec_levqor_e2e_secret";

pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap())
}

static ROLES: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// The cluster-wide login roles, once per cluster (and per test binary).
fn roles(port: u16) {
    let mut done = ROLES.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&port) {
        return;
    }
    let mut su = e2e::connect_to(port, "postgres", "postgres");
    for (role, group) in [(SIDECAR, "levqor_sidecar"), (BACKUP, "levqor_backup")] {
        // Another test binary may create it at the same moment.
        let r = su.batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                 CREATE ROLE {role} LOGIN;
               END IF;
             END $$;"
        ));
        if let Err(e) = r {
            assert!(e.code().is_some_and(|c| c.code() == "23505" || c.code() == "42710"), "create {role}: {e}");
        }
        // The group roles exist once levqor was installed in some database.
        let _ = su.batch_execute(&format!("GRANT {group} TO {role}"));
    }
    done.push(port);
}

/// A database of the test's own with levqor installed; dropped at the end.
pub struct Db {
    pub name: String,
    pub port: u16,
}

impl Db {
    pub fn new(prefix: &str) -> Db {
        let _ = e2e::db();
        Db::on(e2e::port(), &e2e::unique(prefix))
    }

    /// On another cluster (it must have levqor's library installed).
    pub fn on(port: u16, name: &str) -> Db {
        let mut su = e2e::connect_to(port, "postgres", "postgres");
        su.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
        su.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let mut c = e2e::connect_to(port, "postgres", name);
        c.batch_execute("SET client_min_messages = error; CREATE EXTENSION levqor").unwrap();
        // The e2e roles (levqor_e2e::db() made them on the main cluster).
        c.batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{app}') THEN CREATE ROLE {app} LOGIN IN ROLE levqor_app; END IF;
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{admin}') THEN CREATE ROLE {admin} LOGIN IN ROLE levqor_admin; END IF;
             END $$;
             GRANT CREATE ON SCHEMA public TO {app};",
            app = e2e::APP,
            admin = e2e::ADMIN
        ))
        .unwrap();
        roles(port);
        Db { name: name.to_string(), port }
    }

    pub fn connect(&self, user: &str) -> Client {
        e2e::connect_when_up(self.port, user, &self.name)
    }
    pub fn su(&self) -> Client {
        self.connect("postgres")
    }
    pub fn admin(&self) -> Client {
        self.connect(e2e::ADMIN)
    }
    pub fn app(&self) -> Client {
        self.connect(e2e::APP)
    }

    /// A libpq connection string for `user` (no password: the clusters trust loopback).
    pub fn url(&self, user: &str) -> String {
        format!("host=127.0.0.1 port={} dbname={} user={user}", self.port, self.name)
    }

    pub fn tenant(&self, prefix: &str, plan: &str) -> Tenant {
        let slug = e2e::unique(prefix).replace('_', "-");
        let row = self
            .admin()
            .query_one(
                "SELECT tenant_id, api_key FROM levqor.create_tenant($1, $2, $3)",
                &[&slug, &format!("Tenant {slug}"), &plan],
            )
            .unwrap();
        Tenant { id: row.get(0), slug, key: row.get(1) }
    }

    /// A table `name` (tenant_id, id, …) protected by levqor, usable by the app role.
    pub fn table(&self, name: &str, columns: &str) {
        self.su()
            .batch_execute(&format!(
                "CREATE TABLE {name} (id bigserial PRIMARY KEY, {columns});
                 GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {app};
                 GRANT USAGE ON SEQUENCE {name}_id_seq TO {app};
                 SELECT levqor.enable_tenancy('{name}');",
                app = e2e::APP
            ))
            .unwrap();
    }

    /// Run `f` in one transaction as the tenant (through its API key).
    pub fn as_tenant<R>(&self, t: &Tenant, f: impl FnOnce(&mut postgres::Transaction<'_>) -> R) -> R {
        e2e::as_tenant(&mut self.app(), t, f)
    }

    pub fn drop_now(&self) {
        let mut su = e2e::connect_when_up(self.port, "postgres", "postgres");
        let _ = su.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if std::env::var_os("LEVQOR_KEEP_TEST_DB").is_none() {
            self.drop_now();
        }
    }
}

/// Seals the audit log of a database every 100 ms while it lives (the test
/// databases are not in `levqor.audit_database`, so no worker does it).
pub struct Sealer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sealer {
    pub fn start(db: &Db) -> Sealer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, port, name) = (stop.clone(), db.port, db.name.clone());
        let thread = std::thread::spawn(move || {
            let mut c: Option<Client> = None;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if c.is_none() {
                    c = Client::connect(&format!("host=127.0.0.1 port={port} dbname={name} user={}", e2e::ADMIN), NoTls).ok();
                }
                if let Some(cl) = c.as_mut() {
                    if cl.execute("SELECT levqor.seal_audit()", &[]).is_err() {
                        c = None;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sealer { stop, thread: Some(thread) }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A scratch directory under /tmp, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("levqor-sidecar-tests/{}", e2e::unique(prefix)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_levqor-sidecar")
}

/// The daemon, `levqor-sidecar run`, as a child process.
pub struct Sidecar {
    child: Option<Child>,
    pub dir: TempDir,
    pub config: PathBuf,
    pub http: String,
    env: Vec<(String, String)>,
    starts: u32,
}

impl Sidecar {
    /// Start with this configuration (`{http}` in it is replaced by a free
    /// loopback address) and environment.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Sidecar {
        let dir = TempDir::new("sidecar");
        let http = format!("127.0.0.1:{}", free_port());
        let path = dir.path().join("levqor-sidecar.toml");
        std::fs::write(&path, config.replace("{http}", &http)).unwrap();
        let mut s = Sidecar {
            child: None,
            dir,
            config: path,
            http,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            starts: 0,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LEVQOR_SIDECAR_LOG", std::env::var("LEVQOR_SIDECAR_LOG").unwrap_or_else(|_| "info,levqor_sidecar=debug".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start levqor-sidecar");
        self.child = Some(child);
        self.wait_healthy();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sidecar.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Until /healthz answers at all (200 or 503): the daemon is up.
    pub fn wait_healthy(&self) {
        wait_until("the sidecar's HTTP server", Duration::from_secs(20), || self.get("/healthz").is_ok());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit code and how long the daemon took to stop.
    pub fn term(&mut self) -> (Option<i32>, Duration) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        signal(c.id(), "TERM");
        let status = c.wait().unwrap();
        (status.code(), started.elapsed())
    }

    pub fn hup(&self) {
        signal(self.pid(), "HUP");
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config, config.replace("{http}", &self.http)).unwrap();
    }

    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http(&self.http, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        http(&self.http, "POST", path, headers, body).expect("the sidecar answers")
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics").expect("/metrics").1
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- sidecar log ({}) ---\n{}", self.log_path().display(), self.log());
        }
    }
}

fn signal(pid: u32, sig: &str) {
    Command::new("kill").args([format!("-{sig}"), pid.to_string()]).status().unwrap();
}

/// One HTTP/1.1 request, with `Connection: close`.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other("no status line"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // Chunked bodies (axum streams /metrics): drop the chunk sizes.
    let body = if text.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(&body) } else { body };
    Ok((status, body))
}

fn unchunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Run a one-shot command of the binary.
pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).envs(env.iter().copied()).output().expect("run levqor-sidecar");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// Poll `f` until it holds; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A metric's value in Prometheus text (the first series whose line starts
/// with `prefix`), summed over matching series.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
