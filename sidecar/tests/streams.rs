//! Audit streams end to end: the real `levqor-sidecar` delivering sealed
//! audit chains to real HTTP receivers on loopback (Splunk HEC, Datadog
//! intake, a signed webhook; levqor-peers). Per-tenant isolation, order and
//! chain links checked by the receivers; faults: down, 503, kill -9, a wrong
//! token, a poison event.

mod common;

use std::time::Duration;

use common::*;
use levqor_peers::siem::{check_chain, Kind, Receiver};
use serde_json::{json, Value};

const TOKEN: &str = "hec-token-0123456789";

struct Streams {
    db: Db,
    _sealer: Sealer,
}

impl Streams {
    fn new(prefix: &str) -> Streams {
        let db = Db::new(prefix);
        db.table("orders", "tenant_id uuid NOT NULL, item text NOT NULL, qty int NOT NULL");
        db.su().batch_execute("SELECT levqor.enable_audit('orders')").unwrap();
        let sealer = Sealer::start(&db);
        Streams { db, _sealer: sealer }
    }

    fn config(&self, extra: &str) -> String {
        format!(
            r#"[database]
url = "{url}"

[http]
listen = "{{http}}"

[audit]
batch_max_events = 50
poll_seconds = 1
retry_max_seconds = 2
timeout_seconds = 5
max_attempts = 4
{extra}"#,
            url = self.db.url(SIDECAR)
        )
    }

    fn add_stream(&self, t: &Tenant, r: &Receiver, secret: &str, options: Value) -> i64 {
        self.db
            .admin()
            .query_one(
                "SELECT levqor.add_audit_stream($1, $2, $3, $4, $5)",
                &[&t.slug, &r.kind.as_str(), &r.url(), &secret, &options],
            )
            .unwrap()
            .get(0)
    }

    fn orders(&self, t: &Tenant, n: usize, tag: &str) {
        self.db.as_tenant(t, |tx| {
            for i in 0..n {
                tx.execute("INSERT INTO orders (item, qty) VALUES ($1, $2)", &[&format!("{tag}-{i}"), &(i as i32)]).unwrap();
            }
            tx.execute("UPDATE orders SET qty = qty + 1 WHERE item = $1", &[&format!("{tag}-0")]).unwrap();
            tx.execute("DELETE FROM orders WHERE item = $1", &[&format!("{tag}-1")]).unwrap();
        });
    }

    /// The chain's sealed head.
    fn head(&self, t: &Tenant) -> i64 {
        self.db
            .su()
            .query_one("SELECT coalesce((SELECT seq FROM levqor.audit_heads WHERE chain = $1), 0)", &[&t.id])
            .unwrap()
            .get(0)
    }

    /// Wait until nothing of the tenant is left to seal, and the receiver has all of it.
    fn wait_delivered(&self, r: &Receiver, t: &Tenant, timeout: Duration) -> Vec<Value> {
        let id = t.id.to_string();
        wait_until(&format!("{}'s chain at {}", t.slug, r.kind.as_str()), timeout, || {
            // In this order: once nothing is unsealed, the head read after it is final.
            if self.unsealed(t) > 0 {
                return false;
            }
            let head = self.head(t);
            head > 0 && r.events_of(&id).iter().filter_map(|e| e["seq"].as_i64()).max() == Some(head)
        });
        r.events_of(&id)
    }

    /// Entries of the tenant not sealed yet.
    fn unsealed(&self, t: &Tenant) -> i64 {
        self.db
            .su()
            .query_one(
                "SELECT count(*) FROM levqor.audit_log a WHERE a.tenant_id = $1
                    AND NOT EXISTS (SELECT 1 FROM levqor.audit_chain c WHERE a.id = ANY (c.ids))",
                &[&t.id],
            )
            .map(|r| r.get(0))
            .unwrap_or(1)
    }

    fn view(&self, id: i64) -> (String, i64, i64, Option<String>) {
        let r = self
            .db
            .admin()
            .query_one("SELECT state, delivered_seq, parked, last_error FROM levqor.audit_streams WHERE id = $1", &[&id])
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3))
    }
}

fn start(kind: Kind, secret: &str) -> Receiver {
    runtime().block_on(Receiver::start(kind, secret)).unwrap()
}

#[test]
fn each_tenant_receives_all_of_its_chain_in_order_and_nothing_of_another() {
    let s = Streams::new("st_iso");
    let a = s.db.tenant("acme", "enterprise");
    let b = s.db.tenant("globex", "enterprise");
    let splunk = start(Kind::SplunkHec, TOKEN);
    let datadog = start(Kind::Datadog, "dd-api-key-abcdef");
    let hook = start(Kind::Webhook, "webhook-signing-secret");
    s.add_stream(&a, &splunk, TOKEN, json!({}));
    s.add_stream(&b, &datadog, "dd-api-key-abcdef", json!({"host": "db-1", "batch_max_events": 20}));
    let config = s.config(&format!("[[siem]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"{}\"\ntoken_env = \"OPS_WEBHOOK_SECRET\"\n", hook.url()));
    let _sidecar = Sidecar::start(&config, &[("OPS_WEBHOOK_SECRET", "webhook-signing-secret")]);
    // Both orders of operations: rows before and after the streams start.
    s.orders(&a, 30, "a1");
    s.orders(&b, 45, "b1");
    s.orders(&a, 10, "a2");

    let got_a = s.wait_delivered(&splunk, &a, Duration::from_secs(60));
    let got_b = s.wait_delivered(&datadog, &b, Duration::from_secs(60));
    for e in splunk.events() {
        assert_eq!(e["tenant_id"], a.id.to_string(), "an event of another tenant at A's SIEM: {e}");
    }
    for e in datadog.events() {
        assert_eq!(e["tenant_id"], b.id.to_string(), "an event of another tenant at B's SIEM: {e}");
        assert_eq!(e["tenant"], b.slug.as_str());
    }
    let chain_a = check_chain(&got_a, 1).unwrap();
    let chain_b = check_chain(&got_b, 1).unwrap();
    assert_eq!(chain_a.len() as i64, s.head(&a));
    assert_eq!(chain_b.len() as i64, s.head(&b));
    // The fields DESIGN.md lists, with the row changes in them.
    let insert = chain_a.iter().find(|e| e["table"].as_str().is_some_and(|t| t.ends_with("orders")) && e["operation"] == "INSERT").unwrap();
    for field in ["id", "tenant_id", "tenant", "seq", "hash", "prev_hash", "at", "kind", "table", "operation", "pk", "old", "new", "changed", "event", "detail", "db_role", "user_id", "member_role"] {
        assert!(insert.get(field).is_some(), "{field} missing in {insert}");
    }
    assert_eq!(insert["new"]["item"], "a1-0");
    // Datadog: batches within its limits; gzip by default.
    let st = datadog.state.lock().unwrap();
    assert!(st.deliveries.iter().all(|d| d.events <= 20 && d.gzip), "{:?}", st.deliveries);
    drop(st);
    // The operator's webhook gets every tenant's chain, each intact.
    let _ = s.wait_delivered(&hook, &a, Duration::from_secs(30));
    let _ = s.wait_delivered(&hook, &b, Duration::from_secs(30));
    check_chain(&hook.events_of(&a.id.to_string()), 1).unwrap();
    check_chain(&hook.events_of(&b.id.to_string()), 1).unwrap();
    assert!(hook.state.lock().unwrap().deliveries.iter().all(|d| d.delivery_id.is_some()));
}

#[test]
fn a_receiver_down_then_back_or_busy_loses_nothing_and_keeps_the_order() {
    let s = Streams::new("st_down");
    let a = s.db.tenant("initech", "enterprise");
    let splunk = start(Kind::SplunkHec, TOKEN);
    let id = s.add_stream(&a, &splunk, TOKEN, json!({"batch_max_events": 10}));
    let sidecar = Sidecar::start(&s.config(""), &[]);
    s.orders(&a, 10, "before");
    s.wait_delivered(&splunk, &a, Duration::from_secs(30));

    splunk.down();
    s.orders(&a, 25, "while-down");
    wait_until("the stream failing", Duration::from_secs(20), || s.view(id).0 == "failing");
    runtime().block_on(splunk.up());
    s.orders(&a, 5, "after");
    s.wait_delivered(&splunk, &a, Duration::from_secs(60));
    check_chain(&splunk.events_of(&a.id.to_string()), 1).unwrap();
    wait_until("the stream active again", Duration::from_secs(10), || s.view(id).0 == "active");

    // Splunk's "server busy" for a while: waited out, bounded, nothing lost.
    splunk.fail(503, 4);
    let before = splunk.requests();
    s.orders(&a, 12, "busy");
    s.wait_delivered(&splunk, &a, Duration::from_secs(60));
    assert!(splunk.requests() - before <= 12, "{} requests for 4 busy answers and 2 batches", splunk.requests() - before);
    check_chain(&splunk.events_of(&a.id.to_string()), 1).unwrap();
    assert!(metric(&sidecar.metrics(), "levqor_sidecar_stream_retried_total") >= 4.0);
}

#[test]
fn a_dead_destination_delays_no_other_and_a_failing_batch_is_parked_after_max_attempts() {
    let s = Streams::new("st_isolate");
    let a = s.db.tenant("dead-end", "enterprise");
    let b = s.db.tenant("healthy", "enterprise");
    let dead = start(Kind::Webhook, "webhook-signing-secret");
    let alive = start(Kind::Webhook, "webhook-signing-secret");
    dead.set_delay(Some(Duration::from_secs(30)));
    let id_a = s.add_stream(&a, &dead, "webhook-signing-secret", json!({}));
    s.add_stream(&b, &alive, "webhook-signing-secret", json!({}));
    let _sidecar = Sidecar::start(&s.config(""), &[]);
    s.orders(&a, 5, "stuck");
    s.orders(&b, 5, "flows");
    // B's receiver gets everything while A's hangs on its first request.
    s.wait_delivered(&alive, &b, Duration::from_secs(20));
    assert!(dead.events().is_empty());

    // 500s for every request to A's receiver: parked after max_attempts (4), not lost, and A goes on.
    dead.set_delay(None);
    dead.fail(500, 1000);
    wait_until("the batch parked", Duration::from_secs(60), || s.view(id_a).2 > 0);
    let (_, delivered, parked, _) = s.view(id_a);
    assert!(parked > 0 && delivered > 0, "parked {parked}, cursor past them at {delivered}");
    let replies: Vec<String> = s
        .db
        .admin()
        .query("SELECT reply FROM levqor.audit_stream_parked WHERE destination = $1", &[&format!("stream:{id_a}")])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(replies.iter().all(|r| r.contains("given up after 4 attempts")), "{replies:?}");
}

#[test]
fn kill_9_in_the_middle_of_a_delivery_redelivers_at_most_one_batch_and_loses_none() {
    let s = Streams::new("st_kill");
    let a = s.db.tenant("umbrella", "enterprise");
    let hook = start(Kind::Webhook, "webhook-signing-secret");
    s.add_stream(&a, &hook, "webhook-signing-secret", json!({"batch_max_events": 8}));
    s.orders(&a, 80, "bulk");
    // Slow answers: the kill lands while a batch is in flight.
    hook.set_delay(Some(Duration::from_millis(400)));
    let mut sidecar = Sidecar::start(&s.config(""), &[]);
    wait_until("a few batches delivered", Duration::from_secs(60), || hook.state.lock().unwrap().deliveries.len() >= 3);
    std::thread::sleep(Duration::from_millis(200));
    sidecar.kill9();
    hook.set_delay(None);
    sidecar.restart();
    let got = s.wait_delivered(&hook, &a, Duration::from_secs(60));
    let chain = check_chain(&got, 1).unwrap();
    assert_eq!(chain.len() as i64, s.head(&a));
    let redelivered = got.len() - chain.len();
    assert!(redelivered <= 8, "{redelivered} events delivered twice: more than one batch");
    // A redelivered batch carries the same delivery id.
    let st = hook.state.lock().unwrap();
    let mut ids: Vec<&String> = st.deliveries.iter().filter_map(|d| d.delivery_id.as_ref()).collect();
    let all = ids.len();
    ids.sort();
    ids.dedup();
    assert!(all - ids.len() <= 1, "{} deliveries repeated", all - ids.len());
    assert_eq!(redelivered > 0, all > ids.len(), "a redelivered event came in a batch with the id it had");
}

#[test]
fn a_wrong_token_stops_the_stream_until_the_secret_is_fixed() {
    let s = Streams::new("st_auth");
    let a = s.db.tenant("hooli", "enterprise");
    let splunk = start(Kind::SplunkHec, TOKEN);
    let id = s.add_stream(&a, &splunk, "not-the-right-token", json!({}));
    let sidecar = Sidecar::start(&s.config(""), &[]);
    s.orders(&a, 5, "x");
    wait_until("auth_failed in the view", Duration::from_secs(30), || s.view(id).0 == "auth_failed");
    let (_, delivered, _, error) = s.view(id);
    assert_eq!(delivered, 0);
    assert!(error.unwrap_or_default().contains("403"), "the receiver's reply is shown");
    let refused = splunk.requests();
    s.orders(&a, 5, "y");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(splunk.requests(), refused, "no retry storm against a refused secret");
    assert!(splunk.events().is_empty());
    assert!(sidecar.log().contains("auth_failed") || sidecar.log().contains("refused the stream's secret"));
    assert!(metric(&sidecar.metrics(), "levqor_sidecar_errors_total{task=\"streams\",kind=\"auth_failed\"}") >= 1.0);
    assert!(!sidecar.log().contains("not-the-right-token"), "a secret in the log");

    s.db.admin().execute("SELECT levqor.set_audit_stream_secret($1, $2)", &[&id, &TOKEN]).unwrap();
    let got = s.wait_delivered(&splunk, &a, Duration::from_secs(30));
    check_chain(&got, 1).unwrap();
    wait_until("active again", Duration::from_secs(10), || s.view(id).0 == "active");
}

#[test]
fn a_poison_event_is_parked_and_the_rest_is_delivered() {
    let s = Streams::new("st_poison");
    let a = s.db.tenant("vandelay", "enterprise");
    let dd = start(Kind::Datadog, "dd-api-key-abcdef");
    dd.set_poison(Some("POISON-PILL"));
    let id = s.add_stream(&a, &dd, "dd-api-key-abcdef", json!({"batch_max_events": 16}));
    let sidecar = Sidecar::start(&s.config(""), &[]);
    s.orders(&a, 6, "fine");
    s.db.as_tenant(&a, |tx| tx.execute("INSERT INTO orders (item, qty) VALUES ('POISON-PILL', 1)", &[]).unwrap());
    s.orders(&a, 6, "later");
    let head = {
        wait_until("all sealed and delivered or parked", Duration::from_secs(60), || {
            if s.unsealed(&a) > 0 {
                return false;
            }
            let head = s.head(&a);
            head > 0 && s.view(id).1 == head
        });
        s.head(&a)
    };
    let (_, _, parked, _) = s.view(id);
    assert_eq!(parked, 1, "exactly the refused event is parked");
    let got = dd.events_of(&a.id.to_string());
    assert_eq!(got.len() as i64, head - 1, "every other event arrived");
    assert!(got.iter().all(|e| !e.to_string().contains("POISON-PILL")));
    let reply: String = s
        .db
        .admin()
        .query_one("SELECT reply FROM levqor.audit_stream_parked WHERE destination = $1", &[&format!("stream:{id}")])
        .unwrap()
        .get(0);
    assert!(reply.starts_with("400"), "{reply}");
    assert!(metric(&sidecar.metrics(), "levqor_sidecar_stream_parked_total") >= 1.0);
}

#[test]
fn a_policy_deny_a_quota_threshold_and_a_lifecycle_change_reach_the_tenants_siem() {
    let s = Streams::new("st_events");
    let a = s.db.tenant("wonka", "enterprise");
    let hook = start(Kind::Webhook, "webhook-signing-secret");
    s.add_stream(&a, &hook, "webhook-signing-secret", json!({}));
    let _sidecar = Sidecar::start(&s.config(""), &[]);
    s.db.as_tenant(&a, |tx| {
        assert!(!tx.query_one("SELECT levqor.authorize('invoices.delete', 'invoice:42')", &[]).unwrap().get::<_, bool>(0));
    });
    s.db.admin().execute("SELECT levqor.set_quota($1, 'api_calls_per_15min', 10)", &[&a.slug]).unwrap();
    s.db.as_tenant(&a, |tx| tx.query_one("SELECT levqor.consume('api_calls_per_15min', 9)", &[]).unwrap());
    s.db.admin().query_one("SELECT levqor.flush_usage()", &[]).unwrap();
    s.db.admin().execute("SELECT levqor.suspend_tenant($1, 'maintenance', 'read_only')", &[&a.slug]).unwrap();
    s.db.admin().execute("SELECT levqor.resume_tenant($1)", &[&a.slug]).unwrap();
    let got = s.wait_delivered(&hook, &a, Duration::from_secs(60));
    let events: Vec<&str> = got.iter().filter_map(|e| e["event"].as_str()).collect();
    for wanted in ["policy_denied", "quota_threshold", "tenant_suspended", "tenant_resumed", "audit_stream_added"] {
        assert!(events.contains(&wanted), "{wanted} not at the SIEM: {events:?}");
    }
    check_chain(&got, 1).unwrap();
}

#[test]
fn streams_are_for_plans_with_the_feature_and_their_urls_and_secrets_are_checked() {
    let s = Streams::new("st_sql");
    let free = s.db.tenant("smallco", "free");
    let big = s.db.tenant("bigco", "enterprise");
    let mut admin = s.db.admin();
    let add = |c: &mut Client, t: &Tenant, url: &str, secret: &str| {
        c.query_one("SELECT levqor.add_audit_stream($1, 'splunk_hec', $2, $3)", &[&t.slug, &url, &secret])
    };
    assert_eq!(e2e::sqlstate(add(&mut admin, &free, "https://splunk.example.com/services/collector/event", TOKEN)), "55000");
    for bad in ["http://splunk.example.com/x", "ftp://x", "https://exa mple.com", "javascript:alert(1)"] {
        assert_eq!(e2e::sqlstate(add(&mut admin, &big, bad, TOKEN)), "22023", "{bad}");
    }
    assert_eq!(e2e::sqlstate(add(&mut admin, &big, "https://splunk.example.com/x", "short")), "22023");
    let id: i64 = add(&mut admin, &big, "https://splunk.example.com/services/collector/event", TOKEN).unwrap().get(0);
    // The secret: for the sidecar only; never in the view or the audit trail.
    let mut app = s.db.app();
    assert_eq!(e2e::sqlstate(app.query("SELECT * FROM levqor.audit_stream_secrets", &[])), "42501");
    assert_eq!(e2e::sqlstate(admin.query("SELECT * FROM levqor.audit_stream_secrets", &[])), "42501");
    let mut sc = s.db.connect(SIDECAR);
    let secret: String = sc.query_one("SELECT secret FROM levqor.stream_destinations() WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(secret, TOKEN);
    let trail: i64 = s
        .db
        .su()
        .query_one("SELECT count(*) FROM levqor.audit_log WHERE detail::text LIKE '%' || $1 || '%'", &[&TOKEN])
        .unwrap()
        .get(0);
    assert_eq!(trail, 0, "the secret is not in the audit trail");
    // The tenant's own admin reads its streams' state; another tenant sees none.
    s.db.admin().execute("SELECT levqor.add_member($1, $2, 'admin')", &[&big.slug, &uuid::Uuid::new_v4()]).unwrap();
    let n = s.db.as_tenant(&big, |tx| tx.query("SELECT id, state FROM levqor.audit_streams", &[]).unwrap().len());
    assert_eq!(n, 1);
    let n = s.db.as_tenant(&free, |tx| tx.query("SELECT id FROM levqor.audit_streams", &[]).unwrap().len());
    assert_eq!(n, 0);
    // Pause, resume, remove: audited.
    admin.execute("SELECT levqor.pause_audit_stream($1)", &[&id]).unwrap();
    assert_eq!(s.view(id).0, "paused");
    admin.execute("SELECT levqor.resume_audit_stream($1)", &[&id]).unwrap();
    admin.execute("SELECT levqor.remove_audit_stream($1)", &[&id]).unwrap();
    assert_eq!(e2e::sqlstate(admin.execute("SELECT levqor.remove_audit_stream($1)", &[&id])), "42704");
    let events: Vec<String> = s
        .db
        .su()
        .query("SELECT event FROM levqor.audit_log WHERE tenant_id = $1 AND event LIKE 'audit_stream_%' ORDER BY id", &[&big.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["audit_stream_added", "audit_stream_paused", "audit_stream_resumed", "audit_stream_removed"]);
}
