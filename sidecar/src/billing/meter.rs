//! Metering: `levqor.usage_ledger` into Stripe Billing Meters.
//!
//! Each ledger entry becomes one meter event (`POST /v1/billing/meter_events`)
//! for the tenant's customer, with the entry's `period_end` as its timestamp
//! and `lvq-<ledger id>` as its `identifier`, so a retry after a crash is a
//! duplicate Stripe drops. Stripe takes one request at a time per customer
//! and meter: entries of one (customer, meter) go in ledger order, one after
//! the other; different ones go concurrently (`[stripe] concurrency`).
//!
//! The ledger cursor (`levqor.ledger_advance`) moves only through a prefix of
//! entries that are settled: accepted by Stripe, parked, or not billed
//! (a metric without a meter, a tenant that is never billed). An entry whose
//! tenant has no customer yet holds the cursor until provisioning makes one.
//! 429: `Retry-After` is honoured; 5xx, timeouts, resets: backoff with jitter;
//! a 400 for one entry parks it (`levqor.billing_parked`, with Stripe's
//! message) and the rest go on; entries older than Stripe's 35-day window are
//! parked with that reason instead of being retried forever.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;
use tokio_postgres::Client;

use super::stripe::{Stripe, StripeError};
use crate::config::secret;
use crate::daemon::App;
use crate::metrics::PeerLabels;
use crate::retry::Backoff;

/// Stripe takes events up to 35 days old; an hour's margin for the clock.
const WINDOW: chrono::Duration = chrono::Duration::days(35);
const MARGIN: chrono::Duration = chrono::Duration::hours(1);
/// Attempts per entry within one pass before it waits for the next pass.
const ATTEMPTS: u32 = 5;

#[derive(Clone, Debug)]
pub struct Entry {
    pub id: i64,
    pub slug: String,
    pub metric: String,
    pub quantity: i64,
    pub period_end: DateTime<Utc>,
    pub customer: Option<String>,
    pub billable: bool,
    pub retry: bool,
}

/// What happened to an entry in a pass.
#[derive(Clone, Debug, PartialEq)]
enum Fate {
    Accepted,
    Parked(String, String),
    /// Not for Stripe: no meter for its metric, or nobody to bill.
    Unbilled,
    /// Not sent yet (no customer yet, or Stripe unreachable): holds the cursor.
    Held,
}

pub async fn run(app: Arc<App>) {
    let retry_max = app.cfg().stripe.as_ref().map_or(60, |s| s.retry_max_seconds).max(1);
    let mut idle_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(retry_max));
    // Accepted above the cursor (when an entry before them is held): not sent again.
    let mut accepted: HashSet<i64> = HashSet::new();
    // After a failed pass, the next one probes with one customer at a time.
    let mut probe = false;
    'connect: loop {
        let Some(mut db) = crate::db::connect_retrying(&app.db(), "metering", &app.stop).await else { return };
        let _ = db.client.batch_execute("LISTEN levqor_ledger").await;
        loop {
            let cfg = app.cfg();
            let Some(s) = cfg.stripe.clone() else { return };
            app.beat("metering", Duration::from_secs(s.meter_interval_seconds));
            match pass(&app, &db.client, &mut accepted, probe).await {
                Ok(Pass { full: true, failed: false }) => {
                    idle_backoff.reset();
                    probe = false;
                    continue;
                }
                Ok(Pass { failed: false, .. }) => {
                    idle_backoff.reset();
                    probe = false;
                }
                Ok(Pass { failed: true, .. }) => {
                    probe = true;
                    // Stripe is failing: wait longer each pass, never in a hot loop.
                    if !app.pause(idle_backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
                Err(e) if crate::db::is_connection_error(&e) => {
                    tracing::warn!(error = %crate::db::describe(&e), "metering: database connection lost");
                    if !app.pause(idle_backoff.next_delay()).await {
                        return;
                    }
                    continue 'connect;
                }
                Err(e) => {
                    tracing::error!(error = %crate::db::describe(&e), "metering: database error");
                    app.metrics.error("metering", "database");
                    if !app.pause(idle_backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            }
            tokio::select! {
                n = db.notifications.recv() => if n.is_none() { continue 'connect; },
                _ = tokio::time::sleep(Duration::from_secs(s.meter_interval_seconds)) => {}
                _ = app.stop.cancelled() => return,
            }
            while db.notifications.try_recv().is_ok() {}
        }
    }
}

struct Pass {
    /// A full page was read: there is more.
    full: bool,
    /// Stripe failed for some entry (not a 400).
    failed: bool,
}

const PAGE: i32 = 2000;

async fn pass(app: &App, client: &Client, accepted: &mut HashSet<i64>, probe: bool) -> Result<Pass, tokio_postgres::Error> {
    let cfg = app.cfg();
    let s = cfg.stripe.as_ref().expect("billing configured");
    let started = std::time::Instant::now();
    let rows = client.query("SELECT * FROM levqor.billing_ledger($1, $2)", &[&s.consumer, &PAGE]).await?;
    let read_ms = started.elapsed().as_millis() as u64;
    let entries: Vec<Entry> = rows
        .iter()
        .map(|r| Entry {
            id: r.get("id"),
            slug: r.get::<_, Option<String>>("slug").unwrap_or_default(),
            metric: r.get("metric"),
            quantity: r.get("quantity"),
            period_end: r.get("period_end"),
            customer: r.get("customer_id"),
            billable: r.get("billable"),
            retry: r.get("retry"),
        })
        .collect();
    let fresh = entries.iter().filter(|e| !e.retry).count() as i64;
    let lag = client.query_one("SELECT entries, seconds FROM levqor.ledger_lag($1)", &[&s.consumer]).await?;
    app.metrics.ledger_lag_entries.set(lag.get::<_, i64>(0));
    app.metrics.ledger_lag_seconds.set(lag.get::<_, f64>(1) as i64);
    if entries.is_empty() {
        return Ok(Pass { full: false, failed: false });
    }
    let key = match secret("stripe.api_key_env", &s.api_key_env) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "metering: no Stripe key");
            return Ok(Pass { full: false, failed: true });
        }
    };
    let stripe = Stripe::new(&s.api_base, key, Duration::from_secs(s.timeout_seconds));
    let now = Utc::now();

    // Sort each entry: sent, or settled without sending.
    let mut fates: BTreeMap<i64, Fate> = BTreeMap::new();
    let mut groups: BTreeMap<(String, String), Vec<Entry>> = BTreeMap::new();
    for e in &entries {
        let fate = if accepted.contains(&e.id) {
            Some(Fate::Accepted)
        } else if !s.meters.contains_key(&e.metric) || !e.billable {
            Some(Fate::Unbilled)
        } else if e.period_end < now - WINDOW + MARGIN {
            Some(Fate::Parked("too old".into(), "older than Stripe's 35-day window for meter events".into()))
        } else if e.customer.is_none() {
            Some(Fate::Held)
        } else {
            None
        };
        match fate {
            Some(f) => {
                fates.insert(e.id, f);
            }
            None => groups.entry((e.customer.clone().unwrap(), s.meters[&e.metric].clone())).or_default().push(e.clone()),
        }
    }

    // One task per (customer, meter), a bounded number at a time.
    let limit = Arc::new(Semaphore::new(if probe { 1 } else { s.concurrency.max(1) }));
    // Set when Stripe itself fails (no answer, 5xx): the other customers'
    // entries wait for the next pass instead of each retrying into an outage.
    let down = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for ((customer, event_name), group) in groups {
        let (stripe, limit, down) = (stripe.clone(), limit.clone(), down.clone());
        let stop = app.stop.clone();
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore");
            let mut out = Vec::new();
            for e in group {
                if stop.is_cancelled() || down.load(Ordering::Relaxed) {
                    out.push((e.id, Fate::Held, 0u32, None));
                    break;
                }
                let (fate, retries, err) = send(&stripe, &event_name, &customer, &e, &stop, &down).await;
                let held = fate == Fate::Held;
                out.push((e.id, fate, retries, err));
                if held {
                    // The rest of this customer's entries wait too: keep them in order.
                    break;
                }
            }
            out
        });
    }
    let mut failed = false;
    let peer = PeerLabels { peer: "stripe".into() };
    while let Some(done) = tasks.join_next().await {
        for (id, fate, retries, err) in done.expect("meter task") {
            app.metrics.requests.get_or_create(&peer).inc_by(u64::from(retries) + u64::from(fate != Fate::Held || err.is_some()));
            app.metrics.retries.get_or_create(&peer).inc_by(u64::from(retries));
            if let Some(e) = &err {
                app.metrics.error("metering", e.kind());
                if fate == Fate::Held {
                    failed = true;
                }
            }
            fates.insert(id, fate);
        }
    }

    let sent_ms = started.elapsed().as_millis() as u64 - read_ms;
    // Record what was settled, then move the cursor through the settled prefix.
    let mut through: Option<i64> = None;
    let mut holding = false;
    for e in &entries {
        let fate = fates.get(&e.id).cloned().unwrap_or(Fate::Held);
        match &fate {
            Fate::Accepted => {
                if !accepted.contains(&e.id) {
                    app.metrics.meter_events.inc();
                }
                if e.retry {
                    client.execute("SELECT levqor.billing_unparked($1)", &[&e.id]).await?;
                }
            }
            Fate::Parked(reason, message) => {
                client.execute("SELECT levqor.billing_park($1, $2, $3)", &[&e.id, reason, message]).await?;
                app.metrics.parked_entries.inc();
                tracing::warn!(ledger_id = e.id, tenant = %e.slug, metric = %e.metric, reason = %reason, message = %message,
                               "ledger entry parked");
            }
            Fate::Unbilled | Fate::Held => {}
        }
        if e.retry {
            continue;
        }
        if fate == Fate::Held {
            holding = true;
        }
        if holding {
            if fate == Fate::Accepted {
                accepted.insert(e.id);
            }
        } else {
            through = Some(e.id);
        }
    }
    if let Some(t) = through {
        client.execute("SELECT levqor.ledger_advance($1, $2)", &[&s.consumer, &t]).await?;
        accepted.retain(|id| *id > t);
    }
    tracing::debug!(entries = entries.len(), read_ms, sent_ms, total_ms = started.elapsed().as_millis() as u64, "metering pass");
    Ok(Pass { full: fresh >= i64::from(PAGE) && !holding, failed })
}

/// Send one entry, retrying what is worth retrying; returns its fate, how
/// many retries it took and the last error.
async fn send(
    stripe: &Stripe,
    event_name: &str,
    customer: &str,
    e: &Entry,
    stop: &tokio_util::sync::CancellationToken,
    down: &AtomicBool,
) -> (Fate, u32, Option<StripeError>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut retries = 0;
    let identifier = format!("lvq-{}", e.id);
    // A parked entry sent again needs a fresh Idempotency-Key: Stripe would
    // replay its first refusal for a day. The identifier still dedups it.
    let key = if e.retry { format!("{identifier}-retry-{}", Utc::now().timestamp()) } else { identifier.clone() };
    loop {
        match stripe.meter_event(event_name, customer, e.quantity, e.period_end.timestamp(), &identifier, &key).await {
            Ok(()) => return (Fate::Accepted, retries, None),
            Err(err) if err.unauthorized() => return (Fate::Held, retries, Some(err)),
            Err(err) if err.transient() && (down.load(Ordering::Relaxed) || retries + 1 >= ATTEMPTS) => {
                if !matches!(err, StripeError::Status { status: 429, .. }) {
                    down.store(true, Ordering::Relaxed);
                }
                return (Fate::Held, retries, Some(err));
            }
            Err(err) if err.transient() => {
                if !matches!(err, StripeError::Status { status: 429, .. }) {
                    down.store(true, Ordering::Relaxed);
                }
                let wait = err.retry_after().unwrap_or_else(|| backoff.next_delay());
                retries += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return (Fate::Held, retries, Some(err)),
                }
            }
            Err(err) => {
                let message = err.to_string();
                return (Fate::Parked("refused by Stripe".into(), message), retries, Some(err));
            }
        }
    }
}
