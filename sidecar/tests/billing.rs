//! Billing end to end: the real `levqor-sidecar` against a real cluster with
//! levqor and a fake Stripe on loopback (levqor-peers) speaking Stripe's wire
//! format. Provisioning, metering with exact totals, plan changes both ways,
//! webhooks (and forged, replayed, stale and garbage ones), `kill -9` in the
//! middle of a batch, a Stripe outage, reconciliation.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use levqor_peers::stripe::{signed_event, unix_now, Fault, FakeStripe, State};
use serde_json::{json, Value};
use uuid::Uuid;

fn prices(plan: &str) -> Vec<String> {
    let p: &[&str] = match plan {
        "free" => &["price_free_base"],
        "starter" => &["price_starter_base", "price_api_calls"],
        "professional" => &["price_pro_base", "price_api_calls"],
        _ => &["price_enterprise_base", "price_api_calls"],
    };
    let mut v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

struct Billing {
    db: Db,
    stripe: FakeStripe,
}

impl Billing {
    fn new(prefix: &str) -> Billing {
        let db = Db::new(prefix);
        let stripe = runtime().block_on(FakeStripe::start("127.0.0.1:0".parse().unwrap(), STRIPE_KEY, &["api_calls"])).unwrap();
        Billing { db, stripe }
    }

    fn config(&self, extra: &str) -> String {
        format!(
            r#"[database]
url = "{url}"

[http]
listen = "{{http}}"

[stripe]
api_base = "{api}"
api_key_env = "STRIPE_SECRET_KEY"
webhook_secret_env = "STRIPE_WEBHOOK_SECRET"
sweep_seconds = 1
meter_interval_seconds = 1
retry_max_seconds = 2
timeout_seconds = 5
{extra}
{STRIPE_PLANS}
[stripe.meters]
api_calls_per_15min = "api_calls"
"#,
            url = self.db.url(SIDECAR),
            api = self.stripe.url(),
        )
    }

    fn sidecar(&self, extra: &str) -> Sidecar {
        Sidecar::start(&self.config(extra), &[("STRIPE_SECRET_KEY", STRIPE_KEY), ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)])
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.stripe.state.lock().unwrap()
    }

    fn provisioned(&self) -> i64 {
        self.db
            .admin()
            .query_one("SELECT count(*) FROM levqor.tenant_billing WHERE subscription_id IS NOT NULL AND cancelled_at IS NULL", &[])
            .unwrap()
            .get(0)
    }

    fn wait_provisioned(&self, n: i64) {
        wait_until(&format!("{n} tenants with a Stripe subscription"), Duration::from_secs(60), || self.provisioned() >= n);
    }

    fn customer(&self, t: &Tenant) -> String {
        self.db
            .admin()
            .query_one("SELECT customer_id FROM levqor.tenant_billing WHERE tenant_id = $1", &[&t.id])
            .unwrap()
            .get(0)
    }

    fn subscription_prices(&self, t: &Tenant) -> Vec<String> {
        let sub: String = self
            .db
            .admin()
            .query_one("SELECT subscription_id FROM levqor.tenant_billing WHERE tenant_id = $1", &[&t.id])
            .unwrap()
            .get(0);
        let st = self.st();
        let mut p: Vec<String> = st.subscriptions[&sub]["items"]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["price"]["id"].as_str().unwrap().to_string())
            .collect();
        p.sort();
        p
    }

    /// Use `amount` API calls as the tenant, then flush them to the ledger.
    fn use_api(&self, t: &Tenant, amount: i64) {
        self.db.as_tenant(t, |tx| {
            tx.query_one("SELECT levqor.consume('api_calls_per_15min', $1)", &[&amount]).unwrap();
        });
    }

    fn flush(&self) {
        self.db.admin().query_one("SELECT levqor.flush_usage()", &[]).unwrap();
    }

    fn ledger_total(&self, t: &Tenant) -> i64 {
        self.db
            .su()
            .query_one(
                "SELECT coalesce(sum(quantity), 0)::bigint FROM levqor.usage_ledger WHERE tenant_id = $1 AND metric = 'api_calls_per_15min'",
                &[&t.id],
            )
            .unwrap()
            .get(0)
    }

    fn ledger_entries(&self) -> i64 {
        self.db.su().query_one("SELECT count(*) FROM levqor.usage_ledger", &[]).unwrap().get(0)
    }

    fn cursor_at_end(&self) -> bool {
        self.db
            .su()
            .query_one(
                "SELECT coalesce((SELECT position FROM levqor.ledger_cursors WHERE consumer = 'stripe'), 0)
                        >= coalesce((SELECT max(id) FROM levqor.usage_ledger), 0)",
                &[],
            )
            .unwrap()
            .get(0)
    }

    fn wait_metered(&self) {
        wait_until("the ledger metered to its end", Duration::from_secs(90), || self.cursor_at_end());
    }

    fn stripe_total(&self, t: &Tenant) -> i64 {
        let c = self.customer(t);
        self.st().total_all(&c, "api_calls")
    }

    fn reconcile(&self, sidecar: &Sidecar) -> (i32, String, String) {
        cli(
            &["reconcile", "--config", sidecar.config.to_str().unwrap(), "--since", "2020-01-01T00:00:00Z"],
            &[("STRIPE_SECRET_KEY", STRIPE_KEY)],
        )
    }

    fn post_event(&self, sidecar: &Sidecar, id: &str, kind: &str, created: i64, object: Value) -> (u16, Value) {
        let (body, sig) = signed_event(WEBHOOK_SECRET, id, kind, created, object, unix_now());
        let (status, reply) = sidecar.post("/stripe/webhook", &[("Stripe-Signature", &sig), ("Content-Type", "application/json")], body.as_bytes());
        (status, serde_json::from_str(&reply).unwrap_or(Value::Null))
    }

    fn tenant_state(&self, t: &Tenant) -> (String, String, Option<String>) {
        let r = self.db.admin().query_one("SELECT status, plan, suspension_reason FROM levqor.tenants WHERE id = $1", &[&t.id]).unwrap();
        (r.get(0), r.get(1), r.get(2))
    }
}

fn sub_object(b: &Billing, t: &Tenant, plan: &str) -> Value {
    let items: Vec<Value> = prices(plan).iter().map(|p| json!({"id": format!("si_{p}"), "price": {"id": p}})).collect();
    json!({"id": "sub_webhook", "object": "subscription", "customer": b.customer(t), "status": "active", "items": {"data": items}})
}

#[test]
fn every_tenant_gets_one_customer_and_subscription_and_its_usage_is_metered_exactly() {
    let b = Billing::new("bill_meter");
    let plans = ["free", "starter", "professional", "starter", "free", "professional"];
    let tenants: Vec<(Tenant, &str)> = plans.iter().map(|p| (b.db.tenant("acct", p), *p)).collect();
    let mut sidecar = b.sidecar("");
    b.wait_provisioned(tenants.len() as i64);

    // One customer each, tagged with the tenant, and its plan's prices.
    {
        let st = b.st();
        assert_eq!(st.customers.len(), tenants.len(), "one customer per tenant");
        for (t, _) in &tenants {
            let c = st.customer_of(&t.id.to_string()).expect("a customer for every tenant");
            assert_eq!(st.customers[&c]["metadata"]["levqor_slug"], t.slug.as_str());
        }
    }
    for (t, plan) in &tenants {
        assert_eq!(b.subscription_prices(t), prices(plan), "{} on {plan}", t.slug);
    }

    // Three rounds of usage, flushed to the ledger between them.
    let mut expected: BTreeMap<Uuid, i64> = BTreeMap::new();
    for round in 1..=3 {
        for (i, (t, _)) in tenants.iter().enumerate() {
            let n = (i as i64 + 1) * round + 2;
            b.use_api(t, n);
            *expected.entry(t.id).or_default() += n;
        }
        b.flush();
    }
    b.wait_metered();
    for (t, _) in &tenants {
        assert_eq!(b.ledger_total(t), expected[&t.id], "ledger of {}", t.slug);
        assert_eq!(b.stripe_total(t), expected[&t.id], "Stripe's total for {}", t.slug);
    }
    assert!(b.st().max_in_flight_per_customer <= 1, "one meter request at a time per customer and meter");
    assert_eq!(b.st().events.len() as i64, b.ledger_entries(), "one meter event per ledger entry");

    // A restarted sidecar creates nothing twice.
    sidecar.restart();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(b.st().customers.len(), tenants.len());
    assert_eq!(b.st().subscriptions.len(), tenants.len());

    // Reconcile: agreement, then usage not sent yet (told apart from drift), then drift.
    let (code, out, err) = b.reconcile(&sidecar);
    assert_eq!(code, 0, "reconcile agrees:\n{out}\n{err}");
    for (t, _) in &tenants {
        let line = out.lines().find(|l| l.starts_with(&t.slug)).unwrap_or_else(|| panic!("{} in\n{out}", t.slug));
        assert!(line.contains(&expected[&t.id].to_string()) && line.trim_end().ends_with("ok"), "{line}");
    }
    sidecar.kill9();
    b.use_api(&tenants[0].0, 5);
    b.flush();
    let (code, out, _) = b.reconcile(&sidecar);
    assert_eq!(code, 0, "usage behind the cursor is pending, not drift:\n{out}");
    assert!(out.lines().any(|l| l.starts_with(&tenants[0].0.slug) && l.contains("ok, pending")), "{out}");
    let c = b.customer(&tenants[1].0);
    b.st().drift.insert((c, "api_calls".into()), 3);
    let (code, out, _) = b.reconcile(&sidecar);
    assert_eq!(code, 1, "drift is exit 1:\n{out}");
    let line = out.lines().find(|l| l.starts_with(&tenants[1].0.slug)).unwrap();
    assert!(line.contains("DRIFT") && line.contains("-3"), "{line}");
    assert!(out.contains("hint:"), "{out}");
}

#[test]
fn a_plan_change_in_the_database_moves_the_subscription_both_ways_and_offboarding_cancels_it() {
    let b = Billing::new("bill_plan");
    let t = b.db.tenant("shop", "starter");
    let other = b.db.tenant("bystander", "free");
    let _sidecar = b.sidecar("");
    b.wait_provisioned(2);
    assert_eq!(b.subscription_prices(&t), prices("starter"));

    b.db.admin().execute("SELECT levqor.change_plan($1::uuid, 'professional')", &[&t.id]).unwrap();
    wait_until("the upgrade in Stripe", Duration::from_secs(30), || b.subscription_prices(&t) == prices("professional"));
    b.db.admin().execute("SELECT levqor.change_plan($1::uuid, 'free')", &[&t.id]).unwrap();
    wait_until("the downgrade in Stripe", Duration::from_secs(30), || b.subscription_prices(&t) == prices("free"));
    assert_eq!(b.subscription_prices(&other), prices("free"), "another tenant's subscription is untouched");

    // Every change is in the tenant's audit trail.
    let events: Vec<String> = b
        .db
        .su()
        .query("SELECT event FROM levqor.audit_log WHERE tenant_id = $1 AND event LIKE 'billing_%' ORDER BY id", &[&t.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        events,
        ["billing_customer_created", "billing_subscription_created", "billing_subscription_changed", "billing_subscription_changed"]
    );

    // Offboarded: cancelled in Stripe; purged: the billing row stays as a tombstone.
    b.db.admin().execute("SELECT levqor.offboard_tenant($1::uuid, '0 seconds')", &[&t.id]).unwrap();
    let sub: String = b.db.admin().query_one("SELECT subscription_id FROM levqor.tenant_billing WHERE tenant_id = $1", &[&t.id]).unwrap().get(0);
    wait_until("the cancellation in Stripe", Duration::from_secs(30), || b.st().subscriptions[&sub]["status"] == "canceled");
    b.db.admin().execute("SELECT * FROM levqor.purge_tenant($1::uuid)", &[&t.id]).unwrap();
    let r = b.db.admin().query_one("SELECT slug, customer_id, cancelled_at IS NOT NULL FROM levqor.tenant_billing WHERE tenant_id = $1", &[&t.id]).unwrap();
    assert_eq!(r.get::<_, String>(0), t.slug);
    assert!(r.get::<_, Option<String>>(1).is_some() && r.get::<_, bool>(2));
    assert_eq!(b.st().subscriptions[&b.db.admin().query_one("SELECT subscription_id FROM levqor.tenant_billing WHERE tenant_id = $1", &[&other.id]).unwrap().get::<_, String>(0)]["status"], "active");
}

#[test]
fn webhooks_are_verified_applied_once_and_never_undone_by_an_older_event() {
    let b = Billing::new("bill_hook");
    let t = b.db.tenant("studio", "starter");
    let bystander = b.db.tenant("elsewhere", "starter");
    b.db.table("invoices", "tenant_id uuid NOT NULL, total bigint NOT NULL");
    let sidecar = b.sidecar("");
    b.wait_provisioned(2);
    let now = unix_now();
    let seen = || -> i64 { b.db.admin().query_one("SELECT count(*) FROM levqor.stripe_events", &[]).unwrap().get(0) };

    // Forged, missing, stale and garbage: 400, nothing changes.
    let obj = sub_object(&b, &t, "professional");
    let (body, _) = signed_event(WEBHOOK_SECRET, "evt_forged1", "customer.subscription.updated", now, obj.clone(), now);
    let (_, forged) = signed_event("whsec_not_ours", "evt_forged1", "customer.subscription.updated", now, obj.clone(), now);
    assert_eq!(sidecar.post("/stripe/webhook", &[("Stripe-Signature", &forged)], body.as_bytes()).0, 400);
    assert_eq!(sidecar.post("/stripe/webhook", &[], body.as_bytes()).0, 400);
    let (stale_body, stale) = signed_event(WEBHOOK_SECRET, "evt_stale1", "customer.subscription.updated", now, obj.clone(), now - 400);
    let (status, reply) = sidecar.post("/stripe/webhook", &[("Stripe-Signature", &stale)], stale_body.as_bytes());
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("timestamp"), "{reply}");
    for garbage in [&b"not json at all"[..], b"{}", br#"{"id":"evt_x","type":"invoice.paid"}"#, b"\xff\xfe", b""] {
        let sig = levqor_peers::stripe::sign_raw(WEBHOOK_SECRET, now, garbage);
        let (status, reply) = sidecar.post("/stripe/webhook", &[("Stripe-Signature", &sig)], garbage);
        assert_eq!(status, 400, "garbage {garbage:?} answered {reply}");
    }
    assert_eq!(seen(), 0, "no refused event was recorded");
    assert_eq!(b.tenant_state(&t).1, "starter");

    // Stripe moves the subscription to professional: the tenant's plan follows, once.
    let (status, reply) = b.post_event(&sidecar, "evt_up1", "customer.subscription.updated", now - 10, obj.clone());
    assert_eq!((status, reply["outcome"].as_str()), (200, Some("plan changed")), "{reply}");
    assert_eq!(b.tenant_state(&t).1, "professional");
    let (status, reply) = b.post_event(&sidecar, "evt_up1", "customer.subscription.updated", now - 10, obj);
    assert_eq!((status, reply["outcome"].as_str()), (200, Some("duplicate")));
    // An older event arriving late does not undo it.
    let (_, reply) = b.post_event(&sidecar, "evt_old1", "customer.subscription.updated", now - 100, sub_object(&b, &t, "starter"));
    assert_eq!(reply["outcome"], "stale");
    assert_eq!(b.tenant_state(&t).1, "professional");
    // And back down, newer: applied.
    let (_, reply) = b.post_event(&sidecar, "evt_down1", "customer.subscription.updated", now - 5, sub_object(&b, &t, "starter"));
    assert_eq!(reply["outcome"], "plan changed");
    assert_eq!(b.tenant_state(&t).1, "starter");

    // A failed payment suspends (read only); the paid invoice resumes.
    let invoice = json!({"id": "in_1", "object": "invoice", "customer": b.customer(&t)});
    let (_, reply) = b.post_event(&sidecar, "evt_fail1", "invoice.payment_failed", now, invoice.clone());
    assert_eq!(reply["outcome"], "suspended");
    assert_eq!(b.tenant_state(&t), ("suspended".into(), "starter".into(), Some("payment_failed".into())));
    let (_, reply) = b.post_event(&sidecar, "evt_paid1", "invoice.paid", now, invoice);
    assert_eq!(reply["outcome"], "resumed");
    assert_eq!(b.tenant_state(&t).0, "active");

    // invoice.paid resumes only a tenant suspended for a failed payment.
    b.db.admin().execute("SELECT levqor.suspend_tenant($1::uuid, 'abuse')", &[&bystander.id]).unwrap();
    let (_, reply) = b.post_event(&sidecar, "evt_paid2", "invoice.paid", now, json!({"id": "in_2", "customer": b.customer(&bystander)}));
    assert_eq!(reply["outcome"], "unchanged");
    assert_eq!(b.tenant_state(&bystander).0, "suspended");

    // A deleted subscription suspends read only.
    let (_, reply) = b.post_event(&sidecar, "evt_del1", "customer.subscription.deleted", now, sub_object(&b, &t, "starter"));
    assert_eq!(reply["outcome"], "suspended");
    assert_eq!(b.tenant_state(&t).2.as_deref(), Some("subscription_deleted"));
    let cannot_write = b.db.as_tenant(&t, |tx| tx.execute("INSERT INTO invoices (total) VALUES (10)", &[]).is_err());
    assert!(cannot_write, "a suspended tenant is read only");

    // Unknown types: 200 and nothing else.
    let (status, reply) = b.post_event(&sidecar, "evt_misc1", "customer.created", now, json!({"id": "cus_x"}));
    assert_eq!((status, reply["outcome"].as_str()), (200, Some("ignored")));

    // Each applied event once, and in the tenant's audit trail.
    let outcomes: Vec<String> = b
        .db
        .su()
        .query("SELECT detail->>'outcome' FROM levqor.audit_log WHERE tenant_id = $1 AND event = 'billing_webhook' ORDER BY id", &[&t.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outcomes, ["plan changed", "stale", "plan changed", "suspended", "resumed", "suspended"]);
    let m = sidecar.metrics();
    assert!(metric(&m, "levqor_sidecar_webhooks_total{type=\"unverified\",outcome=\"refused\"}") >= 8.0, "{m}");
}

#[test]
fn kill_9_in_the_middle_of_a_metering_batch_bills_nothing_twice_and_drops_nothing() {
    let b = Billing::new("bill_kill");
    let tenants: Vec<Tenant> = (0..12).map(|i| b.db.tenant("team", if i % 2 == 0 { "starter" } else { "professional" })).collect();
    let mut sidecar = b.sidecar("concurrency = 4");
    b.wait_provisioned(tenants.len() as i64);
    sidecar.kill9();
    for round in 1..=5 {
        for t in &tenants {
            b.use_api(t, round);
        }
        b.flush();
    }
    let total_entries = b.ledger_entries();
    // Slow meter answers, so the kill lands while a batch is in flight.
    b.st().faults.push_back(Fault::Slow { path: "/v1/billing/meter_events".into(), delay: Duration::from_millis(150), count: 1000 });
    sidecar.restart();
    wait_until("part of the batch in Stripe", Duration::from_secs(60), || b.st().events.len() >= 10);
    sidecar.kill9();
    let sent_before = b.st().events.len() as i64;
    assert!(sent_before < total_entries, "killed mid-batch ({sent_before} of {total_entries})");
    assert!(!b.cursor_at_end());
    b.st().faults.clear();
    sidecar.restart();
    b.wait_metered();
    for t in &tenants {
        assert_eq!(b.stripe_total(t), 15, "Stripe's total for {} equals the ledger", t.slug);
        assert_eq!(b.ledger_total(t), 15);
    }
    assert_eq!(b.st().events.len() as i64, total_entries, "each entry once in Stripe");
}

#[test]
fn a_stripe_outage_is_waited_out_with_a_bounded_number_of_requests_and_the_backlog_drains() {
    let b = Billing::new("bill_down");
    let tenants: Vec<Tenant> = (0..10).map(|_| b.db.tenant("firm", "starter")).collect();
    let sidecar = b.sidecar("");
    b.wait_provisioned(tenants.len() as i64);
    b.st().down = true;
    for t in &tenants {
        b.use_api(t, 4);
    }
    b.flush();
    let before = b.st().request_count("POST /v1/billing/meter_events");
    std::thread::sleep(Duration::from_secs(8));
    let during = b.st().request_count("POST /v1/billing/meter_events") - before;
    assert!(during > 0, "the sidecar kept trying");
    assert!(during <= 40, "{during} meter requests in 8 s of outage: not bounded");
    assert!(!b.cursor_at_end(), "nothing was recorded as sent during the outage");
    b.st().down = false;
    b.wait_metered();
    for t in &tenants {
        assert_eq!(b.stripe_total(t), 4);
    }
    let m = sidecar.metrics();
    assert!(metric(&m, "levqor_sidecar_errors_total{task=\"metering\"") > 0.0, "errors are counted:\n{m}");
}

#[test]
fn stripe_faults_are_retried_and_a_refused_entry_is_parked_without_blocking_the_rest() {
    let b = Billing::new("bill_fault");
    let t = b.db.tenant("lab", "professional");
    let u = b.db.tenant("works", "professional");
    let sidecar = b.sidecar("");
    b.wait_provisioned(2);
    {
        let mut st = b.st();
        st.faults.push_back(Fault::Status { path: "/v1/billing/meter_events".into(), status: 429, retry_after: Some(1), count: 2 });
        st.faults.push_back(Fault::Status { path: "/v1/billing/meter_events".into(), status: 500, retry_after: None, count: 1 });
        st.faults.push_back(Fault::Drop { path: "/v1/billing/meter_events".into(), count: 1 });
        // A value Stripe refuses with a 400: that entry is parked.
        st.refuse_value = Some(13);
    }
    b.use_api(&t, 13);
    b.use_api(&u, 7);
    b.flush();
    b.use_api(&t, 6);
    b.flush();
    b.wait_metered();
    assert_eq!(b.stripe_total(&t), 6, "the refused entry is not in Stripe; the later one is");
    assert_eq!(b.stripe_total(&u), 7);
    let parked = b.db.admin().query("SELECT quantity, reason, message FROM levqor.billing_parked WHERE tenant_id = $1", &[&t.id]).unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].get::<_, i64>(0), 13);
    assert!(parked[0].get::<_, String>(2).contains("refused"), "Stripe's message is kept");
    assert!(metric(&sidecar.metrics(), "levqor_sidecar_parked_entries_total") >= 1.0);

    // Fixed on Stripe's side, retried by an admin: billed, unparked.
    b.st().refuse_value = None;
    let id: i64 = b.db.admin().query_one("SELECT ledger_id FROM levqor.billing_parked WHERE tenant_id = $1", &[&t.id]).unwrap().get(0);
    assert!(b.db.admin().query_one("SELECT levqor.billing_retry($1)", &[&id]).unwrap().get::<_, bool>(0));
    wait_until("the retried entry in Stripe", Duration::from_secs(30), || b.stripe_total(&t) == 19);
    wait_until("unparked", Duration::from_secs(10), || {
        b.db.admin().query_one("SELECT count(*) FROM levqor.billing_parked", &[]).unwrap().get::<_, i64>(0) == 0
    });
    let (code, out, _) = b.reconcile(&sidecar);
    assert_eq!(code, 0, "{out}");

    // Usage older than Stripe's 35-day window: parked with that reason, not retried forever.
    let old: i64 = b
        .db
        .su()
        .query_one(
            "INSERT INTO levqor.usage_ledger (tenant_id, metric, quantity, period_start, period_end)
             VALUES ($1, 'api_calls_per_15min', 9, now() - interval '41 days', now() - interval '40 days') RETURNING id",
            &[&u.id],
        )
        .unwrap()
        .get(0);
    b.use_api(&u, 2);
    b.flush();
    b.wait_metered();
    let reason: String = b.db.admin().query_one("SELECT reason FROM levqor.billing_parked WHERE ledger_id = $1", &[&old]).unwrap().get(0);
    assert_eq!(reason, "too old");
    assert_eq!(b.stripe_total(&u), 9, "the later entry was billed, the old one not");
}

#[test]
fn the_sidecar_role_reads_no_tenant_rows_and_tenants_read_no_billing() {
    let b = Billing::new("bill_priv");
    let t = b.db.tenant("clinic", "starter");
    b.db.table("patients", "tenant_id uuid NOT NULL, name text NOT NULL");
    b.db.as_tenant(&t, |tx| tx.execute("INSERT INTO patients (name) VALUES ('Ada')", &[]).unwrap());
    let mut sc = b.db.connect(SIDECAR);
    for sql in ["SELECT * FROM patients", "SELECT * FROM levqor.tenant_keys", "SELECT * FROM levqor.members"] {
        assert_eq!(e2e::sqlstate(sc.query(sql, &[])), "42501", "{sql}");
    }
    // The audit log answers it as any session without a tenant: nothing.
    let entries: i64 = b.db.su().query_one("SELECT count(*) FROM levqor.audit_log WHERE tenant_id = $1", &[&t.id]).unwrap().get(0);
    assert!(entries > 0);
    assert_eq!(sc.query("SELECT * FROM levqor.audit_log", &[]).unwrap().len(), 0);
    // Nothing that makes it a tenant.
    assert!(sc.query_one("SELECT levqor.authenticate($1)", &[&t.key]).is_err());
    assert_eq!(e2e::sqlstate(sc.query_one("SELECT levqor.backup_context($1::uuid)", &[&t.id])), "42501");
    assert_eq!(e2e::sqlstate(sc.query_one("SELECT levqor.set_tenant($1)", &[&t.slug])), "42501");
    // What it is for: the billing catalog.
    sc.query("SELECT * FROM levqor.tenant_billing", &[]).unwrap();
    sc.query("SELECT * FROM levqor.billing_pending(10)", &[]).unwrap();
    // The app role sees no billing.
    let mut app = b.db.app();
    assert_eq!(e2e::sqlstate(app.query("SELECT * FROM levqor.tenant_billing", &[])), "42501");
    assert_eq!(e2e::sqlstate(app.query("SELECT * FROM levqor.billing_pending(10)", &[])), "42501");
}

#[test]
fn check_config_checks_the_plan_mapping_against_the_database() {
    let b = Billing::new("bill_check");
    let dir = TempDir::new("check");
    let good = b.config("").replace("{http}", "127.0.0.1:0");
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, &good).unwrap();
    let env = [("STRIPE_SECRET_KEY", STRIPE_KEY), ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)];
    let (code, out, err) = cli(&["check-config", "--config", path.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("database: reachable"), "{out}");
    let missing = good.replace("[stripe.plans.enterprise]\nprices = [\"price_enterprise_base\", \"price_api_calls\"]\n", "");
    std::fs::write(&path, &missing).unwrap();
    let (code, _, err) = cli(&["check-config", "--config", path.to_str().unwrap()], &env);
    assert_eq!(code, 2);
    assert!(err.contains("\"enterprise\""), "{err}");
    // A plan the operator adds later is caught too.
    b.db.su().execute("INSERT INTO levqor.plans (name, limits, features) VALUES ('nonprofit', '{}', '{}')", &[]).unwrap();
    std::fs::write(&path, &good).unwrap();
    let (code, _, err) = cli(&["check-config", "--config", path.to_str().unwrap()], &env);
    assert_eq!(code, 2);
    assert!(err.contains("nonprofit"), "{err}");
    // Secrets: missing variable named, value never printed.
    let (code, _, err) = cli(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("STRIPE_SECRET_KEY") && !err.contains(STRIPE_KEY), "{err}");
}

#[test]
fn sighup_reloads_the_configuration_and_a_broken_file_keeps_the_running_one() {
    let b = Billing::new("bill_hup");
    let t = b.db.tenant("press", "starter");
    let sidecar = b.sidecar("");
    b.wait_provisioned(1);
    // A typo: refused, the daemon goes on with what it had.
    std::fs::write(&sidecar.config, b.config("concurrenzy = 3").replace("{http}", &sidecar.http)).unwrap();
    sidecar.hup();
    wait_until("the refusal logged", Duration::from_secs(10), || sidecar.log().contains("configuration not reloaded"));
    // A good file: reloaded, and used (the plan mapping changed).
    let changed = b.config("").replace("{http}", &sidecar.http).replace(r#"prices = ["price_pro_base", "price_api_calls"]"#, r#"prices = ["price_pro_v2", "price_api_calls"]"#);
    std::fs::write(&sidecar.config, changed).unwrap();
    sidecar.hup();
    wait_until("reloaded", Duration::from_secs(10), || sidecar.log().contains("configuration reloaded"));
    b.db.admin().execute("SELECT levqor.change_plan($1::uuid, 'professional')", &[&t.id]).unwrap();
    let mut want = vec!["price_api_calls".to_string(), "price_pro_v2".to_string()];
    want.sort();
    wait_until("the new prices in Stripe", Duration::from_secs(30), || b.subscription_prices(&t) == want);
    assert_eq!(sidecar.get("/healthz").unwrap().0, 200);
}

#[test]
fn sigterm_stops_the_daemon_within_ten_seconds_and_secrets_stay_out_of_the_log() {
    let b = Billing::new("bill_term");
    let _t = b.db.tenant("agency", "starter");
    let mut sidecar = b.sidecar("");
    b.wait_provisioned(1);
    let (status, body) = sidecar.get("/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    let m = sidecar.metrics();
    assert!(m.contains(&format!("levqor_tenant_info{{tenant=\"{}\"", _t.slug)), "per-tenant gauges:\n{m}");
    // Stripe slow: SIGTERM abandons the request safely.
    b.st().faults.push_back(Fault::Slow { path: "/v1/billing/meter_events".into(), delay: Duration::from_secs(30), count: 10 });
    b.use_api(&_t, 3);
    b.flush();
    std::thread::sleep(Duration::from_millis(1500));
    let (code, took) = sidecar.term();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    assert!(!b.cursor_at_end(), "an abandoned request is not recorded as delivered");
    let log = sidecar.log();
    assert!(!log.contains(STRIPE_KEY) && !log.contains(WEBHOOK_SECRET), "a secret in the log");
    assert!(log.contains("levqor-sidecar stopped"));
}
