//! The sidecar's benchmarks (benches/sidecar/run.sh starts the cluster and
//! builds everything in release mode; see benches/README.md). Each compares
//! the sidecar with the naive alternative in one run and prints ratios:
//!
//! * `billing`: meter events per second, the sidecar against a loop of one
//!   request at a time, same ledger, same fake Stripe; the time to sync
//!   N tenants × 3 metrics; the daemon's peak RSS.
//! * `streams`: audit events per second to a Splunk HEC receiver, batched
//!   against one request per event, same backlog; commit-to-receipt latency
//!   when idle.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand};
use levqor_peers::siem::{Kind, Receiver};
use levqor_peers::stripe::FakeStripe;
use postgres::{Client, NoTls};

#[derive(Parser)]
struct Cli {
    /// The bench cluster's port.
    #[arg(long)]
    port: u16,
    /// The levqor-sidecar binary.
    #[arg(long, default_value = "target/release/levqor-sidecar")]
    sidecar: String,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    Billing {
        #[arg(long, default_value_t = 10_000)]
        tenants: i32,
        /// Milliseconds each meter event takes at the fake Stripe.
        #[arg(long, default_value_t = 5.0)]
        latency_ms: f64,
        /// Entries the naive loop sends (its rate is what counts).
        #[arg(long, default_value_t = 2_000)]
        naive_sample: usize,
        /// `[stripe] concurrency` (its default: 16).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    Streams {
        #[arg(long, default_value_t = 100_000)]
        backlog: i64,
        /// Seconds the one-request-per-event stream runs.
        #[arg(long, default_value_t = 15)]
        single_seconds: u64,
        #[arg(long, default_value_t = 1000)]
        latency_transactions: usize,
    },
}

const KEY: &str = "sk_test_levqor_bench";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

fn connect(port: u16, db: &str, user: &str) -> Client {
    Client::connect(&format!("host=127.0.0.1 port={port} dbname={db} user={user}"), NoTls).unwrap_or_else(|e| panic!("connect {db}: {e}"))
}

fn fresh_db(port: u16, name: &str) -> Client {
    let mut su = connect(port, "postgres", "postgres");
    su.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).unwrap();
    su.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let mut c = connect(port, name, "postgres");
    c.batch_execute(
        "SET client_min_messages = error; CREATE EXTENSION levqor;
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_sidecar') THEN CREATE ROLE bench_sidecar LOGIN IN ROLE levqor_sidecar; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'bench_app') THEN CREATE ROLE bench_app LOGIN IN ROLE levqor_app; END IF;
         END $$;",
    )
    .unwrap();
    c
}

struct Daemon {
    child: Child,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn start(bin: &str, config: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("levqor-bench-sidecar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sidecar.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("sidecar.log")).unwrap();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&path)
            .envs(env.iter().copied())
            .env("LEVQOR_SIDECAR_LOG", std::env::var("LEVQOR_SIDECAR_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start levqor-sidecar");
        Daemon { child, dir }
    }

    /// Peak resident set size so far, in MiB (VmHWM).
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        if std::env::var_os("LEVQOR_BENCH_KEEP_LOG").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn billing(port: u16, bin: &str, tenants: i32, latency_ms: f64, naive_sample: usize, concurrency: usize) {
    let rt = rt();
    let mut db = fresh_db(port, "bench_billing");
    db.batch_execute("SELECT levqor.define_metric('emails_sent'); SELECT levqor.define_metric('reports_run');").unwrap();
    let t = Instant::now();
    db.execute(
        "SELECT count(*) FROM generate_series(1, $1) i, LATERAL levqor.create_tenant('acct-' || i, 'Account ' || i, 'starter') t",
        &[&tenants],
    )
    .unwrap();
    println!("setup: {tenants} tenants in {:.1} s", t.elapsed().as_secs_f64());
    let stripe = rt.block_on(FakeStripe::start("127.0.0.1:0".parse().unwrap(), KEY, &["api_calls", "emails", "reports"])).unwrap();
    stripe.state.lock().unwrap().meter_latency = Duration::from_secs_f64(latency_ms / 1000.0);
    let config = format!(
        r#"[database]
url = "host=127.0.0.1 port={port} dbname=bench_billing user=bench_sidecar"
[http]
listen = "127.0.0.1:{http}"
[stripe]
api_base = "{api}"
api_key_env = "STRIPE_SECRET_KEY"
sweep_seconds = 1
meter_interval_seconds = 1
concurrency = {concurrency}
[stripe.plans.free]
prices = ["price_free"]
[stripe.plans.starter]
prices = ["price_starter", "price_calls"]
[stripe.plans.professional]
prices = ["price_pro", "price_calls"]
[stripe.plans.enterprise]
prices = ["price_ent", "price_calls"]
[stripe.meters]
api_calls_per_15min = "api_calls"
emails_sent = "emails"
reports_run = "reports"
"#,
        http = free_port(),
        api = stripe.url()
    );
    let env = [("STRIPE_SECRET_KEY", KEY)];
    let daemon = Daemon::start(bin, &config, &env);
    let provisioned = wait("provisioning", Duration::from_secs(900), || {
        db.query_one("SELECT count(*) FROM levqor.tenant_billing WHERE subscription_id IS NOT NULL", &[]).unwrap().get::<_, i64>(0)
            == i64::from(tenants)
    });
    println!("provisioning: {tenants} customers and subscriptions in {:.1} s (2 requests each, one tenant at a time)", provisioned.as_secs_f64());
    daemon.stop();

    // The nightly usage: one entry per tenant and metric.
    db.execute(
        "INSERT INTO levqor.usage_ledger (tenant_id, metric, quantity, period_start, period_end)
         SELECT t.id, m.metric, 1 + (abs(hashtext(t.slug || m.metric)) % 500), now() - interval '1 day', now() - interval '1 hour'
           FROM levqor.tenants t, (VALUES ('api_calls_per_15min'), ('emails_sent'), ('reports_run')) m(metric)
          WHERE t.kind = 'tenant' ORDER BY t.id, m.metric",
        &[],
    )
    .unwrap();
    let entries: i64 = db.query_one("SELECT count(*) FROM levqor.usage_ledger", &[]).unwrap().get(0);

    // The naive loop: one request at a time, over the start of the same ledger.
    let sample = db
        .query(
            "SELECT l.id, b.customer_id, l.metric, l.quantity, extract(epoch FROM l.period_end)::bigint
               FROM levqor.usage_ledger l JOIN levqor.tenant_billing b ON b.tenant_id = l.tenant_id ORDER BY l.id LIMIT $1",
            &[&(naive_sample as i64)],
        )
        .unwrap();
    let event = |m: &str| match m {
        "api_calls_per_15min" => "api_calls",
        "emails_sent" => "emails",
        _ => "reports",
    };
    let http = reqwest::Client::new();
    let url = format!("{}/v1/billing/meter_events", stripe.url());
    let naive = rt.block_on(async {
        let t = Instant::now();
        for r in &sample {
            let id: i64 = r.get(0);
            let (customer, metric, qty, ts): (String, String, i64, i64) = (r.get(1), r.get(2), r.get(3), r.get(4));
            let form = [
                ("event_name", event(&metric).to_string()),
                ("payload[stripe_customer_id]", customer),
                ("payload[value]", qty.to_string()),
                ("timestamp", ts.to_string()),
                ("identifier", format!("naive-{id}")),
            ];
            let resp = http.post(&url).bearer_auth(KEY).form(&form).send().await.unwrap();
            assert!(resp.status().is_success(), "naive loop: {}", resp.status());
        }
        t.elapsed()
    });
    let naive_rate = sample.len() as f64 / naive.as_secs_f64();

    // The sidecar drains the whole ledger.
    let daemon = Daemon::start(bin, &config, &env);
    let mut peak = 0.0f64;
    let synced = wait("the ledger metered", Duration::from_secs(1800), || {
        peak = peak.max(daemon.peak_rss_mib());
        db.query_one(
            "SELECT coalesce((SELECT position FROM levqor.ledger_cursors WHERE consumer = 'stripe'), 0) >= (SELECT max(id) FROM levqor.usage_ledger)",
            &[],
        )
        .unwrap()
        .get(0)
    });
    peak = peak.max(daemon.peak_rss_mib());
    daemon.stop();
    let rate = entries as f64 / synced.as_secs_f64();
    // Exact: Stripe's totals per customer and meter equal the ledger's.
    let ledger: HashMap<(String, String), i64> = db
        .query(
            "SELECT b.customer_id, l.metric, sum(l.quantity)::bigint FROM levqor.usage_ledger l
               JOIN levqor.tenant_billing b ON b.tenant_id = l.tenant_id GROUP BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| ((r.get::<_, String>(0), event(&r.get::<_, String>(1)).to_string()), r.get(2)))
        .collect();
    let st = stripe.state.lock().unwrap();
    let mut got: HashMap<(String, String), i64> = HashMap::new();
    for e in st.events.iter().filter(|e| e.identifier.starts_with("lvq-")) {
        *got.entry((e.customer.clone(), e.event_name.clone())).or_default() += e.value;
    }
    let exact = got == ledger;
    println!();
    println!("| meter events, fake Stripe answering in {latency_ms} ms | events | seconds | events/s |");
    println!("|---|---:|---:|---:|");
    println!("| naive loop (one request at a time) | {} | {:.2} | {:.0} |", sample.len(), naive.as_secs_f64(), naive_rate);
    println!("| levqor-sidecar (concurrency {concurrency}) | {entries} | {:.2} | {:.0} |", synced.as_secs_f64(), rate);
    println!();
    println!("ratio sidecar/naive: {:.1}x (target >= 10x)", rate / naive_rate);
    println!("{tenants} tenants x 3 metrics synced in {:.1} s (target < 60 s); totals exact: {exact}", synced.as_secs_f64());
    println!("daemon peak RSS while syncing: {peak:.1} MiB (target < 50 MiB)");
    assert!(exact, "Stripe's totals differ from the ledger");
}

fn streams(port: u16, bin: &str, backlog: i64, single_seconds: u64, latency_transactions: usize) {
    let rt = rt();
    // levqor_streams is in the bench cluster's levqor.audit_database: the worker seals it.
    let mut db = fresh_db(port, "levqor_streams");
    db.batch_execute(
        "CREATE TABLE activity (id bigserial PRIMARY KEY, tenant_id uuid NOT NULL, kind text NOT NULL, payload jsonb);
         SELECT levqor.enable_tenancy('activity');
         SELECT levqor.enable_audit('activity');
         GRANT SELECT, INSERT ON activity TO bench_app; GRANT USAGE ON SEQUENCE activity_id_seq TO bench_app;",
    )
    .unwrap();
    let row = db.query_one("SELECT tenant_id, api_key FROM levqor.create_tenant('bigcorp', 'Big Corp', 'enterprise')", &[]).unwrap();
    let (tenant, key): (uuid::Uuid, String) = (row.get(0), row.get(1));
    let mut app = connect(port, "levqor_streams", "bench_app");
    let t = Instant::now();
    let mut tx = app.transaction().unwrap();
    tx.execute("SELECT levqor.authenticate($1)", &[&key]).unwrap();
    tx.execute(
        "INSERT INTO activity (kind, payload) SELECT 'page_view', jsonb_build_object('n', i, 'path', '/reports/' || i, 'ms', i % 997) FROM generate_series(1::bigint, $1) i",
        &[&backlog],
    )
    .unwrap();
    tx.commit().unwrap();
    let sealed = |db: &mut Client| -> i64 {
        db.query_one("SELECT coalesce((SELECT seq FROM levqor.audit_heads WHERE chain = $1), 0)", &[&tenant]).unwrap().get(0)
    };
    wait("the backlog sealed", Duration::from_secs(600), || sealed(&mut db) >= backlog);
    let head = sealed(&mut db);
    println!("setup: a backlog of {head} sealed entries in {:.1} s", t.elapsed().as_secs_f64());

    let batched_rx = rt.block_on(Receiver::start(Kind::SplunkHec, "hec-bench-token-1")).unwrap();
    let single_rx = rt.block_on(Receiver::start(Kind::SplunkHec, "hec-bench-token-2")).unwrap();
    let config = format!(
        "[database]\nurl = \"host=127.0.0.1 port={port} dbname=levqor_streams user=bench_sidecar\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[audit]\nbatch_max_events = 1000\nbatch_max_bytes = 4000000\npoll_seconds = 1\n",
        free_port()
    );
    let add = |db: &mut Client, r: &Receiver, secret: &str, batch: i32| -> i64 {
        db.query_one(
            "SELECT levqor.add_audit_stream('bigcorp', 'splunk_hec', $1, $2, jsonb_build_object('batch_max_events', $3::int))",
            &[&r.url(), &secret, &batch],
        )
        .unwrap()
        .get(0)
    };
    // Batched: the whole backlog.
    let batched_id = add(&mut db, &batched_rx, "hec-bench-token-1", 1000);
    let daemon = Daemon::start(bin, &config, &[]);
    let batched = wait("the batched stream", Duration::from_secs(900), || batched_rx.state.lock().unwrap().events.len() as i64 >= head);
    let batched_rate = head as f64 / batched.as_secs_f64();
    let requests = batched_rx.state.lock().unwrap().deliveries.len();
    // One request per event: the same backlog, for a while.
    db.execute("SELECT levqor.pause_audit_stream($1)", &[&batched_id]).unwrap();
    let single_id = add(&mut db, &single_rx, "hec-bench-token-2", 1);
    let first = wait("the first single event", Duration::from_secs(120), || !single_rx.state.lock().unwrap().events.is_empty());
    println!("the one-per-event stream started delivering {:.1} s after it was added", first.as_secs_f64());
    // The rate from its first event on, over the same kind of backlog.
    let (n0, t) = (single_rx.state.lock().unwrap().events.len(), Instant::now());
    std::thread::sleep(Duration::from_secs(single_seconds));
    let single_n = single_rx.state.lock().unwrap().events.len() - n0;
    let single_secs = t.elapsed().as_secs_f64();
    let single_rate = single_n as f64 / single_secs;
    db.execute("SELECT levqor.pause_audit_stream($1)", &[&single_id]).unwrap();

    // Latency when idle: single-row transactions, one at a time, to the batched stream.
    db.execute("SELECT levqor.resume_audit_stream($1)", &[&batched_id]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let before = batched_rx.state.lock().unwrap().events.len();
    let mut committed: Vec<(i64, SystemTime)> = Vec::new();
    for i in 0..latency_transactions {
        let mut tx = app.transaction().unwrap();
        tx.execute("SELECT levqor.authenticate($1)", &[&key]).unwrap();
        let id: i64 = tx.query_one("INSERT INTO activity (kind) VALUES ('click') RETURNING id", &[]).unwrap().get(0);
        tx.commit().unwrap();
        committed.push((id, SystemTime::now()));
        let _ = i;
        std::thread::sleep(Duration::from_millis(20));
    }
    wait("every latency event", Duration::from_secs(120), || {
        batched_rx.state.lock().unwrap().events.len() >= before + latency_transactions
    });
    let st = batched_rx.state.lock().unwrap();
    let arrived: HashMap<i64, SystemTime> = st.events[before..]
        .iter()
        .zip(&st.arrived[before..])
        .filter_map(|(e, at)| Some((e["new"]["id"].as_i64()?, *at)))
        .collect();
    let mut lat: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| Some(arrived.get(id)?.duration_since(*at).unwrap_or_default().as_secs_f64() * 1000.0))
        .collect();
    drop(st);
    daemon.stop();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let interval: String = db.query_one("SHOW levqor.audit_seal_interval", &[]).unwrap().get(0);
    println!();
    println!("| audit events to a local Splunk HEC | events | seconds | events/s | requests |");
    println!("|---|---:|---:|---:|---:|");
    println!("| batched (up to 1,000 per request, gzip) | {head} | {:.2} | {:.0} | {requests} |", batched.as_secs_f64(), batched_rate);
    println!("| one request per event | {single_n} | {single_secs:.2} | {single_rate:.0} | {single_n} |");
    println!();
    println!("ratio batched/single: {:.1}x (target >= 20x); batched {:.0} events/s (target >= 20,000)", batched_rate / single_rate, batched_rate);
    println!(
        "commit to receipt, idle, {} single-row transactions: p50 {:.0} ms, p99 {:.0} ms (target p50 < 1500 ms; seal interval {interval})",
        lat.len(),
        pct(0.5),
        pct(0.99)
    );
}

fn main() {
    let cli = Cli::parse();
    match cli.bench {
        Bench::Billing { tenants, latency_ms, naive_sample, concurrency } => billing(cli.port, &cli.sidecar, tenants, latency_ms, naive_sample, concurrency),
        Bench::Streams { backlog, single_seconds, latency_transactions } => streams(cli.port, &cli.sidecar, backlog, single_seconds, latency_transactions),
    }
}
