//! The database restarted, or shut down immediately, under a running
//! sidecar. On the cluster the durability tests restart (scripts/test.sh), in
//! `levqor_streams`, a database levqor's worker seals (cluster.sh), so the
//! sealing is the worker's asynchronous kind. One test at a time.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use levqor_peers::siem::{check_chain, Kind, Receiver};
use levqor_peers::stripe::FakeStripe;


static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn pg_ctl(args: &[&str]) {
    e2e::pg_ctl("e2e-restart", args);
}

#[test]
fn an_immediate_shutdown_right_after_a_delivery_leaves_no_fork_in_the_receivers_chain() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let db = Db::on(e2e::restart_port(), "levqor_streams");
    db.table("payments", "tenant_id uuid NOT NULL, amount bigint NOT NULL");
    db.su().batch_execute("SELECT levqor.enable_audit('payments')").unwrap();
    let t = db.tenant("bank", "enterprise");
    let hook = runtime().block_on(Receiver::start(Kind::Webhook, "webhook-signing-secret")).unwrap();
    db.admin()
        .execute(
            "SELECT levqor.add_audit_stream($1, 'webhook', $2, 'webhook-signing-secret', '{\"batch_max_events\": 5}')",
            &[&t.slug, &hook.url()],
        )
        .unwrap();
    let config = format!(
        "[database]\nurl = \"{}\"\n[http]\nlisten = \"{{http}}\"\n[audit]\npoll_seconds = 1\nretry_max_seconds = 1\n",
        db.url(SIDECAR)
    );
    let _sidecar = Sidecar::start(&config, &[]);

    // A writer that keeps going through the crash (reconnecting).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, port, name, t) = (stop.clone(), db.port, db.name.clone(), t.clone());
        std::thread::spawn(move || {
            let mut written = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = Client::connect(&format!("host=127.0.0.1 port={port} dbname={name} user={}", e2e::APP), NoTls) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    let ok = c.transaction().and_then(|mut tx| {
                        tx.execute("SELECT levqor.authenticate($1)", &[&t.key])?;
                        tx.execute("INSERT INTO payments (amount) VALUES ($1)", &[&(written as i64)])?;
                        tx.commit()
                    });
                    if ok.is_err() {
                        break;
                    }
                    written += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            written
        })
    };
    let id = t.id.to_string();
    for round in 0..3 {
        // Right after a delivery: the worker's last sealing may not be flushed yet.
        let seen = hook.events_of(&id).len();
        wait_until("a delivery", Duration::from_secs(60), || hook.events_of(&id).len() > seen + 5);
        pg_ctl(&["stop", "-m", "immediate"]);
        std::thread::sleep(Duration::from_millis(300 * round + 200));
        pg_ctl(&["start"]);
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 20);
    // Everything sealed in the end reaches the receiver, as one chain.
    let mut c = db.su();
    wait_until("all of the chain delivered", Duration::from_secs(90), || {
        let unsealed: i64 = c
            .query_one(
                "SELECT count(*) FROM levqor.audit_log a WHERE a.tenant_id = $1
                    AND NOT EXISTS (SELECT 1 FROM levqor.audit_chain ch WHERE a.id = ANY (ch.ids))",
                &[&t.id],
            )
            .map(|r| r.get(0))
            .unwrap_or(1);
        if unsealed > 0 {
            return false;
        }
        let head: i64 = c.query_one("SELECT seq FROM levqor.audit_heads WHERE chain = $1", &[&t.id]).map(|r| r.get(0)).unwrap_or(0);
        hook.events_of(&id).iter().filter_map(|e| e["seq"].as_i64()).max() == Some(head)
    });
    let chain = check_chain(&hook.events_of(&id), 1).expect("no gap and no fork at the receiver");
    let ok: bool = c.query_one("SELECT ok FROM levqor.verify_audit($1::uuid)", &[&t.id]).unwrap().get(0);
    assert!(ok);
    // What the receiver holds is what the database holds, entry by entry.
    for e in chain.iter().step_by(7) {
        let entry: i64 = c
            .query_one("SELECT id FROM levqor.audit_events($1, $2, 1)", &[&t.id, &(e["seq"].as_i64().unwrap() - 1)])
            .unwrap()
            .get(0);
        assert_eq!(Some(entry), e["id"].as_i64());
    }
    drop(c);
    db.drop_now();
}

#[test]
fn billing_resumes_after_the_database_restarts_under_the_daemon() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let db = Db::on(e2e::restart_port(), &e2e::unique("bill_restart"));
    let stripe = runtime().block_on(FakeStripe::start("127.0.0.1:0".parse().unwrap(), STRIPE_KEY, &["api_calls"])).unwrap();
    let first = db.tenant("before", "starter");
    let config = format!(
        r#"[database]
url = "{}"
[http]
listen = "{{http}}"
[stripe]
api_base = "{}"
api_key_env = "STRIPE_SECRET_KEY"
sweep_seconds = 1
meter_interval_seconds = 1
retry_max_seconds = 2
{STRIPE_PLANS}
[stripe.meters]
api_calls_per_15min = "api_calls"
"#,
        db.url(SIDECAR),
        stripe.url()
    );
    let sidecar = Sidecar::start(&config, &[("STRIPE_SECRET_KEY", STRIPE_KEY)]);
    let billed = |n: usize| stripe.state.lock().unwrap().subscriptions.len() >= n;
    wait_until("the first tenant billed", Duration::from_secs(30), || billed(1));
    let health = || sidecar.get("/healthz").map(|(s, b)| (s, b)).unwrap_or((0, String::new()));
    assert_eq!(health().0, 200);

    pg_ctl(&["stop", "-m", "fast"]);
    wait_until("/healthz unhealthy", Duration::from_secs(20), || health().0 == 503);
    assert!(health().1.contains("database unreachable"), "{}", health().1);
    std::thread::sleep(Duration::from_secs(2));
    pg_ctl(&["start"]);
    wait_until("/healthz healthy again", Duration::from_secs(60), || health().0 == 200);

    // It resumes: a new tenant is provisioned, usage metered, from the cursors.
    let second = db.tenant("after", "professional");
    wait_until("the new tenant billed", Duration::from_secs(60), || billed(2));
    for t in [&first, &second] {
        db.as_tenant(t, |tx| tx.query_one("SELECT levqor.consume('api_calls_per_15min', 11)", &[]).unwrap());
    }
    db.admin().query_one("SELECT levqor.flush_usage()", &[]).unwrap();
    wait_until("usage metered", Duration::from_secs(60), || {
        let st = stripe.state.lock().unwrap();
        let total: i64 = st.events.iter().map(|e| e.value).sum();
        total == 22
    });
    let log = sidecar.log();
    assert!(log.contains("cannot connect to the database"), "a log line per reconnect attempt");
    assert!(log.contains("database connection restored"));
    let attempts = log.matches("cannot connect to the database").count();
    assert!(attempts < 60, "{attempts} reconnect attempts in a few seconds: a hot loop");
    drop(sidecar);
    db.drop_now();
}
